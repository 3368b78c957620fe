/*
 * The runners of headless tasks and oneshot jobs (loom/task.h): the worker
 * runs the tasks with loom_tasks_start(), `loom run` a job with
 * loom_oneshot_run(). The engine's own header: not installed.
 */
#ifndef LOOM_TASK_RUNNER_H
#define LOOM_TASK_RUNNER_H

#include "loom/bus.h"
#include "loom/config.h"
#include "loom/db.h"
#include "loom/task.h"

#include <stddef.h>
#include <stdint.h>

typedef struct loom_tasks loom_tasks_t;

typedef struct loom_tasks_opts {
    const loom_task_def_t *tasks;
    size_t n_tasks;
    loom_db_pool_t *pool;      /* borrowed: leases of singletons, and the tasks' own use */
    loom_producer_t *producer; /* borrowed; NULL: loom_task_publish fails */
    const loom_config_t *cfg;  /* borrowed; may be NULL */
    const char *holder;        /* lease holder; NULL: cfg's node id */
    int64_t lease_ms;          /* a singleton's lease, renewed every third; 0: 15000 */
    int64_t restart_ms;        /* pause before a returned task runs again; 0: 1000 */
} loom_tasks_opts_t;

/* Starts one thread per task. The options' pointers must outlive the runner. */
int loom_tasks_start(const loom_tasks_opts_t *opts, loom_tasks_t **out, loom_error_t *err);
/* Asks every task to stop, waits for them, and gives up the leases held, so
 * another node takes a singleton at once. NULL does nothing. */
void loom_tasks_stop(loom_tasks_t *t);
/* How many times the task's run function was entered on this runner. */
int64_t loom_tasks_runs(loom_tasks_t *t, const char *name);
/* Whether this runner is running the task now (for a singleton: holds its
 * lease and runs it). */
bool loom_tasks_running(loom_tasks_t *t, const char *name);

/* What `loom run` reports. */
typedef enum {
    LOOM_ONESHOT_RAN,     /* ran now and succeeded */
    LOOM_ONESHOT_DONE,    /* had succeeded before: not run */
    LOOM_ONESHOT_FAILED,  /* ran now and failed (err says why) */
    LOOM_ONESHOT_RUNNING, /* another run is under way: not run */
} loom_oneshot_result_t;

typedef struct loom_oneshot_opts {
    loom_db_pool_t *pool;      /* borrowed */
    loom_producer_t *producer; /* borrowed; may be NULL */
    const loom_config_t *cfg;  /* borrowed; may be NULL */
    const char *version;       /* of the binary, recorded with the run */
    bool again;                /* run even when it succeeded before */
    const volatile int *stop;  /* set (by a signal) to ask the job to return */
} loom_oneshot_opts_t;

/* Runs def once per deployment (see loom/task.h): claims its row in
 * loom_oneshot_runs, runs it, records the outcome. *result says what
 * happened; *when (40 bytes, may be NULL) the time of the earlier run for
 * DONE and RUNNING. Returns 0 unless the database failed. */
int loom_oneshot_run(const loom_oneshot_def_t *def, const loom_oneshot_opts_t *opts,
                     loom_oneshot_result_t *result, char *when, loom_error_t *err);

/* Publishes a command of `type` with data (stolen) on its command table's
 * topic, keyed by key (NULL: the command id), and waits for the broker: what
 * loom_task_publish() and loom_job_publish() do. p may be NULL: then it
 * fails with BROKER_UNAVAILABLE. */
int loom_command_publish(loom_producer_t *p, const loom_config_t *cfg, const char *type,
                         const char *key, json_t *data, loom_error_t *err);

#endif
