/*
 * Loom's producer (engine/src/bus.c) against the real Kafka broker of the
 * harness: delivery reports run on the producer's one delivery thread, in
 * each partition's offset order, also while a flush waits in the sending
 * thread; every message of several topics and partitions is acknowledged
 * once, at a new offset; a producer freed at once reports every message.
 */
#include "support.h"
#include "loom/bus.h"
#include "loom/envelope.h"

#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#define N_TOPICS     2
#define N_PARTITIONS 3

typedef struct reports {
    pthread_mutex_t mu;
    long acked, failed;
    long out_of_order;  /* a partition's offset at or below one reported before */
    long other_threads; /* reports on a thread other than the first report's */
    long on_sender;     /* reports on the sending thread */
    pthread_t first;
    bool have_first;
    pthread_t sender;
    int64_t last[N_TOPICS][N_PARTITIONS];
} reports_t;

typedef struct sent {
    reports_t *r;
    int topic;
} sent_t;

static void on_report(void *opaque, const loom_error_t *err, int32_t partition, int64_t offset)
{
    sent_t *s = opaque;
    reports_t *r = s->r;
    pthread_mutex_lock(&r->mu);
    pthread_t self = pthread_self();
    if (!r->have_first) {
        r->first = self;
        r->have_first = true;
    } else if (!pthread_equal(self, r->first)) {
        r->other_threads++;
    }
    if (pthread_equal(self, r->sender))
        r->on_sender++;
    if (err) {
        r->failed++;
    } else {
        r->acked++;
        if (partition >= 0 && partition < N_PARTITIONS) {
            if (offset <= r->last[s->topic][partition])
                r->out_of_order++;
            r->last[s->topic][partition] = offset;
        }
    }
    pthread_mutex_unlock(&r->mu);
}

/* Sends n envelopes round the topics and partitions, then flushes from this
 * thread: the flush must not serve reports itself. */
Test(producer, reports_come_in_offset_order_on_one_thread_also_during_a_flush, .timeout = 180)
{
    const char *brokers = loom_test_kafka_brokers();
    char names[N_TOPICS][96];
    const char *topics[N_TOPICS];
    for (int t = 0; t < N_TOPICS; t++) {
        char u[64];
        loom_test_unique_name("producer", u, sizeof(u));
        snprintf(names[t], sizeof(names[t]), "test.producer.%s.%d", u, t);
        topics[t] = names[t];
        loom_test_kafka_topic(brokers, names[t], N_PARTITIONS);
    }
    reports_t r = {.sender = pthread_self()};
    pthread_mutex_init(&r.mu, NULL);
    for (int t = 0; t < N_TOPICS; t++)
        for (int p = 0; p < N_PARTITIONS; p++)
            r.last[t][p] = -1;
    sent_t s[N_TOPICS] = {{&r, 0}, {&r, 1}};
    loom_producer_t *p;
    loom_error_t err;
    loom_producer_opts_t o = {.brokers = brokers};
    cr_assert_eq(loom_producer_new(&o, &p, &err), 0, "%s", err.message);
    /* Enough messages that the flush finds reports waiting. */
    const long n = 30000;
    loom_arena_t a;
    loom_arena_init(&a, 0);
    for (long i = 0; i < n; i++) {
        loom_ce_t ce;
        loom_ce_init(&ce, &a, "test", "test", "test.producer");
        ce.data = "{}";
        ce.data_len = 2;
        int t = (int)(i % N_TOPICS);
        while (loom_producer_send(p, topics[t], ce.id, strlen(ce.id), &ce, on_report, &s[t],
                                  &err) != 0)
            cr_assert_eq(err.code, LOOM_CODE_QUEUE_FULL, "%s", err.message);
        loom_arena_reset(&a);
    }
    loom_arena_release(&a);
    cr_assert_eq(loom_producer_flush(p, 120000), 0, "%d messages not reported",
                 loom_producer_in_flight(p));
    pthread_mutex_lock(&r.mu);
    cr_expect_eq(r.failed, 0, "%ld of %ld messages reported undelivered", r.failed, n);
    cr_expect_eq(r.acked, n, "%ld of %ld messages acknowledged", r.acked, n);
    cr_expect_eq(r.out_of_order, 0, "%ld reports at an offset not above the last", r.out_of_order);
    cr_expect_eq(r.other_threads, 0, "%ld reports on a second thread", r.other_threads);
    cr_expect_eq(r.on_sender, 0, "%ld reports on the sending (flushing) thread", r.on_sender);
    pthread_mutex_unlock(&r.mu);
    loom_producer_free(p);
    pthread_mutex_destroy(&r.mu);
}

/* A producer freed right after its sends still reports every message once. */
Test(producer, free_reports_every_message_once, .timeout = 120)
{
    const char *brokers = loom_test_kafka_brokers();
    char u[64], topic[128];
    loom_test_unique_name("producer", u, sizeof(u));
    snprintf(topic, sizeof(topic), "test.producer.%s", u);
    loom_test_kafka_topic(brokers, topic, 1);
    reports_t r = {.sender = pthread_self()};
    pthread_mutex_init(&r.mu, NULL);
    for (int q = 0; q < N_PARTITIONS; q++)
        r.last[0][q] = -1;
    sent_t s = {&r, 0};
    loom_producer_t *p;
    loom_error_t err;
    loom_producer_opts_t o = {.brokers = brokers};
    cr_assert_eq(loom_producer_new(&o, &p, &err), 0, "%s", err.message);
    const long n = 2000;
    for (long i = 0; i < n; i++) {
        char id[16];
        snprintf(id, sizeof(id), "m%ld", i);
        loom_ce_t ce = {.id = id, .source = "test", .specversion = "1.0", .type = "t"};
        ce.data = "{}";
        ce.data_len = 2;
        cr_assert_eq(loom_producer_send(p, topic, id, strlen(id), &ce, on_report, &s, &err), 0,
                     "%s", err.message);
    }
    loom_producer_free(p);
    cr_expect_eq(r.acked + r.failed, n, "%ld reports for %ld messages", r.acked + r.failed, n);
    cr_expect_eq(r.failed, 0);
    cr_expect_eq(r.out_of_order, 0);
    pthread_mutex_destroy(&r.mu);
}
