/*
 * cli_worker.c: `loom worker`, the monolith-worker: every consumer of the
 * app and the outbox relay, until SIGTERM/SIGINT, then a graceful stop.
 */
#include "cli.h"
#include "loom/bus.h"
#include "loom/log.h"
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
    rc = cli_open_db(ctx, "worker", (int)ctx->app->n_consumers + 2, &pool);
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
    loom_worker_opts_t wopts = {.brokers = ctx->cfg.kafka_brokers,
                                .cfg = &ctx->cfg,
                                .pool = pool,
                                .consumers = ctx->app->consumers,
                                .n_consumers = ctx->app->n_consumers,
                                .producer = producer};
    loom_worker_t *w = NULL;
    if (loom_worker_start(&wopts, &w, &err) != 0) {
        loom_producer_free(producer);
        loom_db_pool_free(pool);
        return cli_fail("worker", "%s", err.message);
    }
    for (size_t i = 0; i < ctx->app->n_consumers; i++)
        LOOM_INFO("running consumer", "consumer=%s", ctx->app->consumers[i].name);
    int sig = 0;
    sigwait(&sigs, &sig);
    LOOM_INFO("shutting down", "signal=%s", strsignal(sig));
    loom_worker_stop(w);
    loom_worker_stats_t st;
    loom_worker_stats(w, &st);
    loom_worker_free(w);
    loom_producer_free(producer);
    loom_db_pool_free(pool);
    LOOM_INFO("worker exited cleanly", "applied=%lld rejected=%lld relayed=%lld",
              (long long)st.applied, (long long)st.rejected, (long long)st.relayed);
    return LOOM_EXIT_OK;
}

const cli_command_t cli_worker_command = {
    "worker", "apply commands: run every consumer and the outbox relay",
    "usage: loom worker\n"
    "\n"
    "Runs the monolith-worker: every registered consumer, each in its own Kafka\n"
    "consumer group (loom.<consumer>), and the outbox relay. Commands of one\n"
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
