/*
 * A stuck command blocks only its own key (docs/architecture.md, "Order
 * within a partition"): commands of one partition with other keys are applied
 * meanwhile, a key's own later commands wait and then follow in order, a
 * command failing for longer than the park setting is parked, and one whose
 * deadline has passed is not applied. Against the real broker and
 * PostgreSQL.
 */
#include "services.h"
#include "support.h"
#include "loom/bus.h"
#include "loom/clock.h"
#include "loom/worker.h"

#include <criterion/criterion.h>
#include <libpq-fe.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static atomic_int acked;

static void on_ack(void *opaque, const loom_error_t *err, int32_t partition, int64_t offset)
{
    (void)offset;
    int32_t *part = opaque;
    if (part)
        *part = partition;
    if (!err || !err->code)
        atomic_fetch_add(&acked, 1);
}

/* Queues a command of type on topic keyed by key; *part (may be NULL) gets
 * its partition once acknowledged. */
static void send_cmd(loom_producer_t *p, const char *topic, const char *type, const char *id,
                     const char *key, const char *data, const char *deadline, int32_t *part)
{
    loom_arena_t a;
    loom_arena_init(&a, 0);
    loom_ce_t ce;
    loom_ce_init(&ce, &a, "test", "keys", type);
    if (id)
        ce.id = id;
    ce.deadline = deadline;
    ce.data = data;
    ce.data_len = strlen(data);
    loom_error_t err;
    int rc;
    while ((rc = loom_producer_send(p, topic, key, strlen(key), &ce, on_ack, part, &err)) != 0 &&
           loom_error_is(&err, LOOM_CODE_QUEUE_FULL))
        loom_sleep_ms(5);
    cr_assert_eq(rc, 0, "%s", err.message);
    loom_arena_release(&a);
}

static void wait_acked(int n)
{
    int64_t until = loom_mono_ms() + 60000;
    while (atomic_load(&acked) < n && loom_mono_ms() < until)
        loom_sleep_ms(10);
    cr_assert_eq(atomic_load(&acked), n, "the broker acknowledged %d of %d", atomic_load(&acked),
                 n);
}

/* ---- the messages service: a row lock held by another session ---------------------- */

Test(keys, a_message_id_locked_by_another_session_holds_only_its_key, .timeout = 300)
{
    const char *brokers = loom_test_kafka_brokers();
    char url[512], prefix[64], group[80];
    loom_test_db_create_migrated(url, sizeof(url));
    loom_test_topic_prefix("keys", prefix, sizeof(prefix));
    loom_topic_prefix_set(prefix);
    snprintf(group, sizeof(group), "%s.", prefix);
    loom_consumer_def_t def = *loom_test_app_consumer("messages.store");
    char topic[LOOM_TOPIC_MAX];
    loom_topic_for_command("messages.put_batch", topic, sizeof(topic));
    loom_test_kafka_topic(brokers, topic, 3);
    loom_producer_t *p = loom_test_producer(brokers);
    loom_worker_opts_t o = loom_test_worker_opts(brokers, &def);
    o.group_prefix = group;
    o.apply_threads = 4;
    o.lock_timeout_ms = 300;
    loom_test_worker_t w;
    loom_test_worker_start(&w, url, 6, false, o);

    /* The message to lock exists; then another session locks its row. */
    const char *put = "{\"msgs\":[{\"id\":\"locked\",\"source\":\"urn:k\",\"specversion\":\"1.0\","
                      "\"type\":\"t\"}]}";
    send_cmd(p, topic, "messages.put_batch", NULL, "locked", put, NULL, NULL);
    cr_assert_eq(
        loom_test_wait_for(url, "SELECT count(*) FROM messages WHERE id = 'locked'", 1, 60000), 1);
    PGconn *locker = PQconnectdb(url);
    cr_assert_eq(PQstatus(locker), CONNECTION_OK, "%s", PQerrorMessage(locker));
    PQclear(PQexec(locker, "BEGIN"));
    PGresult *r = PQexec(locker, "SELECT 1 FROM messages WHERE id = 'locked' FOR UPDATE");
    cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "%s", PQerrorMessage(locker));
    PQclear(r);

    /* Its delete waits on the lock; 1,000 writes of other ids, in every
     * partition (the locked one's too), are applied meanwhile. */
    int32_t locked_part = -1;
    send_cmd(p, topic, "messages.delete_batch", "delete-locked", "locked", "{\"ids\":[\"locked\"]}",
             NULL, &locked_part);
    for (int i = 0; i < 1000; i++) {
        char id[32], data[256];
        snprintf(id, sizeof(id), "free-%d", i);
        snprintf(data, sizeof(data),
                 "{\"msgs\":[{\"id\":\"%s\",\"source\":\"urn:k\",\"specversion\":\"1.0\","
                 "\"type\":\"t\"}]}",
                 id);
        send_cmd(p, topic, "messages.put_batch", NULL, id, data, NULL, NULL);
    }
    wait_acked(1002);
    cr_assert_eq(loom_test_wait_for(url, "SELECT count(*) FROM messages WHERE id LIKE 'free-%'",
                                    1000, 120000),
                 1000, "writes of other ids waited for the locked one");
    char sql[300];
    snprintf(sql, sizeof(sql),
             "SELECT count(*) FROM loom_commands WHERE kafka_partition = %d AND type = "
             "'messages.put_batch' AND status = 'applied' AND received_at > (SELECT received_at "
             "FROM loom_commands WHERE message_id = 'delete-locked')",
             (int)locked_part);
    cr_expect_gt(loom_test_sql_ll(url, sql), 0,
                 "commands behind the locked one in its own partition were applied");
    cr_assert_eq(loom_test_sql_ll(url, "SELECT count(*) FROM messages WHERE id = 'locked'"), 1,
                 "the locked message is still there");
    cr_assert_eq(loom_test_sql_ll(url, "SELECT count(*) FROM loom_commands WHERE message_id = "
                                       "'delete-locked' AND status = 'retrying'"),
                 1, "the waiting delete is visible as retrying");

    /* The lock goes; the delete follows. */
    PQclear(PQexec(locker, "ROLLBACK"));
    PQfinish(locker);
    cr_assert_eq(
        loom_test_wait_for(url, "SELECT count(*) FROM messages WHERE id = 'locked'", 0, 60000), 0);
    loom_test_worker_stop(&w);
    loom_producer_free(p);
}

/* ---- the test ledger: a key failing in one partition --------------------------------- */

typedef struct ledger {
    char url[512];
    loom_test_ledger_t led;
    loom_test_worker_t worker;
    loom_producer_t *p;
} ledger_t;

static void ledger_start(ledger_t *l, int partitions, int64_t park_after_ms)
{
    memset(l, 0, sizeof(*l));
    const char *brokers = loom_test_kafka_brokers();
    loom_test_db_create_ledger(l->url, sizeof(l->url));
    loom_test_ledger_init(&l->led, "k");
    loom_test_kafka_topic(brokers, l->led.topic, partitions);
    l->p = loom_test_producer(brokers);
    loom_worker_opts_t o = loom_test_worker_opts(brokers, &l->led.def);
    o.apply_threads = 4;
    o.retry_max_ms = 300;
    o.park_after_ms = park_after_ms;
    loom_test_worker_start(&l->worker, l->url, 6, false, o);
}

static void ledger_stop(ledger_t *l)
{
    loom_test_worker_stop(&l->worker);
    loom_producer_free(l->p);
}

static void credit(ledger_t *l, const char *id, const char *account, long amount, const char *extra,
                   const char *deadline)
{
    char data[256];
    snprintf(data, sizeof(data), "{\"account\":\"%s\",\"amount\":%ld%s%s}", account, amount,
             extra ? "," : "", extra ? extra : "");
    send_cmd(l->p, l->led.topic, "test.credit", id, account, data, deadline, NULL);
}

/* Each account's events, by version, carry amounts 1, 2, 3...: its commands
 * were applied in the order they were published. Returns the accounts seen. */
static long long in_key_order(const char *url, const char *like)
{
    char sql[600];
    snprintf(sql, sizeof(sql),
             "SELECT count(*) FROM (SELECT stream_id, (data->>'amount')::int AS amount, "
             "row_number() OVER (PARTITION BY stream_id ORDER BY version) AS n "
             "FROM loom_events WHERE stream_id LIKE '%s') e WHERE amount <> n",
             like);
    cr_expect_eq(loom_test_sql_ll(url, sql), 0, "an account's commands were applied out of order");
    snprintf(sql, sizeof(sql),
             "SELECT count(DISTINCT stream_id) FROM loom_events WHERE stream_id LIKE '%s'", like);
    return loom_test_sql_ll(url, sql);
}

Test(keys, a_failing_key_holds_only_its_own_later_commands, .timeout = 300)
{
    ledger_t l;
    ledger_start(&l, 1, 0); /* one partition: every key shares it */
    loom_test_sql(l.url, "INSERT INTO test_blocks VALUES ('stuck')");
    atomic_store(&acked, 0);
    credit(&l, "stuck-1", "stuck", 1, "\"fail\":\"blocked\"", NULL);
    int sent = 1;
    for (int i = 0; i < 10000; i++) {
        char acct[32];
        snprintf(acct, sizeof(acct), "acct-%d", i % 500);
        credit(&l, NULL, acct, i / 500 + 1, NULL, NULL);
        sent++;
        if (i % 2500 == 0) { /* the stuck key's later commands, in between */
            credit(&l, NULL, "stuck", 2 + i / 2500, NULL, NULL);
            sent++;
        }
    }
    wait_acked(sent);
    cr_assert_eq(loom_test_wait_for(l.url,
                                    "SELECT count(*) FROM test_ledger WHERE account LIKE 'acct-%'",
                                    10000, 180000),
                 10000, "other keys of the partition waited for the failing one");
    cr_expect_eq(in_key_order(l.url, "account-acct-%"), 500);
    cr_assert_eq(
        loom_test_sql_ll(l.url, "SELECT count(*) FROM test_ledger WHERE account = 'stuck'"), 0,
        "the failing key's later commands wait");
    cr_assert_geq(loom_test_wait_for(l.url,
                                     "SELECT least(attempts, 2) FROM loom_commands WHERE "
                                     "message_id = 'stuck-1' AND status = 'retrying'",
                                     2, 30000),
                  2);
    /* Fixed: the key's commands follow, in order. */
    loom_test_sql(l.url, "DELETE FROM test_blocks");
    cr_assert_eq(loom_test_wait_for(
                     l.url, "SELECT count(*) FROM test_ledger WHERE account = 'stuck'", 5, 60000),
                 5);
    cr_expect_eq(in_key_order(l.url, "account-stuck"), 1);
    ledger_stop(&l);
}

Test(keys, a_command_failing_longer_than_the_park_setting_is_parked, .timeout = 240)
{
    ledger_t l;
    ledger_start(&l, 1, 1000);
    loom_test_sql(l.url, "INSERT INTO test_blocks VALUES ('stuck')");
    atomic_store(&acked, 0);
    credit(&l, "park-1", "stuck", 1, "\"fail\":\"blocked\"", NULL);
    credit(&l, "after-park", "stuck", 2, NULL, NULL);
    wait_acked(2);
    cr_assert_eq(
        loom_test_wait_for(l.url,
                           "SELECT count(*) FROM loom_commands WHERE message_id = 'park-1' "
                           "AND status = 'parked' AND last_error LIKE '%blocked%'",
                           1, 60000),
        1, "not parked");
    /* Its key moves on. */
    cr_assert_eq(
        loom_test_wait_for(
            l.url, "SELECT count(*) FROM test_ledger WHERE message_id = 'after-park'", 1, 60000),
        1);
    ledger_stop(&l);
}

Test(keys, a_command_past_its_deadline_is_expired_not_applied, .timeout = 240)
{
    ledger_t l;
    ledger_start(&l, 1, 0);
    atomic_store(&acked, 0);
    credit(&l, "late-1", "acct", 1, NULL, "2020-01-01T00:00:00Z");
    credit(&l, "on-time", "acct", 1, NULL, "2999-01-01T00:00:00Z");
    wait_acked(2);
    cr_assert_eq(
        loom_test_wait_for(l.url,
                           "SELECT count(*) FROM loom_commands WHERE message_id = 'late-1' "
                           "AND status = 'expired'",
                           1, 60000),
        1);
    cr_assert_eq(loom_test_wait_for(l.url,
                                    "SELECT count(*) FROM test_ledger WHERE message_id = 'on-time'",
                                    1, 60000),
                 1);
    cr_assert_eq(
        loom_test_sql_ll(l.url, "SELECT count(*) FROM test_ledger WHERE message_id = 'late-1'"), 0);
    ledger_stop(&l);
}
