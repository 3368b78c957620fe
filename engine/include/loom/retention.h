/*
 * Retention of loom_commands (LOOM_COMMANDS_RETENTION, docs/operations.md).
 *
 * A row of loom_commands is what makes a command delivered twice apply once.
 * It is needed as long as Kafka may deliver the command again, so rows of
 * finished commands (applied, expired) older than the retention are deleted
 * by a periodic job of the worker, in small batches, each its own short
 * statement on the index loom_commands_by_received, with a pause between
 * batches so that applies never wait on it. Rows that still ask something
 * of an operator (rejected, parked, retrying, conflict) are kept.
 *
 * A retention shorter than what the command topics may still hold is
 * refused: loom_retention_check_topics() reads each topic's retention.ms,
 * segment.ms and cleanup.policy from the brokers.
 */
#ifndef LOOM_RETENTION_H
#define LOOM_RETENTION_H

#include "loom/config.h"
#include "loom/db.h"
#include "loom/error.h"
#include "loom/metrics.h"
#include "loom/periodic.h"

#include <librdkafka/rdkafka.h>
#include <stdbool.h>
#include <stdint.h>

/* Rows one DELETE statement removes at most, and how often the job runs. */
#define LOOM_RETENTION_BATCH       1000
#define LOOM_RETENTION_INTERVAL_MS (10 * 60 * 1000)

typedef struct loom_retention_opts {
    int64_t retention_ms; /* rows received longer ago than this go */
    int batch;            /* rows per statement; 0: LOOM_RETENTION_BATCH */
    int64_t pause_min_ms; /* pause between statements, at least; 0: 10 ms */
    int64_t max_batches;  /* statements per run at most; 0: no limit */
    /* Asked between two statements; the run stops when it says true (may be NULL). */
    bool (*stopping)(void *arg);
    void *stop_arg;
} loom_retention_opts_t;

typedef struct loom_retention_stats {
    int64_t deleted;    /* rows deleted */
    int64_t statements; /* DELETE statements run */
    int64_t max_rows;   /* the most rows one statement deleted */
} loom_retention_stats_t;

/* Deletes applied and expired rows of loom_commands received more than
 * opts->retention_ms ago, batch by batch, until none is left (or max_batches
 * or stop). Each statement commits on its own. */
int loom_retention_run(loom_db_pool_t *pool, const loom_retention_opts_t *opts,
                       loom_retention_stats_t *stats, loom_error_t *err);

/* The text of the batch's statement (for a test to EXPLAIN it). */
const char *loom_retention_sql(void);

/* Checks that retention_ms covers what each topic may still hold: its
 * retention.ms plus its segment.ms (a segment is deleted only once its newest
 * message is older than retention.ms, and a segment spans up to segment.ms),
 * with cleanup.policy "delete". Refuses (LOOM_CODE_CONFIG_INVALID, a message
 * that names the topic and the figures) a shorter retention, a topic that
 * keeps messages forever, and a topic whose configuration cannot be read.
 * rk is any client of the cluster (a producer). */
int loom_retention_check_topics(rd_kafka_t *rk, const char *const *topics, size_t n,
                                int64_t retention_ms, int timeout_ms, loom_error_t *err);

/* The periodic job "loom.commands.retention": runs loom_retention_run() with
 * LOOM_COMMANDS_RETENTION of the job's configuration; counts deleted rows on
 * `deleted` (loom_commands_deleted_total, may be NULL). Set before the
 * periodic jobs start. */
void loom_retention_job_metric(loom_metrics_family_t *deleted);
extern const loom_periodic_def_t loom_retention_job;

/* LOOM_COMMANDS_RETENTION in ms; 0 when unset (keep every row). */
int64_t loom_retention_ms(const loom_config_t *cfg);

#endif
