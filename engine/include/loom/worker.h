/*
 * The monolith-worker: every registered consumer (one thread and one Kafka
 * consumer group each) and the outbox relay, in one process. `loom worker`
 * and `loom dev` run it; tests run it in-process.
 *
 * loom_worker_stop() is the graceful shutdown of docs/architecture.md: stop
 * fetching, finish the batch in flight, commit it and its offsets, leave the
 * group.
 */
#ifndef LOOM_WORKER_H
#define LOOM_WORKER_H

#include "loom/bus.h"
#include "loom/config.h"
#include "loom/consumer.h"
#include "loom/db.h"
#include "loom/metrics.h"

#include <stddef.h>
#include <jansson.h>
#include <stdint.h>

typedef struct loom_worker loom_worker_t;

typedef struct loom_worker_opts {
    const char *brokers;      /* Kafka bootstrap servers (required) */
    const loom_config_t *cfg; /* node id, site, LOOM_KAFKA_*; may be NULL */
    loom_db_pool_t *pool;     /* borrowed; apply_threads per consumer + 1 */
    const loom_consumer_def_t *consumers;
    size_t n_consumers;
    loom_producer_t *producer; /* borrowed; runs the outbox relay when set */
    int64_t retry_base_ms;     /* first backoff of a failing partition; 0: 100 */
    int64_t retry_max_ms;      /* backoff cap; 0: 30000 */
    int64_t stall_after_ms;    /* lag > 0 and nothing arriving for this long; 0: 30000 */
    const char *group_prefix;  /* consumer group = prefix + name; NULL: "loom." */
    int apply_threads;         /* batches a consumer applies at once, each in its
                                * own transaction; 0: the config's
                                * LOOM_WORKER_APPLY_THREADS, else 4 */
    int key_concurrency;       /* keys of one partition applied at once; 0: the
                                * config's LOOM_WORKER_KEY_CONCURRENCY, else 256 */
    int max_pending;           /* commands of one partition tracked between fetch
                                * and commit before its fetching pauses; 0: the
                                * config's LOOM_WORKER_MAX_PENDING, else 10000 */
    int64_t lock_timeout_ms;   /* a command waiting longer on a lock fails (and is
                                * retried, holding only its key); 0: the config's
                                * LOOM_WORKER_LOCK_TIMEOUT, else 5000 */
    int64_t park_after_ms;     /* a command failing transiently for this long is
                                * parked; 0: the config's LOOM_WORKER_PARK_AFTER;
                                * -1 or an unset setting: never */
    loom_metrics_t *metrics;   /* borrowed; NULL: no metrics. Registers
                                * loom_consumer_messages_total{consumer,topic,outcome},
                                * loom_consumer_lag{consumer,topic,partition},
                                * loom_consumer_stalled_partitions{consumer},
                                * loom_consumer_retrying_partitions{consumer},
                                * loom_outbox_relayed_total */
} loom_worker_opts_t;

/* Starts the threads. The options' pointers must outlive the worker. */
int loom_worker_start(const loom_worker_opts_t *opts, loom_worker_t **out, loom_error_t *err);
/* Graceful stop; joins every thread. Idempotent. */
void loom_worker_stop(loom_worker_t *w);
void loom_worker_free(loom_worker_t *w);

/* Counters since start, summed over the consumers (for tests and logs). */
typedef struct loom_worker_stats {
    int64_t applied;  /* commands applied */
    int64_t skipped;  /* redeliveries found already handled */
    int64_t rejected; /* commands rejected for good */
    int64_t retries;  /* transient failures (each holds a key, or a partition
                       * while the database is unavailable) */
    int64_t parked;   /* commands parked after LOOM_WORKER_PARK_AFTER */
    int64_t expired;  /* commands past their deadline, not applied */
    int64_t relayed;  /* outbox messages sent */
    int64_t stalls;   /* partitions reported stalled */
    /* Batches applied without the dedup lookup (docs/architecture.md,
     * "Consumers and the worker"), and batches tried without it that ran
     * again with it (a command was handled already, or anything failed). */
    int64_t unprobed;
    int64_t reprobed;
} loom_worker_stats_t;

void loom_worker_stats(loom_worker_t *w, loom_worker_stats_t *out);

/*
 * What this worker's consumers are doing, for its node's heartbeat (the
 * console's overview reads it from loom_nodes.consumers):
 *   {"consumers": [{"name", "counts": {"applied", "rejected", "retried",
 *     "skipped", "parked", "expired"}, "per_s": {the same per second since
 *     the previous report; empty in the first}, "partitions": [{"topic",
 *     "partition", "lag" (null until measured), "retrying"}]}]}
 * Lag and partitions are as the last stall check saw them (every 5 s).
 * One thread at a time calls it (the rates are since its previous call).
 */
json_t *loom_worker_report(loom_worker_t *w);

#endif
