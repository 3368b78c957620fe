/*
 * probe_job.c: the periodic job "registry.probe" (every
 * LOOM_REGISTRY_PROBE_INTERVAL, on one node at a time): reads the instances
 * page by page in read-only transactions, probes each page (probe.c) and
 * publishes what changed. Writes still go through the consumer:
 *   - one registry.instance_status command per instance whose status
 *     changed (Kafka key = the instance id, so it is applied in order with
 *     the instance's other commands), carrying the time it was checked;
 *   - one registry.instance_heartbeats command per page for the instances
 *     found healthy that were healthy already, so last_heartbeat stays the
 *     time of the last successful probe without a command per instance.
 *
 * The read model lags the commands by however long the consumer takes, so
 * the job remembers what it published (memo below) until the read model
 * shows it: a run that starts before the last run's commands were applied
 * does not publish the same change again.
 *
 * An instance whose address is outside LOOM_REGISTRY_PROBE_ALLOW (probe.c)
 * is not connected to: its status becomes not_probed, with the reason.
 *
 * Reads run in READ ONLY transactions on the process's pool (loom_job_pool).
 */
#include "registry.h"
#include "../../ops/registry/model.h"

#include "loom/clock.h"
#include "loom/db.h"
#include "loom/log.h"
#include "loom/mem.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>

#define PAGE 2000

typedef struct row {
    char id[REGISTRY_INSTANCE_ID_LEN + 8];
    char host[REGISTRY_HOST_MAX + 1];
    char status[16];
} row_t;

typedef struct page {
    long long after; /* seq to read after */
    row_t *rows;
    registry_probe_t *probes;
    size_t n;
    long long last_seq;
} page_t;

static const loom_db_stmt_t stmt_page = {
    "registry_probe_page",
    "SELECT seq, id, host, port, status FROM registry_instances WHERE seq > $1::BIGINT "
    "ORDER BY seq LIMIT 2000",
    1};

static int read_page(loom_db_t *db, void *arg, loom_error_t *err)
{
    page_t *pg = arg;
    char after[32];
    snprintf(after, sizeof(after), "%lld", pg->after);
    const char *p[] = {after};
    PGresult *res = NULL;
    int rc = loom_db_exec(db, &stmt_page, p, &res, err);
    if (rc != 0)
        return rc;
    pg->n = (size_t)PQntuples(res);
    for (size_t i = 0; i < pg->n; i++) {
        int r = (int)i;
        row_t *row = &pg->rows[i];
        snprintf(row->id, sizeof(row->id), "%s", PQgetvalue(res, r, 1));
        snprintf(row->host, sizeof(row->host), "%s", PQgetvalue(res, r, 2));
        snprintf(row->status, sizeof(row->status), "%s", PQgetvalue(res, r, 4));
        memset(&pg->probes[i], 0, sizeof(pg->probes[i]));
        pg->probes[i].host = row->host;
        pg->probes[i].port = atoi(PQgetvalue(res, r, 3));
        pg->last_seq = atoll(PQgetvalue(res, r, 0));
    }
    PQclear(res);
    return 0;
}

/* ---- what this process published and the read model may not show yet ---------------- */

#define MEMO_BUCKETS 4096
#define MEMO_TTL_MS  (10 * 60 * 1000) /* after that, a lost or rejected command is forgotten */

typedef struct memo {
    struct memo *next;
    char id[REGISTRY_INSTANCE_ID_LEN + 8];
    const char *status; /* static string */
    int64_t at_ms;
} memo_t;

static pthread_mutex_t memo_mu = PTHREAD_MUTEX_INITIALIZER;
static memo_t *memo[MEMO_BUCKETS];

static memo_t **memo_slot(const char *id)
{
    uint32_t h = 2166136261u;
    for (const char *c = id; *c; c++)
        h = (h ^ (unsigned char)*c) * 16777619u;
    memo_t **pp = &memo[h % MEMO_BUCKETS];
    while (*pp && strcmp((*pp)->id, id) != 0)
        pp = &(*pp)->next;
    return pp;
}

/* The status instance id had for the job: what it last published while the
 * read model does not show that yet, else what the read model shows. */
static const char *memo_effective(const char *id, const char *stored, int64_t now)
{
    pthread_mutex_lock(&memo_mu);
    memo_t **pp = memo_slot(id);
    const char *status = stored;
    if (*pp && (strcmp((*pp)->status, stored) == 0 || now - (*pp)->at_ms > MEMO_TTL_MS)) {
        memo_t *gone = *pp; /* applied (or too old to trust): the read model decides */
        *pp = gone->next;
        free(gone);
    } else if (*pp) {
        status = (*pp)->status;
    }
    pthread_mutex_unlock(&memo_mu);
    return status;
}

static void memo_put(const char *id, const char *status, int64_t now)
{
    pthread_mutex_lock(&memo_mu);
    memo_t **pp = memo_slot(id);
    if (!*pp) {
        *pp = loom_xcalloc(1, sizeof(memo_t));
        snprintf((*pp)->id, sizeof((*pp)->id), "%s", id);
    }
    (*pp)->status = status;
    (*pp)->at_ms = now;
    pthread_mutex_unlock(&memo_mu);
}

static const char *cfg_str(const loom_config_t *cfg, const char *name, const char *def)
{
    const loom_config_value_t *v = cfg ? loom_config_get(cfg, name) : NULL;
    return v && v->raw ? v->raw : def;
}

static int64_t cfg_num(const loom_config_t *cfg, const char *name, int64_t def)
{
    const loom_config_value_t *v = cfg ? loom_config_get(cfg, name) : NULL;
    return v && v->raw && v->num > 0 ? v->num : def;
}

int registry_probe_job(loom_job_ctx_t *ctx, loom_error_t *err)
{
    const loom_config_t *cfg = loom_job_config(ctx);
    loom_db_pool_t *pool = loom_job_pool(ctx);
    registry_probe_opts_t po = {
        .timeout_ms = cfg_num(cfg, "LOOM_REGISTRY_PROBE_TIMEOUT", REGISTRY_PROBE_TIMEOUT_MS),
        .degraded_ms =
            cfg_num(cfg, "LOOM_REGISTRY_PROBE_DEGRADED_AFTER", REGISTRY_PROBE_DEGRADED_MS),
        .max_in_flight =
            (int)cfg_num(cfg, "LOOM_REGISTRY_PROBE_CONCURRENCY", REGISTRY_PROBE_MAX_IN_FLIGHT)};
    /* Checked at start (loom_config_load), so a parse error here is a bug. */
    registry_probe_allow_t *allow = NULL;
    int rc = registry_probe_allow_parse(
        cfg_str(cfg, "LOOM_REGISTRY_PROBE_ALLOW", REGISTRY_PROBE_ALLOW_DEFAULT), &allow, err);
    if (rc != 0)
        return rc;
    po.allow = allow;

    page_t pg = {.rows = loom_xcalloc(PAGE, sizeof(row_t)),
                 .probes = loom_xcalloc(PAGE, sizeof(registry_probe_t))};
    size_t total = 0, changed = 0, beats = 0, failed = 0;
    int64_t t0 = loom_mono_ms();
    int peak = 0;
    for (;;) {
        loom_tx_opts_t to = {.read_only = true, .max_attempts = 3};
        if ((rc = loom_tx_run(pool, &to, read_page, &pg, err)) != 0 || pg.n == 0)
            break;
        if ((rc = registry_probe_run(pg.probes, pg.n, &po, err)) != 0)
            break;
        if (po.peak_in_flight > peak)
            peak = po.peak_in_flight;
        total += pg.n;
        char at[40];
        loom_rfc3339_format(loom_now_us(), at, sizeof(at));
        json_t *healthy = json_array();
        for (size_t i = 0; i < pg.n; i++) {
            registry_probe_t *p = &pg.probes[i];
            if (!p->status) /* could not probe (local shortage): keep the status */
                continue;
            const char *was = memo_effective(pg.rows[i].id, pg.rows[i].status, loom_mono_ms());
            if (strcmp(p->status, was) == 0) {
                if (strcmp(p->status, "healthy") == 0)
                    json_array_append_new(healthy, json_string(pg.rows[i].id));
                continue;
            }
            json_t *data = json_pack("{s:s, s:s, s:s}", "id", pg.rows[i].id, "status", p->status,
                                     "checked_at", at);
            if (p->details[0])
                json_object_set_new(data, "details", json_string(p->details));
            if (p->connect_ms >= 0)
                json_object_set_new(data, "connect_ms", json_integer(p->connect_ms));
            loom_error_t perr;
            if (loom_job_publish(ctx, "registry.instance_status", pg.rows[i].id, data, &perr) !=
                0) {
                failed++;
                LOOM_WARN("could not publish an instance status", "instance=%s error=%s",
                          pg.rows[i].id, perr.message);
            } else {
                memo_put(pg.rows[i].id, p->status, loom_mono_ms());
                changed++;
            }
        }
        if (json_array_size(healthy) > 0) {
            beats += json_array_size(healthy);
            loom_error_t perr;
            if (loom_job_publish(ctx, "registry.instance_heartbeats", NULL,
                                 json_pack("{s:o, s:s}", "ids", healthy, "at", at), &perr) != 0)
                LOOM_WARN("could not publish instance heartbeats", "error=%s", perr.message);
        } else {
            json_decref(healthy);
        }
        if (pg.n < PAGE)
            break;
        pg.after = pg.last_seq;
    }
    free(pg.rows);
    free(pg.probes);
    registry_probe_allow_free(allow);
    if (rc == 0 && failed > 0)
        rc = loom_error_set(err, LOOM_CODE_BROKER_UNAVAILABLE,
                            "%zu instance statuses could not be published", failed);
    LOOM_INFO("registry probe ran",
              "instances=%zu changed=%zu heartbeats=%zu peak_in_flight=%d ms=%lld", total, changed,
              beats, peak, (long long)(loom_mono_ms() - t0));
    return rc;
}
