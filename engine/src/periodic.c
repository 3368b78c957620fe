/*
 * periodic.c: periodic jobs with lease rows.
 *
 * The lease is taken with one statement that inserts the row, or takes it
 * over only when it has expired, and says whether we got it. It works the
 * same on Postgres and CockroachDB (no advisory locks).
 */
#include "loom/periodic.h"
#include "loom/retention.h"
#include "loom/task_runner.h"
#include "loom/clock.h"
#include "loom/log.h"
#include "loom/mem.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

struct loom_job_ctx {
    loom_periodic_t *p;
    const loom_periodic_def_t *def;
};

struct loom_periodic {
    loom_periodic_opts_t opts;
    loom_periodic_def_t *jobs; /* the caller's, then the engine's own */
    int64_t *interval_ms;      /* per job */
    atomic_llong *runs;        /* per job */
    int64_t *next_try;         /* per job, mono ms */
    pthread_t thread;
    atomic_int stop;
};

static const loom_db_stmt_t stmt_lease = {
    "loom_leases_take",
    "INSERT INTO loom_leases (name, holder, acquired_at, expires_at) "
    "VALUES ($1, $2, now(), now() + $3::bigint * interval '1 millisecond') "
    "ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, acquired_at = now(), "
    "expires_at = EXCLUDED.expires_at WHERE loom_leases.expires_at <= now() "
    "RETURNING holder",
    3};

typedef struct lease_arg {
    const char *name, *holder;
    int64_t ttl_ms;
    int got;
} lease_arg_t;

static int lease_body(loom_db_t *db, void *arg, loom_error_t *err)
{
    lease_arg_t *a = arg;
    char ttl[32];
    snprintf(ttl, sizeof(ttl), "%lld", (long long)a->ttl_ms);
    const char *p[] = {a->name, a->holder, ttl};
    PGresult *res = NULL;
    int rc = loom_db_exec(db, &stmt_lease, p, &res, err);
    if (rc == 0) {
        a->got = PQntuples(res) > 0;
        PQclear(res);
    }
    return rc;
}

int loom_lease_try(loom_db_pool_t *pool, const char *name, const char *holder, int64_t ttl_ms,
                   loom_error_t *err)
{
    lease_arg_t a = {name, holder, ttl_ms, 0};
    loom_tx_opts_t o = {.max_attempts = 3};
    int rc = loom_tx_run(pool, &o, lease_body, &a, err);
    return rc != 0 ? rc : a.got;
}

const loom_config_t *loom_job_config(const loom_job_ctx_t *ctx)
{
    return ctx->p->opts.cfg;
}

loom_db_pool_t *loom_job_pool(const loom_job_ctx_t *ctx)
{
    return ctx->p->opts.pool;
}

bool loom_job_stopping(const loom_job_ctx_t *ctx)
{
    return atomic_load(&ctx->p->stop) != 0;
}

int loom_job_publish(loom_job_ctx_t *ctx, const char *type, const char *key, json_t *data,
                     loom_error_t *err)
{
    return loom_command_publish(ctx->p->opts.producer, ctx->p->opts.cfg, type, key, data, err);
}

static void *periodic_run(void *arg)
{
    loom_periodic_t *p = arg;
    const char *holder = p->opts.cfg ? p->opts.cfg->node_id : "node";
    while (!atomic_load(&p->stop)) {
        int64_t now = loom_mono_ms();
        for (size_t i = 0; i < p->opts.n_jobs && !atomic_load(&p->stop); i++) {
            if (now < p->next_try[i])
                continue;
            const loom_periodic_def_t *def = &p->opts.jobs[i];
            loom_error_t err;
            int got = loom_lease_try(p->opts.pool, def->name, holder, p->interval_ms[i], &err);
            if (got < 0) {
                LOOM_WARN("could not take job lease", "job=%s error=%s", def->name, err.message);
                p->next_try[i] = now + p->opts.tick_ms;
                continue;
            }
            if (got == 0) { /* another node runs it this interval */
                p->next_try[i] = now + p->opts.tick_ms;
                continue;
            }
            loom_job_ctx_t ctx = {p, def};
            int64_t t0 = loom_mono_ms();
            int rc = def->fn(&ctx, &err);
            atomic_fetch_add(&p->runs[i], 1);
            if (rc != 0)
                LOOM_WARN("periodic job failed", "job=%s error=%s", def->name, err.message);
            else
                LOOM_DEBUG("periodic job ran", "job=%s ms=%lld", def->name,
                           (long long)(loom_mono_ms() - t0));
            /* We hold the lease for one interval: try again when it ends. */
            p->next_try[i] = now + p->interval_ms[i];
        }
        for (int64_t t = 0; t < p->opts.tick_ms && !atomic_load(&p->stop); t += 50)
            loom_sleep_ms(50);
    }
    return NULL;
}

int loom_periodic_start(const loom_periodic_opts_t *opts, loom_periodic_t **out, loom_error_t *err)
{
    loom_periodic_t *p = loom_xcalloc(1, sizeof(*p));
    p->opts = *opts;
    if (p->opts.tick_ms <= 0)
        p->opts.tick_ms = 1000;
    /* The engine's own job: deleting old rows of loom_commands, when
     * LOOM_COMMANDS_RETENTION asks for it. */
    size_t n = opts->n_jobs;
    p->jobs = loom_xcalloc(n + 1, sizeof(*p->jobs));
    for (size_t i = 0; i < n; i++)
        p->jobs[i] = opts->jobs[i];
    if (loom_retention_ms(opts->cfg) > 0)
        p->jobs[n++] = loom_retention_job;
    p->opts.jobs = p->jobs;
    p->opts.n_jobs = n;
    p->interval_ms = loom_xcalloc(n + 1, sizeof(*p->interval_ms));
    p->runs = loom_xcalloc(n + 1, sizeof(*p->runs));
    p->next_try = loom_xcalloc(n + 1, sizeof(*p->next_try));
    for (size_t i = 0; i < n; i++) {
        const loom_periodic_def_t *d = &p->jobs[i];
        p->interval_ms[i] = d->default_interval_ms > 0 ? d->default_interval_ms : 60000;
        const loom_config_value_t *v =
            d->interval_var && opts->cfg ? loom_config_get(opts->cfg, d->interval_var) : NULL;
        if (v && v->raw && v->num > 0)
            p->interval_ms[i] = v->num;
    }
    if (pthread_create(&p->thread, NULL, periodic_run, p) != 0) {
        free(p->interval_ms);
        free(p->runs);
        free(p->next_try);
        free(p->jobs);
        free(p);
        return loom_error_set(err, LOOM_CODE_INTERNAL, "could not start the periodic jobs");
    }
    *out = p;
    return 0;
}

void loom_periodic_stop(loom_periodic_t *p)
{
    if (!p)
        return;
    atomic_store(&p->stop, 1);
    pthread_join(p->thread, NULL);
    free(p->interval_ms);
    free(p->runs);
    free(p->next_try);
    free(p->jobs);
    free(p);
}

int64_t loom_periodic_runs(loom_periodic_t *p, const char *name)
{
    for (size_t i = 0; i < p->opts.n_jobs; i++)
        if (strcmp(p->opts.jobs[i].name, name) == 0)
            return atomic_load(&p->runs[i]);
    return 0;
}
