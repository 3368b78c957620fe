/*
 * cli_worker.c: `loom worker`, the monolith-worker: every consumer of the
 * app and the outbox relay, until SIGTERM/SIGINT, then a graceful stop.
 */
#include "cli.h"
#include "loom/bus.h"
#include "loom/log.h"
#include "loom/node.h"
#include "loom/periodic.h"
#include "loom/worker.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>

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

int cli_worker_parts_start(cli_ctx_t *ctx, const char *cmd, const char *brokers,
                           loom_db_pool_t *pool, loom_producer_t *producer, loom_metrics_t *metrics,
                           const char *role, const char *url, cli_worker_parts_t *parts)
{
    memset(parts, 0, sizeof(*parts));
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
    cli_worker_parts_t parts;
    rc = cli_worker_parts_start(ctx, "worker", ctx->cfg.kafka_brokers, pool, producer, NULL,
                                "worker", NULL, &parts);
    if (rc == 0) {
        int sig = 0;
        sigwait(&sigs, &sig);
        LOOM_INFO("shutting down", "signal=%s", strsignal(sig));
        cli_worker_parts_stop(&parts);
    }
    loom_producer_free(producer);
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
    "SIGTERM or SIGINT stops it gracefully: it stops fetching, finishes and\n"
    "commits the batch in flight, leaves the group and exits 0.\n"
    "\n"
    "Needs LOOM_DATABASE_URL and LOOM_KAFKA_BROKERS.\n",
    true, cmd_worker};
