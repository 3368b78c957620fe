/*
 * Ops against a real PostgreSQL: the engine's ops (engine.nodes.list,
 * engine.commands.get) by name, read-only by construction (a write is refused
 * and names the op; nothing is written), deadlines that cancel a slow query
 * and leave the connection usable, and the metrics the calls record, parsed
 * as Prometheus text.
 */
#include "support.h"
#include "loom/clock.h"
#include "loom/op.h"
#include "ops.h"
#include "services.h"
#include "prom.h"

#include <criterion/criterion.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* ---- test-only ops, registered through the same API as the app's ---------- */

static const loom_db_stmt_t write_lease = {
    "test_op_write_lease",
    "INSERT INTO loom_leases (name, holder, expires_at) VALUES ('x', 'y', now())", 0};

static int op_write(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                    loom_error_t *err)
{
    (void)ctx;
    (void)req;
    int rc = loom_db_exec(db, &write_lease, NULL, NULL, err);
    if (rc == 0)
        *res = json_object();
    return rc;
}

/* Ends the engine's transaction and writes in a new one. */
static int op_escape(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                     loom_error_t *err)
{
    (void)ctx;
    (void)req;
    int rc = loom_db_exec_script(db, "COMMIT", err);
    if (rc == 0)
        rc = loom_db_exec(db, &write_lease, NULL, NULL, err);
    if (rc == 0)
        *res = json_object();
    return rc;
}

static int op_commit(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                     loom_error_t *err)
{
    (void)ctx;
    (void)req;
    int rc = loom_db_exec_script(db, "COMMIT", err);
    if (rc == 0)
        *res = json_object();
    return rc;
}

static const loom_db_stmt_t sleep_stmt = {"test_op_sleep", "SELECT pg_sleep($1::FLOAT8)", 1};

static int op_sleep(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                    loom_error_t *err)
{
    (void)ctx;
    json_t *s = json_object_get(req, "seconds");
    if (!json_is_number(s))
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "field \"seconds\" must be a number");
    char secs[32];
    snprintf(secs, sizeof(secs), "%g", json_number_value(s));
    const char *p[] = {secs};
    int rc = loom_db_exec(db, &sleep_stmt, p, NULL, err);
    if (rc == 0)
        *res = json_object();
    return rc;
}

static const loom_db_stmt_t pid_stmt = {"test_op_pid", "SELECT pg_backend_pid()", 0};

static int op_pid(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                  loom_error_t *err)
{
    (void)ctx;
    (void)req;
    PGresult *r;
    int rc = loom_db_exec(db, &pid_stmt, NULL, &r, err);
    if (rc != 0)
        return rc;
    *res = json_pack("{s:i}", "pid", atoi(PQgetvalue(r, 0, 0)));
    PQclear(r);
    return 0;
}

/* The settings the statement ran with, and its backend. */
static const loom_db_stmt_t alone_stmt = {
    "test_op_alone",
    "SELECT 'alone', current_setting('statement_timeout'), "
    "current_setting('transaction_read_only'), pg_backend_pid()",
    0};

static int op_alone(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                    loom_error_t *err)
{
    (void)ctx;
    (void)req;
    PGresult *r;
    int rc = loom_db_exec(db, &alone_stmt, NULL, &r, err);
    if (rc != 0)
        return rc;
    *res = json_pack("{s:s,s:s,s:i}", "timeout", PQgetvalue(r, 0, 1), "read_only",
                     PQgetvalue(r, 0, 2), "pid", atoi(PQgetvalue(r, 0, 3)));
    PQclear(r);
    return 0;
}

static int op_two(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                  loom_error_t *err)
{
    (void)ctx;
    (void)req;
    int rc = loom_db_exec(db, &pid_stmt, NULL, NULL, err);
    if (rc == 0)
        rc = loom_db_exec(db, &pid_stmt, NULL, NULL, err);
    if (rc == 0)
        *res = json_object();
    return rc;
}

/* Turns the session's read-only default off, as its one statement. */
static int op_unguard(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                      loom_error_t *err)
{
    (void)ctx;
    (void)req;
    int rc = loom_db_query(db, "SET default_transaction_read_only = off", 0, NULL, NULL, err);
    if (rc == 0)
        *res = json_object();
    return rc;
}

#define ONE LOOM_OP_ONE_STATEMENT
static const loom_op_t t_alone = {"test.alone", op_alone, 0, "one statement", ONE};
static const loom_op_t t_two = {"test.two", op_two, 0, "two statements, declares one", ONE};
static const loom_op_t t_write_one = {"test.write_one", op_write, 0, "writes, one statement", ONE};
static const loom_op_t t_unguard = {"test.unguard", op_unguard, 0, "SET read-only off", ONE};
static const loom_op_t t_sleep_one = {"test.sleep_one", op_sleep, 300, "pg_sleep, 300 ms", ONE};
static const loom_op_t t_sleep_one_long = {"test.sleep_one_long", op_sleep, 10000, "pg_sleep", ONE};

static const loom_op_t t_write = {"test.write", op_write, 0, "tries to write", 0};
static const loom_op_t t_escape = {"test.escape", op_escape, 0, "commits, then writes", 0};
static const loom_op_t t_commit = {"test.commit", op_commit, 0, "ends its transaction", 0};
static const loom_op_t t_sleep = {"test.sleep", op_sleep, 300, "pg_sleep, 300 ms timeout", 0};
static const loom_op_t t_sleep_long = {"test.sleep_long", op_sleep, 10000, "pg_sleep", 0};
static const loom_op_t t_pid = {"test.pid", op_pid, 0, "the backend pid", 0};
static const loom_op_t *const test_ops[] = {
    &t_write, &t_escape, &t_commit,    &t_sleep,   &t_sleep_long, &t_pid,
    &t_alone, &t_two,    &t_write_one, &t_unguard, &t_sleep_one,  &t_sleep_one_long};

/* ---- fixture ------------------------------------------------------------------ */

static char url[512];
static loom_op_table_t *table;
static loom_metrics_t *metrics;

static void setup(void)
{
    loom_test_db_create_migrated(url, sizeof(url));
    table = loom_op_table_new();
    loom_error_t err;
    cr_assert_eq(
        loom_op_table_add(table, loom_test_full_app()->ops, loom_test_full_app()->n_ops, &err), 0,
        "%s", err.message);
    cr_assert_eq(loom_op_table_add(table, test_ops, sizeof(test_ops) / sizeof(test_ops[0]), &err),
                 0, "%s", err.message);
    metrics = loom_metrics_new();
}

static void teardown(void)
{
    loom_metrics_free(metrics);
    loom_op_table_free(table);
}

TestSuite(ops, .init = setup, .fini = teardown, .timeout = 120);

static json_t *call_ok(loom_op_runtime_t *rt, const char *name, const char *req_json)
{
    loom_op_ctx_t ctx = {.rt = rt, .caller = "test"};
    json_t *req = req_json ? json_loads(req_json, 0, NULL) : NULL;
    json_t *res = NULL;
    loom_error_t err;
    int rc = loom_op_call(&ctx, name, req, &res, &err);
    cr_assert_eq(rc, 0, "%s %s: %s %s", name, req_json ? req_json : "", err.code, err.message);
    json_decref(req);
    return res;
}

static int call_fail(loom_op_runtime_t *rt, const char *name, const char *req_json,
                     loom_error_t *err)
{
    loom_op_ctx_t ctx = {.rt = rt};
    json_t *req = req_json ? json_loads(req_json, 0, NULL) : NULL;
    json_t *res = NULL;
    int rc = loom_op_call(&ctx, name, req, &res, err);
    cr_assert_neq(rc, 0, "%s succeeded", name);
    cr_assert_null(res);
    json_decref(req);
    return rc;
}

/* ---- the engine's ops ------------------------------------------------------------ */

Test(ops, nodes_list_by_name_with_stale_flags)
{
    loom_test_sql(url, "INSERT INTO loom_nodes (id, role, url, site, version, started_at, "
                       "last_heartbeat) VALUES "
                       "('0191b2c4-7e1f-7a3b-9c1d-2e3f4a5b6c7d', 'worker', NULL, 'local', '0.1.0', "
                       "now() - interval '1 hour', now() - interval '2 seconds'), "
                       "('0191b2c4-7e1f-7a3b-9c1d-2e3f4a5b6c7e', 'api', 'http://10.0.0.1:8080', "
                       "'local', '0.1.0', now() - interval '1 hour', now() - interval '1 minute')");
    loom_db_pool_t *pool = loom_test_read_pool(url, 1);
    loom_op_runtime_t rt;
    loom_op_runtime_init(&rt, table, pool, metrics);

    json_t *res = call_ok(&rt, "engine.nodes.list", NULL);
    cr_assert_eq(json_integer_value(json_object_get(res, "stale_after_ms")), 20000);
    json_t *nodes = json_object_get(res, "nodes");
    cr_assert_eq(json_array_size(nodes), 2, "%s", json_dumps(res, 0));
    json_t *api = json_array_get(nodes, 0), *worker = json_array_get(nodes, 1);
    cr_assert_str_eq(json_string_value(json_object_get(api, "role")), "api");
    cr_assert(json_is_true(json_object_get(api, "stale")));
    cr_assert_str_eq(json_string_value(json_object_get(api, "url")), "http://10.0.0.1:8080");
    cr_assert_geq(json_integer_value(json_object_get(api, "heartbeat_age_ms")), 59000);
    cr_assert_str_eq(json_string_value(json_object_get(worker, "id")),
                     "0191b2c4-7e1f-7a3b-9c1d-2e3f4a5b6c7d");
    cr_assert(json_is_false(json_object_get(worker, "stale")));
    cr_assert(json_is_null(json_object_get(worker, "url")));
    const char *hb = json_string_value(json_object_get(worker, "last_heartbeat"));
    cr_assert(hb && strlen(hb) == 27 && hb[26] == 'Z', "RFC 3339 UTC: %s", hb);
    json_decref(res);

    res = call_ok(&rt, "engine.nodes.list", "{\"role\":\"worker\"}");
    cr_assert_eq(json_array_size(json_object_get(res, "nodes")), 1);
    json_decref(res);
    res = call_ok(&rt, "engine.nodes.list", "{\"stale\":true}");
    nodes = json_object_get(res, "nodes");
    cr_assert_eq(json_array_size(nodes), 1);
    cr_assert_str_eq(json_string_value(json_object_get(json_array_get(nodes, 0), "role")), "api");
    json_decref(res);

    loom_error_t err;
    call_fail(&rt, "engine.nodes.list", "{\"stale\":\"yes\"}", &err);
    cr_assert_str_eq(err.code, "INVALID_ARGUMENT");
    call_fail(&rt, "engine.nodes.list", "{\"rol\":\"api\"}", &err);
    cr_assert_str_eq(err.message, "unknown field \"rol\"");
    loom_db_pool_free(pool);
}

Test(ops, commands_get_by_message_id)
{
    loom_test_sql(url, "INSERT INTO loom_commands (consumer, message_id, type, topic, "
                       "kafka_partition, kafka_offset, status, attempts, last_error, result, "
                       "ray_id) VALUES "
                       "('billing', 'm-1', 'orders.place', 'loom.cmd.orders.place', 3, 42, "
                       "'retrying', 4, 'deadlock detected', NULL, 'ray-9'), "
                       "('audit', 'm-1', 'orders.place', 'loom.cmd.orders.place', 3, 42, "
                       "'applied', 1, NULL, '{\"ok\": true}', 'ray-9')");
    loom_db_pool_t *pool = loom_test_read_pool(url, 1);
    loom_op_runtime_t rt;
    loom_op_runtime_init(&rt, table, pool, metrics);

    json_t *res = call_ok(&rt, "engine.commands.get", "{\"id\":\"m-1\"}");
    cr_assert_str_eq(json_string_value(json_object_get(res, "id")), "m-1");
    json_t *cmds = json_object_get(res, "commands");
    cr_assert_eq(json_array_size(cmds), 2);
    json_t *audit = json_array_get(cmds, 0), *billing = json_array_get(cmds, 1);
    cr_assert_str_eq(json_string_value(json_object_get(audit, "consumer")), "audit");
    cr_assert_str_eq(json_string_value(json_object_get(audit, "status")), "applied");
    cr_assert(json_is_true(json_object_get(json_object_get(audit, "result"), "ok")));
    cr_assert(json_is_null(json_object_get(audit, "last_error")));
    cr_assert_str_eq(json_string_value(json_object_get(billing, "status")), "retrying");
    cr_assert_eq(json_integer_value(json_object_get(billing, "attempts")), 4);
    cr_assert_str_eq(json_string_value(json_object_get(billing, "last_error")),
                     "deadlock detected");
    cr_assert_eq(json_integer_value(json_object_get(billing, "offset")), 42);
    cr_assert_eq(json_integer_value(json_object_get(billing, "partition")), 3);
    cr_assert_str_eq(json_string_value(json_object_get(billing, "ray_id")), "ray-9");
    json_decref(res);

    res = call_ok(&rt, "engine.commands.get", "{\"id\":\"m-1\",\"consumer\":\"billing\"}");
    cr_assert_eq(json_array_size(json_object_get(res, "commands")), 1);
    json_decref(res);

    loom_error_t err;
    cr_assert_eq(call_fail(&rt, "engine.commands.get", "{\"id\":\"m-2\"}", &err), LOOM_ENOENT);
    cr_assert_str_eq(err.code, "COMMAND_NOT_FOUND");
    cr_assert_eq(loom_error_class_http_status(err.cls), 404);
    cr_assert_str_eq(err.message, "no command \"m-2\"");
    call_fail(&rt, "engine.commands.get", "{\"id\":\"m-1\",\"consumer\":\"nobody\"}", &err);
    cr_assert_str_eq(err.code, "COMMAND_NOT_FOUND");
    call_fail(&rt, "engine.commands.get", "{}", &err);
    cr_assert_str_eq(err.code, "INVALID_ARGUMENT");
    cr_assert_str_eq(err.message, "missing field \"id\"");
    call_fail(&rt, "engine.commands.get", "[\"m-1\"]", &err);
    cr_assert_str_eq(err.code, "INVALID_JSON");
    loom_db_pool_free(pool);
}

/* ---- read-only by construction ------------------------------------------------------ */

static void assert_nothing_written(void)
{
    char *n = loom_test_sql_value(url, "SELECT count(*) FROM loom_leases");
    cr_assert_str_eq(n, "0", "an op wrote a row");
    free(n);
}

Test(ops, a_write_is_refused_naming_the_op_on_any_pool)
{
    /* A read/write pool (the op's transaction is READ ONLY) and a read-only
     * pool (what LOOM_DATABASE_READ_URL gets) alike. */
    loom_db_pool_t *pools[] = {loom_test_pool(url, 1), loom_test_read_pool(url, 1)};
    for (int i = 0; i < 2; i++) {
        loom_op_runtime_t rt;
        loom_op_runtime_init(&rt, table, pools[i], metrics);
        loom_error_t err;
        call_fail(&rt, "test.write", NULL, &err);
        cr_assert_str_eq(err.code, "READ_ONLY_VIOLATION");
        cr_assert_eq(err.cls, LOOM_ERR_INTERNAL);
        cr_assert_eq(loom_error_class_http_status(err.cls), 500);
        cr_assert(strstr(err.message, "op \"test.write\" tried to write"), "%s", err.message);
        cr_assert(strstr(err.message, "read-only transaction"), "%s", err.message);
        assert_nothing_written();
        /* The connection is fine afterwards. */
        json_decref(call_ok(&rt, "engine.nodes.list", NULL));
        loom_db_pool_free(pools[i]);
    }
}

Test(ops, an_op_that_ends_its_transaction_cannot_write_on_the_read_pool)
{
    loom_db_pool_t *pool = loom_test_read_pool(url, 1);
    loom_op_runtime_t rt;
    loom_op_runtime_init(&rt, table, pool, metrics);
    loom_error_t err;
    call_fail(&rt, "test.escape", NULL, &err);
    cr_assert_str_eq(err.code, "READ_ONLY_VIOLATION");
    cr_assert(strstr(err.message, "op \"test.escape\""), "%s", err.message);
    assert_nothing_written();
    call_fail(&rt, "test.commit", NULL, &err);
    cr_assert_str_eq(err.code, "INTERNAL");
    cr_assert(strstr(err.message, "op \"test.commit\" ended its transaction"), "%s", err.message);
    json_decref(call_ok(&rt, "engine.nodes.list", NULL));
    loom_db_pool_free(pool);
}

/* ---- deadlines ------------------------------------------------------------------------ */

static int pid_of(loom_op_runtime_t *rt)
{
    json_t *res = call_ok(rt, "test.pid", NULL);
    int pid = (int)json_integer_value(json_object_get(res, "pid"));
    json_decref(res);
    return pid;
}

static void assert_no_sleep_running(void)
{
    char *n = loom_test_sql_value(url, "SELECT count(*) FROM pg_stat_activity WHERE state = "
                                       "'active' AND datname = current_database() AND pid <> "
                                       "pg_backend_pid() AND query LIKE '%pg_sleep($1%'");
    cr_assert_str_eq(n, "0", "the slow query is still running on the server");
    free(n);
}

Test(ops, a_slow_query_past_the_op_timeout_is_canceled_and_the_connection_kept)
{
    loom_db_pool_t *pool = loom_test_pool(url, 1);
    loom_op_runtime_t rt;
    loom_op_runtime_init(&rt, table, pool, metrics);
    int pid = pid_of(&rt);

    loom_error_t err;
    int64_t t0 = loom_mono_ms();
    cr_assert_eq(call_fail(&rt, "test.sleep", "{\"seconds\":10}", &err), LOOM_ETIMEDOUT);
    int64_t took = loom_mono_ms() - t0;
    cr_assert(took >= 250 && took < 2000, "took %lld ms for a 300 ms timeout", (long long)took);
    cr_assert_str_eq(err.code, "DEADLINE_EXCEEDED");
    cr_assert_eq(err.cls, LOOM_ERR_TIMEOUT);
    cr_assert_eq(loom_error_class_http_status(err.cls), 504);
    cr_assert(strstr(err.message, "op \"test.sleep\" did not finish within its timeout of 300 ms"),
              "%s", err.message);
    cr_assert(strstr(err.message, "statement timeout"), "%s", err.message);
    assert_no_sleep_running();

    /* Same connection (same backend), still usable, no statement_timeout left over. */
    cr_assert_eq(pid_of(&rt), pid, "the connection was replaced");
    json_t *res = call_ok(&rt, "test.sleep_long", "{\"seconds\":0.4}");
    json_decref(res);
    loom_db_t *db;
    cr_assert_eq(loom_db_acquire(pool, &db, &err), 0);
    PGresult *r;
    cr_assert_eq(loom_db_query(db, "SHOW statement_timeout", 0, NULL, &r, &err), 0);
    cr_assert_str_eq(PQgetvalue(r, 0, 0), "0");
    PQclear(r);
    loom_db_release(db);
    loom_db_pool_free(pool);
}

Test(ops, the_callers_deadline_wins_when_it_is_earlier)
{
    loom_db_pool_t *pool = loom_test_pool(url, 1);
    loom_op_runtime_t rt;
    loom_op_runtime_init(&rt, table, pool, metrics);
    int pid = pid_of(&rt);
    loom_op_ctx_t ctx = {.rt = &rt, .deadline_mono_ms = loom_mono_ms() + 200};
    json_t *req = json_pack("{s:i}", "seconds", 10);
    json_t *res = NULL;
    loom_error_t err;
    int64_t t0 = loom_mono_ms();
    cr_assert_eq(loom_op_call(&ctx, "test.sleep_long", req, &res, &err), LOOM_ETIMEDOUT);
    cr_assert_lt(loom_mono_ms() - t0, 2000);
    /* The message gives the time that was left (200 ms or a little less on a
     * slow machine). */
    cr_assert(strstr(err.message, "op \"test.sleep_long\" did not finish within the caller's "
                                  "deadline of "),
              "%s", err.message);
    json_decref(req);
    assert_no_sleep_running();
    cr_assert_eq(pid_of(&rt), pid);
    loom_db_pool_free(pool);
}

/* ---- ops that declare one statement ------------------------------------------------------- */

static json_t *alone(loom_op_runtime_t *rt)
{
    return call_ok(rt, "test.alone", NULL);
}

/* The last statement the server ran for a backend, once it is idle (an
 * unawaited read-only COMMIT may still be on its way). */
static char *last_statement(json_t *alone_res)
{
    int pid = (int)json_integer_value(json_object_get(alone_res, "pid"));
    char sql[256];
    snprintf(sql, sizeof(sql),
             "SELECT coalesce((SELECT state || ': ' || query FROM pg_stat_activity WHERE pid = "
             "%d), 'gone')",
             pid);
    char *last = NULL;
    for (int i = 0; i < 200; i++) {
        free(last);
        last = loom_test_sql_value(url, sql);
        if (strncmp(last, "idle: ", 6) == 0)
            break;
        loom_sleep_ms(50);
    }
    return last;
}

/* A statement alone: the backend's last statement is the op's, and it is
 * idle, not in a transaction (no BEGIN before it, no COMMIT after). */
static bool ran_alone(json_t *alone_res)
{
    char *last = last_statement(alone_res);
    bool ok = strcmp(last, "idle: SELECT 'alone', current_setting('statement_timeout'), "
                           "current_setting('transaction_read_only'), pg_backend_pid()") == 0;
    if (!ok)
        cr_log_info("last statement: %s", last);
    free(last);
    return ok;
}

Test(ops, a_one_statement_op_runs_alone_on_a_read_only_session)
{
    loom_db_pool_t *pool = loom_test_read_pool(url, 1);
    loom_op_runtime_t rt;
    loom_op_runtime_init(&rt, table, pool, metrics);
    /* The first call sets the op's timeout on the session, with the
     * statement; the next ones send the statement alone. */
    json_t *first = alone(&rt);
    cr_assert_str_eq(json_string_value(json_object_get(first, "timeout")), "5s");
    cr_assert_str_eq(json_string_value(json_object_get(first, "read_only")), "on");
    cr_assert(ran_alone(first));
    for (int i = 0; i < 3; i++) {
        json_t *next = alone(&rt);
        cr_assert(ran_alone(next), "not alone: a transaction around it");
        cr_assert_str_eq(json_string_value(json_object_get(next, "timeout")), "5s");
        cr_assert_str_eq(json_string_value(json_object_get(next, "read_only")), "on");
        cr_assert(json_equal(json_object_get(next, "pid"), json_object_get(first, "pid")));
        json_decref(next);
    }
    json_decref(first);
    loom_db_pool_free(pool);

    /* On a read/write pool the same op runs in its READ ONLY transaction,
     * and the session keeps no statement_timeout. */
    pool = loom_test_pool(url, 1);
    loom_op_runtime_init(&rt, table, pool, metrics);
    for (int i = 0; i < 2; i++) {
        json_t *tx = alone(&rt);
        char *last = last_statement(tx);
        cr_assert_str_eq(last, "idle: COMMIT");
        free(last);
        cr_assert_str_eq(json_string_value(json_object_get(tx, "read_only")), "on");
        json_decref(tx);
    }
    loom_db_t *db;
    loom_error_t err;
    cr_assert_eq(loom_db_acquire(pool, &db, &err), 0);
    PGresult *r;
    cr_assert_eq(loom_db_query(db, "SHOW statement_timeout", 0, NULL, &r, &err), 0);
    cr_assert_str_eq(PQgetvalue(r, 0, 0), "0");
    PQclear(r);
    loom_db_release(db);
    loom_db_pool_free(pool);
}

Test(ops, a_one_statement_op_that_runs_two_is_refused_naming_it)
{
    loom_db_pool_t *pool = loom_test_read_pool(url, 1);
    loom_op_runtime_t rt;
    loom_op_runtime_init(&rt, table, pool, metrics);
    loom_error_t err;
    call_fail(&rt, "test.two", NULL, &err);
    cr_assert_str_eq(err.code, "INTERNAL");
    cr_assert(strstr(err.message, "op \"test.two\" declares one statement"), "%s", err.message);
    cr_assert(strstr(err.message, "second statement"), "%s", err.message);
    /* The connection is fine afterwards. */
    json_decref(alone(&rt));
    loom_db_pool_free(pool);
}

Test(ops, a_one_statement_op_cannot_write_even_after_unsetting_read_only)
{
    loom_db_pool_t *pool = loom_test_read_pool(url, 1);
    loom_op_runtime_t rt;
    loom_op_runtime_init(&rt, table, pool, metrics);
    loom_error_t err;
    call_fail(&rt, "test.write_one", NULL, &err);
    cr_assert_str_eq(err.code, "READ_ONLY_VIOLATION");
    cr_assert(strstr(err.message, "op \"test.write_one\" tried to write"), "%s", err.message);
    /* An op turns the session's default off: the next ones see it (the
     * server reports the change) and run in BEGIN READ ONLY again. */
    json_decref(call_ok(&rt, "test.unguard", NULL));
    call_fail(&rt, "test.write_one", NULL, &err);
    cr_assert_str_eq(err.code, "READ_ONLY_VIOLATION");
    json_t *tx = alone(&rt);
    char *last = last_statement(tx);
    cr_assert_str_eq(last, "idle: COMMIT");
    free(last);
    json_decref(tx);
    assert_nothing_written();
    loom_db_pool_free(pool);
}

Test(ops, a_one_statement_op_keeps_its_timeout_and_the_callers_deadline)
{
    loom_db_pool_t *pool = loom_test_read_pool(url, 1);
    loom_op_runtime_t rt;
    loom_op_runtime_init(&rt, table, pool, metrics);
    int pid = pid_of(&rt);
    loom_error_t err;
    /* The op's own timeout (300 ms), set on the session with the statement:
     * the server cancels it. */
    call_fail(&rt, "test.sleep_one", "{\"seconds\":10}", &err);
    cr_assert_str_eq(err.code, "DEADLINE_EXCEEDED");
    cr_assert(strstr(err.message, "op \"test.sleep_one\" did not finish within its timeout of "
                                  "300 ms"),
              "%s", err.message);
    cr_assert(strstr(err.message, "statement timeout"), "%s", err.message);
    assert_no_sleep_running();
    /* A 10 s op leaves 10 s on the session; a caller's deadline of 200 ms
     * must still cancel its statement on the server. */
    json_decref(call_ok(&rt, "test.sleep_one_long", "{\"seconds\":0}"));
    loom_op_ctx_t ctx = {.rt = &rt, .deadline_mono_ms = loom_mono_ms() + 200};
    json_t *req = json_pack("{s:i}", "seconds", 10);
    json_t *res = NULL;
    cr_assert_eq(loom_op_call(&ctx, "test.sleep_one_long", req, &res, &err), LOOM_ETIMEDOUT);
    cr_assert(strstr(err.message, "the caller's deadline"), "%s", err.message);
    cr_assert(strstr(err.message, "statement timeout"), "%s", err.message);
    json_decref(req);
    assert_no_sleep_running();
    /* Same connection, and the next call runs with the op's timeout again. */
    cr_assert_eq(pid_of(&rt), pid, "the connection was replaced");
    json_t *a = alone(&rt);
    cr_assert_str_eq(json_string_value(json_object_get(a, "timeout")), "5s");
    json_decref(a);
    loom_db_pool_free(pool);
}

/* ---- metrics ----------------------------------------------------------------------------- */

static double sample(const prom_doc_t *doc, const char *key)
{
    bool found;
    double v = prom_get(doc, key, &found);
    cr_assert(found, "no sample %s", key);
    return v;
}

Test(ops, metrics_count_calls_by_op_and_result)
{
    loom_db_pool_t *pool = loom_test_read_pool(url, 1);
    loom_op_runtime_t rt;
    loom_op_runtime_init(&rt, table, pool, metrics);
    for (int i = 0; i < 3; i++)
        json_decref(call_ok(&rt, "engine.nodes.list", NULL));
    loom_error_t err;
    call_fail(&rt, "engine.commands.get", "{\"id\":\"none\"}", &err);
    call_fail(&rt, "test.sleep", "{\"seconds\":5}", &err);
    call_fail(&rt, "test.write", NULL, &err);
    call_fail(&rt, "no.such.op", NULL, &err);

    char *text = loom_metrics_render_string(metrics, NULL);
    prom_doc_t doc;
    char errbuf[512];
    cr_assert_eq(prom_parse(text, &doc, errbuf, sizeof(errbuf)), 0, "%s\n%s", errbuf, text);
    cr_assert_eq(sample(&doc, "loom_op_calls_total{op=\"engine.nodes.list\",result=\"ok\"}"), 3);
    cr_assert_eq(sample(&doc, "loom_op_calls_total{op=\"engine.commands.get\",result=\"COMMAND_"
                              "NOT_FOUND\"}"),
                 1);
    cr_assert_eq(
        sample(&doc, "loom_op_calls_total{op=\"test.sleep\",result=\"DEADLINE_EXCEEDED\"}"), 1);
    cr_assert_eq(
        sample(&doc, "loom_op_calls_total{op=\"test.write\",result=\"READ_ONLY_VIOLATION\"}"), 1);
    cr_assert_eq(sample(&doc, "loom_op_calls_total{op=\"_unknown\",result=\"OP_NOT_FOUND\"}"), 1);
    cr_assert_eq(sample(&doc, "loom_op_duration_seconds_count{op=\"engine.nodes.list\"}"), 3);
    cr_assert_eq(sample(&doc, "loom_op_duration_seconds_count{op=\"test.sleep\"}"), 1);
    /* The 300 ms timeout lands in the (0.25, 0.5] bucket. */
    cr_assert_eq(sample(&doc, "loom_op_duration_seconds_bucket{op=\"test.sleep\",le=\"0.25\"}"), 0);
    cr_assert_eq(sample(&doc, "loom_op_duration_seconds_bucket{op=\"test.sleep\",le=\"+Inf\"}"), 1);
    cr_assert_geq(sample(&doc, "loom_op_duration_seconds_sum{op=\"test.sleep\"}"), 0.29);
    char py[2048];
    cr_assert(prom_python_parse(text, py, sizeof(py)), "%s\n---\n%s", py, text);
    prom_free(&doc);
    free(text);
    loom_db_pool_free(pool);
}

static loom_op_runtime_t shared_rt;

static void *reader(void *arg)
{
    (void)arg;
    for (int i = 0; i < 50; i++) {
        loom_op_ctx_t ctx = {.rt = &shared_rt};
        json_t *res = NULL;
        loom_error_t err;
        if (loom_op_call(&ctx, "engine.nodes.list", NULL, &res, &err) != 0)
            return (void *)1;
        json_decref(res);
    }
    return NULL;
}

Test(ops, concurrent_calls_share_a_pool)
{
    loom_db_pool_t *pool = loom_test_read_pool(url, 2);
    loom_op_runtime_init(&shared_rt, table, pool, metrics);
    pthread_t t[4];
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, reader, NULL);
    for (int i = 0; i < 4; i++) {
        void *failed;
        pthread_join(t[i], &failed);
        cr_assert_null(failed);
    }
    cr_assert_eq(loom_metrics_value(shared_rt.calls, (const char *[]){"engine.nodes.list", "ok"}),
                 200);
    loom_db_pool_free(pool);
}
