/*
 * The messaging core end to end: CloudEvents in and out through kcat (a
 * third-party client), effectively-once application under redelivery and
 * kill -9, transient failures holding only their partition, rejected
 * commands, two workers sharing partitions, and broker outages. Against the
 * real Apache Kafka broker of the harness, and the mock cluster where a fault
 * is injected.
 */
#include "support.h"
#include "loom/bus.h"
#include "loom/clock.h"
#include "loom/pglocal.h"
#include "loom/worker.h"

#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stddef.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* ---- the environment: a ledger database and the test consumer ------------ */

typedef struct env {
    char url[512];
    loom_test_ledger_t led; /* the test consumer, names of its own */
    loom_test_worker_t worker;
} env_t;

static rd_kafka_mock_cluster_t *env_mock; /* set while a test runs on the mock cluster */

static void env_init(env_t *e, const char *brokers, int partitions)
{
    memset(e, 0, sizeof(*e));
    loom_test_db_create_ledger(e->url, sizeof(e->url));
    loom_test_ledger_init(&e->led, "s");
    if (env_mock) /* the mock cluster of librdkafka 2.0 has no CreateTopics */
        cr_assert_eq(rd_kafka_mock_topic_create(env_mock, e->led.topic, partitions, 1), 0);
    else
        loom_test_kafka_topic(brokers, e->led.topic, partitions);
}

static const char *tail(const char *s, size_t n)
{
    size_t len = s ? strlen(s) : 0;
    return len > n ? s + len - n : (s ? s : "");
}

/* The test worker, relaying its outbox. */
static void env_start_worker(env_t *e, const char *brokers)
{
    loom_test_worker_start(&e->worker, e->url, 4, true,
                           loom_test_worker_opts(brokers, &e->led.def));
}

/* ---- CloudEvents with a third-party client ---------------------------------------- */

Test(messaging, kcat_cloudevent_is_applied_and_loom_output_reads_back_in_kcat, .timeout = 240)
{
    const char *brokers = loom_test_kafka_brokers();
    env_t e;
    env_init(&e, brokers, 3);
    env_start_worker(&e, brokers);

    /* kcat publishes a CloudEvent in binary mode, as any Kafka client would. */
    char cmd[2048];
    snprintf(cmd, sizeof(cmd),
             "printf '%%s' '{\"account\":\"kc-1\",\"amount\":42,\"notify\":true}' | "
             "kcat -P -b %s -t %s -k kc-1 -H ce_specversion=1.0 "
             "-H ce_id=kcat-event-0001 -H ce_source=urn:test:kcat -H ce_type=test.credit "
             "-H ce_rayid=ray-kcat-1 -H content-type=application/json",
             brokers, e.led.topic);
    cr_assert_eq(system(cmd), 0, "kcat failed: %s", cmd);
    cr_assert_eq(
        loom_test_wait_for(e.url,
                           "SELECT count(*) FROM test_ledger WHERE message_id = 'kcat-event-0001' "
                           "AND account = 'kc-1' AND amount = 42",
                           1, 60000),
        1, "the kcat event was not applied");
    char sql[512];
    snprintf(sql, sizeof(sql),
             "SELECT count(*) FROM loom_commands WHERE consumer = '%s' AND message_id = "
             "'kcat-event-0001' AND status = 'applied' AND ray_id = 'ray-kcat-1' AND "
             "result->>'credited' = '42'",
             e.led.name);
    cr_assert_eq(loom_test_sql_ll(e.url, sql), 1);
    cr_assert_eq(
        loom_test_sql_ll(e.url, "SELECT count(*) FROM loom_events WHERE stream_id = 'account-kc-1' "
                                "AND causation_id = 'kcat-event-0001' AND version = 1"),
        1);

    /* A structured-mode event (the whole CloudEvent as JSON) is read too. */
    snprintf(cmd, sizeof(cmd),
             "printf '%%s' '{\"specversion\":\"1.0\",\"id\":\"kcat-structured-1\","
             "\"source\":\"urn:test\",\"type\":\"test.credit\","
             "\"data\":{\"account\":\"kc-2\",\"amount\":7}}' | "
             "kcat -P -b %s -t %s -k kc-2 -H content-type=application/cloudevents+json",
             brokers, e.led.topic);
    cr_assert_eq(system(cmd), 0);
    cr_assert_eq(loom_test_wait_for(e.url,
                                    "SELECT count(*) FROM test_ledger WHERE message_id = "
                                    "'kcat-structured-1' AND amount = 7",
                                    1, 60000),
                 1);

    /* What Loom published (through the outbox) reads back in kcat with its headers. */
    cr_assert_eq(loom_test_wait_for(e.url, "SELECT count(*) FROM loom_outbox", 0, 30000), 0,
                 "the outbox was not relayed");
    char out[] = "/tmp/loom-kcat-XXXXXX";
    int fd = mkstemp(out);
    close(fd);
    snprintf(cmd, sizeof(cmd),
             "kcat -C -b %s -t loom.evt.test.credited -o beginning -e -q "
             "-f '%%k|%%s|%%h\\n' > %s 2>&1",
             brokers, out);
    bool found = false;
    char *text = NULL;
    for (int tries = 0; tries < 30 && !found; tries++) {
        cr_assert_eq(system(cmd), 0);
        FILE *f = fopen(out, "r");
        char line[4096];
        while (f && fgets(line, sizeof(line), f))
            if (strstr(line, "ce_causationid=kcat-event-0001")) {
                found = true;
                free(text);
                text = strdup(line);
            }
        if (f)
            fclose(f);
        if (!found)
            loom_sleep_ms(500);
    }
    unlink(out);
    cr_assert(found, "kcat did not see the follow-up event");
    cr_assert(strncmp(text, "kc-1|{\"account\":\"kc-1\",\"amount\":42}|", 36) == 0, "%s", text);
    cr_assert(strstr(text, "ce_specversion=1.0"), "%s", text);
    cr_assert(strstr(text, "ce_type=test.credited"), "%s", text);
    cr_assert(strstr(text, "ce_rayid=ray-kcat-1"), "%s", text);
    cr_assert(strstr(text, "ce_source=loom://"), "%s", text);
    cr_assert(strstr(text, "content-type=application/json"), "%s", text);
    cr_assert(strstr(text, "ce_id="), "%s", text);
    free(text);
    loom_test_worker_stop(&e.worker);
}

/* ---- redelivery ------------------------------------------------------------------ */

Test(messaging, the_same_message_delivered_twice_is_applied_once, .timeout = 180)
{
    const char *brokers = loom_test_kafka_brokers();
    env_t e;
    env_init(&e, brokers, 2);
    env_start_worker(&e, brokers);
    loom_producer_t *p = loom_test_producer(brokers);
    for (int i = 0; i < 50; i++) {
        char id[64];
        snprintf(id, sizeof(id), "dup-%d", i);
        loom_test_credit(p, e.led.topic, id, "dup", 1, NULL);
        loom_test_credit(p, e.led.topic, id, "dup", 1, NULL); /* the same command again */
    }
    loom_producer_flush(p, 30000);
    cr_assert_eq(loom_test_wait_for(e.url, "SELECT count(*) FROM loom_commands", 50, 60000), 50);
    loom_sleep_ms(1000); /* give a double apply the time to show */
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT count(*) FROM test_ledger"), 50);
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT count(DISTINCT message_id) FROM test_ledger"), 50);
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT count(*) FROM loom_events"), 50);
    loom_worker_stats_t st;
    loom_worker_stats(e.worker.w, &st);
    cr_assert_eq(st.applied, 50);
    cr_assert_eq(st.skipped, 50);
    loom_producer_free(p);
    loom_test_worker_stop(&e.worker);
}

/* A worker stats field (offsetof in loom_worker_stats_t) once it reaches
 * want, or its value after 60 s. */
static long long wait_stats(loom_worker_t *w, size_t field, long long want)
{
    loom_worker_stats_t st;
    int64_t end = loom_mono_ms() + 60000;
    for (;;) {
        loom_worker_stats(w, &st);
        long long v = *(const int64_t *)((const char *)&st + field);
        if (v >= want || loom_mono_ms() > end)
            return v;
        loom_sleep_ms(20);
    }
}

/* Credits PREFIX-0 .. PREFIX-(n-1) to account "o": amount i + 1 with
 * `rising`, else 1. */
static void credits(loom_producer_t *p, const char *topic, const char *prefix, int n, bool rising)
{
    char id[64];
    for (int i = 0; i < n; i++) {
        snprintf(id, sizeof(id), "%s-%d", prefix, i);
        loom_test_credit(p, topic, id, "o", rising ? i + 1 : 1, NULL);
    }
}

/* Once a partition has found no command handled already, its batches skip
 * the dedup probe and send their loom_commands rows with the COMMIT. A copy
 * of an applied command must still be found: its row fails that transaction
 * and the batch runs again with the probe, whatever the handler said on the
 * way (here it refuses the copy of an "expect": 0 append, which the stream
 * has passed). */
Test(messaging, a_copy_of_an_applied_command_is_found_when_batches_skip_the_probe, .timeout = 180)
{
    const char *brokers = loom_test_kafka_brokers();
    env_t e;
    env_init(&e, brokers, 1);
    env_start_worker(&e, brokers);
    loom_producer_t *p = loom_test_producer(brokers);
    char id[64];
    /* 1: the first batch of the partition asks loom_commands, finds nothing. */
    credits(p, e.led.topic, "opt", 20, true);
    loom_test_credit(p, e.led.topic, "exp-1", "x", 100, "\"expect\":0");
    loom_producer_flush(p, 30000);
    cr_assert_eq(loom_test_wait_for(e.url, "SELECT count(*) FROM loom_commands", 21, 60000), 21);
    /* 2: from then on its batches skip the probe. */
    credits(p, e.led.topic, "new", 20, false);
    loom_producer_flush(p, 30000);
    cr_assert_eq(loom_test_wait_for(e.url, "SELECT count(*) FROM loom_commands", 41, 60000), 41);
    cr_assert_geq(wait_stats(e.worker.w, offsetof(loom_worker_stats_t, unprobed), 1), 1);
    loom_worker_stats_t before;
    loom_worker_stats(e.worker.w, &before);
    /* 3: copies of applied commands, an id reused with other data and new
     * commands, back to back. */
    credits(p, e.led.topic, "opt", 10, true);
    loom_test_credit(p, e.led.topic, "opt-10", "o", 999, NULL);
    credits(p, e.led.topic, "late", 5, false);
    loom_producer_flush(p, 30000);
    /* 41 + the conflict's own row + 5 new */
    cr_assert_eq(loom_test_wait_for(e.url, "SELECT count(*) FROM loom_commands", 47, 60000), 47);
    cr_assert_eq(wait_stats(e.worker.w, offsetof(loom_worker_stats_t, skipped), 11), 11);
    loom_worker_stats_t st;
    loom_worker_stats(e.worker.w, &st);
    cr_assert_gt(st.reprobed, before.reprobed, "the copies never met a batch without the probe");
    cr_assert_eq(st.applied, 46);
    cr_assert_eq(st.rejected, 0);
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT count(*) FROM test_ledger"), 46);
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT count(DISTINCT message_id) FROM test_ledger"), 46);
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT sum(amount) FROM test_ledger"),
                 210 + 100 + 20 + 5);
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT count(*) FROM loom_commands WHERE status = "
                                         "'conflict' AND conflict_of = 'opt-10'"),
                 1);
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT count(*) FROM loom_events"), 46);
    /* 4: a batch that finds nothing handled lets the partition skip the
     * probe again. */
    for (int i = 0; i < 3; i++) {
        snprintf(id, sizeof(id), "after-%d", i);
        loom_test_credit_sync(p, e.led.topic, id, "o", 1, NULL);
        cr_assert_eq(loom_test_wait_for(e.url, "SELECT count(*) FROM loom_commands", 48 + i, 60000),
                     48 + i);
    }
    cr_assert_gt(wait_stats(e.worker.w, offsetof(loom_worker_stats_t, unprobed), st.unprobed + 1),
                 st.unprobed);
    /* 5: alone, the copy of the "expect": 0 append fails on the way (the
     * stream is at version 1): it is found applied, not rejected. */
    loom_worker_stats(e.worker.w, &before);
    loom_test_credit(p, e.led.topic, "exp-1", "x", 100, "\"expect\":0");
    loom_producer_flush(p, 30000);
    cr_assert_eq(wait_stats(e.worker.w, offsetof(loom_worker_stats_t, skipped), 12), 12);
    loom_worker_stats(e.worker.w, &st);
    cr_assert_gt(st.reprobed, before.reprobed);
    cr_assert_eq(st.rejected, 0);
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT count(*) FROM loom_commands WHERE message_id = "
                                         "'exp-1' AND status = 'applied'"),
                 1);
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT count(*) FROM test_ledger"), 49);
    loom_producer_free(p);
    loom_test_worker_stop(&e.worker);
}

/* ---- the event log --------------------------------------------------------------------- */

Test(messaging, event_versions_are_contiguous_and_optimistic_checks_hold_within_a_batch,
     .timeout = 180)
{
    const char *brokers = loom_test_kafka_brokers();
    env_t e;
    env_init(&e, brokers, 1);
    loom_producer_t *p = loom_test_producer(brokers);
    /* Published before the worker starts, so they land in one batch. */
    loom_test_credit(p, e.led.topic, "v-1", "v", 1, NULL);
    loom_test_credit(p, e.led.topic, "v-2", "v", 1, NULL);
    loom_test_credit(p, e.led.topic, "v-3", "v", 1, NULL);
    loom_test_credit(p, e.led.topic, "v-4", "v", 1, "\"expect\":3");
    loom_test_credit(p, e.led.topic, "v-5", "v", 1, "\"expect\":3"); /* stale: the stream is at 4 */
    loom_test_credit(p, e.led.topic, "v-6", "v", 1, NULL);
    loom_producer_flush(p, 30000);
    env_start_worker(&e, brokers);
    cr_assert_eq(loom_test_wait_for(e.url, "SELECT count(*) FROM loom_commands", 6, 60000), 6);
    char *v = loom_test_sql_value(e.url, "SELECT string_agg(version || ':' || causation_id, ',' "
                                         "ORDER BY version) FROM loom_events "
                                         "WHERE stream_id = 'account-v'");
    cr_assert_str_eq(v, "1:v-1,2:v-2,3:v-3,4:v-4,5:v-6");
    free(v);
    cr_assert_eq(
        loom_test_sql_ll(e.url, "SELECT count(*) FROM loom_commands WHERE message_id = 'v-5' AND "
                                "status = 'rejected' AND last_error LIKE '%at version 4, not 3%'"),
        1);
    /* A later batch appends after what is stored. */
    loom_test_credit(p, e.led.topic, "v-7", "v", 1, NULL);
    loom_test_credit(p, e.led.topic, "v-8", "v", 1, "\"expect\":6");
    loom_producer_flush(p, 30000);
    cr_assert_eq(
        loom_test_wait_for(
            e.url, "SELECT max(version) FROM loom_events WHERE stream_id = 'account-v'", 7, 60000),
        7);
    cr_assert_eq(
        loom_test_sql_ll(e.url, "SELECT count(*) FROM loom_events WHERE stream_id = 'account-v'"),
        7);
    loom_producer_free(p);
    loom_test_worker_stop(&e.worker);
}

/* ---- rows added for the whole batch ---------------------------------------------------- */

Test(messaging, a_batch_row_the_database_refuses_rejects_only_its_own_command, .timeout = 180)
{
    const char *brokers = loom_test_kafka_brokers();
    env_t e;
    env_init(&e, brokers, 1);
    loom_producer_t *p = loom_test_producer(brokers);
    /* In one batch: c-2 claims what c-1 claimed, so the batch's multi-row
     * INSERT into test_claims fails as a whole. */
    loom_test_credit(p, e.led.topic, "c-1", "c", 1, "\"claim\":\"x\"");
    loom_test_credit(p, e.led.topic, "c-2", "c", 10, "\"claim\":\"x\"");
    loom_test_credit(p, e.led.topic, "c-3", "c", 100, "\"claim\":\"y\"");
    loom_test_credit(p, e.led.topic, "c-4", "c", 1000, NULL);
    loom_producer_flush(p, 30000);
    env_start_worker(&e, brokers);
    cr_assert_eq(loom_test_wait_for(e.url, "SELECT count(*) FROM loom_commands", 4, 60000), 4);
    char *v = loom_test_sql_value(
        e.url, "SELECT string_agg(message_id || ':' || status, ',' ORDER BY message_id) "
               "FROM loom_commands");
    cr_assert_str_eq(v, "c-1:applied,c-2:rejected,c-3:applied,c-4:applied");
    free(v);
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT count(*) FROM loom_commands WHERE message_id = "
                                         "'c-2' AND last_error LIKE '%test_claims_pkey%'"),
                 1);
    /* The refused command left nothing behind: no ledger row, no event. */
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT sum(amount) FROM test_ledger"), 1101);
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT count(*) FROM loom_events"), 3);
    v = loom_test_sql_value(e.url,
                            "SELECT string_agg(name || '=' || message_id, ',' ORDER BY name) "
                            "FROM test_claims");
    cr_assert_str_eq(v, "x=c-1,y=c-3");
    free(v);
    loom_producer_free(p);
    loom_test_worker_stop(&e.worker);
}

/* ---- failure classes ---------------------------------------------------------------- */

Test(messaging, a_transient_failure_holds_only_its_partition_and_a_rejection_holds_nothing,
     .timeout = 240)
{
    const char *brokers = loom_test_kafka_brokers();
    env_t e;
    env_init(&e, brokers, 4);
    loom_test_sql(e.url, "INSERT INTO test_blocks VALUES ('stuck')");
    env_start_worker(&e, brokers);
    loom_producer_t *p = loom_test_producer(brokers);
    int32_t stuck =
        loom_test_credit_sync(p, e.led.topic, "blocked-1", "stuck", 5, "\"fail\":\"blocked\"");
    loom_test_credit_sync(p, e.led.topic, "blocked-2", "stuck", 6,
                          NULL); /* same key: waits behind it */
    loom_test_credit_sync(p, e.led.topic, "poison-1", "other", 1, "\"fail\":\"permanent\"");
    int32_t flaky = loom_test_credit_sync(p, e.led.topic, "flaky-1", "flaky", 3,
                                          "\"fail\":\"transient\",\"fail_times\":2");
    int free_flowing = flaky != stuck; /* rows expected outside the stuck partition */
    for (int i = 0; i < 200; i++) {
        char acct[16];
        snprintf(acct, sizeof(acct), "acct-%d", i % 20);
        free_flowing += loom_test_credit_sync(p, e.led.topic, NULL, acct, 1, NULL) != stuck;
    }
    cr_assert_gt(free_flowing, 20, "some keys share no partition with 'stuck'");
    int32_t poison_part = loom_test_credit_sync(p, e.led.topic, "after-poison", "other", 2, NULL);
    free_flowing += poison_part != stuck;
    cr_assert_neq(poison_part, stuck, "pick keys so 'other' and 'stuck' do not share a partition");

    /* Everything in the other partitions flows while 'stuck' waits. */
    char sql[512];
    snprintf(sql, sizeof(sql), "SELECT count(*) FROM test_ledger WHERE kafka_partition <> %d",
             (int)stuck);
    cr_assert_eq(loom_test_wait_for(e.url, sql, free_flowing, 90000), free_flowing);
    char *acct_part = loom_test_sql_value(
        e.url,
        "SELECT count(DISTINCT kafka_partition) FROM test_ledger WHERE account LIKE 'acct-%'");
    cr_assert_geq(atoi(acct_part), 2, "keys spread over partitions");
    free(acct_part);
    cr_assert_eq(
        loom_test_sql_ll(e.url, "SELECT count(*) FROM test_ledger WHERE account = 'stuck'"), 0);
    cr_assert_eq(
        loom_test_sql_ll(e.url, "SELECT count(*) FROM loom_commands WHERE message_id = 'poison-1' "
                                "AND status = 'rejected' AND last_error LIKE '%closed%'"),
        1);
    cr_assert_eq(loom_test_sql_ll(e.url,
                                  "SELECT attempts FROM loom_commands WHERE message_id = 'flaky-1' "
                                  "AND status = 'applied'"),
                 3, "two transient failures, then applied");
    cr_assert_geq(
        loom_test_wait_for(e.url,
                           "SELECT CASE WHEN attempts >= 3 THEN 3 ELSE attempts END FROM "
                           "loom_commands WHERE message_id = 'blocked-1' AND status = 'retrying'",
                           3, 30000),
        3, "the blocked command is retried and its attempts counted");

    /* Operators see both in `loom commands list`. */
    char envurl[600];
    snprintf(envurl, sizeof(envurl), "LOOM_DATABASE_URL=%s", e.url);
    const char *env[] = {envurl, NULL};
    const char *argv[] = {loom_test_bin(), "commands", "list", "--limit", "1000", NULL};
    char *out, *err;
    cr_assert_eq(loom_test_run(argv, env, &out, &err), 0, "%s", err);
    cr_assert(strstr(out, "poison-1"), "%s", out);
    cr_assert(strstr(out, "rejected"), "%s", out);
    free(out);
    free(err);
    const char *argv2[] = {loom_test_bin(), "commands", "list", "--stuck", NULL};
    cr_assert_eq(loom_test_run(argv2, env, &out, &err), 0, "%s", err);
    cr_assert(strstr(out, "blocked-1"), "%s", out);
    cr_assert(strstr(out, "retrying"), "%s", out);
    cr_assert_null(strstr(out, "poison-1"), "%s", out);
    free(out);
    free(err);

    /* Unblocked, the partition catches up in order. */
    loom_test_sql(e.url, "DELETE FROM test_blocks");
    cr_assert_eq(loom_test_wait_for(
                     e.url, "SELECT count(*) FROM test_ledger WHERE account = 'stuck'", 2, 60000),
                 2);
    cr_assert_eq(
        loom_test_sql_ll(e.url, "SELECT count(*) FROM test_ledger WHERE account = 'stuck' AND "
                                "message_id = 'blocked-1' AND kafka_offset < (SELECT kafka_offset "
                                "FROM test_ledger WHERE message_id = 'blocked-2')"),
        1, "blocked-1 before blocked-2");
    cr_assert_eq(loom_test_wait_for(e.url,
                                    "SELECT count(*) FROM loom_commands WHERE status = 'applied'",
                                    200 + 4, 60000),
                 200 + 4, "all but the rejected one");
    loom_producer_free(p);
    loom_test_worker_stop(&e.worker);
}

/* ---- processes: kill -9, two workers ------------------------------------------------- */

static pid_t start_worker_process(const char *url, const char *brokers, const char *suffix, int *fd)
{
    static char e1[600], e2[256], e3[128];
    snprintf(e1, sizeof(e1), "LOOM_DATABASE_URL=%s", url);
    snprintf(e2, sizeof(e2), "LOOM_KAFKA_BROKERS=%s", brokers);
    snprintf(e3, sizeof(e3), "LOOM_TEST_LEDGER_SUFFIX=%s", suffix);
    const char *env[] = {e1, e2, e3, NULL};
    const char *argv[] = {loom_test_app_bin(), "worker", NULL};
    return loom_test_spawn(argv, env, fd);
}

Test(messaging, kill_9_in_the_middle_of_20000_commands_then_restart_applies_each_once,
     .timeout = 600)
{
    const char *brokers = loom_test_kafka_brokers();
    env_t e;
    env_init(&e, brokers, 6);
    enum { N = 20000 };
    loom_producer_t *p = loom_test_producer(brokers);
    for (int i = 0; i < N; i++) {
        char acct[16];
        snprintf(acct, sizeof(acct), "k-%d", i % 97);
        loom_test_credit(p, e.led.topic, NULL, acct, i + 1, NULL);
    }
    cr_assert_eq(loom_producer_flush(p, 120000), 0);
    loom_producer_free(p);

    int fd;
    pid_t pid = start_worker_process(e.url, brokers, e.led.suffix, &fd);
    /* Wait until it is in the middle of the stream, then kill it hard. */
    int64_t end = loom_mono_ms() + 120000;
    long long applied = 0;
    while ((applied = loom_test_sql_ll(e.url, "SELECT count(*) FROM test_ledger")) < N / 4 &&
           loom_mono_ms() < end)
        loom_sleep_ms(20);
    cr_assert_lt(applied, N, "the worker finished before it could be killed");
    cr_assert_gt(applied, 0);
    kill(pid, SIGKILL);
    loom_test_wait(pid, 10000);
    close(fd);
    long long at_kill = loom_test_sql_ll(e.url, "SELECT count(*) FROM test_ledger");

    pid = start_worker_process(e.url, brokers, e.led.suffix, &fd);
    long long done = loom_test_wait_for(e.url, "SELECT count(*) FROM test_ledger", N, 300000);
    kill(pid, SIGTERM);
    int status = loom_test_wait(pid, 60000);
    char *log = NULL;
    loom_test_read_until(fd, "\x01", 200, &log);
    close(fd);
    cr_assert_eq(status, 0, "graceful stop exited %d:\n%.2000s", status, log);
    cr_assert_eq(done, N, "applied %lld of %d (killed at %lld)", done, N, at_kill);
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT count(DISTINCT message_id) FROM test_ledger"), N,
                 "a command was applied twice");
    long long want_sum = (long long)N * (N + 1) / 2;
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT sum(amount) FROM test_ledger"), want_sum);
    cr_assert_eq(
        loom_test_sql_ll(e.url, "SELECT count(*) FROM loom_commands WHERE status = 'applied'"), N);
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT count(*) FROM loom_events"), N);
    cr_log_info("killed at %lld of %d applied; after restart %lld, sum %lld", at_kill, N, done,
                want_sum);
    free(log);
}

Test(messaging, two_worker_processes_split_partitions_and_take_over_when_one_stops, .timeout = 600)
{
    const char *brokers = loom_test_kafka_brokers();
    env_t e;
    env_init(&e, brokers, 6);
    int fa, fb;
    pid_t a = start_worker_process(e.url, brokers, e.led.suffix, &fa);
    pid_t b = start_worker_process(e.url, brokers, e.led.suffix, &fb);
    char *la = NULL, *lb = NULL;
    cr_assert(loom_test_read_until(fa, "msg=\"partitions assigned\"", 60000, &la), "%s", la);
    cr_assert(loom_test_read_until(fb, "msg=\"partitions assigned\"", 60000, &lb), "%s", lb);

    loom_producer_t *p = loom_test_producer(brokers);
    for (int i = 0; i < 3000; i++) {
        char acct[16];
        snprintf(acct, sizeof(acct), "t-%d", i % 60);
        loom_test_credit(p, e.led.topic, NULL, acct, 1, NULL);
    }
    loom_producer_flush(p, 60000);
    cr_assert_eq(loom_test_wait_for(e.url, "SELECT count(*) FROM test_ledger", 3000, 120000), 3000);
    /* The group split the six partitions: three each. */
    loom_test_read_until(fa, "count=3", 15000, &la);
    loom_test_read_until(fb, "count=3", 15000, &lb);
    cr_assert(strstr(la, "count=3"), "worker a:\n%s", tail(la, 3000));
    cr_assert(strstr(lb, "count=3"), "worker b:\n%s", tail(lb, 3000));
    cr_assert_gt(loom_test_sql_ll(e.url, "SELECT count(DISTINCT kafka_partition) FROM test_ledger"),
                 3);

    /* Stop one; the other takes all six partitions and keeps applying. */
    kill(a, SIGTERM);
    cr_assert_eq(loom_test_wait(a, 60000), 0, "%s", tail(la, 3000));
    char *after = NULL;
    cr_assert(loom_test_read_until(fb, "count=6", 60000, &after), "worker b after a left:\n%s",
              tail(after, 3000));
    free(after);
    for (int i = 0; i < 3000; i++) {
        char acct[16];
        snprintf(acct, sizeof(acct), "t-%d", i % 60);
        loom_test_credit(p, e.led.topic, NULL, acct, 1, NULL);
    }
    loom_producer_flush(p, 60000);
    cr_assert_eq(loom_test_wait_for(e.url, "SELECT count(*) FROM test_ledger", 6000, 120000), 6000);
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT count(DISTINCT message_id) FROM test_ledger"),
                 6000);
    kill(b, SIGTERM);
    cr_assert_eq(loom_test_wait(b, 60000), 0);
    loom_producer_free(p);
    close(fa);
    close(fb);
    free(la);
    free(lb);
}

/* ---- the mock cluster: a broker taken down and brought back ---------------------------- */

Test(messaging, a_worker_stops_in_bounded_time_when_the_broker_does_not_answer, .timeout = 300)
{
    rd_kafka_mock_cluster_t *mc;
    const char *brokers;
    rd_kafka_t *owner = loom_test_mock_cluster(1, &mc, &brokers);
    env_mock = mc;
    env_t e;
    env_init(&e, brokers, 2);
    env_start_worker(&e, brokers);
    loom_producer_t *p = loom_test_producer(brokers);
    for (int i = 0; i < 100; i++)
        loom_test_credit(p, e.led.topic, NULL, "gone", 1, NULL);
    loom_producer_flush(p, 60000);
    cr_assert_eq(loom_test_wait_for(e.url, "SELECT count(*) FROM test_ledger", 100, 60000), 100);
    loom_producer_free(p);
    /* The broker stops answering (a stopping or overloaded broker keeps its
     * connections open); stopping must neither hang on the offset commit nor
     * on leaving the group. */
    rd_kafka_mock_broker_set_rtt(mc, 1, 120000);
    int64_t t0 = loom_mono_ms();
    loom_test_worker_stop(&e.worker);
    int64_t took = loom_mono_ms() - t0;
    cr_log_info("worker stopped %lld ms after the broker stopped answering", (long long)took);
    cr_assert_lt(took, 60000, "stopping took %lld ms", (long long)took);
    rd_kafka_mock_cluster_destroy(mc);
    rd_kafka_destroy(owner);
    env_mock = NULL;
}

Test(messaging, a_broker_down_and_back_loses_nothing_on_the_mock_cluster, .timeout = 300)
{
    rd_kafka_mock_cluster_t *mc;
    const char *brokers;
    rd_kafka_t *owner = loom_test_mock_cluster(3, &mc, &brokers);
    env_mock = mc;
    env_t e;
    env_init(&e, brokers, 6);
    env_start_worker(&e, brokers);
    loom_producer_t *p = loom_test_producer(brokers);
    for (int i = 0; i < 1000; i++)
        loom_test_credit(p, e.led.topic, NULL, i % 2 ? "odd" : "even", 1, NULL);
    loom_producer_flush(p, 60000);
    cr_assert_geq(loom_test_wait_for(e.url, "SELECT count(*) FROM test_ledger", 1000, 60000), 1);

    rd_kafka_mock_broker_set_down(mc, 1);
    rd_kafka_mock_broker_set_down(mc, 2);
    for (int i = 0; i < 1000; i++)
        loom_test_credit(p, e.led.topic, NULL, i % 2 ? "odd" : "even", 1, NULL);
    loom_sleep_ms(3000);
    rd_kafka_mock_broker_set_up(mc, 1);
    rd_kafka_mock_broker_set_up(mc, 2);
    cr_assert_eq(loom_producer_flush(p, 120000), 0);
    cr_assert_eq(loom_test_wait_for(e.url, "SELECT count(*) FROM test_ledger", 2000, 120000), 2000);
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT count(DISTINCT message_id) FROM test_ledger"),
                 2000);
    loom_producer_free(p);
    loom_test_worker_stop(&e.worker);
    rd_kafka_mock_cluster_destroy(mc);
    rd_kafka_destroy(owner);
}

/* ---- commands for people: migrate up (topics), publish, commands ------------------------ */

static int app_run(const char *url, const char *brokers, const char *suffix, const char *shell,
                   char **out, char **err)
{
    char e1[600], e2[256], e3[128];
    snprintf(e1, sizeof(e1), "LOOM_DATABASE_URL=%s", url);
    snprintf(e2, sizeof(e2), "LOOM_KAFKA_BROKERS=%s", brokers);
    snprintf(e3, sizeof(e3), "LOOM_TEST_LEDGER_SUFFIX=%s", suffix);
    const char *env[] = {e1, e2, e3, "LOOM_KAFKA_PARTITIONS=3", NULL};
    char cmd[4096];
    snprintf(cmd, sizeof(cmd), "exec %s %s", loom_test_app_bin(), shell);
    const char *argv[] = {"/bin/sh", "-c", cmd, NULL};
    return loom_test_run(argv, env, out, err);
}

Test(messaging, migrate_up_publish_and_commands_park_replay_from_the_shell, .timeout = 300)
{
    const char *brokers = loom_test_kafka_brokers();
    env_t e;
    memset(&e, 0, sizeof(e));
    loom_test_db_create(e.url, sizeof(e.url));
    loom_test_ledger_init(&e.led, "s");
    char *out, *err;

    cr_assert_eq(app_run(e.url, brokers, e.led.suffix, "migrate up", &out, &err), 0, "%s", err);
    /* Its own topic is new; the engine's loom.cmd.engine (the console's park
     * and replay) may be there already from another test on this broker. */
    cr_assert(strstr(out, "kafka: 2 topics created, 0 already there (3 partitions each)") ||
                  strstr(out, "kafka: 1 topic created, 1 already there (3 partitions each)"),
              "%s", out);
    free(out);
    free(err);
    char cmd[1024];
    snprintf(cmd, sizeof(cmd), "kcat -L -b %s -t %s | grep -c 'partition [0-2],'", brokers,
             e.led.topic);
    /* A new topic's metadata takes a moment to reach every listener. */
    char line[64] = "";
    for (int tries = 0; tries < 50 && atoi(line) != 3; tries++) {
        if (tries)
            loom_sleep_ms(200);
        FILE *f = popen(cmd, "r");
        line[0] = '\0';
        if (!fgets(line, sizeof(line), f))
            line[0] = '\0';
        pclose(f);
    }
    cr_assert_eq(atoi(line), 3, "the topic has 3 partitions");

    loom_test_sql(e.url, "INSERT INTO test_blocks VALUES ('p')");
    env_start_worker(&e, brokers);

    snprintf(cmd, sizeof(cmd), "publish --key a1 %s '{\"account\":\"a1\",\"amount\":3}'",
             e.led.topic);
    cr_assert_eq(app_run(e.url, brokers, e.led.suffix, cmd, &out, &err), 0, "%s", err);
    cr_assert(strstr(out, "published 1 message to"), "%s", out);
    free(out);
    free(err);

    char nd[] = "/tmp/loom-ndjson-XXXXXX";
    int fd = mkstemp(nd);
    FILE *nf = fdopen(fd, "w");
    for (int i = 0; i < 100; i++)
        fprintf(nf, "{\"account\":\"n%d\",\"amount\":%d}\n", i % 7, i);
    fprintf(nf, "\nnot json\n");
    fclose(nf);
    snprintf(cmd, sizeof(cmd), "publish %s - < %s", e.led.topic, nd);
    cr_assert_eq(app_run(e.url, brokers, e.led.suffix, cmd, &out, &err), 1, "%s", err);
    cr_assert(strstr(out, "published 100 messages to"), "%s", out);
    cr_assert(strstr(out, "1 failed"), "%s", out);
    cr_assert(strstr(err, "line 102: not valid JSON"), "%s", err);
    free(out);
    free(err);
    unlink(nd);
    cr_assert_eq(loom_test_wait_for(e.url, "SELECT count(*) FROM test_ledger", 101, 60000), 101);

    /* A stuck command: parked to free its partition, then replayed. */
    snprintf(cmd, sizeof(cmd),
             "publish --key p %s '{\"specversion\":\"1.0\",\"id\":\"cli-stuck-1\","
             "\"source\":\"urn:test\",\"type\":\"test.credit\","
             "\"data\":{\"account\":\"p\",\"amount\":9,\"fail\":\"blocked\"}}'",
             e.led.topic);
    cr_assert_eq(app_run(e.url, brokers, e.led.suffix, cmd, &out, &err), 0, "%s", err);
    free(out);
    free(err);
    snprintf(cmd, sizeof(cmd), "publish --key p %s '{\"account\":\"p\",\"amount\":1}'",
             e.led.topic);
    cr_assert_eq(app_run(e.url, brokers, e.led.suffix, cmd, &out, &err), 0, "%s", err);
    free(out);
    free(err);
    cr_assert_eq(
        loom_test_wait_for(e.url,
                           "SELECT count(*) FROM loom_commands WHERE message_id = 'cli-stuck-1' "
                           "AND status = 'retrying'",
                           1, 30000),
        1);
    cr_assert_eq(app_run(e.url, brokers, e.led.suffix, "commands show cli-stuck-1", &out, &err), 0,
                 "%s", err);
    cr_assert(strstr(out, "\"status\":\"retrying\""), "%s", out);
    cr_assert(strstr(out, "is blocked"), "%s", out);
    free(out);
    free(err);
    cr_assert_eq(app_run(e.url, brokers, e.led.suffix, "commands park cli-stuck-1", &out, &err), 0,
                 "%s", err);
    cr_assert(strstr(out, "parked cli-stuck-1"), "%s", out);
    free(out);
    free(err);
    /* The command behind it on the same key now goes through. */
    cr_assert_eq(
        loom_test_wait_for(e.url, "SELECT count(*) FROM test_ledger WHERE account = 'p'", 1, 60000),
        1);
    cr_assert_eq(loom_test_sql_ll(
                     e.url, "SELECT count(*) FROM test_ledger WHERE message_id = 'cli-stuck-1'"),
                 0);

    loom_test_sql(e.url, "DELETE FROM test_blocks");
    cr_assert_eq(app_run(e.url, brokers, e.led.suffix, "commands replay cli-stuck-1", &out, &err),
                 0, "%s", err);
    cr_assert(strstr(out, "replayed cli-stuck-1"), "%s", out);
    free(out);
    free(err);
    cr_assert_eq(
        loom_test_wait_for(e.url,
                           "SELECT count(*) FROM loom_commands WHERE message_id = 'cli-stuck-1' "
                           "AND status = 'applied'",
                           1, 60000),
        1);
    cr_assert_eq(loom_test_sql_ll(
                     e.url, "SELECT count(*) FROM test_ledger WHERE message_id = 'cli-stuck-1'"),
                 1);
    cr_assert_eq(app_run(e.url, brokers, e.led.suffix, "commands show no-such-id", &out, &err), 6);
    free(out);
    free(err);
    loom_test_worker_stop(&e.worker);
}

/* ---- Postgres stopped for 10 s under load ------------------------------------------------ */

Test(messaging, postgres_stopped_for_10_s_under_load_loses_nothing_and_recovers_by_itself,
     .timeout = 400)
{
    const char *brokers = loom_test_kafka_brokers();
    char dir[] = "/tmp/loom-pgdown-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    chmod(dir, 0755);
    char pgdir[128];
    snprintf(pgdir, sizeof(pgdir), "%s/pg", dir);
    loom_pglocal_t pg;
    loom_error_t err;
    loom_pglocal_opts_t po = {.fast = true};
    cr_assert_eq(loom_pglocal_start(&pg, pgdir, &po, &err), 0, "%s", err.message);
    po.port = pg.port;

    env_t e;
    memset(&e, 0, sizeof(e));
    snprintf(e.url, sizeof(e.url), "%s", pg.url);
    loom_test_migrate_ledger(e.url);
    loom_test_ledger_init(&e.led, "s");
    loom_test_kafka_topic(brokers, e.led.topic, 4);
    env_start_worker(&e, brokers);

    loom_producer_t *p = loom_test_producer(brokers);
    for (int i = 0; i < 1500; i++)
        loom_test_credit(p, e.led.topic, NULL, i % 3 ? "x" : "y", i + 1, NULL);
    loom_producer_flush(p, 60000);
    cr_assert_geq(
        loom_test_wait_for(e.url, "SELECT least(count(*), 500) FROM test_ledger", 500, 60000), 500);

    cr_assert_eq(loom_pglocal_stop(&pg), 0);
    int64_t down_at = loom_mono_ms();
    for (int i = 1500; i < 3000; i++) /* the load goes on while the database is away */
        loom_test_credit(p, e.led.topic, NULL, i % 3 ? "x" : "y", i + 1, NULL);
    loom_producer_flush(p, 60000);
    loom_sleep_ms(10000 - (loom_mono_ms() - down_at));
    cr_assert_eq(loom_pglocal_start(&pg, pgdir, &po, &err), 0, "%s", err.message);
    int64_t up_at = loom_mono_ms();

    long long n = loom_test_wait_for(e.url, "SELECT count(*) FROM test_ledger", 3000, 180000);
    int64_t recovered_ms = loom_mono_ms() - up_at;
    cr_assert_eq(n, 3000, "applied %lld of 3000 after the outage", n);
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT count(DISTINCT message_id) FROM test_ledger"),
                 3000);
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT sum(amount) FROM test_ledger"), 3000LL * 3001 / 2);
    loom_worker_stats_t st;
    loom_worker_stats(e.worker.w, &st);
    cr_assert_gt(st.retries, 0, "the outage was noticed and retried");
    cr_log_info("database down %lld ms; all applied %lld ms after it came back, %lld retries",
                (long long)(up_at - down_at), (long long)recovered_ms, (long long)st.retries);
    loom_producer_free(p);
    loom_test_worker_stop(&e.worker);
    loom_pglocal_stop(&pg);
    char cmd[200];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    cr_assert_eq(system(cmd), 0);
}

/* ---- a partition whose lag stays above zero while nothing arrives ----------------------- */

Test(messaging, an_idle_partition_after_a_restart_is_not_reported_as_stalled, .timeout = 300)
{
    rd_kafka_mock_cluster_t *mc;
    const char *brokers;
    rd_kafka_t *owner = loom_test_mock_cluster(1, &mc, &brokers);
    env_mock = mc;
    env_t e;
    env_init(&e, brokers, 2);
    loom_worker_opts_t o = {
        .brokers = brokers, .consumers = &e.led.def, .n_consumers = 1, .stall_after_ms = 1000};
    loom_test_worker_start(&e.worker, e.url, 4, false, o);
    loom_producer_t *p = loom_test_producer(brokers);
    for (int i = 0; i < 20; i++)
        loom_test_credit(p, e.led.topic, NULL, i % 2 ? "a" : "b", 1, NULL);
    loom_producer_flush(p, 30000);
    cr_assert_eq(loom_test_wait_for(e.url, "SELECT count(*) FROM test_ledger", 20, 60000), 20);
    loom_worker_free(e.worker.w);
    /* A new worker of the same group (on the same pool): its partitions have
     * nothing to fetch, so librdkafka gives them no position. Nothing waits:
     * no stall. */
    loom_metrics_t *reg = loom_metrics_new();
    o.metrics = reg;
    o.pool = e.worker.pool;
    loom_error_t err;
    cr_assert_eq(loom_worker_start(&o, &e.worker.w, &err), 0, "%s", err.message);
    char want[256];
    snprintf(want, sizeof(want), "loom_consumer_lag{consumer=\"%s\"", e.led.name);
    int64_t t0 = loom_mono_ms();
    for (char *t = NULL; loom_mono_ms() - t0 < 60000; free(t)) {
        t = loom_metrics_render_string(reg, NULL);
        if (strstr(t, want)) {
            free(t);
            break;
        }
        loom_sleep_ms(100);
    }
    cr_log_info("partitions watched after %lld ms", (long long)(loom_mono_ms() - t0));
    loom_sleep_ms(3000); /* three times stall_after_ms */
    loom_worker_stats_t st = {0};
    loom_worker_stats(e.worker.w, &st);
    cr_assert_eq(st.stalls, 0, "an idle, fully applied partition was reported as stalled");
    char *text = loom_metrics_render_string(reg, NULL);
    snprintf(want, sizeof(want), "loom_consumer_stalled_partitions{consumer=\"%s\"} 0", e.led.name);
    cr_assert(strstr(text, want), "%s", text);
    /* and the lag of every partition is 0 */
    snprintf(want, sizeof(want), "loom_consumer_lag{consumer=\"%s\"", e.led.name);
    int lags = 0;
    for (const char *l = strstr(text, want); l; l = strstr(l + 1, want), lags++)
        cr_assert(strncmp(strchr(l, '}'), "} 0\n", 4) == 0, "%.120s", l);
    cr_assert_eq(lags, 2, "%s", text);
    free(text);
    loom_producer_free(p);
    loom_test_worker_stop(&e.worker);
    loom_metrics_free(reg);
    rd_kafka_mock_cluster_destroy(mc);
    rd_kafka_destroy(owner);
    env_mock = NULL;
}

Test(messaging, a_stalled_partition_is_reported_in_the_log_and_metrics, .timeout = 300)
{
    rd_kafka_mock_cluster_t *mc;
    const char *brokers;
    rd_kafka_t *owner = loom_test_mock_cluster(1, &mc, &brokers);
    env_mock = mc;
    env_t e;
    env_init(&e, brokers, 1);
    loom_metrics_t *reg = loom_metrics_new();
    loom_worker_opts_t o = loom_test_worker_opts(brokers, &e.led.def);
    o.stall_after_ms = 1000;
    o.metrics = reg;
    loom_test_worker_start(&e.worker, e.url, 4, false, o);
    loom_producer_t *p = loom_test_producer(brokers);
    for (int i = 0; i < 10; i++)
        loom_test_credit(p, e.led.topic, NULL, "s", 1, NULL);
    loom_producer_flush(p, 30000);
    cr_assert_eq(loom_test_wait_for(e.url, "SELECT count(*) FROM test_ledger", 10, 60000), 10);

    /* Fetches fail from now on while messages keep arriving. */
    /* Enough failed fetches (about half a second apart) for the stall to be
     * seen and repaired, few enough that they run out well within the
     * drain's wait below. */
    rd_kafka_resp_err_t errs[60];
    for (int i = 0; i < 60; i++)
        errs[i] = RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION;
    rd_kafka_mock_push_request_errors_array(mc, 1 /* Fetch API key */, 60, errs);
    for (int i = 0; i < 10; i++)
        loom_test_credit(p, e.led.topic, NULL, "s", 1, NULL);
    loom_producer_flush(p, 30000);
    /* The worker reports the stall (counter and gauge) and then repairs it
     * (a seek, then leaving and rejoining the group), which resets the
     * gauge: it is sampled while waiting. */
    loom_worker_stats_t st = {0};
    char want[256];
    snprintf(want, sizeof(want), "loom_consumer_stalled_partitions{consumer=\"%s\"} 1", e.led.name);
    bool gauge = false;
    int64_t end = loom_mono_ms() + 60000;
    while ((st.stalls == 0 || !gauge) && loom_mono_ms() < end) {
        loom_sleep_ms(100);
        loom_worker_stats(e.worker.w, &st);
        char *text = loom_metrics_render_string(reg, NULL);
        gauge = gauge || strstr(text, want);
        free(text);
    }
    cr_assert_gt(st.stalls, 0, "no stall was reported");
    cr_assert(gauge, "the stalled-partitions gauge never showed it");
    /* Once fetches work again the backlog drains and the gauge drops. */
    cr_assert_eq(loom_test_wait_for(e.url, "SELECT count(*) FROM test_ledger", 20, 180000), 20);
    loom_producer_free(p);
    loom_test_worker_stop(&e.worker);
    loom_metrics_free(reg);
    rd_kafka_mock_cluster_destroy(mc);
    rd_kafka_destroy(owner);
    env_mock = NULL;
}
