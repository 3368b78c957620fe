/*
 * Statement ops on the gateway's event loops (engine/src/gateway_pipe.c),
 * against a real PostgreSQL: each call gets its own row back when many are
 * pipelined at once, the op's errors come through unchanged, a statement that
 * hangs holds only the calls queued behind it, a lost connection hands its
 * calls to the worker threads and the loop connects again, and
 * LOOM_API_OP_PIPELINE=off keeps every call on the threads.
 */
#include "http_client.h"
#include "prom.h"
#include "support.h"
#include "loom/clock.h"
#include "loom/gateway.h"
#include "loom/mem.h"

#include <criterion/criterion.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define TOK     "tok-pipe-0123456789"
#define APPNAME "loom pipe test"
#define N_ROWS  500

/* ---- the ops: statement ops on two tables, one that writes, one that sleeps --------- */

static int bind_id(loom_op_ctx_t *ctx, const json_t *req, loom_op_params_t *params,
                   loom_error_t *err)
{
    (void)ctx;
    static const char *const keys[] = {"id", NULL};
    int rc = loom_op_req_check_keys(req, keys, err);
    if (rc == 0)
        rc = loom_op_req_string(req, "id", true, 64, &params->v[0], err);
    return rc;
}

/* {"id", "v"} of the one row, or NOT_FOUND. */
static int row_result(loom_op_ctx_t *ctx, const json_t *req, const PGresult *rows, json_t **res,
                      loom_error_t *err)
{
    (void)ctx;
    (void)req;
    if (PQntuples(rows) == 0)
        return loom_error_set(err, LOOM_CODE_NOT_FOUND, "no row");
    *res = json_pack("{s:s, s:s}", "id", PQgetvalue(rows, 0, 0), "v", PQgetvalue(rows, 0, 1));
    return 0;
}

static const loom_db_stmt_t get_sql = {"test_pipe_get",
                                       "SELECT id, v FROM pipe_items WHERE id = $1", 1};
static const loom_op_stmt_t get_stmt = {&get_sql, bind_id, row_result};
/* A long timeout: a call stuck behind a lock stays stuck for the whole test. */
static const loom_op_t get_op = {.name = "test.pipe.get", .stmt = &get_stmt, .timeout_ms = 120000};

static const loom_db_stmt_t other_sql = {"test_pipe_other",
                                         "SELECT id, v FROM pipe_other WHERE id = $1", 1};
static const loom_op_stmt_t other_stmt = {&other_sql, bind_id, row_result};
static const loom_op_t other_op = {.name = "test.pipe.other", .stmt = &other_stmt};

static const loom_db_stmt_t write_sql = {
    "test_pipe_write", "INSERT INTO pipe_items (id, v) VALUES ($1, 'w') RETURNING id, v", 1};
static const loom_op_stmt_t write_stmt = {&write_sql, bind_id, row_result};
static const loom_op_t write_op = {.name = "test.pipe.write", .stmt = &write_stmt};

static int bind_ms(loom_op_ctx_t *ctx, const json_t *req, loom_op_params_t *params,
                   loom_error_t *err)
{
    (void)ctx;
    (void)err;
    snprintf(params->scratch, sizeof(params->scratch), "%lld",
             (long long)json_integer_value(json_object_get(req, "ms")));
    params->v[0] = params->scratch;
    return 0;
}

static int slept_result(loom_op_ctx_t *ctx, const json_t *req, const PGresult *rows, json_t **res,
                        loom_error_t *err)
{
    (void)ctx;
    (void)rows;
    (void)err;
    *res = json_pack("{s:I}", "slept_ms", json_integer_value(json_object_get(req, "ms")));
    return 0;
}

static const loom_db_stmt_t sleep_sql = {"test_pipe_sleep", "SELECT pg_sleep($1::float8 / 1000)",
                                         1};
static const loom_op_stmt_t sleep_stmt = {&sleep_sql, bind_ms, slept_result};
static const loom_op_t sleep_op = {
    .name = "test.pipe.sleep", .stmt = &sleep_stmt, .timeout_ms = 3000};

/* A stored JSON document, answered as it is (json_column). */
static int doc_result(loom_op_ctx_t *ctx, const json_t *req, const PGresult *rows, json_t **res,
                      loom_error_t *err)
{
    (void)ctx;
    (void)req;
    if (PQntuples(rows) == 0)
        return loom_error_set(err, LOOM_CODE_NOT_FOUND, "no document");
    *res = json_loads(PQgetvalue(rows, 0, 0), 0, NULL);
    if (!*res)
        return loom_error_set(err, LOOM_CODE_INTERNAL, "the stored document is not JSON");
    return 0;
}

static const loom_db_stmt_t doc_sql = {"test_pipe_doc", "SELECT doc FROM pipe_docs WHERE id = $1",
                                       1};
static const loom_op_stmt_t doc_stmt = {&doc_sql, bind_id, doc_result, .json_column = true};
static const loom_op_t doc_op = {.name = "test.pipe.doc", .stmt = &doc_stmt};

/* ---- routes ----------------------------------------------------------------------------- */

static int route_get(loom_http_req_t *req, loom_http_res_t *res)
{
    return loom_gateway_op_answer(req, res, "test.pipe.get",
                                  json_pack("{s:s}", "id", loom_gateway_param(req, "id")));
}

static int route_other(loom_http_req_t *req, loom_http_res_t *res)
{
    return loom_gateway_op_answer(req, res, "test.pipe.other",
                                  json_pack("{s:s}", "id", loom_gateway_param(req, "id")));
}

static int route_write(loom_http_req_t *req, loom_http_res_t *res)
{
    return loom_gateway_op_answer(req, res, "test.pipe.write",
                                  json_pack("{s:s}", "id", loom_gateway_param(req, "id")));
}

static int route_doc(loom_http_req_t *req, loom_http_res_t *res)
{
    return loom_gateway_op_answer(req, res, "test.pipe.doc",
                                  json_pack("{s:s}", "id", loom_gateway_param(req, "id")));
}

/* The result through a callback of the route's own: a json_t, as always. */
static int doc_keys(loom_http_req_t *req, loom_http_res_t *res, int rc, json_t *result,
                    const loom_error_t *err, void *arg)
{
    (void)arg;
    if (rc != 0)
        return loom_gateway_fail(req, res, err);
    return loom_gateway_reply(req, res, 200,
                              json_pack("{s:i}", "keys", (int)json_object_size(result)));
}

static int route_doc_keys(loom_http_req_t *req, loom_http_res_t *res)
{
    return loom_gateway_op_call(req, res, "test.pipe.doc",
                                json_pack("{s:s}", "id", loom_gateway_param(req, "id")), doc_keys,
                                NULL);
}

static int route_sleep(loom_http_req_t *req, loom_http_res_t *res)
{
    const char *ms = loom_http_req_query(req, "ms");
    return loom_gateway_op_answer(req, res, "test.pipe.sleep",
                                  json_pack("{s:I}", "ms", (json_int_t)(ms ? atoi(ms) : 0)));
}

/* A request that is not an object's worth of fields: INVALID_ARGUMENT from bind. */
static int route_bad(loom_http_req_t *req, loom_http_res_t *res)
{
    return loom_gateway_op_answer(req, res, "test.pipe.get", json_pack("{s:i}", "id", 7));
}

static const loom_route_t routes[] = {
    {"GET", "/v1/pipe/items/{id}", route_get, NULL},
    {"GET", "/v1/pipe/other/{id}", route_other, NULL},
    {"POST", "/v1/pipe/items/{id}", route_write, NULL},
    {"GET", "/v1/pipe/sleep", route_sleep, NULL},
    {"GET", "/v1/pipe/docs/{id}", route_doc, NULL},
    {"GET", "/v1/pipe/docs/{id}/keys", route_doc_keys, NULL},
    {"GET", "/v1/pipe/bad", route_bad, NULL},
};

/* ---- the gateway ------------------------------------------------------------------------ */

typedef struct env {
    char url[512];
    char tokens_path[256];
    loom_op_table_t *table;
    loom_db_pool_t *pool;
    loom_op_runtime_t rt;
    loom_metrics_t *metrics;
    loom_gateway_opts_t opts;
    loom_gateway_t *gw;
    int port;
} env_t;

static void env_init(env_t *e)
{
    memset(e, 0, sizeof(*e));
    snprintf(e->tokens_path, sizeof(e->tokens_path), "/tmp/loom-pipe-tokens-%d", (int)getpid());
    loom_test_token_t t[] = {{TOK, "pipe *"}};
    loom_test_tokens_file(e->tokens_path, t, 1);
    loom_error_t err;
    e->table = loom_op_table_new();
    const loom_op_t *mine[] = {&get_op, &other_op, &write_op, &sleep_op, &doc_op};
    cr_assert_eq(loom_op_table_add(e->table, mine, 5, &err), 0, "%s", err.message);
    e->metrics = loom_metrics_new();
    loom_test_db_create(e->url, sizeof(e->url));
    char *sql = loom_xasprintf(
        "CREATE TABLE pipe_items (id TEXT PRIMARY KEY, v TEXT NOT NULL);"
        "CREATE TABLE pipe_other (id TEXT PRIMARY KEY, v TEXT NOT NULL);"
        "INSERT INTO pipe_items SELECT 'i' || g, 'value-' || g FROM generate_series(1, %d) g;"
        "INSERT INTO pipe_other VALUES ('o1', 'other-1');"
        "CREATE TABLE pipe_docs (id TEXT PRIMARY KEY, doc TEXT NOT NULL);"
        "INSERT INTO pipe_docs VALUES ('d1', '{\"a\": 1,  \"b\": [true]}'), ('d2', 'not json'),"
        " ('d3', '[1, 2]')",
        N_ROWS);
    loom_test_sql(e->url, sql);
    free(sql);
    loom_db_pool_opts_t po = {.size = 4, .read_only = true, .application_name = APPNAME};
    cr_assert_eq(loom_db_pool_new(e->url, &po, &e->pool, &err), 0, "%s", err.message);
    loom_op_runtime_init(&e->rt, e->table, e->pool, e->metrics);
    e->opts = (loom_gateway_opts_t){.listen = "127.0.0.1:0",
                                    .threads = 1,
                                    .routes = routes,
                                    .n_routes = sizeof(routes) / sizeof(routes[0]),
                                    .ops = &e->rt,
                                    .metrics = e->metrics,
                                    .tokens_file = e->tokens_path,
                                    .no_access_log = true,
                                    .workers = 4};
}

static void env_start(env_t *e)
{
    loom_error_t err;
    cr_assert_eq(loom_gateway_start(&e->opts, &e->gw, &err), 0, "%s", err.message);
    e->port = loom_gateway_port(e->gw, 0);
}

static void env_free(env_t *e)
{
    loom_gateway_free(e->gw);
    loom_db_pool_free(e->pool);
    loom_op_table_free(e->table);
    loom_metrics_free(e->metrics);
    unlink(e->tokens_path);
}

static double metric(env_t *e, const char *key)
{
    return prom_scrape(e->port, key);
}

#define ON_LOOP   "loom_http_op_calls_total{path=\"loop\"}"
#define ON_THREAD "loom_http_op_calls_total{path=\"thread\"}"

static char *request(const char *method, const char *path)
{
    return loom_xasprintf("%s %s HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer " TOK
                          "\r\nContent-Length: 0\r\n\r\n",
                          method, path);
}

/* One call and its answer. */
static void call(env_t *e, const char *method, const char *path, loom_test_http_res_t *r)
{
    loom_test_http(e->port, method, path, TOK, NULL, NULL, r);
}

/* Waits (up to 30 s) until the loop has its connection: a call runs there. */
static void wait_loop_ready(env_t *e)
{
    double before = metric(e, ON_LOOP);
    for (int i = 0; i < 300; i++) {
        loom_test_http_res_t r;
        call(e, "GET", "/v1/pipe/items/i1", &r);
        cr_assert_eq(r.status, 200, "%s", r.body);
        loom_test_http_res_free(&r);
        if (metric(e, ON_LOOP) > before)
            return;
        loom_sleep_ms(100);
    }
    cr_assert_fail("no call ran on the loop within 30 s");
}

/* Sends `rounds` rounds of one GET on each of n connections, all sent
 * before any is read, and checks every answer is its own row. */
static void burst(env_t *e, int n, int rounds, int seed)
{
    loom_test_http_conn_t **c = loom_xcalloc((size_t)n, sizeof(*c));
    for (int i = 0; i < n; i++)
        c[i] = loom_test_http_open(e->port);
    for (int round = 0; round < rounds; round++) {
        for (int i = 0; i < n; i++) {
            char path[64];
            snprintf(path, sizeof(path), "/v1/pipe/items/i%d",
                     1 + (seed + round * n + i * 7) % N_ROWS);
            char *req = request("GET", path);
            loom_test_http_sends(c[i], req);
            free(req);
        }
        for (int i = 0; i < n; i++) {
            int k = 1 + (seed + round * n + i * 7) % N_ROWS;
            loom_test_http_res_t r;
            cr_assert(loom_test_http_read(c[i], 60000, &r), "no answer for i%d", k);
            cr_assert_eq(r.status, 200, "i%d: %s", k, r.body);
            char id[32], v[32];
            snprintf(id, sizeof(id), "i%d", k);
            snprintf(v, sizeof(v), "value-%d", k);
            cr_assert_str_eq(json_string_value(json_object_get(r.json, "id")), id, "%s", r.body);
            cr_assert_str_eq(json_string_value(json_object_get(r.json, "v")), v, "%s", r.body);
            loom_test_http_res_free(&r);
        }
    }
    for (int i = 0; i < n; i++)
        loom_test_http_close(c[i]);
    free(c);
}

Test(gateway_pipe, pipelined_calls_each_get_their_own_row, .timeout = 300)
{
    env_t e;
    env_init(&e);
    env_start(&e);
    wait_loop_ready(&e);
    double loop0 = metric(&e, ON_LOOP), thread0 = metric(&e, ON_THREAD);
    const char *ok_key = "loom_op_calls_total{op=\"test.pipe.get\",result=\"ok\"}";
    double ok0 = metric(&e, ok_key);
    burst(&e, 32, 20, 0); /* 640 calls, 32 at a time on one loop */
    double on_loop = metric(&e, ON_LOOP) - loop0, on_thread = metric(&e, ON_THREAD) - thread0;
    cr_expect_eq(on_loop + on_thread, 640, "%.0f on the loop, %.0f on threads", on_loop, on_thread);
    /* Most ran on the loop (a slow moment of the machine may send a few to
     * the threads: the oldest call in flight then waited too long). */
    cr_expect_gt(on_loop, 320, "%.0f on the loop, %.0f on threads", on_loop, on_thread);
    cr_expect_eq(metric(&e, ok_key) - ok0, 640, "every call counted once");
    env_free(&e);
}

Test(gateway_pipe, errors_on_the_loop_are_the_ops_errors, .timeout = 300)
{
    env_t e;
    env_init(&e);
    env_start(&e);
    wait_loop_ready(&e);
    double loop0 = metric(&e, ON_LOOP);
    loom_test_http_res_t r;

    call(&e, "GET", "/v1/pipe/items/nope", &r);
    cr_expect_eq(r.status, 404, "%s", r.body);
    cr_expect_str_eq(loom_test_http_error_code(&r), "NOT_FOUND", "%s", r.body);
    loom_test_http_res_free(&r);

    call(&e, "GET", "/v1/pipe/bad", &r);
    cr_expect_eq(r.status, 400, "%s", r.body);
    cr_expect_str_eq(loom_test_http_error_code(&r), "INVALID_ARGUMENT", "%s", r.body);
    loom_test_http_res_free(&r);

    /* The loop's session is read-only: the write is refused and nothing is
     * written. */
    call(&e, "POST", "/v1/pipe/items/w1", &r);
    cr_expect_str_eq(loom_test_http_error_code(&r), "READ_ONLY_VIOLATION", "%s", r.body);
    cr_expect(strstr(r.body, "test.pipe.write") != NULL, "%s", r.body);
    loom_test_http_res_free(&r);
    cr_expect_eq(loom_test_sql_ll(e.url, "SELECT count(*) FROM pipe_items WHERE id = 'w1'"), 0);

    /* Past the op's timeout (3 s) the server cancels the statement. */
    call(&e, "GET", "/v1/pipe/sleep?ms=10000", &r);
    cr_expect_str_eq(loom_test_http_error_code(&r), "DEADLINE_EXCEEDED", "%s", r.body);
    cr_expect(strstr(r.body, "test.pipe.sleep") != NULL, "%s", r.body);
    loom_test_http_res_free(&r);

    /* The connection still serves, with the other op's timeout back. */
    call(&e, "GET", "/v1/pipe/sleep?ms=10", &r);
    cr_expect_eq(r.status, 200, "%s", r.body);
    loom_test_http_res_free(&r);
    call(&e, "GET", "/v1/pipe/items/i42", &r);
    cr_expect_eq(r.status, 200, "%s", r.body);
    cr_expect_str_eq(json_string_value(json_object_get(r.json, "v")), "value-42", "%s", r.body);
    loom_test_http_res_free(&r);

    cr_expect_eq(metric(&e, ON_LOOP) - loop0, 6, "all six ran on the loop");
    cr_expect_eq(metric(&e, "loom_op_calls_total{op=\"test.pipe.write\","
                            "result=\"READ_ONLY_VIOLATION\"}"),
                 1);
    cr_expect_eq(metric(&e, "loom_op_calls_total{op=\"test.pipe.sleep\","
                            "result=\"DEADLINE_EXCEEDED\"}"),
                 1);
    env_free(&e);
}

/* A raw connection of the test's own. */
static PGconn *raw(env_t *e)
{
    PGconn *pg = PQconnectdb(e->url);
    cr_assert_eq(PQstatus(pg), CONNECTION_OK, "%s", PQerrorMessage(pg));
    return pg;
}

static void raw_exec(PGconn *pg, const char *sql)
{
    PGresult *r = PQexec(pg, sql);
    cr_assert(PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK,
              "%s: %s", sql, PQresultErrorMessage(r));
    PQclear(r);
}

Test(gateway_pipe, a_call_stuck_on_a_lock_holds_only_itself, .timeout = 300)
{
    env_t e;
    env_init(&e);
    env_start(&e);
    wait_loop_ready(&e);
    double thread0 = metric(&e, ON_THREAD);

    /* Another session locks pipe_items: a read of it waits on the lock
     * (for its whole 120 s timeout, unless the lock goes). */
    PGconn *locker = raw(&e);
    raw_exec(locker, "BEGIN");
    raw_exec(locker, "LOCK TABLE pipe_items IN ACCESS EXCLUSIVE MODE");
    loom_test_http_conn_t *stuck = loom_test_http_open(e.port);
    enum { N_BEHIND = 4 };
    loom_test_http_conn_t *behind[N_BEHIND];
    for (int i = 0; i < N_BEHIND; i++)
        behind[i] = loom_test_http_open(e.port);
    char *req = request("GET", "/v1/pipe/items/i9");
    loom_test_http_sends(stuck, req);
    free(req);
    /* Sent right after it: most go on the loop's connection behind it. */
    req = request("GET", "/v1/pipe/other/o1");
    for (int i = 0; i < N_BEHIND; i++)
        loom_test_http_sends(behind[i], req);
    free(req);
    /* It is in flight on the loop's connection once it waits on the lock. */
    cr_assert_eq(loom_test_wait_for(e.url,
                                    "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                    "current_database() AND application_name "
                                    "= '" APPNAME "' AND wait_event_type = 'Lock'",
                                    1, 30000),
                 1);

    /* Reads of another table, on the same loop, still flow while it is
     * stuck: those queued behind it on the loop's connection, and those
     * that come later, go to the worker threads. */
    for (int i = 0; i < N_BEHIND; i++) {
        loom_test_http_res_t r;
        cr_assert(loom_test_http_read(behind[i], 20000, &r), "a read behind the stuck one waits");
        cr_assert_eq(r.status, 200, "%s", r.body);
        cr_expect_str_eq(json_string_value(json_object_get(r.json, "v")), "other-1");
        loom_test_http_res_free(&r);
        loom_test_http_close(behind[i]);
    }
    for (int i = 0; i < 5; i++) {
        loom_test_http_res_t r;
        call(&e, "GET", "/v1/pipe/other/o1", &r);
        cr_assert_eq(r.status, 200, "%s", r.body);
        cr_expect_str_eq(json_string_value(json_object_get(r.json, "v")), "other-1");
        loom_test_http_res_free(&r);
    }
    cr_expect_geq(metric(&e, ON_THREAD) - thread0, N_BEHIND + 5);
    /* The stuck one is still waiting... */
    loom_test_http_res_t r;
    cr_expect_not(loom_test_http_read(stuck, 200, &r), "answered while the lock was held");
    /* ...and answers with its row once the lock goes. */
    raw_exec(locker, "ROLLBACK");
    cr_assert(loom_test_http_read(stuck, 60000, &r), "no answer after the lock went");
    cr_expect_eq(r.status, 200, "%s", r.body);
    cr_expect_str_eq(json_string_value(json_object_get(r.json, "v")), "value-9", "%s", r.body);
    loom_test_http_res_free(&r);
    loom_test_http_close(stuck);
    PQfinish(locker);
    env_free(&e);
}

Test(gateway_pipe, a_lost_connection_hands_its_calls_to_the_threads_and_comes_back, .timeout = 300)
{
    env_t e;
    env_init(&e);
    env_start(&e);
    wait_loop_ready(&e);

    /* A call in flight on the loop (it sleeps 1.5 s on the server) when
     * every connection of the gateway is terminated. */
    loom_test_http_conn_t *inflight = loom_test_http_open(e.port);
    char *req = request("GET", "/v1/pipe/sleep?ms=1500");
    loom_test_http_sends(inflight, req);
    free(req);
    cr_assert_eq(loom_test_wait_for(e.url,
                                    "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                    "current_database() AND application_name "
                                    "= '" APPNAME "' AND query LIKE '%pg_sleep%' AND state = "
                                    "'active'",
                                    1, 30000),
                 1);
    double thread0 = metric(&e, ON_THREAD);
    loom_test_sql(e.url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = current_database() AND application_name = '" APPNAME "'");

    /* The call still answers: it ran again on a worker thread. */
    loom_test_http_res_t r;
    cr_assert(loom_test_http_read(inflight, 60000, &r), "the call in flight got no answer");
    cr_expect_eq(r.status, 200, "%s", r.body);
    cr_expect_eq(json_integer_value(json_object_get(r.json, "slept_ms")), 1500, "%s", r.body);
    loom_test_http_res_free(&r);
    loom_test_http_close(inflight);
    cr_expect_geq(metric(&e, ON_THREAD) - thread0, 1);

    /* Meanwhile and after, every read answers its own row... */
    burst(&e, 8, 5, 3);
    /* ...and the loop connects again and takes calls once more. */
    wait_loop_ready(&e);
    burst(&e, 8, 5, 11);
    env_free(&e);
}

Test(gateway_pipe, a_stored_document_is_answered_as_it_is, .timeout = 300)
{
    env_t e;
    env_init(&e);
    env_start(&e);
    wait_loop_ready(&e);
    loom_test_http_res_t r;
    /* The bytes as stored (jansson would have printed them without the
     * extra spaces). */
    call(&e, "GET", "/v1/pipe/docs/d1", &r);
    cr_expect_eq(r.status, 200, "%s", r.body);
    cr_expect_str_eq(r.body, "{\"a\": 1,  \"b\": [true]}");
    char ct[64];
    cr_expect_str_eq(loom_test_http_header(&r, "Content-Type", ct, sizeof(ct)), "application/json");
    loom_test_http_res_free(&r);
    call(&e, "GET", "/v1/pipe/docs/d3", &r);
    cr_expect_str_eq(r.body, "[1, 2]");
    loom_test_http_res_free(&r);
    /* What does not look like JSON goes through the op's result, which
     * says what is wrong; no row, the same. */
    call(&e, "GET", "/v1/pipe/docs/d2", &r);
    cr_expect_eq(r.status, 500, "%s", r.body);
    cr_expect_str_eq(loom_test_http_error_code(&r), "INTERNAL", "%s", r.body);
    loom_test_http_res_free(&r);
    call(&e, "GET", "/v1/pipe/docs/none", &r);
    cr_expect_str_eq(loom_test_http_error_code(&r), "NOT_FOUND", "%s", r.body);
    loom_test_http_res_free(&r);
    /* A route with a callback of its own gets the result as a json_t. */
    call(&e, "GET", "/v1/pipe/docs/d1/keys", &r);
    cr_expect_eq(r.status, 200, "%s", r.body);
    cr_expect_eq(json_integer_value(json_object_get(r.json, "keys")), 2, "%s", r.body);
    loom_test_http_res_free(&r);
    cr_expect_eq(metric(&e, "loom_op_calls_total{op=\"test.pipe.doc\",result=\"ok\"}"), 3);
    env_free(&e);
}

Test(gateway_pipe, off_runs_statement_ops_on_the_threads, .timeout = 300)
{
    env_t e;
    env_init(&e);
    e.opts.no_op_pipeline = true;
    env_start(&e);
    burst(&e, 8, 5, 5);
    cr_expect_eq(metric(&e, ON_LOOP), 0);
    cr_expect_eq(metric(&e, ON_THREAD), 40);
    env_free(&e);
}
