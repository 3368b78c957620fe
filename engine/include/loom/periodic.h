/*
 * Periodic jobs (docs/architecture.md): a job runs every `interval` on at most
 * one node at a time. Leadership is a row in loom_leases: the node that takes
 * an expired (or absent) lease runs the job and holds the lease for one
 * interval, so on a cluster the job runs about once per interval whichever
 * node takes it, and a crashed runner is replaced after one interval. Jobs
 * only publish commands (writes still go through consumers).
 */
#ifndef LOOM_PERIODIC_H
#define LOOM_PERIODIC_H

#include "loom/bus.h"
#include "loom/config.h"
#include "loom/db.h"
#include "loom/error.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

typedef struct loom_job_ctx loom_job_ctx_t;

typedef int (*loom_job_fn)(loom_job_ctx_t *ctx, loom_error_t *err);

typedef struct loom_periodic_def {
    const char *name;            /* lease name, e.g. "messages.clean" */
    const char *interval_var;    /* LOOM_* duration variable giving the interval (may be NULL) */
    int64_t default_interval_ms; /* used when interval_var is NULL or unset */
    loom_job_fn fn;
    const char *description;
} loom_periodic_def_t;

/* Configuration of the process (borrowed). */
const loom_config_t *loom_job_config(const loom_job_ctx_t *ctx);
/* The process's database pool (borrowed): jobs may read through it (writes
 * still go through commands). */
loom_db_pool_t *loom_job_pool(const loom_job_ctx_t *ctx);
/* True once the periodic jobs are stopping: a long job returns early. */
bool loom_job_stopping(const loom_job_ctx_t *ctx);
/* Publishes a command of `type` (topic loom.cmd.<type>) with data (stolen)
 * and waits for the broker's acknowledgement. */
int loom_job_publish(loom_job_ctx_t *ctx, const char *type, const char *key, json_t *data,
                     loom_error_t *err);

typedef struct loom_periodic loom_periodic_t;

typedef struct loom_periodic_opts {
    const loom_periodic_def_t *jobs;
    size_t n_jobs;
    loom_db_pool_t *pool;      /* borrowed */
    loom_producer_t *producer; /* borrowed */
    const loom_config_t *cfg;  /* borrowed: node id, site, intervals */
    int64_t tick_ms;           /* how often leases are tried; 0: 1000 */
} loom_periodic_opts_t;

/* Starts one thread that runs the jobs this node wins. */
int loom_periodic_start(const loom_periodic_opts_t *opts, loom_periodic_t **out, loom_error_t *err);
void loom_periodic_stop(loom_periodic_t *p);
/* Runs counted since start (for tests). */
int64_t loom_periodic_runs(loom_periodic_t *p, const char *name);

/* Tries to take the lease `name` for ttl_ms; 1 when this holder got it, 0
 * when another holds it, negative on error. */
int loom_lease_try(loom_db_pool_t *pool, const char *name, const char *holder, int64_t ttl_ms,
                   loom_error_t *err);

#endif
