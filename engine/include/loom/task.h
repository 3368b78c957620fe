/*
 * Headless tasks and oneshot jobs: the service kinds besides consumers and
 * periodic jobs (docs/architecture.md, "Headless tasks and oneshot jobs").
 *
 * A headless task is long-running work a service registers (a listener, a
 * prober, a feed it follows). `loom worker` (and `loom dev`) starts each in a
 * thread of its own and, on SIGTERM, asks it to stop and waits for it. A task
 * that returns while the worker runs is started again after a pause. With
 * `.singleton` one node of the cluster runs it at a time: the node that holds
 * the lease "task:<name>" in loom_leases, renewed while it runs; when that
 * node stops (or stops renewing), another takes over.
 *
 *   static int follow(loom_task_ctx_t *ctx, loom_error_t *err)
 *   {
 *       while (!loom_task_sleep(ctx, 1000))
 *           ...one round of work...
 *       return 0;
 *   }
 *   static const loom_task_def_t tasks[] = {
 *       {.name = "feeds.follow", .run = follow, .singleton = true,
 *        .description = "follows the upstream feed"},
 *       {0},
 *   };
 *
 * A oneshot job is named work run by hand, once per deployment, like a
 * migration: `loom run NAME`. Each run is recorded in loom_oneshot_runs; a
 * job that succeeded is not run again (unless `loom run NAME --again`), one
 * that failed is run again by the next `loom run NAME`, and two runs of one
 * job never overlap. `loom run --list` shows them.
 *
 * Both kinds get the process's configuration, its database pool (a task or
 * job may read, and write its own service's tables) and a producer for
 * commands (loom_task_publish: other services' data changes through them).
 */
#ifndef LOOM_TASK_H
#define LOOM_TASK_H

#include "loom/config.h"
#include "loom/db.h"
#include "loom/error.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

typedef struct loom_task_ctx loom_task_ctx_t;

/* The body of a task or a oneshot job: 0, or an error with err filled. */
typedef int (*loom_task_fn)(loom_task_ctx_t *ctx, loom_error_t *err);

typedef struct loom_task_def {
    const char *name; /* "feeds.follow" */
    loom_task_fn run; /* runs until loom_task_stopping() */
    bool singleton;   /* one runner across the cluster (a lease) */
    const char *description;
} loom_task_def_t;

typedef struct loom_oneshot_def {
    const char *name; /* "ledger.backfill": `loom run ledger.backfill` */
    loom_task_fn run;
    const char *description;
} loom_oneshot_def_t;

/* The task or job's name. */
const char *loom_task_name(const loom_task_ctx_t *ctx);
/* True once the task should return: the worker stops, the lease was lost, or
 * `loom run` got SIGINT/SIGTERM. */
bool loom_task_stopping(loom_task_ctx_t *ctx);
/* Sleeps up to ms, waking at once when stopping; returns loom_task_stopping(). */
bool loom_task_sleep(loom_task_ctx_t *ctx, int64_t ms);
/* Configuration and database pool of the process (borrowed). */
const loom_config_t *loom_task_config(const loom_task_ctx_t *ctx);
loom_db_pool_t *loom_task_pool(const loom_task_ctx_t *ctx);
/* Publishes a command of `type` (its command table's topic) with data
 * (stolen), keyed by key (NULL: the command id), and waits for the broker.
 * Fails with BROKER_UNAVAILABLE when the process has no Kafka. */
int loom_task_publish(loom_task_ctx_t *ctx, const char *type, const char *key, json_t *data,
                      loom_error_t *err);

#endif
