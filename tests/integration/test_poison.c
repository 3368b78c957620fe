/*
 * Every message a worker takes ends visible: hostile messages published
 * straight to a real Kafka partition (the Apache Kafka broker of the
 * harness), each followed by a good command on the same partition. The test
 * waits for the good command to be applied, then finds the hostile one
 * recorded: rejected (under its own ce_id when that id is usable, else under
 * its Kafka position, with its raw bytes), a conflict, or applied. A stalled
 * partition or a message dropped without a trace fails it.
 *
 * The rows of the table in docs/operations.md ("What happens to a message")
 * are tested here, one test per kind of trouble.
 */
#include "support.h"
#include "loom/bus.h"
#include "loom/clock.h"
#include "loom/envelope.h"
#include "loom/worker.h"
#include "messages/messages.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct penv {
    char url[512];
    char suffix[64];
    char topic[200];
    char name[128];
    const char *topics[2];
    loom_consumer_def_t def;
    loom_test_worker_t worker; /* its relay publishes the test's messages too */
} penv_t;

/* The messages service's command table as one handler. */
static int messages_store_handler(loom_msg_t *msg, loom_error_t *err)
{
    return loom_msg_dispatch(msg, messages_commands, loom_commands_count(messages_commands), err);
}

/* A worker with one consumer (the test ledger, or `handler`) on a topic of
 * one partition of its own: every message of a test shares that partition. */
static void penv_start(penv_t *e, loom_handler_fn handler)
{
    memset(e, 0, sizeof(*e));
    const char *brokers = loom_test_kafka_brokers();
    loom_test_db_create_ledger(e->url, sizeof(e->url));
    loom_test_unique_name("p", e->suffix, sizeof(e->suffix));
    snprintf(e->topic, sizeof(e->topic), "loom.cmd.poison.%s", e->suffix);
    snprintf(e->name, sizeof(e->name), "test.poison.%s", e->suffix);
    loom_test_kafka_topic(brokers, e->topic, 1);
    e->topics[0] = e->topic;
    e->def = loom_test_consumers[0];
    e->def.name = e->name;
    e->def.topics = e->topics;
    if (handler)
        e->def.handler = handler;
    loom_test_worker_start(&e->worker, e->url, 4, true, loom_test_worker_opts(brokers, &e->def));
}

/* Binary-mode headers of a valid command (id, type test.credit). */
static rd_kafka_headers_t *hdrs_ok(const char *id)
{
    rd_kafka_headers_t *h = rd_kafka_headers_new(8);
    rd_kafka_header_add(h, "ce_specversion", -1, "1.0", -1);
    rd_kafka_header_add(h, "ce_id", -1, id, -1);
    rd_kafka_header_add(h, "ce_source", -1, "urn:test:poison", -1);
    rd_kafka_header_add(h, "ce_type", -1, "test.credit", -1);
    rd_kafka_header_add(h, "content-type", -1, "application/json", -1);
    return h;
}

/* Replaces (or adds) header `name` with n bytes of v. */
static void hdr_set(rd_kafka_headers_t *h, const char *name, const void *v, size_t n)
{
    rd_kafka_header_remove(h, name);
    rd_kafka_header_add(h, name, -1, v, (ssize_t)n);
}

/* Publishes one message as it is and waits for the broker; returns its
 * offset. The headers are taken. */
static int64_t publish(penv_t *e, const void *key, size_t key_len, rd_kafka_headers_t *h,
                       const void *value, size_t len)
{
    loom_error_t err;
    loom_delivery_t d;
    loom_delivery_init(&d);
    int rc = loom_producer_send_raw(e->worker.relay, e->topic, key, key_len, h, value, len,
                                    loom_delivery_future_cb, &d, &err);
    if (rc != 0 && h)
        rd_kafka_headers_destroy(h);
    cr_assert_eq(rc, 0, "%s", err.message);
    cr_assert_eq(loom_delivery_wait(&d, 60000, &err), 0, "%s", err.message);
    cr_assert_eq(d.partition, 0);
    int64_t off = d.offset;
    loom_delivery_release(&d);
    return off;
}

static const char credit[] = "{\"account\":\"a\",\"amount\":1}";

/* A good command after the hostile ones; waits until it is applied, which
 * it can only be once every message before it on the partition is done. */
static void good_after(penv_t *e, const char *id)
{
    publish(e, "a", 1, hdrs_ok(id), credit, strlen(credit));
    char sql[300];
    snprintf(sql, sizeof(sql),
             "SELECT count(*) FROM loom_commands WHERE message_id = '%s' AND status = 'applied'",
             id);
    cr_assert_eq(loom_test_wait_for(e->url, sql, 1, 90000), 1,
                 "the command after the hostile ones was not applied: the partition is stuck");
    snprintf(sql, sizeof(sql), "SELECT count(*) FROM test_ledger WHERE message_id = '%s'", id);
    cr_assert_eq(loom_test_sql_ll(e->url, sql), 1);
}

/* The value of `column` of the row of message `id` with `status`, as text
 * ("" when there is none); a new string. */
static char *row(penv_t *e, const char *id, const char *status, const char *column)
{
    loom_db_t *db;
    loom_error_t err;
    cr_assert_eq(loom_db_acquire(e->worker.pool, &db, &err), 0, "%s", err.message);
    char sql[300];
    snprintf(
        sql, sizeof(sql),
        "SELECT coalesce(%s::text, '') FROM loom_commands WHERE message_id = $1 AND status = $2",
        column);
    const char *p[] = {id, status};
    PGresult *r = NULL;
    cr_assert_eq(loom_db_query(db, sql, 2, p, &r, &err), 0, "%s", err.message);
    char *v = strdup(PQntuples(r) == 1 ? PQgetvalue(r, 0, 0) : "");
    PQclear(r);
    loom_db_release(db);
    return v;
}

static void expect_row(penv_t *e, const char *id, const char *status, const char *error_has)
{
    char *err = row(e, id, status, "last_error");
    char *st = row(e, id, status, "status");
    cr_assert_str_eq(st, status, "no %s row for \"%.60s\"", status, id);
    if (error_has)
        cr_assert(strstr(err, error_has), "\"%.60s\": last_error \"%s\" lacks \"%s\"", id, err,
                  error_has);
    free(err);
    free(st);
}

static char *kafka_id(penv_t *e, int64_t offset)
{
    char *id = malloc(300);
    snprintf(id, 300, "kafka:%s:0:%lld", e->topic, (long long)offset);
    return id;
}

/* Runs the loom binary with the test database; returns its stdout (new). */
static char *loom_out(penv_t *e, const char *const *args)
{
    char envurl[600];
    snprintf(envurl, sizeof(envurl), "LOOM_DATABASE_URL=%s", e->url);
    const char *env[] = {envurl, NULL};
    const char *argv[16] = {loom_test_bin()};
    size_t n = 1;
    for (; args[n - 1] && n < 15; n++)
        argv[n] = args[n - 1];
    argv[n] = NULL;
    char *out, *err;
    int rc = loom_test_run(argv, env, &out, &err);
    cr_assert_eq(rc, 0, "loom %s: %s", args[0], err);
    free(err);
    return out;
}

/* ---- the rows of the issue ---------------------------------------------------------- */

Test(poison, invalid_utf8_in_ce_id_ce_rayid_or_the_key_is_rejected_visibly, .timeout = 240)
{
    penv_t e;
    penv_start(&e, NULL);
    rd_kafka_headers_t *h = hdrs_ok("x");
    hdr_set(h, "ce_id", "bad\xff\xfe", 5);
    int64_t off = publish(&e, "a", 1, h, credit, strlen(credit));
    h = hdrs_ok("u-ray");
    hdr_set(h, "ce_rayid", "r\xc3", 2);
    publish(&e, "a", 1, h, credit, strlen(credit));
    static const char bad_key[] = {'k', (char)0xff, '\0', 'y'};
    publish(&e, bad_key, sizeof(bad_key), hdrs_ok("u-key"), credit, strlen(credit));
    good_after(&e, "u-good");

    /* An id that is not usable: filed under its Kafka position, bytes kept. */
    char *kid = kafka_id(&e, off);
    expect_row(&e, kid, "rejected", "\"id\" is not valid UTF-8");
    char *payload = row(&e, kid, "rejected", "payload");
    cr_assert_str_eq(payload, "\\x7b226163636f756e74223a2261222c22616d6f756e74223a317d");
    char *hdrs = row(&e, kid, "rejected", "headers->'ce_id'->>'hex'");
    cr_assert_str_eq(hdrs, "626164fffe", "the raw id is kept: %s", hdrs);
    /* Usable ids: filed under them. */
    expect_row(&e, "u-ray", "rejected", "\"rayid\" is not valid UTF-8");
    expect_row(&e, "u-key", "rejected", "Kafka key");
    char *key = row(&e, "u-key", "rejected", "msg_key");
    cr_assert_str_eq(key, "\\x6bff0079", "the raw key is kept: %s", key);
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT count(*) FROM test_ledger"), 1);
    free(kid);
    free(payload);
    free(hdrs);
    free(key);
    loom_test_worker_stop(&e.worker);
}

Test(poison, ce_id_of_the_largest_size_allowed_and_one_byte_more, .timeout = 240)
{
    penv_t e;
    penv_start(&e, NULL);
    char *id = malloc(4001);
    for (int i = 0; i < 4000; i++) /* varied, so the index cannot compress it */
        id[i] = "abcdefghijklmnopqrstuvwxyz0123456789"[(i * 7 + i / 36) % 36];
    id[4000] = '\0';
    int64_t off[3];
    size_t lens[] = {LOOM_CE_ID_MAX, LOOM_CE_ID_MAX + 1, 3000};
    for (int i = 0; i < 3; i++) {
        rd_kafka_headers_t *h = hdrs_ok("x");
        hdr_set(h, "ce_id", id, lens[i]);
        off[i] = publish(&e, "a", 1, h, credit, strlen(credit));
    }
    good_after(&e, "l-good");
    id[LOOM_CE_ID_MAX] = '\0';
    expect_row(&e, id, "applied", NULL);
    for (int i = 1; i < 3; i++) {
        char *kid = kafka_id(&e, off[i]);
        expect_row(&e, kid, "rejected", "longer than 1024 bytes");
        free(kid);
    }
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT count(*) FROM test_ledger"), 2);
    free(id);
    loom_test_worker_stop(&e.worker);
}

Test(poison, invalid_utf8_in_ce_type_and_a_long_id_of_an_unknown_type_are_recorded, .timeout = 240)
{
    penv_t e;
    penv_start(&e, NULL);
    rd_kafka_headers_t *h = hdrs_ok("t-type");
    hdr_set(h, "ce_type", "test.\xe2\x28\xa1", 8);
    publish(&e, "a", 1, h, credit, strlen(credit));
    char id[2000];
    memset(id, 'q', sizeof(id) - 1);
    id[sizeof(id) - 1] = '\0';
    h = hdrs_ok(id);
    hdr_set(h, "ce_type", "no.such.type", 12);
    int64_t off = publish(&e, "a", 1, h, credit, strlen(credit));
    good_after(&e, "t-good");
    expect_row(&e, "t-type", "rejected", "\"type\" is not valid UTF-8");
    char *kid = kafka_id(&e, off);
    expect_row(&e, kid, "rejected", "longer than 1024 bytes");
    char *type = row(&e, kid, "rejected", "type");
    cr_assert_str_eq(type, "no.such.type");
    free(type);
    free(kid);
    loom_test_worker_stop(&e.worker);
}

Test(poison, a_nul_byte_in_a_header_of_a_rejected_message_is_kept, .timeout = 240)
{
    penv_t e;
    penv_start(&e, NULL);
    /* Rejected by the handler; an ordinary header holds a NUL byte. */
    static const char perm[] = "{\"account\":\"a\",\"amount\":1,\"fail\":\"permanent\"}";
    rd_kafka_headers_t *h = hdrs_ok("n-hdr");
    rd_kafka_header_add(h, "x-note", -1, "a\0b", 3);
    publish(&e, "a", 1, h, perm, strlen(perm));
    /* A NUL byte in an attribute. */
    h = hdrs_ok("n-attr");
    rd_kafka_header_add(h, "ce_subject", -1, "s\0t", 3);
    publish(&e, "a", 1, h, credit, strlen(credit));
    good_after(&e, "n-good");
    expect_row(&e, "n-hdr", "rejected", "closed");
    char *hex = row(&e, "n-hdr", "rejected", "headers->'x-note'->>'hex'");
    cr_assert_str_eq(hex, "610062");
    char *id = row(&e, "n-hdr", "rejected", "headers->>'ce_id'");
    cr_assert_str_eq(id, "n-hdr");
    expect_row(&e, "n-attr", "rejected", "NUL");
    free(hex);
    free(id);
    loom_test_worker_stop(&e.worker);
}

Test(poison, messages_clean_with_an_older_than_out_of_range_is_rejected, .timeout = 240)
{
    penv_t e;
    penv_start(&e, messages_store_handler);
    rd_kafka_headers_t *h = hdrs_ok("clean-far");
    hdr_set(h, "ce_type", "messages.clean", 14);
    static const char far[] = "{\"older_than_ms\":300000000000000}";
    publish(&e, NULL, 0, h, far, strlen(far));
    /* The largest allowed runs. */
    h = hdrs_ok("clean-max");
    hdr_set(h, "ce_type", "messages.clean", 14);
    static const char max[] = "{\"older_than_ms\":3155760000000}";
    publish(&e, NULL, 0, h, max, strlen(max));
    h = hdrs_ok("put-after");
    hdr_set(h, "ce_type", "messages.put_batch", 18);
    static const char put[] =
        "{\"msgs\":[{\"id\":\"m1\",\"source\":\"urn:s\",\"specversion\":\"1.0\","
        "\"type\":\"t\",\"data\":{}}]}";
    publish(&e, NULL, 0, h, put, strlen(put));
    cr_assert_eq(loom_test_wait_for(e.url,
                                    "SELECT count(*) FROM loom_commands WHERE message_id = "
                                    "'put-after' AND status = 'applied'",
                                    1, 90000),
                 1);
    expect_row(&e, "clean-far", "rejected", "older_than_ms");
    expect_row(&e, "clean-max", "applied", NULL);
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT attempts FROM loom_commands WHERE message_id = "
                                         "'clean-far'"),
                 1, "rejected at once, not retried");
    loom_test_worker_stop(&e.worker);
}

Test(poison, the_same_id_with_other_data_or_type_is_a_conflict, .timeout = 240)
{
    penv_t e;
    penv_start(&e, NULL);
    static const char other[] = "{\"account\":\"a\",\"amount\":2}";
    publish(&e, "a", 1, hdrs_ok("c-1"), credit, strlen(credit));
    publish(&e, "a", 1, hdrs_ok("c-1"), other, strlen(other));   /* other data */
    publish(&e, "a", 1, hdrs_ok("c-1"), credit, strlen(credit)); /* a resend: skipped */
    /* Reused for another type (a "delete"). */
    rd_kafka_headers_t *h = hdrs_ok("c-1");
    hdr_set(h, "ce_type", "test.debit", 10);
    int64_t off_type = publish(&e, "a", 1, h, credit, strlen(credit));
    good_after(&e, "c-good");
    /* Once more after the first batch is committed: the stored row decides. */
    int64_t off_late = publish(&e, "a", 1, hdrs_ok("c-1"), other, strlen(other));
    good_after(&e, "c-good-2");

    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT sum(amount) FROM test_ledger WHERE message_id = "
                                         "'c-1'"),
                 1, "applied once, with its first data");
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT count(*) FROM loom_commands WHERE conflict_of = "
                                         "'c-1' AND status = 'conflict'"),
                 3, "other data twice and another type once");
    char sql[400];
    snprintf(sql, sizeof(sql),
             "SELECT count(*) FROM loom_commands WHERE conflict_of = 'c-1' AND type = "
             "'test.debit' AND kafka_offset = %lld AND last_error LIKE '%%another type or data%%'",
             (long long)off_type);
    cr_assert_eq(loom_test_sql_ll(e.url, sql), 1);
    snprintf(sql, sizeof(sql),
             "SELECT count(*) FROM loom_commands WHERE conflict_of = 'c-1' AND kafka_offset = %lld",
             (long long)off_late);
    cr_assert_eq(loom_test_sql_ll(e.url, sql), 1);

    /* Visible to operators and to the sender. */
    const char *list[] = {"commands", "list", "--limit", "100", NULL};
    char *out = loom_out(&e, list);
    cr_assert(strstr(out, "conflict"), "%s", out);
    free(out);
    const char *get[] = {"op", "engine.commands.get", "{\"id\":\"c-1\"}", NULL};
    out = loom_out(&e, get);
    json_t *doc = json_loads(out, 0, NULL);
    cr_assert_not_null(doc, "%s", out);
    cr_assert_eq(json_array_size(json_object_get(doc, "commands")), 1, "%s", out);
    cr_assert_eq(json_array_size(json_object_get(doc, "conflicts")), 3, "%s", out);
    json_decref(doc);
    free(out);
    loom_test_worker_stop(&e.worker);
}

Test(poison, malformed_ce_time_or_ce_deadline_is_rejected_under_its_own_id, .timeout = 240)
{
    penv_t e;
    penv_start(&e, NULL);
    rd_kafka_headers_t *h = hdrs_ok("bad-time");
    rd_kafka_header_add(h, "ce_time", -1, "yesterday", -1);
    publish(&e, "a", 1, h, credit, strlen(credit));
    h = hdrs_ok("bad-deadline");
    rd_kafka_header_add(h, "ce_deadline", -1, "2024-13-01T00:00:00Z", -1);
    publish(&e, "a", 1, h, credit, strlen(credit));
    good_after(&e, "tm-good");
    expect_row(&e, "bad-time", "rejected", "\"time\" is not an RFC 3339 timestamp");
    expect_row(&e, "bad-deadline", "rejected", "\"deadline\" is not an RFC 3339 timestamp");
    /* GET /v1/commands/{id} is this op. */
    const char *get[] = {"op", "engine.commands.get", "{\"id\":\"bad-time\"}", NULL};
    char *out = loom_out(&e, get);
    cr_assert(strstr(out, "\"rejected\""), "%s", out);
    free(out);
    loom_test_worker_stop(&e.worker);
}

Test(poison, a_missing_ce_specversion_is_named_in_the_error, .timeout = 240)
{
    penv_t e;
    penv_start(&e, NULL);
    /* A command's data with no CloudEvent around it. */
    static const char data[] = "{\"msgs\":[{\"id\":\"m\"}]}";
    int64_t off = publish(&e, "a", 1, NULL, data, strlen(data));
    /* Binary mode without ce_specversion: still filed under its id. */
    rd_kafka_headers_t *h = hdrs_ok("no-spec");
    rd_kafka_header_remove(h, "ce_specversion");
    publish(&e, "a", 1, h, credit, strlen(credit));
    good_after(&e, "s-good");
    char *kid = kafka_id(&e, off);
    expect_row(&e, kid, "rejected", "\"specversion\" is missing");
    char *err = row(&e, kid, "rejected", "last_error");
    cr_assert_null(strstr(err, "msgs"), "%s", err);
    expect_row(&e, "no-spec", "rejected", "ce_specversion");
    free(err);
    free(kid);
    loom_test_worker_stop(&e.worker);
}

/* ---- every other way a message can fail before its row exists ------------------------ */

Test(poison, other_malformed_messages_are_each_recorded, .timeout = 240)
{
    penv_t e;
    penv_start(&e, NULL);
    int64_t offs[8];
    size_t n = 0;
    /* an extension name that is not text */
    rd_kafka_headers_t *h = hdrs_ok("o-1");
    rd_kafka_header_add(h, "ce_\xff\xfe", -1, "v", 1);
    offs[n++] = publish(&e, "a", 1, h, credit, strlen(credit));
    /* 33 extensions */
    h = hdrs_ok("o-2");
    for (int i = 0; i < 33; i++) {
        char name[16];
        snprintf(name, sizeof(name), "ce_x%d", i);
        rd_kafka_header_add(h, name, -1, "v", 1);
    }
    offs[n++] = publish(&e, "a", 1, h, credit, strlen(credit));
    /* a source over 4096 bytes */
    char *big = malloc(5000);
    memset(big, 's', 5000);
    h = hdrs_ok("o-3");
    hdr_set(h, "ce_source", big, 4097);
    offs[n++] = publish(&e, "a", 1, h, credit, strlen(credit));
    free(big);
    /* no headers, no value */
    offs[n++] = publish(&e, NULL, 0, NULL, NULL, 0);
    /* a value that is not JSON, and JSON that is not an object */
    offs[n++] = publish(&e, "a", 1, hdrs_ok("o-5"), "\xff\x00garbage", 9);
    offs[n++] = publish(&e, "a", 1, hdrs_ok("o-6"), "[1,2]", 5);
    /* structured mode that is not JSON */
    h = rd_kafka_headers_new(1);
    rd_kafka_header_add(h, "content-type", -1, "application/cloudevents+json", -1);
    offs[n++] = publish(&e, "a", 1, h, "{\"id\":", 6);
    good_after(&e, "o-good");
    const char *ids[] = {"o-1", "o-2", "o-3", NULL, "o-5", "o-6", NULL};
    for (size_t i = 0; i < n; i++) {
        char *kid = kafka_id(&e, offs[i]);
        const char *id = ids[i] ? ids[i] : kid;
        expect_row(&e, id, "rejected", NULL);
        free(kid);
    }
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT count(*) FROM loom_commands"), (long long)n + 1);
    loom_test_worker_stop(&e.worker);
}

/* ---- an outcome that cannot be recorded holds the partition ------------------------- */

Test(poison, a_message_whose_outcome_cannot_be_recorded_holds_its_partition, .timeout = 240)
{
    penv_t e;
    penv_start(&e, NULL);
    /* The database refuses every rejected row, in every form. */
    loom_test_sql(e.url, "ALTER TABLE loom_commands ADD CONSTRAINT test_no_rejects "
                         "CHECK (status <> 'rejected')");
    rd_kafka_headers_t *h = hdrs_ok("r-1");
    hdr_set(h, "ce_time", "never", 5);
    publish(&e, "a", 1, h, credit, strlen(credit));
    publish(&e, "a", 1, hdrs_ok("r-after"), credit, strlen(credit));
    /* Held, and shown as retrying: the command behind it waits (not
     * skipped, not committed past). */
    cr_assert_eq(loom_test_wait_for(e.url,
                                    "SELECT count(*) FROM loom_commands WHERE message_id = 'r-1' "
                                    "AND status = 'retrying' AND attempts >= 3 AND last_error "
                                    "LIKE '%outcome (rejected) could not be recorded%'",
                                    1, 60000),
                 1);
    const char *stuck[] = {"commands", "list", "--stuck", NULL};
    char *out = loom_out(&e, stuck);
    cr_assert(strstr(out, "r-1"), "%s", out);
    free(out);
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT count(*) FROM loom_commands"), 1);
    cr_assert_eq(loom_test_sql_ll(e.url, "SELECT count(*) FROM test_ledger"), 0);
    /* Fixed: the outcome is recorded and the partition moves on. */
    loom_test_sql(e.url, "ALTER TABLE loom_commands DROP CONSTRAINT test_no_rejects");
    cr_assert_eq(loom_test_wait_for(e.url,
                                    "SELECT count(*) FROM loom_commands WHERE message_id = "
                                    "'r-after' AND status = 'applied'",
                                    1, 90000),
                 1);
    expect_row(&e, "r-1", "rejected", "\"time\"");
    loom_test_worker_stop(&e.worker);
}

Test(poison, a_row_refused_as_it_is_is_recorded_in_safe_form, .timeout = 240)
{
    penv_t e;
    penv_start(&e, NULL);
    /* The database refuses a rejected row unless it is the safe form (type
     * "unknown", filed under the Kafka position). */
    loom_test_sql(e.url, "ALTER TABLE loom_commands ADD CONSTRAINT test_safe_only "
                         "CHECK (status <> 'rejected' OR type = 'unknown')");
    rd_kafka_headers_t *h = hdrs_ok("sf-1");
    hdr_set(h, "ce_time", "never", 5);
    int64_t off = publish(&e, "a", 1, h, credit, strlen(credit));
    good_after(&e, "sf-good");
    char *kid = kafka_id(&e, off);
    expect_row(&e, kid, "rejected", "recorded in safe form");
    expect_row(&e, kid, "rejected", "\"time\" is not an RFC 3339 timestamp");
    expect_row(&e, kid, "rejected", "test_safe_only");
    char *payload = row(&e, kid, "rejected", "length(payload)");
    cr_assert_str_eq(payload, "26", "the raw value is kept");
    free(payload);
    free(kid);
    loom_test_worker_stop(&e.worker);
}
