/*
 * worker_int.h: private state shared by worker.c, consumer.c and outbox.c.
 */
#ifndef LOOM_WORKER_INT_H
#define LOOM_WORKER_INT_H

#include "loom/worker.h"

#include <pthread.h>
#include <stdatomic.h>

typedef struct worker_consumer {
    struct loom_worker *w;
    const loom_consumer_def_t *def;
    pthread_t thread;
    bool started;
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
    loom_metrics_family_t *m_messages; /* {consumer,topic,outcome} */
    loom_metrics_family_t *m_lag;      /* {consumer,topic,partition} */
    loom_metrics_family_t *m_stalled;  /* {consumer} */
    loom_metrics_family_t *m_retrying; /* {consumer} */
    loom_metrics_family_t *m_relayed;
    bool stopped;
};

/* Thread bodies. */
void *loom__consumer_run(void *arg);
void *loom__outbox_relay_run(void *arg);

#endif
