/*
 * cli.h: private plumbing shared by the `loom` subcommands (engine/src/cli_*.c).
 */
#ifndef LOOM_CLI_H
#define LOOM_CLI_H

#include "loom/app.h"
#include "loom/config.h"
#include "loom/bus.h"
#include "loom/db.h"
#include "loom/gateway.h"
#include "loom/metrics.h"
#include "loom/node.h"
#include "loom/periodic.h"
#include "loom/task_runner.h"
#include "loom/worker.h"

#include <librdkafka/rdkafka_mock.h>

#include <signal.h>
#include <stdio.h>
#include <stdbool.h>

typedef struct cli_ctx {
    const loom_app_t *app;
    loom_config_t cfg; /* loaded before a command that needs it runs */
} cli_ctx_t;

typedef struct cli_command {
    const char *name;
    const char *summary; /* one line for `loom --help` */
    const char *usage;   /* the whole `loom CMD --help` text */
    bool needs_config;
    int (*run)(cli_ctx_t *ctx, int argc, char **argv); /* argv[0] is the command */
} cli_command_t;

extern const cli_command_t cli_migrate_command;
extern const cli_command_t cli_dev_command;
extern const cli_command_t cli_api_command;
extern const cli_command_t cli_op_command;
extern const cli_command_t cli_worker_command;
extern const cli_command_t cli_publish_command;
extern const cli_command_t cli_commands_command;
extern const cli_command_t cli_consumers_command;
extern const cli_command_t cli_broker_command;
extern const cli_command_t cli_nodes_command;
extern const cli_command_t cli_replay_command;
extern const cli_command_t cli_run_command;
extern const cli_command_t cli_new_command;

/* The parts of a worker process: consumers + outbox relay, periodic jobs and
 * heartbeats (cli_worker.c); `loom worker` and `loom dev` both run them. */
typedef struct cli_worker_parts {
    loom_worker_t *worker;
    loom_periodic_t *periodic;
    loom_tasks_t *tasks; /* the headless tasks (cli_worker_tasks_start) */
    loom_node_t *node;
} cli_worker_parts_t;

int cli_worker_parts_start(cli_ctx_t *ctx, const char *cmd, const char *brokers,
                           loom_db_pool_t *pool, loom_producer_t *producer, loom_metrics_t *metrics,
                           const char *role, const char *url, cli_worker_parts_t *parts);
void cli_worker_parts_stop(cli_worker_parts_t *parts);
/* The app's headless tasks, as part of the worker (cli_run.c). */
int cli_worker_tasks_start(cli_ctx_t *ctx, loom_db_pool_t *pool, loom_producer_t *producer,
                           cli_worker_parts_t *parts, loom_error_t *err);

/* The gateway's producer (a short linger, a bounded wait for the broker)
 * and the gateway on LOOM_API_* (threads, limits, tokens), as `loom api`
 * and `loom dev` both run them (cli_api.c). opts must outlive the gateway. */
int cli_gateway_producer_new(cli_ctx_t *ctx, const char *brokers, loom_producer_t **out,
                             loom_error_t *err);
int cli_gateway_start(cli_ctx_t *ctx, const loom_op_runtime_t *rt, loom_producer_t *producer,
                      loom_metrics_t *metrics, loom_gateway_opts_t *opts, loom_gateway_t **gw,
                      loom_error_t *err);

/* Creates the topics of the app's consumers on brokers (as `loom migrate up`
 * does) and reports to out, naming any per-type topic of an earlier Loom.
 * Returns how many were created, or -1 when they could not be (reported). */
int cli_create_topics(cli_ctx_t *ctx, const char *brokers, FILE *out);

/* A librdkafka mock cluster for `loom dev` and `loom broker`, with the app's
 * topics created (the mock has no CreateTopics). cli_broker.c. */
rd_kafka_t *cli_mock_cluster_start(cli_ctx_t *ctx, int brokers, rd_kafka_mock_cluster_t **mc,
                                   const char **bootstraps);

/* Blocks SIGINT, SIGTERM and SIGHUP in this thread (call before starting
 * threads) and fills set with them, for sigwait(). */
void cli_block_signals(sigset_t *set);
/* Kafka brokers from LOOM_KAFKA_BROKERS, or explains that it is unset. */
int cli_need_brokers(cli_ctx_t *ctx, const char *cmd);

/* Prints "loom CMD: message" and a hint to stderr; returns LOOM_EXIT_USAGE. */
int cli_usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Prints "loom CMD: message" to stderr; returns LOOM_EXIT_FAILURE. */
int cli_fail(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Opens a pool on LOOM_DATABASE_URL, or explains that it is unset. */
int cli_open_db(cli_ctx_t *ctx, const char *cmd, int size, loom_db_pool_t **pool);

/* Sets up logging from the configuration. */
void cli_setup_logging(const loom_config_t *cfg);

#endif
