/*
 * The messages service below the gateway: its consumer against the real
 * Kafka broker and Postgres (first write wins, CloudEvents unchanged, delete
 * counts, retention clean), its ops, `loom replay messages` ending with the
 * same rows, the periodic clean taking turns through its lease, and node
 * heartbeats with `loom nodes`.
 */
#include "support.h"
#include "services.h"
#include "loom/bus.h"
#include "loom/clock.h"
#include "loom/node.h"
#include "loom/op.h"
#include "loom/periodic.h"
#include "loom/worker.h"
#include "ops.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct svc {
    char url[512];
    char suffix[64];
    char topics_buf[3][200];
    const char *topics[4]; /* per kind: all the service's one topic */
    const char *sub[2];
    char name[128];
    loom_consumer_def_t def;
    loom_test_worker_t worker; /* its relay publishes the test's commands too */
} svc_t;

static const char *const kinds[] = {"put_batch", "delete_batch", "clean"};

/* The messages consumer on topics of its own, so tests can run at once. */
static void svc_start(svc_t *s)
{
    memset(s, 0, sizeof(*s));
    const char *brokers = loom_test_kafka_brokers();
    loom_test_db_create_migrated(s->url, sizeof(s->url));
    loom_test_unique_name("m", s->suffix, sizeof(s->suffix));
    /* One topic for every command of the service, as loom.cmd.messages. */
    snprintf(s->topics_buf[0], sizeof(s->topics_buf[0]), "loom.cmd.messages.%s", s->suffix);
    for (int i = 0; i < 3; i++)
        s->topics[i] = s->topics_buf[0];
    int created;
    loom_error_t err;
    cr_assert_eq(loom_kafka_create_topics(brokers, NULL, s->topics, 1, 3, &created, &err), 0, "%s",
                 err.message);
    snprintf(s->name, sizeof(s->name), "messages.store.%s", s->suffix);
    s->def = *loom_test_app_consumer("messages.store");
    s->def.name = s->name;
    s->sub[0] = s->topics_buf[0];
    s->def.topics = s->sub;
    loom_worker_opts_t o = {.brokers = brokers, .consumers = &s->def, .n_consumers = 1};
    loom_test_worker_start(&s->worker, s->url, 4, true, o);
}

/* Publishes a command and waits until it is applied; returns its result. */
/* Publishes a command of `type` (NULL: the kind's own) on the kind's topic,
 * waits until loom_commands has it with `status` and returns `column` of its
 * row (a new string). */
static char *command_row(svc_t *s, int kind, const char *type, const char *data, const char *status,
                         const char *column)
{
    loom_arena_t a;
    loom_arena_init(&a, 0);
    loom_ce_t ce;
    char own[64];
    snprintf(own, sizeof(own), "messages.%s", kinds[kind]);
    loom_ce_init(&ce, &a, "test", "t", type ? type : own);
    ce.data = data;
    ce.data_len = strlen(data);
    loom_error_t err;
    loom_delivery_t d;
    loom_delivery_init(&d);
    cr_assert_eq(loom_producer_send(s->worker.relay, s->topics[kind], ce.id, strlen(ce.id), &ce,
                                    loom_delivery_future_cb, &d, &err),
                 0, "%s", err.message);
    cr_assert_eq(loom_delivery_wait(&d, 30000, &err), 0, "%s", err.message);
    loom_delivery_release(&d);
    char sql[300];
    snprintf(sql, sizeof(sql),
             "SELECT count(*) FROM loom_commands WHERE message_id = '%s' AND status = '%s'", ce.id,
             status);
    cr_assert_eq(loom_test_wait_for(s->url, sql, 1, 60000), 1, "command %s not %s", ce.id, status);
    snprintf(sql, sizeof(sql), "SELECT %s FROM loom_commands WHERE message_id = '%s'", column,
             ce.id);
    char *r = loom_test_sql_value(s->url, sql);
    loom_arena_release(&a);
    return r;
}

static json_t *command(svc_t *s, int kind, const char *data)
{
    char *r = command_row(s, kind, NULL, data, "applied", "result::text");
    json_t *res = json_loads(r, 0, NULL);
    free(r);
    return res;
}

static json_t *op(svc_t *s, const char *name, const char *req_text)
{
    loom_op_table_t *t = loom_op_table_new();
    loom_error_t err;
    cr_assert_eq(loom_op_table_add(t, loom_test_full_app()->ops, loom_test_full_app()->n_ops, &err),
                 0, "%s", err.message);
    loom_op_runtime_t rt;
    loom_op_runtime_init(&rt, t, s->worker.pool, NULL);
    loom_op_ctx_t ctx = {.rt = &rt};
    json_t *req = json_loads(req_text, 0, NULL);
    json_t *res = NULL;
    int rc = loom_op_call(&ctx, name, req, &res, &err);
    json_decref(req);
    loom_op_table_free(t);
    if (rc != 0)
        return json_pack("{s:s, s:s}", "error", err.code, "message", err.message);
    return res;
}

static const char *batch =
    "{\"msgs\":["
    "{\"id\":\"a\",\"source\":\"urn:s\",\"specversion\":\"1.0\",\"type\":\"t.x\","
    "\"time\":\"2026-01-02T03:04:05.678+02:00\",\"subject\":\"sub\",\"count\":42,"
    "\"flag\":true,\"note\":\"snow \\u2603 and "
    "\\u00fcml\",\"datacontenttype\":\"application/json\","
    "\"data\":{\"n\":1.5,\"list\":[1,\"two\",null,false],\"deep\":{\"k\":\"v\"}}},"
    "{\"id\":\"b\",\"source\":\"urn:s\",\"specversion\":\"1.0\",\"type\":\"t.y\","
    "\"data_base64\":\"AAECAwQ=\"},"
    "{\"id\":\"c\",\"source\":\"urn:s\",\"specversion\":\"1.0\",\"type\":\"t.z\","
    "\"datacontenttype\":\"text/plain\",\"data\":\"plain text\"}]}";

Test(messages, put_get_round_trip_first_write_wins_delete_and_clean, .timeout = 240)
{
    svc_t s;
    svc_start(&s);
    json_t *r = command(&s, 0, batch);
    cr_assert_eq(json_integer_value(json_object_get(r, "ack_count")), 3);
    json_decref(r);

    /* Read back unchanged, in request order, missing ids left out. */
    json_t *want = json_loads(batch, 0, NULL);
    json_t *got = op(&s, "messages.batch_get", "{\"ids\":[\"c\",\"nope\",\"a\",\"b\"]}");
    json_t *msgs = json_object_get(got, "msgs");
    cr_assert_eq(json_array_size(msgs), 3, "%s", json_dumps(got, 0));
    json_t *wm = json_object_get(want, "msgs");
    cr_assert(json_equal(json_array_get(msgs, 0), json_array_get(wm, 2)));
    cr_assert(json_equal(json_array_get(msgs, 1), json_array_get(wm, 0)), "a changed: %s",
              json_dumps(json_array_get(msgs, 1), 0));
    cr_assert(json_equal(json_array_get(msgs, 2), json_array_get(wm, 1)));
    json_decref(got);
    got = op(&s, "messages.get", "{\"id\":\"zzz\"}");
    cr_assert_str_eq(json_string_value(json_object_get(got, "error")), "MESSAGE_NOT_FOUND");
    json_decref(got);

    /* The same batch again: full ack, nothing new; an id put again with other
     * data keeps the stored copy. */
    r = command(&s, 0, batch);
    cr_assert_eq(json_integer_value(json_object_get(r, "ack_count")), 3);
    json_decref(r);
    r = command(&s, 0,
                "{\"msgs\":[{\"id\":\"a\",\"source\":\"urn:other\",\"specversion\":\"1.0\","
                "\"type\":\"t.x\",\"data\":0},{\"id\":\"d\",\"source\":\"urn:s\","
                "\"specversion\":\"1.0\",\"type\":\"t.w\"}]}");
    cr_assert_eq(json_integer_value(json_object_get(r, "ack_count")), 2);
    json_decref(r);
    cr_assert_eq(loom_test_sql_ll(s.url, "SELECT count(*) FROM messages"), 4);
    got = op(&s, "messages.get", "{\"id\":\"a\"}");
    cr_assert(json_equal(got, json_array_get(wm, 0)), "first write must win: %s",
              json_dumps(got, 0));
    json_decref(got);
    cr_assert_eq(
        loom_test_sql_ll(s.url, "SELECT count(*) FROM loom_events WHERE type = 'messages.stored'"),
        2, "a put that stores nothing records no event");

    /* Delete counts only what existed. */
    r = command(&s, 1, "{\"ids\":[\"a\",\"nope\",\"b\"]}");
    cr_assert_eq(json_integer_value(json_object_get(r, "ack_count")), 2);
    json_decref(r);
    cr_assert_eq(loom_test_sql_ll(s.url, "SELECT count(*) FROM messages"), 2);

    /* Clean with a 1 min retention removes what is older: the rows stored
     * so far are made two minutes old, so a slow machine changes nothing. */
    loom_test_sql(s.url, "UPDATE messages SET stored_at = stored_at - interval '2 minutes'");
    r = command(&s, 0,
                "{\"msgs\":[{\"id\":\"fresh\",\"source\":\"urn:s\",\"specversion\":\"1.0\","
                "\"type\":\"t\"}]}");
    json_decref(r);
    r = command(&s, 2, "{\"older_than_ms\":60000}");
    cr_assert_eq(json_integer_value(json_object_get(r, "deleted")), 2);
    json_decref(r);
    cr_assert_eq(loom_test_sql_ll(s.url, "SELECT count(*) FROM messages WHERE id = 'fresh'"), 1);
    cr_assert_eq(loom_test_sql_ll(s.url, "SELECT count(*) FROM messages"), 1);

    /* An invalid message in a command is rejected, naming index and field;
     * so are data that is not an object and a type the service does not know. */
    char *e = command_row(&s, 0, NULL, "{\"msgs\":[{\"id\":\"x\",\"source\":\"urn:s\"}]}",
                          "rejected", "last_error");
    cr_assert(strstr(e, "msgs[0].") != NULL, "%s", e);
    free(e);
    e = command_row(&s, 0, NULL, "[1]", "rejected", "last_error");
    cr_assert_str_eq(e, "command data must be an object");
    free(e);
    e = command_row(&s, 0, "messages.shred", "{}", "rejected", "last_error");
    cr_assert_str_eq(e, "unknown command type \"messages.shred\"");
    free(e);
    json_decref(want);
    loom_test_worker_stop(&s.worker);
}

static char *checksum(const char *url)
{
    return loom_test_sql_value(url, "SELECT md5(coalesce(string_agg(id || '|' || stored_at || '|' "
                                    "|| event, ',' ORDER BY id), '')) || ':' || count(*) "
                                    "FROM messages");
}

Test(messages, replay_rebuilds_the_same_rows_from_the_event_log, .timeout = 240)
{
    svc_t s;
    svc_start(&s);
    for (int b = 0; b < 5; b++) {
        char data[8192];
        size_t len = (size_t)snprintf(data, sizeof(data), "{\"msgs\":[");
        for (int i = 0; i < 40; i++)
            len += (size_t)snprintf(data + len, sizeof(data) - len,
                                    "%s{\"id\":\"r-%d-%d\",\"source\":\"urn:s\","
                                    "\"specversion\":\"1.0\",\"type\":\"t\",\"data\":{\"i\":%d}}",
                                    i ? "," : "", b, i, i);
        snprintf(data + len, sizeof(data) - len, "]}");
        json_decref(command(&s, 0, data));
    }
    json_decref(command(&s, 1, "{\"ids\":[\"r-0-1\",\"r-3-7\",\"r-4-39\"]}"));
    json_decref(command(&s, 0, batch));
    char *before = checksum(s.url);
    cr_assert(strstr(before, ":200"), "%s", before);
    loom_test_worker_stop(&s.worker);

    /* Damage the read model, then rebuild it with the CLI. */
    loom_test_sql(s.url, "DELETE FROM messages WHERE id LIKE 'r-2-%'");
    loom_test_sql(s.url, "INSERT INTO messages (id, event) VALUES ('bogus', '{}')");
    char envurl[600];
    snprintf(envurl, sizeof(envurl), "LOOM_DATABASE_URL=%s", s.url);
    const char *env[] = {envurl, NULL};
    const char *argv[] = {loom_test_bin(), "replay", "messages", NULL};
    char *out, *err;
    cr_assert_eq(loom_test_run(argv, env, &out, &err), 0, "%s", err);
    cr_assert(strstr(out, "rebuilt messages from 7 events"), "%s", out);
    char *after = checksum(s.url);
    cr_assert_str_eq(after, before);
    free(out);
    free(err);
    const char *bad[] = {loom_test_bin(), "replay", "nothing", NULL};
    cr_assert_eq(loom_test_run(bad, env, &out, &err), 2);
    cr_assert(strstr(err, "unknown projection 'nothing'; known: messages"), "%s", err);
    free(out);
    free(err);
    free(before);
    free(after);
}

Test(messages, the_periodic_clean_runs_on_one_node_at_a_time, .timeout = 120)
{
    char url[512];
    loom_test_db_create_migrated(url, sizeof(url));
    const char *brokers = loom_test_kafka_brokers();
    loom_db_pool_t *pool = loom_test_pool(url, 4);
    loom_producer_t *p = loom_test_producer(brokers);
    loom_error_t err;
    loom_config_t cfg[2];
    char *env0[] = {"LOOM_MESSAGES_CLEAN_INTERVAL=1s", "LOOM_MESSAGES_RETENTION=2s",
                    "LOOM_NODE_ID=00000000-0000-4000-8000-00000000000a", NULL};
    char *env1[] = {"LOOM_MESSAGES_CLEAN_INTERVAL=1s", "LOOM_MESSAGES_RETENTION=2s",
                    "LOOM_NODE_ID=00000000-0000-4000-8000-00000000000b", NULL};
    char eb[256];
    cr_assert_eq(loom_config_load(&cfg[0], env0, loom_test_full_app()->config_vars,
                                  loom_test_full_app()->n_config_vars, eb, sizeof(eb)),
                 0, "%s", eb);
    cr_assert_eq(loom_config_load(&cfg[1], env1, loom_test_full_app()->config_vars,
                                  loom_test_full_app()->n_config_vars, eb, sizeof(eb)),
                 0, "%s", eb);
    loom_periodic_t *runners[2];
    for (int i = 0; i < 2; i++) {
        loom_periodic_opts_t o = {.jobs = loom_test_full_app()->jobs,
                                  .n_jobs = loom_test_full_app()->n_jobs,
                                  .pool = pool,
                                  .producer = p,
                                  .cfg = &cfg[i],
                                  .tick_ms = 100};
        cr_assert_eq(loom_periodic_start(&o, &runners[i], &err), 0, "%s", err.message);
    }
    loom_sleep_ms(5500);
    int64_t a = loom_periodic_runs(runners[0], "messages.clean");
    int64_t b = loom_periodic_runs(runners[1], "messages.clean");
    cr_assert_geq(a + b, 4, "runs %lld + %lld in 5.5 s at 1 s", (long long)a, (long long)b);
    cr_assert_leq(a + b, 7, "runs %lld + %lld: both nodes ran it", (long long)a, (long long)b);
    /* One node stops; the other carries on alone. */
    loom_periodic_stop(runners[0]);
    int64_t b0 = loom_periodic_runs(runners[1], "messages.clean");
    loom_sleep_ms(3500);
    cr_assert_geq(loom_periodic_runs(runners[1], "messages.clean") - b0, 2);
    loom_periodic_stop(runners[1]);
    cr_assert_eq(
        loom_test_sql_ll(url, "SELECT count(*) FROM loom_leases WHERE name = 'messages.clean'"), 1);
    loom_producer_free(p);
    loom_db_pool_free(pool);
    loom_config_release(&cfg[0]);
    loom_config_release(&cfg[1]);
}

Test(messages, nodes_beat_and_loom_nodes_marks_the_stale_ones, .timeout = 60)
{
    char url[512];
    loom_test_db_create_migrated(url, sizeof(url));
    loom_db_pool_t *pool = loom_test_pool(url, 2);
    loom_node_t *n;
    loom_error_t err;
    loom_node_opts_t o = {.pool = pool,
                          .id = "00000000-0000-4000-8000-000000000001",
                          .role = "worker",
                          .url = "http://127.0.0.1:1",
                          .site = "eu",
                          .version = "9.9",
                          .interval_ms = 200};
    cr_assert_eq(loom_node_start(&o, &n, &err), 0, "%s", err.message);
    loom_sleep_ms(700);
    cr_assert_geq(loom_node_beats(n), 3);
    loom_test_sql(url, "INSERT INTO loom_nodes VALUES ('00000000-0000-4000-8000-000000000002', "
                       "'api', NULL, 'eu', '9.8', now() - interval '1 hour', "
                       "now() - interval '45 seconds')");
    char envurl[600];
    snprintf(envurl, sizeof(envurl), "LOOM_DATABASE_URL=%s", url);
    const char *env[] = {envurl, NULL};
    const char *argv[] = {loom_test_bin(), "nodes", NULL};
    char *out, *e;
    cr_assert_eq(loom_test_run(argv, env, &out, &e), 0, "%s", e);
    cr_assert(strstr(out, "00000000-0000-4000-8000-000000000001  worker    http://127.0.0.1:1"),
              "%s", out);
    cr_assert(strstr(out, "45 s ago  STALE"), "%s", out);
    cr_assert(strstr(out, "2 nodes, 1 stale"), "%s", out);
    free(out);
    free(e);
    loom_node_stop(n);
    loom_db_pool_free(pool);
}
