/*
 * worker_int.h: private state shared by worker.c, consumer.c and outbox.c.
 */
#ifndef LOOM_WORKER_INT_H
#define LOOM_WORKER_INT_H

#include "loom/worker.h"

#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>

/* Outcomes counted per consumer for the node's report (loom_worker_report). */
enum { OUT_APPLIED, OUT_REJECTED, OUT_RETRIED, OUT_SKIPPED, OUT_PARKED, OUT_EXPIRED, OUT_N };
/* Their names, as in loom_consumer_messages_total{outcome} (worker.c). */
extern const char *const loom__outcome_names[OUT_N];

typedef struct worker_consumer {
    struct loom_worker *w;
    const loom_consumer_def_t *def;
    pthread_t thread;
    bool started;
    atomic_llong outcomes[OUT_N];
    /* The partitions this consumer owns, as the last stall check saw them:
     * [{"topic", "partition", "lag", "retrying"}] (report_mu). */
    pthread_mutex_t report_mu;
    json_t *parts;
    /* What the last report counted, for its rates (the reporting thread's). */
    long long reported[OUT_N];
} worker_consumer_t;

struct loom_worker {
    loom_worker_opts_t opts;
    int64_t max_pending_bytes; /* per consumer: LOOM_WORKER_MAX_PENDING_BYTES */
    atomic_int stop;
    worker_consumer_t *consumers;
    size_t n_consumers;
    pthread_t relay_thread;
    bool relay_started;
    atomic_llong applied, skipped, rejected, retries, relayed, stalls, parked, expired;
    atomic_llong unprobed, reprobed;   /* batches without the dedup probe; of them, run again */
    loom_metrics_family_t *m_messages; /* {consumer,topic,outcome} */
    loom_metrics_family_t *m_lag;      /* {consumer,topic,partition} */
    loom_metrics_family_t *m_stalled;  /* {consumer} */
    loom_metrics_family_t *m_retrying; /* {consumer} */
    loom_metrics_family_t *m_relayed;
    int64_t reported_us; /* when the last report was made (0: never) */
    bool stopped;
};

/*
 * The dedup lookup of a batch: which of these message ids ($2) has the
 * consumer ($1) finished already? One primary-key probe per id, written so
 * that no plan can do anything else. The ids are unnested and each is looked
 * up by a LATERAL subquery whose LIMIT 1 (the key is unique, so it changes
 * no result) keeps PostgreSQL from flattening it into a join: the only plan
 * left is a nested loop over the ids, and for the inner side an equality
 * probe on (consumer, message_id) costs one row whatever the statistics say,
 * so it wins over any scan of a table larger than a few pages (an empty,
 * never-analyzed table counts as ten). The plain form,
 * `message_id = ANY($2)`, depends on statistics: on a table not yet
 * analyzed it scanned every row of the consumer. Exported so that
 * tests/integration/test_dedup_plan.c can EXPLAIN the very text used.
 */
#define LOOM_SQL_COMMANDS_DEDUP                                           \
    "SELECT c.message_id, c.digest, c.type, c.source, c.status "          \
    "FROM unnest($2::text[]) AS u(id) CROSS JOIN LATERAL ("               \
    "SELECT message_id, digest, type, source, status FROM loom_commands " \
    "WHERE consumer = $1 AND message_id = u.id "                          \
    "AND status IN ('applied', 'rejected', 'parked', 'expired') LIMIT 1) AS c"

/*
 * A batch's appends numbered after each stream's stored version: each row's
 * subquery sees the table as the statement began, so rows of one stream in
 * one statement get base + 1, base + 2, ... from their relative numbers
 * ($2). The subquery reads the last entry of the stream in loom_events_pkey
 * (stream_id, version); its plan is made once per connection (plan_once),
 * and tests/integration/test_dedup_plan.c checks that it is that probe on an
 * empty, never-analyzed table too.
 */
#define LOOM_SQL_EVENTS_APPEND_RELATIVE                                                            \
    "INSERT INTO loom_events (stream_id, version, event_id, type, data, ray_id, causation_id) "    \
    "SELECT u.s, coalesce((SELECT max(e.version) FROM loom_events e WHERE e.stream_id = u.s), 0) " \
    "+ u.r, u.id, u.t, u.d::jsonb, u.ray, u.c "                                                    \
    "FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], "       \
    "$7::text[]) AS u(s, r, id, t, d, ray, c)"

/* A stream's version (0: none yet), read from the last entry of the stream
 * in loom_events_pkey; planned once, checked by test_dedup_plan as above. */
#define LOOM_SQL_STREAM_VERSION \
    "SELECT coalesce(max(version), 0) FROM loom_events WHERE stream_id = $1"

/* Thread bodies. */
void *loom__consumer_run(void *arg);
void *loom__outbox_relay_run(void *arg);

#endif
