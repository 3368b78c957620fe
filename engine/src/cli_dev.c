/*
 * cli_dev.c: `loom dev`, Loom on its embedded defaults in one process.
 *
 * Without LOOM_DATABASE_URL it starts a private PostgreSQL under
 * LOOM_DEV_DIR/pg (kept between runs), applies the migrations, prints what it
 * runs and where, and stays up until SIGINT/SIGTERM, then stops Postgres
 * cleanly so nothing is left behind.
 */
#include "cli.h"
#include "loom/clock.h"
#include "loom/log.h"
#include "loom/gateway.h"
#include "loom/metrics.h"
#include "loom/pglocal.h"

#include <errno.h>
#include <pthread.h>
#include <limits.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static int apply_migrations(const char *url, const loom_app_t *app, int *applied)
{
    loom_db_pool_t *pool = NULL;
    loom_db_t *db = NULL;
    loom_error_t err;
    loom_db_pool_opts_t opts = {.size = 1};
    int rc = loom_db_pool_new(url, &opts, &pool, &err);
    if (rc == 0)
        rc = loom_db_acquire(pool, &db, &err);
    if (rc == 0)
        rc = loom_migrate_up(db, &app->migrations, applied, &err);
    loom_db_release(db);
    loom_db_pool_free(pool);
    if (rc != 0)
        return cli_fail("dev", "%s", err.message);
    return 0;
}

/* Ready-to-paste calls of the routes this binary has (those with an
 * example), so a service binary shows its own. */
static void print_examples(const loom_app_t *app, const char *token, const char *api_url)
{
    bool any = false;
    for (size_t i = 0; i < app->n_routes; i++) {
        const loom_route_t *r = &app->routes[i];
        if (!r->example)
            continue;
        if (!any)
            printf("Try it:\n");
        any = true;
        bool body = strcmp(r->method, "GET") != 0 && strcmp(r->method, "DELETE") != 0;
        if (body)
            printf("  curl -s -H 'Authorization: Bearer %s'%s%s \\\n    -d '%s' '%s%s?wait=5s'\n",
                   token, strcmp(r->method, "POST") ? " -X " : "",
                   strcmp(r->method, "POST") ? r->method : "", r->example, api_url, r->pattern);
        else
            printf("  curl -s -H 'Authorization: Bearer %s'%s%s %s%s\n", token,
                   strcmp(r->method, "GET") ? " -X " : "",
                   strcmp(r->method, "GET") ? r->method : "", api_url, r->example);
    }
    if (!any)
        printf("Routes: %zu (see `loom api --help`); ops: `loom op --list`.\n", app->n_routes);
}

/* ---- the embedded broker's limits ------------------------------------------------- */

/*
 * librdkafka's mock cluster keeps at most 5 MiB and 100,000 message sets per
 * partition, and drops the oldest beyond that, consumed or not. A partition
 * whose consumer is held (a command retrying) can so lose the commands
 * behind it. This watcher warns before a partition's backlog (what its
 * consumer group has not committed) reaches those limits.
 */
#define MOCK_MAX_BYTES  (5 * 1024 * 1024)
#define MOCK_MAX_COUNT  100000
#define MOCK_WARN_SHARE 0.6 /* warn at 60% of either */

typedef struct mock_watch {
    cli_ctx_t *ctx;
    const char *brokers;
    atomic_int stop;
    pthread_t thread;
    bool started;
} mock_watch_t;

/* Bytes of partition's messages from `from` to `hi`, read with `rk`;
 * stops early once over `enough`. */
static int64_t backlog_bytes(rd_kafka_t *rk, const char *topic, int32_t part, int64_t from,
                             int64_t hi, int64_t enough)
{
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(l, topic, part)->offset = from;
    rd_kafka_assign(rk, l);
    int64_t bytes = 0, until = loom_mono_ms() + 2000;
    while (bytes < enough && loom_mono_ms() < until) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 100);
        if (!m)
            continue;
        bool last = m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF || m->offset >= hi - 1;
        if (!m->err)
            bytes += (int64_t)(m->len + m->key_len) + 64; /* and the record's overhead */
        rd_kafka_message_destroy(m);
        if (last)
            break;
    }
    rd_kafka_assign(rk, NULL);
    rd_kafka_topic_partition_list_destroy(l);
    return bytes;
}

static rd_kafka_t *watch_client(const char *brokers, const char *group)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    const char *kv[][2] = {{"bootstrap.servers", brokers},
                           {"group.id", group},
                           {"enable.auto.commit", "false"},
                           {"enable.partition.eof", "true"},
                           {"log_level", "3"}};
    for (size_t i = 0; i < sizeof(kv) / sizeof(kv[0]); i++)
        rd_kafka_conf_set(conf, kv[i][0], kv[i][1], NULL, 0);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, NULL, 0);
    if (!rk)
        rd_kafka_conf_destroy(conf);
    return rk;
}

static void *mock_watch_run(void *arg)
{
    mock_watch_t *mw = arg;
    const loom_app_t *app = mw->ctx->app;
    int parts = mw->ctx->cfg.kafka_partitions;
    size_t n_slots = 0;
    for (size_t i = 0; i < app->n_consumers; i++)
        for (const char *const *t = app->consumers[i].topics; t && *t; t++)
            n_slots += (size_t)parts;
    bool *warned = calloc(n_slots ? n_slots : 1, sizeof(bool));
    rd_kafka_t *reader = watch_client(mw->brokers, "loom.dev.limits");
    while (warned && reader && !atomic_load(&mw->stop)) {
        for (int i = 0; i < 20 && !atomic_load(&mw->stop); i++)
            loom_sleep_ms(100);
        size_t slot = 0;
        for (size_t c = 0; c < app->n_consumers && !atomic_load(&mw->stop); c++) {
            /* The worker's group: "loom." + name (loom_worker_opts_t). */
            char group[256];
            snprintf(group, sizeof(group), "loom.%s", app->consumers[c].name);
            rd_kafka_t *rk = watch_client(mw->brokers, group);
            for (const char *const *t = app->consumers[c].topics; rk && t && *t; t++) {
                char topic[256];
                loom_topic_map(*t, topic, sizeof(topic));
                rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(parts);
                for (int p = 0; p < parts; p++)
                    rd_kafka_topic_partition_list_add(l, topic, p);
                if (rd_kafka_committed(rk, l, 1000) != RD_KAFKA_RESP_ERR_NO_ERROR)
                    l->cnt = 0;
                for (int p = 0; p < l->cnt; p++, slot++) {
                    int64_t lo = 0, hi = 0;
                    if (rd_kafka_query_watermark_offsets(rk, topic, p, &lo, &hi, 1000) != 0)
                        continue;
                    int64_t from = l->elems[p].offset >= lo ? l->elems[p].offset : lo;
                    int64_t count = hi - from;
                    int64_t bytes =
                        count > 0 ? backlog_bytes(reader, topic, p, from, hi, MOCK_MAX_BYTES) : 0;
                    bool near = count >= MOCK_WARN_SHARE * MOCK_MAX_COUNT ||
                                bytes >= MOCK_WARN_SHARE * MOCK_MAX_BYTES;
                    if (near && !warned[slot])
                        LOOM_WARN("embedded kafka: a partition's backlog nears what the mock "
                                  "broker keeps; beyond it the oldest messages are dropped",
                                  "topic=%s partition=%d backlog_messages=%lld "
                                  "backlog_bytes=%lld limit_bytes=%d limit_messages=%d "
                                  "hint=see loom commands list --stuck; use a real Kafka "
                                  "(LOOM_KAFKA_BROKERS) for large backlogs",
                                  topic, p, (long long)count, (long long)bytes, MOCK_MAX_BYTES,
                                  MOCK_MAX_COUNT);
                    warned[slot] = near || (warned[slot] && bytes >= MOCK_MAX_BYTES / 4);
                }
                slot += (size_t)(parts - l->cnt);
                rd_kafka_topic_partition_list_destroy(l);
            }
            if (rk) {
                rd_kafka_consumer_close(rk);
                rd_kafka_destroy(rk);
            }
        }
    }
    if (reader) {
        rd_kafka_consumer_close(reader);
        rd_kafka_destroy(reader);
    }
    free(warned);
    return NULL;
}

static void mock_watch_start(mock_watch_t *mw, cli_ctx_t *ctx, const char *brokers)
{
    mw->ctx = ctx;
    mw->brokers = brokers;
    atomic_store(&mw->stop, 0);
    mw->started = pthread_create(&mw->thread, NULL, mock_watch_run, mw) == 0;
}

static void mock_watch_stop(mock_watch_t *mw)
{
    atomic_store(&mw->stop, 1);
    if (mw->started)
        pthread_join(mw->thread, NULL);
    mw->started = false;
}

static int cmd_dev(cli_ctx_t *ctx, int argc, char **argv)
{
    if (argc > 1)
        return cli_usage_error("dev", "%s '%s'",
                               argv[1][0] == '-' ? "unknown option" : "unexpected argument",
                               argv[1]);
    /* Signals are taken with sigwait() below; block them before anything
     * starts a thread or a child so none of them sees one first. */
    sigset_t sigs;
    cli_block_signals(&sigs);

    loom_pglocal_t pg = {.lock_fd = -1};
    const char *url = ctx->cfg.database_url;
    char pgdir[PATH_MAX] = "";
    if (!url) {
        if (mkdir(ctx->cfg.dev_dir, 0755) != 0 && errno != EEXIST)
            return cli_fail("dev", "could not create directory \"%s\": %s", ctx->cfg.dev_dir,
                            strerror(errno));
        char *abs = realpath(ctx->cfg.dev_dir, NULL);
        snprintf(pgdir, sizeof(pgdir), "%s/pg", abs ? abs : ctx->cfg.dev_dir);
        free(abs);
        loom_error_t err;
        LOOM_INFO("starting private postgres", "dir=%s", pgdir);
        if (loom_pglocal_start(&pg, pgdir, NULL, &err) != 0)
            return cli_fail("dev", "%s", err.message);
        url = pg.url;
    }
    int applied = 0;
    int rc = apply_migrations(url, ctx->app, &applied);

    /* Kafka: LOOM_KAFKA_BROKERS, or the embedded mock cluster. */
    rd_kafka_t *mock_owner = NULL;
    rd_kafka_mock_cluster_t *mc = NULL;
    const char *brokers = ctx->cfg.kafka_brokers;
    if (rc == 0 && !brokers) {
        mock_owner = cli_mock_cluster_start(ctx, 1, &mc, &brokers);
        if (!mock_owner)
            rc = cli_fail("dev", "could not start the embedded kafka");
    }
    /* A real broker gets its topics as `loom migrate up` makes them, before
     * any consumer subscribes or any write auto-creates one. */
    char topics_line[512] = "";
    if (rc == 0 && !mock_owner) {
        char *buf = NULL;
        size_t len = 0;
        FILE *mem = open_memstream(&buf, &len);
        if (mem) {
            cli_create_topics(ctx, brokers, mem);
            fclose(mem);
            snprintf(topics_line, sizeof(topics_line), "%s", buf);
            free(buf);
        }
    }
    loom_db_pool_t *pool = NULL;
    loom_producer_t *producer = NULL;
    loom_metrics_t *metrics = loom_metrics_new();
    loom_error_t err;
    if (rc == 0) {
        loom_db_pool_opts_t po = {
            .size = (int)ctx->app->n_consumers * ctx->cfg.worker_apply_threads + 8};
        if (loom_db_pool_new(url, &po, &pool, &err) != 0)
            rc = cli_fail("dev", "%s", err.message);
    }
    if (rc == 0) {
        loom_producer_opts_t popts = {
            .brokers = brokers, .cfg = &ctx->cfg, .flush_timeout_ms = ctx->cfg.shutdown_timeout_ms};
        if (loom_producer_new(&popts, &producer, &err) != 0)
            rc = cli_fail("dev", "%s", err.message);
    }
    /* The gateway: ops on a read-only pool, writes through a producer of its
     * own, started as `loom api` starts it (LOOM_API_* apply). */
    loom_db_pool_t *read_pool = NULL;
    loom_op_table_t *table = loom_op_table_new();
    loom_op_runtime_t rt;
    loom_producer_t *api_producer = NULL;
    loom_gateway_opts_t gopts;
    loom_gateway_t *gw = NULL;
    char token[64] = "", api_url[128] = "";
    if (rc == 0) {
        loom_db_pool_opts_t ro = {
            .size = ctx->cfg.database_pool_size, .read_only = true, .application_name = "loom dev"};
        if (loom_db_pool_new(url, &ro, &read_pool, &err) != 0 ||
            loom_op_table_add(table, ctx->app->ops, ctx->app->n_ops, &err) != 0)
            rc = cli_fail("dev", "%s", err.message);
    }
    if (rc == 0) {
        loom_op_runtime_init(&rt, table, read_pool, metrics);
        if (cli_gateway_producer_new(ctx, brokers, &api_producer, &err) != 0)
            rc = cli_fail("dev", "%s", err.message);
    }
    if (rc == 0) {
        if (cli_gateway_start(ctx, &rt, api_producer, metrics, &gopts, &gw, &err) != 0 ||
            loom_gateway_dev_token(gw, token, sizeof(token)) != 0)
            rc = cli_fail("dev", "%s", err.message);
        else
            snprintf(api_url, sizeof(api_url), "http://%s", loom_gateway_addr(gw, 0));
    }
    cli_worker_parts_t parts = {0};
    bool parts_up = false;
    mock_watch_t mock_watch = {.started = false};
    if (rc == 0) {
        rc = cli_worker_parts_start(ctx, "dev", brokers, pool, producer, metrics, "dev", api_url,
                                    &parts);
        parts_up = rc == 0;
    }
    if (rc == 0) {
        printf("loom dev is up (node %s)\n", ctx->cfg.node_id);
        printf("  api         %s  (/healthz, /readyz, /metrics need no token)\n", api_url);
        printf("  console     %s/console  (paste the token once per browser tab)\n", api_url);
        printf("  token       %s  (development token: every scope)\n", token);
        if (pg.started)
            printf("  postgres    %s  (private, data in %s)\n", url, pgdir);
        else
            printf("  postgres    LOOM_DATABASE_URL\n");
        if (mock_owner)
            printf("  kafka       %s  (embedded mock cluster; kcat -L -b %s)\n", brokers, brokers);
        else
            printf("  kafka       %s  (LOOM_KAFKA_BROKERS)\n", brokers);
        if (topics_line[0])
            printf("  topics      %s", topics_line + (strncmp(topics_line, "kafka: ", 7) ? 0 : 7));
        printf("  migrations  %zu known, %d applied now\n", ctx->app->migrations.count, applied);
        printf("  worker      %zu consumer%s, %zu periodic job%s, outbox relay\n",
               ctx->app->n_consumers, ctx->app->n_consumers == 1 ? "" : "s", ctx->app->n_jobs,
               ctx->app->n_jobs == 1 ? "" : "s");
        if (ctx->app->n_tasks || ctx->app->n_oneshots)
            printf("  tasks       %zu headless task%s, %zu oneshot job%s ('%s run --list')\n",
                   ctx->app->n_tasks, ctx->app->n_tasks == 1 ? "" : "s", ctx->app->n_oneshots,
                   ctx->app->n_oneshots == 1 ? "" : "s", ctx->app->name);
        print_examples(ctx->app, token, api_url);
        printf("Press Ctrl-C to stop.\n");
        fflush(stdout);
        LOOM_INFO("loom dev ready", "api=%s postgres_port=%d kafka=%s", api_url, pg.port, brokers);
        if (mock_owner)
            mock_watch_start(&mock_watch, ctx, brokers);
        int sig = 0;
        sigwait(&sigs, &sig);
        LOOM_INFO("shutting down", "signal=%s", strsignal(sig));
    }
    mock_watch_stop(&mock_watch);
    if (gw)
        loom_gateway_stop(gw, ctx->cfg.shutdown_timeout_ms);
    loom_gateway_free(gw);
    loom_producer_free(api_producer);
    if (parts_up)
        cli_worker_parts_stop(&parts);
    loom_op_table_free(table);
    loom_db_pool_free(read_pool);
    loom_producer_free(producer);
    loom_db_pool_free(pool);
    loom_metrics_free(metrics);
    if (mock_owner) {
        rd_kafka_mock_cluster_destroy(mc);
        rd_kafka_destroy(mock_owner);
    }
    if (pg.started || pg.lock_fd >= 0) {
        if (loom_pglocal_stop(&pg) != 0)
            rc = cli_fail("dev", "could not stop the private postgres cleanly (see %s)", pgdir);
        else
            LOOM_INFO("private postgres stopped", "dir=%s", pgdir);
    }
    return rc;
}

const cli_command_t cli_dev_command = {
    "dev", "run Loom on its embedded defaults (private Postgres) until Ctrl-C",
    "usage: loom dev\n"
    "\n"
    "Runs all of Loom in one process with nothing to set up: the HTTP gateway on\n"
    "LOOM_API_LISTEN (with a development token it prints, holding every scope) and\n"
    "the worker (every consumer, the outbox relay, periodic jobs) on a private\n"
    "PostgreSQL and an\n"
    "embedded Kafka. Without LOOM_DATABASE_URL it starts PostgreSQL in\n"
    "LOOM_DEV_DIR/pg (default ./.loom/pg; data kept between runs) on a free\n"
    "loopback port; without LOOM_KAFKA_BROKERS it starts librdkafka's mock cluster\n"
    "(in memory) and prints its address for kcat. It applies the migrations,\n"
    "prints what it runs and where, and stays up until Ctrl-C (or SIGTERM), when\n"
    "it stops everything cleanly. As root, Postgres runs as the postgres user.\n",
    true, cmd_dev};
