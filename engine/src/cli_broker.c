/*
 * cli_broker.c: `loom broker`, the embedded Kafka (librdkafka's mock
 * cluster) on its own, so separate `loom api` and `loom worker` processes on
 * one machine can share it. For development only: it keeps everything in
 * memory (README.md, "Quick start", says what it keeps).
 */
#include "cli.h"
#include "loom/envelope.h"
#include "loom/log.h"

#include <librdkafka/rdkafka_mock.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

rd_kafka_t *cli_mock_cluster_start(cli_ctx_t *ctx, int brokers, rd_kafka_mock_cluster_t **mc,
                                   const char **bootstraps)
{
    char errstr[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "log_level", "3", NULL, 0);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    if (!rk) {
        rd_kafka_conf_destroy(conf);
        LOOM_ERROR("could not start the embedded kafka", "error=%s", errstr);
        return NULL;
    }
    *mc = rd_kafka_mock_cluster_new(rk, brokers);
    if (!*mc) {
        rd_kafka_destroy(rk);
        LOOM_ERROR("could not start the embedded kafka", "error=\"mock cluster refused\"");
        return NULL;
    }
    *bootstraps = rd_kafka_mock_cluster_bootstraps(*mc);
    /* The mock has no CreateTopics: create the app's topics here. */
    int n = 0;
    char topics[64][LOOM_TOPIC_MAX];
    for (size_t i = 0; i < ctx->app->n_consumers; i++) {
        size_t nt = loom_consumer_topics(&ctx->app->consumers[i], topics, 64);
        for (size_t t = 0; t < nt && t < 64; t++)
            if (rd_kafka_mock_topic_create(*mc, topics[t], ctx->cfg.kafka_partitions, 1) == 0)
                n++;
    }
    LOOM_INFO("embedded kafka started", "bootstrap=%s brokers=%d topics=%d partitions=%d",
              *bootstraps, brokers, n, ctx->cfg.kafka_partitions);
    return rk;
}

static int cmd_broker(cli_ctx_t *ctx, int argc, char **argv)
{
    if (argc > 1)
        return cli_usage_error("broker", "%s '%s'",
                               argv[1][0] == '-' ? "unknown option" : "unexpected argument",
                               argv[1]);
    sigset_t sigs;
    cli_block_signals(&sigs);
    rd_kafka_mock_cluster_t *mc = NULL;
    const char *bootstraps = NULL;
    rd_kafka_t *owner = cli_mock_cluster_start(ctx, 1, &mc, &bootstraps);
    if (!owner)
        return cli_fail("broker", "could not start the embedded kafka");
    printf("loom broker is up: embedded Kafka (librdkafka mock cluster) at %s\n", bootstraps);
    printf("  use it with  LOOM_KAFKA_BROKERS=%s loom worker   (and loom api)\n", bootstraps);
    printf("  look at it   kcat -L -b %s\n", bootstraps);
    printf("Press Ctrl-C to stop (its messages are kept in memory only).\n");
    fflush(stdout);
    int sig = 0;
    sigwait(&sigs, &sig);
    LOOM_INFO("shutting down", "signal=%s", strsignal(sig));
    rd_kafka_mock_cluster_destroy(mc);
    rd_kafka_destroy(owner);
    return LOOM_EXIT_OK;
}

const cli_command_t cli_broker_command = {
    "broker", "run the embedded Kafka (mock cluster) alone, for development",
    "usage: loom broker\n"
    "\n"
    "Starts librdkafka's mock cluster on a loopback port, creates the topics the\n"
    "consumers read (LOOM_KAFKA_PARTITIONS partitions each), prints its bootstrap\n"
    "address and runs until Ctrl-C. Separate 'loom api' and 'loom worker'\n"
    "processes share it through LOOM_KAFKA_BROKERS. Everything is in memory and\n"
    "lost on exit: use a real Kafka cluster for anything else.\n",
    true, cmd_broker};
