/*
 * cli_api.c: `loom api`, the HTTP gateway: the app's routes, ops on a
 * read-only pool, commands through an idempotent producer, until SIGTERM or
 * SIGINT, then a graceful stop (in-flight requests finish, the producer is
 * flushed) and exit 0.
 */
#include "cli.h"
#include "loom/bus.h"
#include "loom/gateway.h"
#include "loom/log.h"
#include "loom/node.h"

#include <stdio.h>
#include <string.h>

/* How long a write waits for Kafka's acknowledgement before answering 503. */
#define API_PUBLISH_TIMEOUT_MS 10000
/* Every write waits for its acknowledgement, so the gateway's producer
 * lingers 1 ms rather than the engine's 5: under load batches still form
 * from what arrives meanwhile (bench/run: about twice the writes/s). */
#define API_LINGER_MS 1

static int64_t cfg_num(const loom_config_t *cfg, const char *name)
{
    const loom_config_value_t *v = loom_config_get(cfg, name);
    return v ? v->num : 0;
}

int cli_gateway_producer_new(cli_ctx_t *ctx, const char *brokers, loom_producer_t **out,
                             loom_error_t *err)
{
    loom_producer_opts_t popts = {.brokers = brokers,
                                  .cfg = &ctx->cfg,
                                  .flush_timeout_ms = ctx->cfg.shutdown_timeout_ms,
                                  .message_timeout_ms = API_PUBLISH_TIMEOUT_MS,
                                  .linger_ms = API_LINGER_MS};
    return loom_producer_new(&popts, out, err);
}

int cli_gateway_start(cli_ctx_t *ctx, const loom_op_runtime_t *rt, loom_producer_t *producer,
                      loom_metrics_t *metrics, loom_gateway_opts_t *opts, loom_gateway_t **gw,
                      loom_error_t *err)
{
    int64_t wait_target = cfg_num(&ctx->cfg, "LOOM_API_WAIT_TARGET");
    *opts = (loom_gateway_opts_t){
        .listen = ctx->cfg.api_listen,
        .threads = (int)cfg_num(&ctx->cfg, "LOOM_API_THREADS"),
        .limits = {.max_body = (size_t)cfg_num(&ctx->cfg, "LOOM_API_MAX_BODY"),
                   .max_connections = (int)cfg_num(&ctx->cfg, "LOOM_API_MAX_CONNECTIONS"),
                   .header_timeout_ms = cfg_num(&ctx->cfg, "LOOM_API_HEADER_TIMEOUT"),
                   .idle_timeout_ms = cfg_num(&ctx->cfg, "LOOM_API_IDLE_TIMEOUT")},
        .routes = ctx->app->routes,
        .n_routes = ctx->app->n_routes,
        .ops = rt,
        .producer = producer,
        .metrics = metrics,
        .tokens_file = ctx->cfg.api_tokens_file,
        .site = ctx->cfg.site_name,
        .node = ctx->cfg.node_id,
        .workers = ctx->cfg.database_pool_size,
        .rate_limit = (int)cfg_num(&ctx->cfg, "LOOM_API_RATE_LIMIT"),
        .rate_burst = (int)cfg_num(&ctx->cfg, "LOOM_API_RATE_BURST"),
        .max_waiters = (int)cfg_num(&ctx->cfg, "LOOM_API_MAX_WAITERS"),
        .max_queue = (int)cfg_num(&ctx->cfg, "LOOM_API_MAX_QUEUE"),
        .no_access_log = strcmp(loom_config_get(&ctx->cfg, "LOOM_API_ACCESS_LOG")->raw, "off") == 0,
        .no_op_pipeline =
            strcmp(loom_config_get(&ctx->cfg, "LOOM_API_OP_PIPELINE")->raw, "off") == 0,
        /* 0 turns the adaptive bound off; the option's 0 means the default */
        .wait_target_ms = wait_target ? wait_target : -1,
    };
    int rc = loom_gateway_start(opts, gw, err);
    if (rc == 0)
        LOOM_INFO("gateway started",
                  "listen=%s threads=%d max_body=%zu max_connections=%d "
                  "header_timeout_ms=%lld idle_timeout_ms=%lld routes=%zu",
                  loom_gateway_addr(*gw, 0), opts->threads, opts->limits.max_body,
                  opts->limits.max_connections, (long long)opts->limits.header_timeout_ms,
                  (long long)opts->limits.idle_timeout_ms, opts->n_routes);
    return rc;
}

static int cmd_api(cli_ctx_t *ctx, int argc, char **argv)
{
    if (argc > 1)
        return cli_usage_error("api", "%s '%s'",
                               argv[1][0] == '-' ? "unknown option" : "unexpected argument",
                               argv[1]);
    int rc = cli_need_brokers(ctx, "api");
    if (rc != 0)
        return rc;
    const char *read_url =
        ctx->cfg.database_read_url ? ctx->cfg.database_read_url : ctx->cfg.database_url;
    if (!read_url) {
        fprintf(stderr, "loom api: LOOM_DATABASE_URL (or LOOM_DATABASE_READ_URL) is not set; the "
                        "gateway runs ops on it\n");
        return LOOM_EXIT_CONFIG;
    }
    loom_error_t err;
    size_t n_tokens = 0;
    if (ctx->cfg.api_tokens_file &&
        loom_gateway_tokens_check(ctx->cfg.api_tokens_file, &n_tokens, &err) != 0) {
        fprintf(stderr, "loom api: %s\n", err.message);
        return LOOM_EXIT_CONFIG;
    }
    sigset_t sigs;
    cli_block_signals(&sigs);

    /* Ops read on a pool that is read-only at the session level too. */
    loom_db_pool_t *pool = NULL;
    loom_db_pool_opts_t dopts = {
        .size = ctx->cfg.database_pool_size, .read_only = true, .application_name = "loom api"};
    if (loom_db_pool_new(read_url, &dopts, &pool, &err) != 0)
        return cli_fail("api", "%s", err.message);
    loom_op_table_t *table = loom_op_table_new();
    if (loom_op_table_add(table, ctx->app->ops, ctx->app->n_ops, &err) != 0) {
        loom_op_table_free(table);
        loom_db_pool_free(pool);
        return cli_fail("api", "%s", err.message);
    }
    loom_metrics_t *metrics = loom_metrics_new();
    loom_op_runtime_t rt;
    loom_op_runtime_init(&rt, table, pool, metrics);

    loom_producer_t *producer = NULL;
    if (cli_gateway_producer_new(ctx, ctx->cfg.kafka_brokers, &producer, &err) != 0) {
        loom_metrics_free(metrics);
        loom_op_table_free(table);
        loom_db_pool_free(pool);
        return cli_fail("api", "%s", err.message);
    }

    loom_gateway_opts_t gopts;
    loom_gateway_t *gw = NULL;
    rc = LOOM_EXIT_OK;
    if (cli_gateway_start(ctx, &rt, producer, metrics, &gopts, &gw, &err) != 0) {
        rc = cli_fail("api", "%s", err.message);
        goto out;
    }

    /* This node's heartbeat, when a writable database is configured. */
    loom_node_t *node = NULL;
    loom_db_pool_t *node_pool = NULL;
    char url[128];
    snprintf(url, sizeof(url), "http://%s", loom_gateway_addr(gw, 0));
    if (ctx->cfg.database_url) {
        loom_db_pool_opts_t nopts = {.size = 1, .application_name = "loom api node"};
        if (loom_db_pool_new(ctx->cfg.database_url, &nopts, &node_pool, &err) == 0) {
            loom_node_opts_t no = {.pool = node_pool,
                                   .id = ctx->cfg.node_id,
                                   .role = "api",
                                   .url = url,
                                   .site = ctx->cfg.site_name,
                                   .version = ctx->app->version};
            if (loom_node_start(&no, &node, &err) != 0)
                LOOM_WARN("could not write this node's heartbeat", "error=%s", err.message);
        } else {
            LOOM_WARN("could not open the heartbeat pool", "error=%s", err.message);
        }
    }

    for (size_t i = 0; i < loom_gateway_naddrs(gw); i++)
        printf("loom api listening on http://%s\n", loom_gateway_addr(gw, i));
    printf("  routes %zu, ops %zu, tokens %zu\n", ctx->app->n_routes, loom_op_table_count(table),
           n_tokens);
    fflush(stdout);
    if (!ctx->cfg.api_tokens_file)
        LOOM_WARN("no LOOM_API_TOKENS_FILE: every /v1 request will be refused with 401");

    int sig = 0;
    sigwait(&sigs, &sig);
    LOOM_INFO("shutting down", "signal=%s timeout_ms=%lld", strsignal(sig),
              (long long)ctx->cfg.shutdown_timeout_ms);
    loom_gateway_stop(gw, ctx->cfg.shutdown_timeout_ms);
    loom_node_stop(node);
    loom_db_pool_free(node_pool);
    loom_gateway_free(gw);
    LOOM_INFO("gateway exited cleanly");
out:
    loom_producer_free(producer);
    loom_metrics_free(metrics);
    loom_op_table_free(table);
    loom_db_pool_free(pool);
    return rc;
}

const cli_command_t cli_api_command = {
    "api", "serve the HTTP gateway: routes to ops and commands",
    "usage: loom api\n"
    "\n"
    "Runs the HTTP/1.1 gateway on LOOM_API_LISTEN (default 127.0.0.1:8080; several\n"
    "addresses separated by commas) with LOOM_API_THREADS event loops (default one\n"
    "per core). Reads go to ops, run on LOOM_DATABASE_READ_URL when set, else on\n"
    "LOOM_DATABASE_URL, in READ ONLY transactions; writes are published as commands\n"
    "to LOOM_KAFKA_BROKERS and answered 202 once Kafka acknowledged them, or 200\n"
    "with the applied result under ?wait=DURATION (at most 30s). The gateway itself\n"
    "never writes to the database.\n"
    "\n"
    "endpoints:\n"
    "  GET  /healthz            the process is up (no token)\n"
    "  GET  /readyz             the database and Kafka answer (no token; 503 if not)\n"
    "  GET  /metrics            Prometheus text: requests, latency, ops, ... (no token)\n"
    "  POST /v1/ops/{name}      call any op; body = its JSON request (scope ops:call)\n"
    "  GET  /v1/commands/{id}   a command's status, attempts, last error, result\n"
    "  ...                      the services' routes (see README.md)\n"
    "\n"
    "Every /v1 request needs 'Authorization: Bearer TOKEN' with a token listed in\n"
    "LOOM_API_TOKENS_FILE (one line each: sha256-of-token slug scope[,scope...];\n"
    "'*' grants every scope). No or an unknown token: 401; a missing scope: 403.\n"
    "Writes accept 'Idempotency-Key: KEY': retries with the same key are one command.\n"
    "\n"
    "Limits: LOOM_API_MAX_BODY (413), LOOM_API_MAX_CONNECTIONS (503),\n"
    "LOOM_API_HEADER_TIMEOUT (408, slow clients are dropped), LOOM_API_IDLE_TIMEOUT;\n"
    "request targets over 8 KiB get 414, headers over 16 KiB or 100 lines 431.\n"
    "\n"
    "SIGTERM or SIGINT stops it gracefully: it stops accepting, lets requests in\n"
    "progress finish for up to LOOM_SHUTDOWN_TIMEOUT, flushes the producer and\n"
    "exits 0.\n"
    "\n"
    "Needs LOOM_KAFKA_BROKERS and LOOM_DATABASE_URL (or LOOM_DATABASE_READ_URL).\n",
    true, cmd_api};
