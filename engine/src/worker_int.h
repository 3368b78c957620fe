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
    atomic_int stop;
    worker_consumer_t *consumers;
    size_t n_consumers;
    pthread_t relay_thread;
    bool relay_started;
    atomic_llong applied, skipped, rejected, retries, relayed, stalls, parked, expired;
    loom_metrics_family_t *m_messages; /* {consumer,topic,outcome} */
    loom_metrics_family_t *m_lag;      /* {consumer,topic,partition} */
    loom_metrics_family_t *m_stalled;  /* {consumer} */
    loom_metrics_family_t *m_retrying; /* {consumer} */
    loom_metrics_family_t *m_relayed;
    int64_t reported_us; /* when the last report was made (0: never) */
    bool stopped;
};

/* Thread bodies. */
void *loom__consumer_run(void *arg);
void *loom__outbox_relay_run(void *arg);

#endif
