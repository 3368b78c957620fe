/*
 * One entity's commands in one order (docs/architecture.md, "Topics and
 * order"): every command that can touch an entity travels on its service's
 * topic under the entity's key, so a put and a delete sent back to back,
 * without waiting, are applied in that order even with two workers sharing
 * the partitions. Against the real broker and PostgreSQL; the registry and
 * messages services as `loom worker` runs them.
 *
 * Before topics per service, a put and a delete travelled on two topics and
 * a delete applied first was rejected (not found) while the later put left
 * the entity registered.
 */
#include "services.h"
#include "support.h"
#include "loom/bus.h"
#include "loom/clock.h"
#include "loom/worker.h"
#include "registry/model.h"

#include <criterion/criterion.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define N_ENTITIES 1000
#define N_WORKERS  2

typedef struct env {
    char url[512];
    loom_test_app_sub_t sub; /* the consumer on a topic of its own */
    loom_test_worker_t workers[N_WORKERS];
    loom_producer_t *p;
    atomic_int acked, failed;
} env_t;

static void on_delivery(void *opaque, const loom_error_t *err, int32_t partition, int64_t offset)
{
    (void)partition;
    (void)offset;
    env_t *e = opaque;
    if (err && err->code)
        atomic_fetch_add(&e->failed, 1);
    else
        atomic_fetch_add(&e->acked, 1);
}

/* The service's consumer on topics of this test's own prefix, in two workers
 * of one group. */
static void env_start(env_t *e, const char *consumer)
{
    memset(e, 0, sizeof(*e));
    const char *brokers = loom_test_kafka_brokers();
    loom_test_db_create_migrated(e->url, sizeof(e->url));
    loom_test_app_sub_init(&e->sub, consumer, "ord", brokers, 6);
    cr_assert_eq(e->sub.n_topics, 1, "%s reads one topic, its service's", consumer);
    e->p = loom_test_producer(brokers);
    loom_worker_opts_t o = {.brokers = brokers,
                            .consumers = &e->sub.def,
                            .n_consumers = 1,
                            .producer = e->p,
                            .group_prefix = e->sub.group,
                            .apply_threads = 3};
    for (int i = 0; i < N_WORKERS; i++)
        loom_test_worker_start(&e->workers[i], e->url, 4, false, o);
}

static void env_stop(env_t *e)
{
    for (int i = 0; i < N_WORKERS; i++)
        loom_test_worker_stop(&e->workers[i]);
    loom_producer_free(e->p);
}

/* Queues one command of `type` keyed by key (no waiting). */
static void send_command(env_t *e, const char *type, const char *key, const char *data)
{
    loom_arena_t a;
    loom_arena_init(&a, 0);
    loom_ce_t ce;
    loom_ce_init(&ce, &a, "test", "order", type);
    ce.data = data;
    ce.data_len = strlen(data);
    char topic[LOOM_TOPIC_MAX];
    loom_topic_for_command(type, topic, sizeof(topic));
    loom_error_t err;
    int rc;
    while ((rc = loom_producer_send(e->p, topic, key, strlen(key), &ce, on_delivery, e, &err)) !=
               0 &&
           err.code && strcmp(err.code, "QUEUE_FULL") == 0)
        loom_sleep_ms(5);
    cr_assert_eq(rc, 0, "%s", err.message);
    loom_arena_release(&a);
}

/* Waits for every acknowledgement, then for the consumer to have handled
 * every command; returns how many were applied. */
static long long settle(env_t *e, int sent)
{
    int64_t until = loom_mono_ms() + 60000;
    while (atomic_load(&e->acked) + atomic_load(&e->failed) < sent && loom_mono_ms() < until)
        loom_sleep_ms(20);
    cr_assert_eq(atomic_load(&e->failed), 0, "the broker refused commands");
    cr_assert_eq(atomic_load(&e->acked), sent);
    char sql[300];
    snprintf(sql, sizeof(sql),
             "SELECT count(*) FROM loom_commands WHERE consumer = '%s' "
             "AND status IN ('applied', 'rejected')",
             e->sub.def.name);
    cr_assert_eq(loom_test_wait_for(e->url, sql, sent, 240000), sent,
                 "not every command was handled");
    snprintf(sql, sizeof(sql),
             "SELECT count(*) FROM loom_commands WHERE consumer = '%s' AND status = 'applied'",
             e->sub.def.name);
    return loom_test_sql_ll(e->url, sql);
}

Test(order, an_instance_put_then_deleted_at_once_stays_deleted, .timeout = 300)
{
    env_t e;
    env_start(&e, "registry.store");
    for (int i = 0; i < N_ENTITIES; i++) {
        char url[128], id[REGISTRY_INSTANCE_ID_LEN + 1], data[256];
        snprintf(url, sizeof(url), "http://order-%d.example:8080/", i);
        registry_instance_id(url, id);
        snprintf(data, sizeof(data), "{\"url\":\"%s\",\"caller\":\"alice\"}", url);
        send_command(&e, "registry.put_instance", id, data);
        snprintf(data, sizeof(data), "{\"id\":\"%s\",\"caller\":\"alice\"}", id);
        send_command(&e, "registry.delete_instance", id, data);
    }
    long long applied = settle(&e, 2 * N_ENTITIES);
    long long left = loom_test_sql_ll(
        e.url, "SELECT count(*) FROM registry_instances WHERE url LIKE 'http://order-%'");
    cr_expect_eq(left, 0, "%lld of %d instances are still registered", left, N_ENTITIES);
    cr_expect_eq(applied, 2 * N_ENTITIES, "a delete was rejected: it ran before its put");
    env_stop(&e);
}

Test(order, a_definition_put_then_deleted_at_once_stays_deleted, .timeout = 300)
{
    env_t e;
    env_start(&e, "registry.store");
    for (int i = 0; i < N_ENTITIES; i++) {
        char id[64], data[400];
        snprintf(id, sizeof(id), "order-def-%d", i);
        snprintf(data, sizeof(data),
                 "{\"definition\":{\"id\":\"%s\",\"image\":{\"name\":\"example/echo\","
                 "\"internal_ports\":[8080]}},\"caller\":\"alice\"}",
                 id);
        send_command(&e, "registry.put_definition", id, data);
        snprintf(data, sizeof(data), "{\"id\":\"%s\",\"caller\":\"alice\"}", id);
        send_command(&e, "registry.delete_definition", id, data);
    }
    long long applied = settle(&e, 2 * N_ENTITIES);
    long long left = loom_test_sql_ll(
        e.url, "SELECT count(*) FROM registry_definitions WHERE id LIKE 'order-def-%'");
    cr_expect_eq(left, 0, "%lld of %d definitions are still there", left, N_ENTITIES);
    cr_expect_eq(applied, 2 * N_ENTITIES, "a delete was rejected: it ran before its put");
    env_stop(&e);
}

Test(order, a_message_put_then_deleted_with_one_partition_key_stays_deleted, .timeout = 300)
{
    env_t e;
    env_start(&e, "messages.store");
    for (int i = 0; i < N_ENTITIES; i++) {
        char id[64], data[400];
        snprintf(id, sizeof(id), "order-msg-%d", i);
        snprintf(data, sizeof(data),
                 "{\"msgs\":[{\"id\":\"%s\",\"source\":\"urn:order\",\"specversion\":\"1.0\","
                 "\"type\":\"demo.order\",\"data\":{\"n\":%d}}]}",
                 id, i);
        /* The partition key the caller gives (Partition-Key over HTTP). */
        send_command(&e, "messages.put_batch", id, data);
        snprintf(data, sizeof(data), "{\"ids\":[\"%s\"]}", id);
        send_command(&e, "messages.delete_batch", id, data);
    }
    long long applied = settle(&e, 2 * N_ENTITIES);
    cr_expect_eq(applied, 2 * N_ENTITIES);
    long long left =
        loom_test_sql_ll(e.url, "SELECT count(*) FROM messages WHERE id LIKE 'order-msg-%'");
    cr_expect_eq(left, 0, "%lld of %d messages are still stored", left, N_ENTITIES);
    /* And each delete found its message: it ran after the put. */
    long long deleted = loom_test_sql_ll(
        e.url, "SELECT coalesce(sum((result->>'ack_count')::int), 0) FROM loom_commands "
               "WHERE type = 'messages.delete_batch'");
    cr_expect_eq(deleted, N_ENTITIES, "%lld of %d deletes found their message", deleted,
                 N_ENTITIES);
    env_stop(&e);
}
