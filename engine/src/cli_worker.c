/*
 * cli_worker.c: `loom worker`, the monolith-worker: every consumer of the
 * app and the outbox relay, until SIGTERM/SIGINT, then a graceful stop.
 *
 * It serves /healthz, /readyz and /metrics on LOOM_WORKER_LISTEN with the
 * engine's HTTP server core (http.c). Readiness is checked by a thread of its
 * own, once a second, on a connection of its own: the database must take a
 * read-write transaction and Kafka must answer a metadata request. Requests
 * only read the last result, so a hung check never holds the event loop; a
 * check that has not answered for a few seconds counts as failed.
 */
#include "cli.h"
#include "loom/bus.h"
#include "loom/clock.h"
#include "loom/http.h"
#include "loom/log.h"
#include "loom/node.h"
#include "loom/periodic.h"
#include "loom/retention.h"
#include "loom/consumer.h"
#include "loom/mem.h"
#include "loom/worker.h"

#include <jansson.h>
#include <malloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void cli_block_signals(sigset_t *set)
{
    sigemptyset(set);
    sigaddset(set, SIGINT);
    sigaddset(set, SIGTERM);
    sigaddset(set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, set, NULL);
}

int cli_need_brokers(cli_ctx_t *ctx, const char *cmd)
{
    if (ctx->cfg.kafka_brokers)
        return 0;
    fprintf(stderr,
            "loom %s: LOOM_KAFKA_BROKERS is not set (or run 'loom dev', which embeds Kafka)\n",
            cmd);
    return LOOM_EXIT_CONFIG;
}

static json_t *worker_report(void *worker)
{
    return loom_worker_report(worker);
}

/* LOOM_COMMANDS_RETENTION, when set, must cover what every topic the
 * consumers read may still hold (loom/retention.h): refused otherwise. */
static int check_retention(cli_ctx_t *ctx, const char *cmd, loom_producer_t *producer)
{
    int64_t keep = loom_retention_ms(&ctx->cfg);
    if (keep <= 0)
        return 0;
    if (!producer) {
        cli_fail(cmd, "LOOM_COMMANDS_RETENTION is set but there is no Kafka client to read the "
                      "topics' retention with");
        return LOOM_EXIT_CONFIG;
    }
    enum { per_consumer = 64 };
    char(*mine)[LOOM_TOPIC_MAX] = loom_xcalloc(per_consumer, sizeof(*mine));
    size_t cap = per_consumer * (ctx->app->n_consumers + 1), n = 0;
    char **topics = loom_xcalloc(cap, sizeof(*topics));
    for (size_t i = 0; i < ctx->app->n_consumers; i++) {
        size_t k = loom_consumer_topics(&ctx->app->consumers[i], mine, per_consumer);
        for (size_t j = 0; j < k && j < per_consumer; j++) {
            bool seen = false;
            for (size_t m = 0; m < n && !seen; m++)
                seen = strcmp(topics[m], mine[j]) == 0;
            if (!seen)
                topics[n++] = loom_xstrdup(mine[j]);
        }
    }
    loom_error_t err;
    int rc = loom_retention_check_topics(loom_producer_handle(producer),
                                         (const char *const *)topics, n, keep, 15000, &err);
    for (size_t i = 0; i < n; i++)
        free(topics[i]);
    free(topics);
    free(mine);
    if (rc != 0) {
        cli_fail(cmd, "%s", err.message);
        return LOOM_EXIT_CONFIG;
    }
    char text[32];
    loom_duration_format(keep, text, sizeof(text));
    LOOM_INFO("deleting old rows of loom_commands", "retention=%s topics_checked=%zu", text, n);
    return 0;
}

int cli_worker_parts_start(cli_ctx_t *ctx, const char *cmd, const char *brokers,
                           loom_db_pool_t *pool, loom_producer_t *producer, loom_metrics_t *metrics,
                           const char *role, const char *url, cli_worker_parts_t *parts)
{
    memset(parts, 0, sizeof(*parts));
    int crc = check_retention(ctx, cmd, producer);
    if (crc != 0)
        return crc;
    if (metrics)
        loom_retention_job_metric(loom_metrics_counter(
            metrics, "loom_commands_deleted_total",
            "Rows of loom_commands deleted by LOOM_COMMANDS_RETENTION.", NULL));
    loom_error_t err;
    loom_node_opts_t nopts = {.pool = pool,
                              .id = ctx->cfg.node_id,
                              .role = role,
                              .url = url,
                              .site = ctx->cfg.site_name,
                              .version = ctx->app->version};
    if (loom_node_start(&nopts, &parts->node, &err) != 0)
        return cli_fail(cmd, "could not write this node's heartbeat: %s", err.message);
    loom_worker_opts_t wopts = {.brokers = brokers,
                                .cfg = &ctx->cfg,
                                .pool = pool,
                                .consumers = ctx->app->consumers,
                                .n_consumers = ctx->app->n_consumers,
                                .producer = producer,
                                .metrics = metrics};
    if (loom_worker_start(&wopts, &parts->worker, &err) != 0) {
        cli_worker_parts_stop(parts);
        return cli_fail(cmd, "%s", err.message);
    }
    loom_node_set_report(parts->node, worker_report, parts->worker);
    loom_periodic_opts_t popts = {.jobs = ctx->app->jobs,
                                  .n_jobs = ctx->app->n_jobs,
                                  .pool = pool,
                                  .producer = producer,
                                  .cfg = &ctx->cfg};
    if (loom_periodic_start(&popts, &parts->periodic, &err) != 0) {
        cli_worker_parts_stop(parts);
        return cli_fail(cmd, "%s", err.message);
    }
    if (cli_worker_tasks_start(ctx, pool, producer, parts, &err) != 0) {
        cli_worker_parts_stop(parts);
        return cli_fail(cmd, "%s", err.message);
    }
    for (size_t i = 0; i < ctx->app->n_consumers; i++)
        LOOM_INFO("running consumer", "consumer=%s", ctx->app->consumers[i].name);
    for (size_t i = 0; i < ctx->app->n_jobs; i++)
        LOOM_INFO("running periodic job", "job=%s", ctx->app->jobs[i].name);
    return 0;
}

void cli_worker_parts_stop(cli_worker_parts_t *parts)
{
    loom_tasks_stop(parts->tasks);
    loom_periodic_stop(parts->periodic);
    loom_node_set_report(parts->node, NULL, NULL);
    if (parts->worker) {
        loom_worker_stats_t st;
        loom_worker_stop(parts->worker);
        loom_worker_stats(parts->worker, &st);
        LOOM_INFO("worker exited cleanly", "applied=%lld rejected=%lld relayed=%lld",
                  (long long)st.applied, (long long)st.rejected, (long long)st.relayed);
        loom_worker_free(parts->worker);
    }
    loom_node_stop(parts->node);
    memset(parts, 0, sizeof(*parts));
}

/* ---- /healthz, /readyz, /metrics --------------------------------------------------- */

/* How often readiness is checked, and how long a check may take before the
 * process counts as not ready. */
#define STATUS_CHECK_EVERY_MS 1000
#define STATUS_CHECK_STALE_MS 5000
#define STATUS_KAFKA_TIMEOUT  2000

typedef struct worker_status {
    loom_http_server_t *http;
    loom_metrics_t *metrics;
    loom_db_pool_t *pool; /* one connection, for the checks only */
    loom_producer_t *producer;
    loom_metrics_family_t *m_ready; /* loom_ready{check} */
    pthread_t thread;
    bool thread_started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool quit;
    bool stopping;       /* shutdown began: not ready */
    bool checked;        /* a check has finished */
    int64_t check_began; /* mono ms; 0 when no check is running */
    bool db_ok, kafka_ok;
    char db[200], kafka[200];
    loom_worker_t *worker; /* set while the worker runs: trimmed when idle */
    long long last_done;   /* commands and outbox messages handled at the last check */
    bool trimmed;          /* nothing was handled since the last trim */
} worker_status_t;

static void status_check_db(worker_status_t *st, bool *ok, char *msg, size_t size)
{
    loom_db_t *db = NULL;
    loom_error_t err;
    PGresult *res = NULL;
    int rc = loom_db_acquire(st->pool, &db, &err);
    /* A worker needs a primary: a standby (or a read-only node) answers
     * SELECT but refuses every write. */
    if (rc == 0)
        rc = loom_db_query(db, "SHOW transaction_read_only", 0, NULL, &res, &err);
    if (db)
        loom_db_release(db);
    if (rc != 0) {
        *ok = false;
        snprintf(msg, size, "%s", err.message);
    } else if (PQntuples(res) == 1 && strcmp(PQgetvalue(res, 0, 0), "off") == 0) {
        *ok = true;
        snprintf(msg, size, "ok");
    } else {
        *ok = false;
        snprintf(msg, size, "the database is read-only (a standby?)");
    }
    PQclear(res);
}

static void status_check_kafka(worker_status_t *st, bool *ok, char *msg, size_t size)
{
    const struct rd_kafka_metadata *md = NULL;
    rd_kafka_resp_err_t e =
        rd_kafka_metadata(loom_producer_handle(st->producer), 0, NULL, &md, STATUS_KAFKA_TIMEOUT);
    if (md)
        rd_kafka_metadata_destroy(md);
    *ok = e == RD_KAFKA_RESP_ERR_NO_ERROR;
    snprintf(msg, size, "%s", *ok ? "ok" : rd_kafka_err2str(e));
}

/* Gives the allocator's free memory back to the system once the worker is
 * idle (nothing handled for a whole check interval) after it handled
 * something: what a backlog needed is not kept resident afterwards. Called
 * with st->mu held. */
static void status_trim_when_idle(worker_status_t *st)
{
    if (!st->worker)
        return;
    loom_worker_stats_t s;
    loom_worker_stats(st->worker, &s);
    long long done = s.applied + s.skipped + s.rejected + s.relayed + s.retries + s.expired;
    if (done != st->last_done) {
        st->last_done = done;
        st->trimmed = false;
        return;
    }
    if (!st->trimmed) {
        malloc_trim(0);
        st->trimmed = true;
    }
}

static void *status_thread(void *arg)
{
    worker_status_t *st = arg;
    pthread_mutex_lock(&st->mu);
    while (!st->quit) {
        st->check_began = loom_mono_ms();
        pthread_mutex_unlock(&st->mu);
        bool db_ok, kafka_ok;
        char db[200], kafka[200];
        status_check_db(st, &db_ok, db, sizeof(db));
        status_check_kafka(st, &kafka_ok, kafka, sizeof(kafka));
        pthread_mutex_lock(&st->mu);
        if (st->checked && (db_ok != st->db_ok || kafka_ok != st->kafka_ok)) {
            if (db_ok && kafka_ok)
                LOOM_INFO("ready again", "database=%s kafka=%s", db, kafka);
            else
                LOOM_WARN("not ready", "database=%s kafka=%s", db, kafka);
        }
        st->db_ok = db_ok;
        st->kafka_ok = kafka_ok;
        snprintf(st->db, sizeof(st->db), "%s", db);
        snprintf(st->kafka, sizeof(st->kafka), "%s", kafka);
        st->checked = true;
        st->check_began = 0;
        const char *d[] = {"database"}, *k[] = {"kafka"};
        loom_metrics_gauge_set(st->m_ready, d, db_ok);
        loom_metrics_gauge_set(st->m_ready, k, kafka_ok);
        status_trim_when_idle(st);
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += STATUS_CHECK_EVERY_MS / 1000;
        while (!st->quit && pthread_cond_timedwait(&st->cv, &st->mu, &until) == 0)
            ;
    }
    pthread_mutex_unlock(&st->mu);
    return NULL;
}

static void status_reply(loom_http_res_t *res, int status, json_t *body)
{
    char *text = json_dumps(body, JSON_COMPACT);
    json_decref(body);
    loom_http_res_status(res, status);
    loom_http_res_header(res, "Content-Type", "application/json");
    if (status == 503)
        loom_http_res_header(res, "Retry-After", "1");
    loom_http_res_body_take(res, text, strlen(text));
    loom_http_res_send(res);
}

static void status_readyz(worker_status_t *st, loom_http_res_t *res)
{
    pthread_mutex_lock(&st->mu);
    bool stopping = st->stopping, checked = st->checked;
    bool hung = st->check_began && loom_mono_ms() - st->check_began > STATUS_CHECK_STALE_MS;
    bool ok = checked && !hung && st->db_ok && st->kafka_ok;
    char db[200], kafka[200];
    snprintf(db, sizeof(db), "%s", st->db);
    snprintf(kafka, sizeof(kafka), "%s", st->kafka);
    pthread_mutex_unlock(&st->mu);
    if (stopping) {
        status_reply(res, 503, json_pack("{s:s}", "status", "shutting_down"));
        return;
    }
    if (!checked)
        snprintf(db, sizeof(db), "%s", "not checked yet");
    if (hung)
        snprintf(db, sizeof(db), "the checks did not answer within %d s",
                 STATUS_CHECK_STALE_MS / 1000);
    status_reply(res, ok ? 200 : 503,
                 json_pack("{s:s, s:{s:s, s:s}}", "status", ok ? "ready" : "not_ready", "checks",
                           "database", db, "kafka", checked ? kafka : "not checked yet"));
}

static void status_handle(loom_http_req_t *req, loom_http_res_t *res, void *opaque)
{
    worker_status_t *st = opaque;
    const char *path = loom_http_req_path(req);
    const char *method = loom_http_req_method(req);
    bool known = strcmp(path, "/healthz") == 0 || strcmp(path, "/readyz") == 0 ||
                 strcmp(path, "/metrics") == 0;
    if (!known) {
        status_reply(res, 404,
                     json_pack("{s:s, s:s}", "code", "NOT_FOUND", "message",
                               "this worker serves /healthz, /readyz and /metrics"));
        return;
    }
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        loom_http_res_header(res, "Allow", "GET, HEAD");
        status_reply(res, 405,
                     json_pack("{s:s, s:s}", "code", "METHOD_NOT_ALLOWED", "message", "use GET"));
        return;
    }
    if (strcmp(path, "/healthz") == 0) {
        status_reply(res, 200, json_pack("{s:s}", "status", "ok"));
    } else if (strcmp(path, "/readyz") == 0) {
        status_readyz(st, res);
    } else {
        size_t len = 0;
        char *text = loom_metrics_render_string(st->metrics, &len);
        loom_http_res_status(res, 200);
        loom_http_res_header(res, "Content-Type", LOOM_METRICS_CONTENT_TYPE);
        loom_http_res_body_take(res, text, len);
        loom_http_res_send(res);
    }
}

static int status_start(cli_ctx_t *ctx, const char *cmd, const char *listen,
                        loom_metrics_t *metrics, loom_producer_t *producer, worker_status_t *st)
{
    memset(st, 0, sizeof(*st));
    st->metrics = metrics;
    st->producer = producer;
    pthread_mutex_init(&st->mu, NULL);
    pthread_cond_init(&st->cv, NULL);
    snprintf(st->db, sizeof(st->db), "not checked yet");
    snprintf(st->kafka, sizeof(st->kafka), "not checked yet");
    st->m_ready = loom_metrics_gauge(metrics, "loom_ready",
                                     "1 while this process reaches what it depends on (check: "
                                     "database, kafka), else 0; /readyz answers 503 then.",
                                     (const char *const[]){"check", NULL});
    loom_error_t err;
    loom_db_pool_opts_t po = {.size = 1, .application_name = "loom worker readyz"};
    if (loom_db_pool_new(ctx->cfg.database_url, &po, &st->pool, &err) != 0)
        return cli_fail(cmd, "%s", err.message);
    loom_http_opts_t ho = {.listen = listen,
                           .threads = 1,
                           .limits = {.max_body = 1024, .max_connections = 256},
                           .handler = status_handle,
                           .opaque = st};
    if (loom_http_server_start(&ho, &st->http, &err) != 0)
        return cli_fail(cmd, "LOOM_WORKER_LISTEN: %s", err.message);
    if (pthread_create(&st->thread, NULL, status_thread, st) != 0)
        return cli_fail(cmd, "could not start the readiness checks");
    st->thread_started = true;
    for (size_t i = 0; i < loom_http_server_naddrs(st->http); i++) {
        printf("loom %s: /healthz, /readyz and /metrics on http://%s\n", cmd,
               loom_http_server_addr(st->http, i));
        LOOM_INFO("serving health and metrics", "addr=http://%s",
                  loom_http_server_addr(st->http, i));
    }
    fflush(stdout);
    return 0;
}

/* Shutdown began: /readyz says 503 from now on; the server keeps answering
 * (and /metrics keeps counting) until status_stop(). */
static void status_draining(worker_status_t *st)
{
    pthread_mutex_lock(&st->mu);
    st->stopping = true;
    pthread_mutex_unlock(&st->mu);
}

static void status_stop(worker_status_t *st)
{
    if (st->thread_started) {
        pthread_mutex_lock(&st->mu);
        st->quit = true;
        pthread_cond_broadcast(&st->cv);
        pthread_mutex_unlock(&st->mu);
        pthread_join(st->thread, NULL);
    }
    loom_http_server_free(st->http);
    loom_db_pool_free(st->pool);
    pthread_mutex_destroy(&st->mu);
    pthread_cond_destroy(&st->cv);
    memset(st, 0, sizeof(*st));
}

static int cmd_worker(cli_ctx_t *ctx, int argc, char **argv)
{
    if (argc > 1)
        return cli_usage_error("worker", "%s '%s'",
                               argv[1][0] == '-' ? "unknown option" : "unexpected argument",
                               argv[1]);
    int rc = cli_need_brokers(ctx, "worker");
    if (rc != 0)
        return rc;
    sigset_t sigs;
    cli_block_signals(&sigs);
    /* Bound the allocator before any thread starts: glibc gives each
     * thread that meets a locked arena a new one (up to 8 a core), and
     * memory freed in one arena is not reused by another, so under a
     * backlog the consumer, apply and librdkafka threads would each keep a
     * peak of their own. Two arenas keep contention low with the few
     * threads that allocate often. A fixed mmap threshold keeps large
     * buffers (fetch responses, batches) in mappings of their own, given
     * back when freed, instead of letting glibc raise the threshold and
     * fragment the heap with them. MALLOC_ARENA_MAX in the environment
     * wins. */
    if (!getenv("MALLOC_ARENA_MAX"))
        mallopt(M_ARENA_MAX, 2);
    if (!getenv("MALLOC_MMAP_THRESHOLD_"))
        mallopt(M_MMAP_THRESHOLD, 256 * 1024);

    loom_db_pool_t *pool = NULL;
    rc = cli_open_db(ctx, "worker", (int)ctx->app->n_consumers * ctx->cfg.worker_apply_threads + 4,
                     &pool);
    if (rc != 0)
        return rc;
    loom_error_t err;
    loom_producer_t *producer = NULL;
    loom_producer_opts_t popts = {.brokers = ctx->cfg.kafka_brokers,
                                  .cfg = &ctx->cfg,
                                  .flush_timeout_ms = ctx->cfg.shutdown_timeout_ms};
    if (loom_producer_new(&popts, &producer, &err) != 0) {
        loom_db_pool_free(pool);
        return cli_fail("worker", "%s", err.message);
    }
    loom_metrics_t *metrics = loom_metrics_new();
    worker_status_t st;
    const loom_config_value_t *listen = loom_config_get(&ctx->cfg, "LOOM_WORKER_LISTEN");
    rc = status_start(ctx, "worker", listen->raw, metrics, producer, &st);
    char url[160] = "";
    if (rc == 0 && st.http)
        snprintf(url, sizeof(url), "http://%s", loom_http_server_addr(st.http, 0));
    cli_worker_parts_t parts;
    if (rc == 0)
        rc = cli_worker_parts_start(ctx, "worker", ctx->cfg.kafka_brokers, pool, producer, metrics,
                                    "worker", url, &parts);
    if (rc == 0) {
        pthread_mutex_lock(&st.mu);
        st.worker = parts.worker;
        pthread_mutex_unlock(&st.mu);
        int sig = 0;
        sigwait(&sigs, &sig);
        LOOM_INFO("shutting down", "signal=%s", strsignal(sig));
        status_draining(&st);
        pthread_mutex_lock(&st.mu);
        st.worker = NULL;
        pthread_mutex_unlock(&st.mu);
        cli_worker_parts_stop(&parts);
    }
    status_stop(&st);
    loom_producer_free(producer);
    loom_metrics_free(metrics);
    loom_db_pool_free(pool);
    return rc;
}

const cli_command_t cli_worker_command = {
    "worker", "apply commands: run every consumer and the outbox relay",
    "usage: loom worker\n"
    "\n"
    "Runs the monolith-worker: every registered consumer, each in its own Kafka\n"
    "consumer group (loom.<consumer>), the outbox relay, the periodic jobs (one\n"
    "node at a time runs each) and this node's heartbeat. Commands of one\n"
    "partition are applied in batches, one database transaction per batch, and\n"
    "the Kafka offset is committed after the database commit. Transient failures\n"
    "are retried forever with backoff, pausing only the failing partition;\n"
    "commands a handler rejects are recorded as rejected (see 'loom commands').\n"
    "Run several workers to share the partitions.\n"
    "\n"
    "endpoints on LOOM_WORKER_LISTEN (default 127.0.0.1:9091; port 0 picks a free\n"
    "one, printed at start), no token:\n"
    "  GET /healthz   the process is up\n"
    "  GET /readyz    the database takes writes and Kafka answers (503 if not,\n"
    "                 and while shutting down)\n"
    "  GET /metrics   Prometheus text: messages by outcome, lag per partition,\n"
    "                 retrying and stalled partitions, outbox, loom_ready\n"
    "\n"
    "SIGTERM or SIGINT stops it gracefully: it stops fetching, finishes and\n"
    "commits the batch in flight, leaves the group and exits 0.\n"
    "\n"
    "Needs LOOM_DATABASE_URL and LOOM_KAFKA_BROKERS.\n",
    true, cmd_worker};
