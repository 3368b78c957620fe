/*
 * The console's ops against a real PostgreSQL (docs/console.md):
 * engine.commands.list pages by key without repeating or skipping a row,
 * also while newer commands arrive, and applies each filter;
 * engine.commands.story follows causation ids up to the first recorded cause
 * and down through the follow-ups, with each command's events and the
 * follow-ups still in the outbox; engine.commands.counts counts what needs a
 * person. Bad requests fail with INVALID_ARGUMENT naming the field.
 */
#include "support.h"
#include "loom/op.h"
#include "services.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char url[512];
static loom_op_table_t *table;
static loom_db_pool_t *pool;
static loom_op_runtime_t rt;

static void setup(void)
{
    loom_test_db_create_migrated(url, sizeof(url));
    table = loom_op_table_new();
    loom_error_t err;
    cr_assert_eq(
        loom_op_table_add(table, loom_test_full_app()->ops, loom_test_full_app()->n_ops, &err), 0,
        "%s", err.message);
    pool = loom_test_read_pool(url, 2);
    loom_op_runtime_init(&rt, table, pool, NULL);
}

static void teardown(void)
{
    loom_db_pool_free(pool);
    loom_op_table_free(table);
}

TestSuite(console_ops, .init = setup, .fini = teardown, .timeout = 120);

static int call(const char *name, json_t *req, json_t **res, loom_error_t *err)
{
    loom_op_ctx_t ctx = {.rt = &rt, .caller = "test"};
    *res = NULL;
    int rc = loom_op_call(&ctx, name, req, res, err);
    json_decref(req);
    return rc;
}

static json_t *call_ok(const char *name, json_t *req)
{
    json_t *res;
    loom_error_t err;
    int rc = call(name, req, &res, &err);
    cr_assert_eq(rc, 0, "%s: %s %s", name, err.code, err.message);
    return res;
}

static void expect_invalid(const char *name, const char *req_json, const char *field)
{
    json_t *res;
    loom_error_t err;
    int rc = call(name, json_loads(req_json, 0, NULL), &res, &err);
    cr_assert_neq(rc, 0, "%s %s succeeded", name, req_json);
    cr_expect(loom_error_is(&err, LOOM_CODE_INVALID_ARGUMENT), "%s: %s", req_json, err.code);
    cr_expect(strstr(err.message, field), "%s: %s", req_json, err.message);
}

/* n commands cmd-<first>..: consumer c<i%2>, type t<i%3>, key k<i%5>, status
 * rejected for i%4==1 else applied, received ten at a time on one timestamp
 * (ties are ordered by id, consumer). */
static void insert_commands(int first, int n, const char *base_time)
{
    char sql[2048];
    snprintf(sql, sizeof(sql),
             "INSERT INTO loom_commands (consumer, message_id, type, stream_id, topic, "
             "kafka_partition, kafka_offset, status, ray_id, received_at) "
             "SELECT 'c' || (i %% 2), 'cmd-' || lpad(i::text, 5, '0'), 't' || (i %% 3), "
             "'k' || (i %% 5), 'loom.cmd.t', 0, i, "
             "CASE WHEN i %% 4 = 1 THEN 'rejected' ELSE 'applied' END, 'ray-' || i, "
             "timestamptz '%s' + (i / 10) * interval '1 second' "
             "FROM generate_series(%d, %d) AS i",
             base_time, first, first + n - 1);
    loom_test_sql(url, sql);
}

/* Every page of req (with limit 50), as one array of ids. */
static json_t *all_pages(const char *req_json, int *pages, bool insert_between)
{
    json_t *ids = json_array();
    const char *cursor = NULL;
    json_t *res = NULL;
    *pages = 0;
    for (;;) {
        json_t *req = json_loads(req_json, 0, NULL);
        json_object_set_new(req, "limit", json_integer(50));
        if (cursor)
            json_object_set_new(req, "cursor", json_string(cursor));
        json_t *next = call_ok("engine.commands.list", req);
        json_decref(res);
        res = next;
        (*pages)++;
        size_t i;
        json_t *c;
        json_array_foreach(json_object_get(res, "commands"), i, c)
        {
            json_array_append(ids, json_object_get(c, "id"));
        }
        cursor = json_string_value(json_object_get(res, "next_cursor"));
        if (!cursor)
            break;
        if (insert_between && *pages == 1)
            insert_commands(10000, 20, "2030-01-01T00:00:00Z"); /* newer than all */
        cr_assert(*pages < 100, "paging does not end");
    }
    json_decref(res);
    return ids;
}

Test(console_ops, list_pages_by_key_without_repeats_or_gaps)
{
    insert_commands(0, 230, "2026-01-01T00:00:00Z");
    int pages;
    json_t *ids = all_pages("{}", &pages, true);
    /* The 20 newer commands came after the first page was read: they are
     * not on the later pages, and nothing of the 230 is repeated or lost. */
    cr_assert_eq(json_array_size(ids), 230, "%zu ids", json_array_size(ids));
    cr_assert_eq(pages, 5);
    for (size_t i = 0; i < 230; i++) {
        char want[32];
        snprintf(want, sizeof(want), "cmd-%05zu", 229 - i);
        cr_assert_str_eq(json_string_value(json_array_get(ids, i)), want, "position %zu", i);
    }
    json_decref(ids);

    /* Now the newest come first. */
    json_t *res = call_ok("engine.commands.list", json_pack("{s:i}", "limit", 3));
    cr_assert_str_eq(json_string_value(json_object_get(
                         json_array_get(json_object_get(res, "commands"), 0), "id")),
                     "cmd-10019");
    json_decref(res);
}

Test(console_ops, list_filters)
{
    insert_commands(0, 100, "2026-01-01T00:00:00Z");
    struct {
        const char *req;
        size_t want;
    } cases[] = {
        {"{\"status\":\"rejected\"}", 25},
        {"{\"status\":\"retrying\"}", 0},
        {"{\"consumer\":\"c1\"}", 50},
        {"{\"type\":\"t0\"}", 34},
        {"{\"key\":\"k3\"}", 20},
        {"{\"key\":\"k3\",\"status\":\"rejected\"}", 5},
        {"{\"ray_id\":\"ray-42\"}", 1},
        /* i/10 seconds after the base: [10 s, 20 s) holds i = 100..199, none;
         * [2 s, 4 s) holds i = 20..39. */
        {"{\"from\":\"2026-01-01T00:00:02Z\",\"to\":\"2026-01-01T00:00:04Z\"}", 20},
        {"{\"from\":\"2026-01-01T01:00:02+01:00\",\"to\":\"2026-01-01T00:00:04.000Z\"}", 20},
        {"{\"from\":\"2026-01-01T00:00:10Z\"}", 0},
    };
    for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
        int pages;
        json_t *ids = all_pages(cases[k].req, &pages, false);
        cr_expect_eq(json_array_size(ids), cases[k].want, "%s: %zu", cases[k].req,
                     json_array_size(ids));
        json_decref(ids);
    }
    expect_invalid("engine.commands.list", "{\"status\":\"done\"}", "status");
    expect_invalid("engine.commands.list", "{\"limit\":0}", "limit");
    expect_invalid("engine.commands.list", "{\"limit\":201}", "limit");
    expect_invalid("engine.commands.list", "{\"from\":\"yesterday\"}", "from");
    expect_invalid("engine.commands.list", "{\"to\":\"2026-13-01T00:00:00Z\"}", "to");
    expect_invalid("engine.commands.list", "{\"cursor\":\"zz\"}", "cursor");
    expect_invalid("engine.commands.list", "{\"cursor\":\"5b315d\"}", "cursor"); /* [1] */
    expect_invalid("engine.commands.list", "{\"sort\":\"asc\"}", "sort");
}

Test(console_ops, story_follows_causation_down_and_up_with_events_and_outbox)
{
    /* A (from a request, ray r1) -> B -> C; A -> D; E elsewhere in ray r1;
     * F unrelated. B was applied by two consumers; C is still retrying. */
    loom_test_sql(url,
                  "INSERT INTO loom_commands (consumer, message_id, type, topic, kafka_partition, "
                  "kafka_offset, status, ray_id, causation_id, last_error, received_at) VALUES "
                  "('s', 'A', 'shop.place', 't', 0, 1, 'applied', 'r1', NULL, NULL, now()), "
                  "('s', 'B', 'shop.pay', 't', 0, 2, 'applied', 'r1', 'A', NULL, now()), "
                  "('audit', 'B', 'shop.pay', 't', 0, 2, 'applied', 'r1', 'A', NULL, now()), "
                  "('s', 'C', 'shop.ship', 't', 0, 3, 'retrying', 'r1', 'B', 'no truck', now()), "
                  "('s', 'D', 'shop.mail', 't', 0, 4, 'applied', 'r1', 'A', NULL, now()), "
                  "('s', 'E', 'shop.note', 't', 0, 5, 'applied', 'r1', 'outside', NULL, now()), "
                  "('s', 'F', 'shop.place', 't', 0, 6, 'applied', 'r2', NULL, NULL, now())");
    loom_test_sql(
        url, "INSERT INTO loom_events (stream_id, version, event_id, type, data, causation_id) "
             "VALUES ('order-1', 1, 'e1', 'shop.placed', '{}', 'A'), "
             "('order-1', 2, 'e2', 'shop.paid', '{}', 'B'), "
             "('order-2', 1, 'e3', 'shop.placed', '{}', 'F')");
    loom_test_sql(url, "INSERT INTO loom_outbox (topic, headers, payload) VALUES ('t', "
                       "'{\"ce_id\":\"G\",\"ce_type\":\"shop.track\",\"ce_causationid\":\"C\"}', "
                       "'\\x7b7d')");

    /* From C: the story starts at A. */
    json_t *s = call_ok("engine.commands.story", json_pack("{s:s}", "id", "C"));
    json_t *cmds = json_object_get(s, "commands");
    cr_assert_eq(json_array_size(cmds), 4, "%s", json_dumps(s, 0));
    const char *want[][3] = {{"A", NULL, "0"}, {"B", "A", "1"}, {"C", "B", "2"}, {"D", "A", "1"}};
    for (size_t i = 0; i < 4; i++) {
        json_t *c = NULL;
        size_t k;
        json_t *x;
        json_array_foreach(cmds, k, x)
        {
            if (strcmp(json_string_value(json_object_get(x, "id")), want[i][0]) == 0)
                c = x;
        }
        cr_assert_not_null(c, "%s missing", want[i][0]);
        json_t *cause = json_object_get(c, "causation_id");
        if (want[i][1])
            cr_expect_str_eq(json_string_value(cause), want[i][1]);
        else
            cr_expect(json_is_null(cause));
        cr_expect_eq(json_integer_value(json_object_get(c, "depth")), atoi(want[i][2]), "%s",
                     want[i][0]);
        if (strcmp(want[i][0], "B") == 0) {
            cr_expect_eq(json_array_size(json_object_get(c, "consumers")), 2);
            json_t *ev = json_array_get(json_object_get(c, "events"), 0);
            cr_expect_str_eq(json_string_value(json_object_get(ev, "type")), "shop.paid");
            cr_expect_eq(json_integer_value(json_object_get(ev, "version")), 2);
        }
        if (strcmp(want[i][0], "C") == 0) {
            json_t *row = json_array_get(json_object_get(c, "consumers"), 0);
            cr_expect_str_eq(json_string_value(json_object_get(row, "status")), "retrying");
            cr_expect_str_eq(json_string_value(json_object_get(row, "last_error")), "no truck");
        }
    }
    json_t *ob = json_array_get(json_object_get(s, "outbox"), 0);
    cr_assert_not_null(ob);
    cr_expect_str_eq(json_string_value(json_object_get(ob, "id")), "G");
    cr_expect_str_eq(json_string_value(json_object_get(ob, "causation_id")), "C");
    json_decref(s);

    /* By ray: every command of r1 (E too, whose cause is outside), not F. */
    s = call_ok("engine.commands.story", json_pack("{s:s}", "ray_id", "r1"));
    cr_expect_eq(json_array_size(json_object_get(s, "commands")), 5, "%s", json_dumps(s, 0));
    json_decref(s);

    json_t *res;
    loom_error_t err;
    cr_expect_neq(call("engine.commands.story", json_pack("{s:s}", "id", "nope"), &res, &err), 0);
    cr_expect(loom_error_is(&err, LOOM_CODE_COMMAND_NOT_FOUND), "%s", err.code);
    expect_invalid("engine.commands.story", "{}", "ray_id");
    expect_invalid("engine.commands.story", "{\"id\":\"A\",\"ray_id\":\"r1\"}", "ray_id");
}

Test(console_ops, counts_what_needs_a_person)
{
    insert_commands(0, 100, "2026-01-01T00:00:00Z");
    loom_test_sql(url, "UPDATE loom_commands SET status = 'retrying' WHERE message_id IN "
                       "('cmd-00000', 'cmd-00002')");
    loom_test_sql(url, "UPDATE loom_commands SET status = 'parked' WHERE message_id = 'cmd-00004'");
    json_t *c = call_ok("engine.commands.counts", NULL);
    cr_expect_eq(json_integer_value(json_object_get(c, "retrying")), 2);
    cr_expect_eq(json_integer_value(json_object_get(c, "parked")), 1);
    cr_expect_eq(json_integer_value(json_object_get(c, "rejected")), 25);
    cr_expect(json_is_false(json_object_get(c, "capped")));
    json_decref(c);
}

/* Two live workers share a consumer's partitions; a partition both report
 * (a hand-over between heartbeats) stays with the newer report; a stale node
 * and a malformed report are left out. */
Test(console_ops, consumers_list_sums_live_nodes_with_each_partitions_owner)
{
    loom_test_sql(
        url,
        "INSERT INTO loom_nodes (id, role, url, site, version, started_at, last_heartbeat, "
        "consumers) VALUES "
        "('00000000-0000-7000-8000-00000000000a', 'worker', NULL, 's', 'v', now(), now(), "
        " '{\"consumers\":[{\"name\":\"orders.store\",\"counts\":{\"applied\":10,\"rejected\":1},"
        "   \"per_s\":{\"applied\":2.5},\"partitions\":[{\"topic\":\"loom.cmd.orders\","
        "   \"partition\":0,\"lag\":3,\"retrying\":true},{\"topic\":\"loom.cmd.orders\","
        "   \"partition\":1,\"lag\":null,\"retrying\":false}]}]}'), "
        "('00000000-0000-7000-8000-00000000000b', 'worker', 'http://b', 's', 'v', now(), "
        " now() - interval '2 seconds', "
        " '{\"consumers\":[{\"name\":\"orders.store\",\"counts\":{\"applied\":5,\"rejected\":0},"
        "   \"per_s\":{\"applied\":1.5},\"partitions\":[{\"topic\":\"loom.cmd.orders\","
        "   \"partition\":1,\"lag\":7,\"retrying\":false},{\"topic\":\"loom.cmd.orders\","
        "   \"partition\":2,\"lag\":4,\"retrying\":false}]},"
        "   {\"name\":\"messages.store\",\"counts\":{},\"per_s\":{},\"partitions\":[]}]}'), "
        "('00000000-0000-7000-8000-00000000000c', 'worker', NULL, 's', 'v', now(), "
        " now() - interval '1 minute', "
        " '{\"consumers\":[{\"name\":\"gone.store\",\"counts\":{\"applied\":99},"
        "   \"partitions\":[{\"topic\":\"t\",\"partition\":0,\"lag\":1}]}]}'), "
        "('00000000-0000-7000-8000-00000000000d', 'worker', NULL, 's', 'v', now(), now(), "
        " '{\"consumers\":[{\"name\":7},{\"counts\":\"x\"},{\"name\":\"orders.store\","
        "   \"counts\":[1],\"partitions\":[{\"topic\":1},{\"partition\":\"x\"}]}]}'), "
        "('00000000-0000-7000-8000-00000000000e', 'api', NULL, 's', 'v', now(), now(), NULL)");
    json_t *res = call_ok("engine.consumers.list", NULL);
    json_t *list = json_object_get(res, "consumers");
    cr_assert_eq(json_array_size(list), 2, "%s", json_dumps(res, 0));
    json_t *orders = json_array_get(list, 0);
    cr_assert_str_eq(json_string_value(json_object_get(orders, "name")), "orders.store");
    /* a, then d (malformed parts skipped, but the node runs it), then b */
    cr_expect_eq(json_array_size(json_object_get(orders, "nodes")), 3);
    json_t *counts = json_object_get(orders, "counts");
    cr_expect_eq(json_integer_value(json_object_get(counts, "applied")), 15);
    cr_expect_eq(json_integer_value(json_object_get(counts, "rejected")), 1);
    cr_expect(json_real_value(json_object_get(json_object_get(orders, "per_s"), "applied")) == 4.0);
    json_t *parts = json_object_get(orders, "partitions");
    cr_assert_eq(json_array_size(parts), 3, "%s", json_dumps(parts, 0));
    const char *owner[] = {"00000000-0000-7000-8000-00000000000a",
                           "00000000-0000-7000-8000-00000000000a",
                           "00000000-0000-7000-8000-00000000000b"};
    for (size_t i = 0; i < 3; i++) {
        json_t *p = json_array_get(parts, i);
        cr_expect_eq(json_integer_value(json_object_get(p, "partition")), (json_int_t)i);
        cr_expect_str_eq(json_string_value(json_object_get(p, "node")), owner[i]);
    }
    cr_expect(json_is_null(json_object_get(json_array_get(parts, 1), "lag")));
    cr_expect(json_is_true(json_object_get(json_array_get(parts, 0), "retrying")));
    cr_expect_str_eq(json_string_value(json_object_get(json_array_get(parts, 2), "node_url")),
                     "http://b");
    cr_expect_eq(json_integer_value(json_object_get(orders, "lag")), 7);
    cr_expect_eq(json_integer_value(json_object_get(orders, "retrying_partitions")), 1);
    cr_expect_str_eq(json_string_value(json_object_get(json_array_get(list, 1), "name")),
                     "messages.store");
    json_decref(res);
    expect_invalid("engine.consumers.list", "{\"x\":1}", "x");
}
