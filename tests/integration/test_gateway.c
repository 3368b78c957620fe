/*
 * The HTTP gateway over real loopback sockets: every status it answers,
 * keep-alive and pipelining, chunked bodies, 100-continue, the limits (413,
 * 414, 431, malformed 400, a slowloris client, maximum connections), tokens
 * and scopes (401, 403), routing (404, 405 + Allow), the write path against
 * the real Kafka broker with an in-process worker (202, ?wait returning the
 * applied result that an op then reads back, Idempotency-Key, a rejected
 * command), 503 + Retry-After when the broker is down, health, readiness and
 * metrics, and a graceful shutdown that finishes a request in flight.
 */
#include "api.h"
#include "http_client.h"
#include "ops.h"
#include "services.h"
#include "support.h"
#include "loom/bus.h"
#include "loom/clock.h"
#include "loom/gateway.h"
#include "loom/mem.h"
#include "loom/sha256.h"
#include "loom/worker.h"

#include <criterion/criterion.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define TOK_ADMIN  "tok-admin-0123456789"
#define TOK_READER "tok-reader-0123456789"
#define TOK_WRITER "tok-writer-0123456789"
#define TOK_OPS    "tok-ops-0123456789"
#define TOK_OPS_RD "tok-ops-read-0123456789"

/* ---- the test service: ops and routes ------------------------------------------------ */

static char g_topic[200]; /* this test's command topic */

static const loom_db_stmt_t balance_stmt = {
    "test_gw_balance",
    "SELECT coalesce(sum(amount), 0)::BIGINT, count(*)::BIGINT FROM test_ledger WHERE account = $1",
    1};

static int op_balance(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                      loom_error_t *err)
{
    (void)ctx;
    const char *account;
    int rc = loom_op_req_string(req, "account", true, 100, &account, err);
    if (rc != 0)
        return rc;
    PGresult *r = NULL;
    const char *p[] = {account};
    rc = loom_db_exec(db, &balance_stmt, p, &r, err);
    if (rc != 0)
        return rc;
    *res = json_pack("{s:s, s:I, s:I}", "account", account, "balance",
                     (json_int_t)atoll(PQgetvalue(r, 0, 0)), "credits",
                     (json_int_t)atoll(PQgetvalue(r, 0, 1)));
    PQclear(r);
    return 0;
}

static int op_sleep(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                    loom_error_t *err)
{
    (void)ctx;
    (void)db;
    (void)err;
    json_int_t ms = json_integer_value(json_object_get(req, "ms"));
    loom_sleep_ms(ms);
    *res = json_pack("{s:I}", "slept_ms", ms);
    return 0;
}

static const loom_op_t balance_op = {.name = "test.ledger.balance", .fn = op_balance};
static const loom_op_t sleep_op = {
    .name = "test.sleep", .fn = op_sleep, .timeout_ms = 20000, .flags = LOOM_OP_NO_DB};

static int route_credit(loom_http_req_t *req, loom_http_res_t *res)
{
    json_t *body;
    loom_error_t err;
    if (loom_gateway_body_json(req, true, &body, &err) != 0)
        return loom_gateway_fail(req, res, &err);
    const char *account = json_string_value(json_object_get(body, "account"));
    if (!account || !json_is_integer(json_object_get(body, "amount"))) {
        loom_error_set(&err, LOOM_CODE_INVALID_ARGUMENT, "\"account\" and \"amount\" are required");
        return loom_gateway_fail(req, res, &err);
    }
    loom_gateway_command_t cmd = {
        .type = "test.credit", .topic = g_topic, .key = account, .data = json_incref(body)};
    return loom_gateway_publish(req, res, &cmd);
}

static int route_balance(loom_http_req_t *req, loom_http_res_t *res)
{
    return loom_gateway_op_answer(
        req, res, "test.ledger.balance",
        json_pack("{s:s}", "account", loom_gateway_param(req, "account")));
}

static int route_slow(loom_http_req_t *req, loom_http_res_t *res)
{
    const char *ms = loom_http_req_query(req, "ms");
    return loom_gateway_op_answer(req, res, "test.sleep",
                                  json_pack("{s:I}", "ms", (json_int_t)(ms ? atoi(ms) : 0)));
}

static int route_echo(loom_http_req_t *req, loom_http_res_t *res)
{
    json_t *body;
    loom_error_t err;
    if (loom_gateway_body_json(req, false, &body, &err) != 0)
        return loom_gateway_fail(req, res, &err);
    size_t len;
    loom_http_req_body(req, &len);
    return loom_gateway_reply(req, res, 200,
                              json_pack("{s:I, s:O, s:s}", "len", (json_int_t)len, "body", body,
                                        "caller", loom_gateway_caller(req)));
}

static const loom_route_t test_routes[] = {
    {"POST", "/v1/test/credits", route_credit, "test:write"},
    {"GET", "/v1/test/accounts/{account}", route_balance, "test:read"},
    {"GET", "/v1/test/slow", route_slow, NULL},
    {"POST", "/v1/test/echo", route_echo, NULL},
    {"PUT", "/v1/test/echo", route_echo, NULL},
};

/* ---- the environment ------------------------------------------------------------------ */

typedef struct gw_env {
    char url[512];
    char tokens_path[256];
    loom_test_ledger_t led; /* the test consumer; its topic is g_topic */
    loom_route_t routes[32];
    size_t n_routes;
    loom_op_table_t *table;
    loom_db_pool_t *read_pool;
    loom_op_runtime_t rt;
    loom_metrics_t *metrics;
    loom_producer_t *producer;
    loom_gateway_opts_t opts;
    loom_gateway_t *gw;
    int port;
    loom_test_worker_t worker;
    /* mock cluster for the broker-down test */
    rd_kafka_t *mock_owner;
    rd_kafka_mock_cluster_t *mc;
} gw_env_t;

static void write_tokens(gw_env_t *e)
{
    snprintf(e->tokens_path, sizeof(e->tokens_path), "/tmp/loom-gw-tokens-%d", (int)getpid());
    loom_test_token_t t[] = {{TOK_ADMIN, "admin *"},
                             {TOK_READER, "reader test:read   # a comment"},
                             {TOK_WRITER, "writer test:write,test:read"},
                             {TOK_OPS, "opsonly ops:call"},
                             {TOK_OPS_RD, "opsreader ops:call,test:read,messages:read"}};
    loom_test_tokens_file(e->tokens_path, t, sizeof(t) / sizeof(t[0]));
}

/* Everything but the gateway: database, topic, ops, producer. db=false
 * skips the database (tests of the HTTP layer only). */
static void env_init(gw_env_t *e, bool db, const char *brokers)
{
    memset(e, 0, sizeof(*e));
    loom_test_ledger_init(&e->led, "g");
    snprintf(g_topic, sizeof(g_topic), "%s", e->led.topic);
    write_tokens(e);
    const loom_app_t *app = loom_test_full_app();
    for (size_t i = 0; i < app->n_routes; i++)
        e->routes[e->n_routes++] = app->routes[i];
    for (size_t i = 0; i < sizeof(test_routes) / sizeof(test_routes[0]); i++)
        e->routes[e->n_routes++] = test_routes[i];
    e->table = loom_op_table_new();
    loom_error_t err;
    cr_assert_eq(loom_op_table_add(e->table, app->ops, app->n_ops, &err), 0, "%s", err.message);
    const loom_op_t *mine[] = {&balance_op, &sleep_op};
    cr_assert_eq(loom_op_table_add(e->table, mine, 2, &err), 0, "%s", err.message);
    e->metrics = loom_metrics_new();
    if (db) {
        loom_test_db_create_ledger(e->url, sizeof(e->url));
        e->read_pool = loom_test_read_pool(e->url, 4);
    }
    loom_op_runtime_init(&e->rt, e->table, e->read_pool, e->metrics);
    if (brokers) {
        int created = 0;
        const char *t[] = {g_topic};
        if (!e->mc)
            cr_assert_eq(loom_kafka_create_topics(brokers, NULL, t, 1, 3, &created, &err), 0, "%s",
                         err.message);
        loom_producer_opts_t o = {.brokers = brokers, .message_timeout_ms = 10000};
        cr_assert_eq(loom_producer_new(&o, &e->producer, &err), 0, "%s", err.message);
    }
    e->opts = (loom_gateway_opts_t){.listen = "127.0.0.1:0",
                                    .threads = 2,
                                    .routes = e->routes,
                                    .n_routes = e->n_routes,
                                    .ops = &e->rt,
                                    .producer = e->producer,
                                    .metrics = e->metrics,
                                    .tokens_file = e->tokens_path,
                                    .site = "test",
                                    .node = "gw",
                                    .workers = 4};
}

static void env_start(gw_env_t *e)
{
    loom_error_t err;
    cr_assert_eq(loom_gateway_start(&e->opts, &e->gw, &err), 0, "%s", err.message);
    e->port = loom_gateway_port(e->gw, 0);
    cr_assert_gt(e->port, 0);
}

static void env_free(gw_env_t *e)
{
    loom_gateway_free(e->gw);
    loom_test_worker_stop(&e->worker);
    loom_producer_free(e->producer);
    loom_db_pool_free(e->read_pool);
    loom_op_table_free(e->table);
    loom_metrics_free(e->metrics);
    if (e->mc) {
        rd_kafka_mock_cluster_destroy(e->mc);
        rd_kafka_destroy(e->mock_owner);
    }
    unlink(e->tokens_path);
}

static void expect_error(const loom_test_http_res_t *r, int status, const char *code)
{
    cr_expect_eq(r->status, status, "status %d, want %d: %s", r->status, status, r->body);
    cr_expect_str_eq(loom_test_http_error_code(r), code, "body: %s", r->body);
    json_t *e = json_object_get(r->json, "error");
    cr_expect(json_is_string(json_object_get(e, "message")), "no message: %s", r->body);
    cr_expect(json_is_string(json_object_get(e, "ray_id")), "no ray_id: %s", r->body);
}

static const char *hdr(const loom_test_http_res_t *r, const char *name)
{
    static char buf[4][256];
    static int k;
    k = (k + 1) % 4;
    return loom_test_http_header(r, name, buf[k], sizeof(buf[k]));
}

/* ---- operations endpoints ------------------------------------------------------------- */

Test(gateway, healthz_readyz_and_metrics_need_no_token, .timeout = 120)
{
    const char *brokers = loom_test_kafka_brokers();
    gw_env_t e;
    env_init(&e, true, brokers);
    env_start(&e);
    loom_test_http_res_t r;
    loom_test_http(e.port, "GET", "/healthz", NULL, NULL, NULL, &r);
    cr_expect_eq(r.status, 200);
    cr_expect_str_eq(json_string_value(json_object_get(r.json, "status")), "ok");
    cr_expect_not_null(hdr(&r, "X-Request-ID"));
    cr_expect_not_null(hdr(&r, "Date"));
    loom_test_http_res_free(&r);

    loom_test_http(e.port, "GET", "/readyz", NULL, NULL, NULL, &r);
    cr_expect_eq(r.status, 200, "%s", r.body);
    json_t *checks = json_object_get(r.json, "checks");
    cr_expect_str_eq(json_string_value(json_object_get(checks, "database")), "ok");
    cr_expect_str_eq(json_string_value(json_object_get(checks, "kafka")), "ok");
    loom_test_http_res_free(&r);

    /* A request of each kind, then the metrics count them by route and status. */
    loom_test_http(e.port, "POST", "/v1/test/echo", TOK_ADMIN, NULL, "{}", &r);
    loom_test_http_res_free(&r);
    loom_test_http(e.port, "GET", "/nowhere", TOK_ADMIN, NULL, NULL, &r);
    loom_test_http_res_free(&r);
    /* A request is counted when its answer has been written, which may be
     * a moment after the client read it: poll. */
    int64_t until = loom_mono_ms() + 5000;
    for (;;) {
        loom_test_http(e.port, "GET", "/metrics", NULL, NULL, NULL, &r);
        if (strstr(r.body, "route=\"_unmatched\",method=\"GET\",status=\"404\"} 1") ||
            loom_mono_ms() > until)
            break;
        loom_test_http_res_free(&r);
        loom_sleep_ms(50);
    }
    cr_expect_eq(r.status, 200);
    cr_expect(strstr(hdr(&r, "Content-Type"), "text/plain"));
    cr_expect(strstr(r.body, "loom_http_requests_total{route=\"/v1/test/echo\",method=\"POST\","
                             "status=\"200\"} 1"),
              "%s", r.body);
    cr_expect(strstr(r.body, "loom_http_requests_total{route=\"_unmatched\",method=\"GET\","
                             "status=\"404\"} 1"),
              "%s", r.body);
    cr_expect(strstr(r.body, "loom_http_request_duration_seconds_bucket{route=\"/v1/test/echo\""),
              "%s", r.body);
    cr_expect(strstr(r.body, "\nloom_http_in_flight "), "%s", r.body);
    cr_expect(strstr(r.body, "\nloom_http_connections "), "%s", r.body);
    cr_expect(strstr(r.body, "loom_op_calls_total"), "the engine's registry too");
    loom_test_http_res_free(&r);

    /* HEAD: the headers of GET, no body. */
    loom_test_http_conn_t *c = loom_test_http_open(e.port);
    loom_test_http_sends(c, "HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    cr_expect_not(loom_test_http_read(c, 500, &r), "a body came after HEAD");
    cr_expect_eq(r.status, 200);
    cr_expect(c->len > 4 && strcmp(c->buf + c->len - 4, "\r\n\r\n") == 0, "%s", c->buf);
    loom_test_http_res_free(&r);
    loom_test_http_close(c);
    env_free(&e);
}

Test(gateway, readyz_says_503_when_the_database_and_broker_are_down, .timeout = 60)
{
    gw_env_t e;
    env_init(&e, false, NULL);
    /* A producer pointing at a closed port and no database for ops. */
    loom_error_t err;
    loom_producer_opts_t o = {.brokers = "127.0.0.1:1", .message_timeout_ms = 1000};
    cr_assert_eq(loom_producer_new(&o, &e.producer, &err), 0, "%s", err.message);
    e.opts.producer = e.producer;
    e.opts.ready_timeout_ms = 300;
    env_start(&e);
    loom_test_http_res_t r;
    loom_test_http(e.port, "GET", "/readyz", NULL, NULL, NULL, &r);
    cr_expect_eq(r.status, 503, "%s", r.body);
    cr_expect_str_eq(json_string_value(json_object_get(r.json, "status")), "not_ready");
    cr_expect_not_null(hdr(&r, "Retry-After"));
    loom_test_http_res_free(&r);
    env_free(&e);
}

/* ---- routing and auth ----------------------------------------------------------------- */

Test(gateway, unknown_paths_404_wrong_methods_405_with_allow, .timeout = 60)
{
    gw_env_t e;
    env_init(&e, false, NULL);
    env_start(&e);
    loom_test_http_res_t r;
    loom_test_http(e.port, "GET", "/v1/nothing/here", TOK_ADMIN, NULL, NULL, &r);
    expect_error(&r, 404, "NOT_FOUND");
    loom_test_http_res_free(&r);

    loom_test_http(e.port, "DELETE", "/v1/test/echo", TOK_ADMIN, NULL, NULL, &r);
    expect_error(&r, 405, "METHOD_NOT_ALLOWED");
    cr_expect_str_eq(hdr(&r, "Allow"), "POST, PUT");
    loom_test_http_res_free(&r);

    loom_test_http(e.port, "POST", "/healthz", NULL, NULL, NULL, &r);
    expect_error(&r, 405, "METHOD_NOT_ALLOWED");
    cr_expect_str_eq(hdr(&r, "Allow"), "GET, HEAD");
    loom_test_http_res_free(&r);

    /* A path parameter is one segment, percent-decoded. */
    loom_test_http(e.port, "GET", "/v1/test/accounts/a/b", TOK_ADMIN, NULL, NULL, &r);
    expect_error(&r, 404, "NOT_FOUND");
    loom_test_http_res_free(&r);
    env_free(&e);
}

Test(gateway, missing_wrong_and_underscoped_tokens, .timeout = 60)
{
    gw_env_t e;
    env_init(&e, false, NULL);
    env_start(&e);
    loom_test_http_res_t r;
    loom_test_http(e.port, "POST", "/v1/test/echo", NULL, NULL, "{}", &r);
    expect_error(&r, 401, "UNAUTHENTICATED");
    cr_expect(strstr(hdr(&r, "WWW-Authenticate"), "Bearer"));
    loom_test_http_res_free(&r);

    loom_test_http(e.port, "POST", "/v1/test/echo", "not-a-token", NULL, "{}", &r);
    expect_error(&r, 401, "UNAUTHENTICATED");
    loom_test_http_res_free(&r);

    loom_test_http(e.port, "POST", "/v1/test/echo", NULL, "Authorization: Basic dTpw\r\n", "{}",
                   &r);
    expect_error(&r, 401, "UNAUTHENTICATED");
    loom_test_http_res_free(&r);

    /* reader holds test:read only. */
    loom_test_http(e.port, "POST", "/v1/test/credits", TOK_READER, NULL,
                   "{\"account\":\"a\",\"amount\":1}", &r);
    expect_error(&r, 403, "PERMISSION_DENIED");
    cr_expect(strstr(r.body, "test:write"), "%s", r.body);
    cr_expect(strstr(hdr(&r, "WWW-Authenticate"), "insufficient_scope"));
    loom_test_http_res_free(&r);

    loom_test_http(e.port, "POST", "/v1/ops/test.sleep", TOK_READER, NULL, "{}", &r);
    expect_error(&r, 403, "PERMISSION_DENIED");
    loom_test_http_res_free(&r);

    /* Any valid token passes a route without a scope; the caller is its slug. */
    loom_test_http(e.port, "POST", "/v1/test/echo", TOK_READER, NULL, "{\"x\":1}", &r);
    cr_expect_eq(r.status, 200, "%s", r.body);
    cr_expect_str_eq(json_string_value(json_object_get(r.json, "caller")), "reader");
    loom_test_http_res_free(&r);

    /* The development token: every scope. */
    char dev[64];
    cr_assert_eq(loom_gateway_dev_token(e.gw, dev, sizeof(dev)), 0);
    cr_expect_eq(strncmp(dev, "loomdev_", 8), 0);
    loom_test_http(e.port, "POST", "/v1/ops/test.sleep", dev, NULL, "{\"ms\":1}", &r);
    cr_expect_eq(r.status, 200, "%s", r.body);
    loom_test_http_res_free(&r);
    env_free(&e);
}

Test(gateway, tokens_file_errors_name_the_line, .timeout = 30)
{
    char path[] = "/tmp/loom-gw-badtokens-XXXXXX";
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    const char *text = "# ok\n"
                       "0000000000000000000000000000000000000000000000000000000000000000 a b\n"
                       "abc slug scope\n";
    cr_assert_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    loom_error_t err;
    size_t n = 0;
    cr_expect_neq(loom_gateway_tokens_check(path, &n, &err), 0);
    cr_expect(strstr(err.message, "line 3"), "%s", err.message);
    cr_expect(strstr(err.message, "64 hex"), "%s", err.message);
    loom_gateway_opts_t o = {.listen = "127.0.0.1:0", .tokens_file = path};
    loom_gateway_t *gw = NULL;
    cr_expect_neq(loom_gateway_start(&o, &gw, &err), 0);
    cr_expect_str_eq(err.code, "CONFIG_INVALID");
    unlink(path);
}

/* ---- HTTP/1.1 on the wire ------------------------------------------------------------- */

Test(gateway, keep_alive_and_pipelined_requests_answer_in_order, .timeout = 60)
{
    gw_env_t e;
    env_init(&e, false, NULL);
    env_start(&e);
    loom_test_http_conn_t *c = loom_test_http_open(e.port);
    /* Two requests in one write; the first is slow (an op on a worker
     * thread), the second fast: the answers still come in request order. */
    char *two = loom_xasprintf("GET /v1/test/slow?ms=300 HTTP/1.1\r\nHost: x\r\n"
                               "Authorization: Bearer %s\r\n\r\n"
                               "POST /v1/test/echo HTTP/1.1\r\nHost: x\r\n"
                               "Authorization: Bearer %s\r\nContent-Length: 7\r\n\r\n{\"n\":2}",
                               TOK_ADMIN, TOK_ADMIN);
    cr_assert(loom_test_http_sends(c, two));
    free(two);
    loom_test_http_res_t r1, r2;
    cr_assert(loom_test_http_read(c, 10000, &r1));
    cr_assert(loom_test_http_read(c, 10000, &r2));
    cr_expect_eq(r1.status, 200, "%s", r1.body);
    cr_expect_eq(json_integer_value(json_object_get(r1.json, "slept_ms")), 300, "%s", r1.body);
    cr_expect_eq(r2.status, 200, "%s", r2.body);
    cr_expect_eq(json_integer_value(json_object_get(json_object_get(r2.json, "body"), "n")), 2);
    cr_expect_null(hdr(&r2, "Connection"), "keep-alive is the default of HTTP/1.1");
    loom_test_http_res_free(&r1);
    loom_test_http_res_free(&r2);
    /* The connection stays open for a third. */
    char *third = loom_xasprintf("POST /v1/test/echo HTTP/1.1\r\nHost: x\r\n"
                                 "Authorization: Bearer %s\r\nContent-Length: 2\r\n"
                                 "Connection: close\r\n\r\n{}",
                                 TOK_ADMIN);
    cr_assert(loom_test_http_sends(c, third));
    free(third);
    cr_assert(loom_test_http_read(c, 10000, &r1));
    cr_expect_eq(r1.status, 200);
    cr_expect_str_eq(hdr(&r1, "Connection"), "close");
    cr_expect(loom_test_http_closed(c, 5000));
    loom_test_http_res_free(&r1);
    loom_test_http_close(c);
    env_free(&e);
}

Test(gateway, chunked_body_and_expect_100_continue, .timeout = 60)
{
    gw_env_t e;
    env_init(&e, false, NULL);
    env_start(&e);
    loom_test_http_conn_t *c = loom_test_http_open(e.port);
    char *req = loom_xasprintf("POST /v1/test/echo HTTP/1.1\r\nHost: x\r\n"
                               "Authorization: Bearer %s\r\nTransfer-Encoding: chunked\r\n\r\n"
                               "5\r\n{\"a\":\r\n"
                               "3;ext=1\r\n\"xy\r\n"
                               "2\r\n\"}\r\n"
                               "0\r\n\r\n",
                               TOK_ADMIN);
    cr_assert(loom_test_http_sends(c, req));
    free(req);
    loom_test_http_res_t r;
    cr_assert(loom_test_http_read(c, 10000, &r));
    cr_expect_eq(r.status, 200, "%s", r.body);
    cr_expect_eq(json_integer_value(json_object_get(r.json, "len")), 10);
    cr_expect_str_eq(json_string_value(json_object_get(json_object_get(r.json, "body"), "a")),
                     "xy");
    loom_test_http_res_free(&r);

    /* Expect: 100-continue: the interim answer comes before the body is sent. */
    req = loom_xasprintf("PUT /v1/test/echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                         "Content-Length: 9\r\nExpect: 100-continue\r\n\r\n",
                         TOK_ADMIN);
    cr_assert(loom_test_http_sends(c, req));
    free(req);
    cr_assert(loom_test_http_read(c, 5000, &r), "no 100 Continue");
    cr_expect_eq(r.status, 100);
    loom_test_http_res_free(&r);
    cr_assert(loom_test_http_sends(c, "{\"b\":true"));
    cr_assert(loom_test_http_sends(c, "}"),
              "one byte over the announced length is the next request");
    cr_assert(loom_test_http_read(c, 5000, &r));
    cr_expect_eq(r.status, 400, "a body cut at its Content-Length is not JSON: %s", r.body);
    loom_test_http_res_free(&r);
    loom_test_http_close(c);

    /* 100-continue refused at once when the announced body is too large. */
    c = loom_test_http_open(e.port);
    req = loom_xasprintf("POST /v1/test/echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                         "Content-Length: 99999999\r\nExpect: 100-continue\r\n\r\n",
                         TOK_ADMIN);
    cr_assert(loom_test_http_sends(c, req));
    free(req);
    cr_assert(loom_test_http_read(c, 5000, &r));
    expect_error(&r, 413, "PAYLOAD_TOO_LARGE");
    cr_expect(loom_test_http_closed(c, 5000));
    loom_test_http_res_free(&r);
    loom_test_http_close(c);

    /* An Expect the server does not know: 417. */
    c = loom_test_http_open(e.port);
    cr_assert(loom_test_http_sends(c, "POST /v1/test/echo HTTP/1.1\r\nHost: x\r\n"
                                      "Expect: teapot\r\nContent-Length: 2\r\n\r\n{}"));
    cr_assert(loom_test_http_read(c, 5000, &r));
    expect_error(&r, 417, "EXPECTATION_FAILED");
    loom_test_http_res_free(&r);
    loom_test_http_close(c);
    env_free(&e);
}

Test(gateway, limits_answer_413_414_431_and_malformed_400_then_close, .timeout = 60)
{
    gw_env_t e;
    env_init(&e, false, NULL);
    e.opts.limits.max_body = 65536;
    env_start(&e);
    loom_test_http_res_t r;

    /* Content-Length over the limit: 413 before the body is read. */
    loom_test_http_conn_t *c = loom_test_http_open(e.port);
    cr_assert(loom_test_http_sends(c, "POST /v1/test/echo HTTP/1.1\r\nHost: x\r\n"
                                      "Content-Length: 65537\r\n\r\n"));
    char *junk = loom_xcalloc(1, 70000);
    memset(junk, 'x', 69999);
    loom_test_http_send(c, junk, 20000);
    cr_assert(loom_test_http_read(c, 5000, &r));
    expect_error(&r, 413, "PAYLOAD_TOO_LARGE");
    cr_expect(strstr(r.body, "65536"), "the limit is named: %s", r.body);
    cr_expect_str_eq(hdr(&r, "Connection"), "close");
    cr_expect(loom_test_http_closed(c, 5000));
    loom_test_http_res_free(&r);
    loom_test_http_close(c);

    /* A chunked body that grows over the limit. */
    c = loom_test_http_open(e.port);
    cr_assert(loom_test_http_sends(c, "POST /v1/test/echo HTTP/1.1\r\nHost: x\r\n"
                                      "Transfer-Encoding: chunked\r\n\r\n"));
    for (int i = 0; i < 3 && !c->eof; i++) {
        char size[32];
        snprintf(size, sizeof(size), "%x\r\n", 30000);
        loom_test_http_sends(c, size);
        loom_test_http_send(c, junk, 30000);
        loom_test_http_sends(c, "\r\n");
    }
    cr_assert(loom_test_http_read(c, 5000, &r));
    expect_error(&r, 413, "PAYLOAD_TOO_LARGE");
    loom_test_http_res_free(&r);
    loom_test_http_close(c);

    /* A request target over 8 KiB: 414. */
    c = loom_test_http_open(e.port);
    loom_test_http_sends(c, "GET /");
    loom_test_http_send(c, junk, 9000);
    loom_test_http_sends(c, " HTTP/1.1\r\nHost: x\r\n\r\n");
    cr_assert(loom_test_http_read(c, 5000, &r));
    expect_error(&r, 414, "URI_TOO_LONG");
    cr_expect(loom_test_http_closed(c, 5000));
    loom_test_http_res_free(&r);
    loom_test_http_close(c);

    /* Headers over 16 KiB: 431; and more than 100 header lines: 431. */
    c = loom_test_http_open(e.port);
    loom_test_http_sends(c, "GET /healthz HTTP/1.1\r\nX-Big: ");
    loom_test_http_send(c, junk, 17000);
    loom_test_http_sends(c, "\r\n\r\n");
    cr_assert(loom_test_http_read(c, 5000, &r));
    expect_error(&r, 431, "HEADERS_TOO_LARGE");
    loom_test_http_res_free(&r);
    loom_test_http_close(c);
    c = loom_test_http_open(e.port);
    loom_test_http_sends(c, "GET /healthz HTTP/1.1\r\n");
    for (int i = 0; i < 120; i++) {
        char h[32];
        snprintf(h, sizeof(h), "X-H%d: v\r\n", i);
        loom_test_http_sends(c, h);
    }
    loom_test_http_sends(c, "\r\n");
    cr_assert(loom_test_http_read(c, 5000, &r));
    expect_error(&r, 431, "HEADERS_TOO_LARGE");
    loom_test_http_res_free(&r);
    loom_test_http_close(c);
    free(junk);

    /* Malformed requests: 400 and the connection closes. */
    static const char *const bad[] = {
        "GARBAGE\r\n\r\n",
        "GET / HTTP/9.9\r\n\r\n",
        "GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n",
        "POST /v1/test/echo HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        "POST /v1/test/echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        "GET * HTTP/1.1\r\n\r\n",
        "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        c = loom_test_http_open(e.port);
        loom_test_http_sends(c, bad[i]);
        cr_assert(loom_test_http_read(c, 5000, &r), "no answer to bad request %zu", i);
        expect_error(&r, 400, "MALFORMED_REQUEST");
        cr_expect(loom_test_http_closed(c, 5000), "bad request %zu: not closed", i);
        loom_test_http_res_free(&r);
        loom_test_http_close(c);
    }

    /* Not JSON where JSON is expected: 400 INVALID_JSON, connection kept. */
    loom_test_http(e.port, "POST", "/v1/test/echo", TOK_ADMIN, NULL, "{\"a\":", &r);
    expect_error(&r, 400, "INVALID_JSON");
    loom_test_http_res_free(&r);

    /* The server is still fine. */
    loom_test_http(e.port, "GET", "/healthz", NULL, NULL, NULL, &r);
    cr_expect_eq(r.status, 200);
    loom_test_http_res_free(&r);
    env_free(&e);
}

Test(gateway, slowloris_is_dropped_by_the_header_timeout, .timeout = 60)
{
    gw_env_t e;
    env_init(&e, false, NULL);
    e.opts.limits.header_timeout_ms = 2000;
    env_start(&e);
    loom_test_http_conn_t *silent = loom_test_http_open(e.port);
    loom_test_http_conn_t *slow = loom_test_http_open(e.port);
    const char *req = "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    int64_t t0 = loom_mono_ms();
    bool dropped = false;
    loom_test_http_res_t r;
    for (size_t i = 0; req[i] && !dropped; i++) {
        if (!loom_test_http_send(slow, req + i, 1))
            break;
        /* One byte a second; meanwhile others are served at once. */
        loom_test_http_res_t ok;
        loom_test_http(e.port, "GET", "/healthz", NULL, NULL, NULL, &ok);
        cr_expect_eq(ok.status, 200);
        loom_test_http_res_free(&ok);
        if (loom_test_http_read(slow, 1000, &r)) {
            dropped = true;
            break;
        }
    }
    cr_assert(dropped, "the slow client was never answered");
    int64_t took = loom_mono_ms() - t0;
    expect_error(&r, 408, "REQUEST_TIMEOUT");
    cr_expect(loom_test_http_closed(slow, 3000));
    cr_expect(took >= 1500 && took < 6000, "dropped after %lld ms", (long long)took);
    loom_test_http_res_free(&r);
    loom_test_http_close(slow);
    /* A client that connected and never sent a byte is gone too. */
    cr_expect(loom_test_http_closed(silent, 3000), "a silent connection was kept");
    loom_test_http_close(silent);
    env_free(&e);
}

Test(gateway, connections_over_the_maximum_get_503_with_retry_after, .timeout = 60)
{
    gw_env_t e;
    env_init(&e, false, NULL);
    e.opts.limits.max_connections = 4;
    env_start(&e);
    loom_test_http_conn_t *held[4];
    loom_test_http_res_t r;
    for (int i = 0; i < 4; i++) {
        held[i] = loom_test_http_open(e.port);
        /* Each is accepted and served. */
        loom_test_http_sends(held[i], "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        cr_assert(loom_test_http_read(held[i], 5000, &r));
        cr_expect_eq(r.status, 200);
        loom_test_http_res_free(&r);
    }
    loom_test_http_conn_t *extra = loom_test_http_open(e.port);
    loom_test_http_sends(extra, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    cr_assert(loom_test_http_read(extra, 5000, &r));
    expect_error(&r, 503, "TOO_MANY_CONNECTIONS");
    cr_expect_str_eq(hdr(&r, "Retry-After"), "1");
    cr_expect(loom_test_http_closed(extra, 5000));
    loom_test_http_res_free(&r);
    loom_test_http_close(extra);
    /* One goes; a new one is served again. */
    loom_test_http_close(held[0]);
    loom_sleep_ms(200);
    loom_test_http(e.port, "GET", "/healthz", NULL, NULL, NULL, &r);
    cr_expect_eq(r.status, 200);
    loom_test_http_res_free(&r);
    for (int i = 1; i < 4; i++)
        loom_test_http_close(held[i]);
    env_free(&e);
}

Test(gateway, request_ids_are_accepted_or_generated_and_returned, .timeout = 60)
{
    gw_env_t e;
    env_init(&e, false, NULL);
    e.opts.listen = "127.0.0.1:0,[::1]:0"; /* several listeners */
    env_start(&e);
    loom_test_http_res_t r;
    cr_assert_eq(loom_gateway_naddrs(e.gw), 2);
    char want[64];
    snprintf(want, sizeof(want), "[::1]:%d", loom_gateway_port(e.gw, 1));
    cr_expect_str_eq(loom_gateway_addr(e.gw, 1), want);
    cr_expect_neq(loom_gateway_port(e.gw, 1), 0);
    loom_test_http(e.port, "GET", "/healthz", NULL, "X-Request-ID: req-42.abc\r\n", NULL, &r);
    cr_expect_str_eq(hdr(&r, "X-Request-ID"), "req-42.abc");
    cr_expect_eq(strlen(hdr(&r, "X-Ray-Id")), 36);
    loom_test_http_res_free(&r);
    loom_test_http(e.port, "GET", "/healthz", NULL, "X-Request-ID: bad id with spaces\r\n", NULL,
                   &r);
    cr_expect_eq(strlen(hdr(&r, "X-Request-ID")), 36, "a new one replaces an invalid one");
    loom_test_http_res_free(&r);
    /* A ray id sent by a caller (loom op --url does) is kept and in errors. */
    loom_test_http(e.port, "GET", "/nowhere", TOK_ADMIN, "X-Ray-Id: ray-from-caller\r\n", NULL, &r);
    cr_expect_str_eq(hdr(&r, "X-Ray-Id"), "ray-from-caller");
    cr_expect_str_eq(json_string_value(json_object_get(json_object_get(r.json, "error"), "ray_id")),
                     "ray-from-caller");
    loom_test_http_res_free(&r);
    env_free(&e);
}

/* ---- ops over HTTP --------------------------------------------------------------------- */

Test(gateway, post_v1_ops_calls_any_op_with_ops_call_scope, .timeout = 120)
{
    gw_env_t e;
    env_init(&e, true, NULL);
    env_start(&e);
    loom_test_sql(e.url, "INSERT INTO test_ledger (message_id, account, amount) "
                         "VALUES ('m1', 'acct-1', 5), ('m2', 'acct-1', 7)");
    loom_test_http_res_t r;
    loom_test_http(e.port, "POST", "/v1/ops/test.ledger.balance", TOK_ADMIN, NULL,
                   "{\"account\":\"acct-1\"}", &r);
    cr_expect_eq(r.status, 200, "%s", r.body);
    cr_expect_eq(json_integer_value(json_object_get(r.json, "balance")), 12, "%s", r.body);
    loom_test_http_res_free(&r);

    loom_test_http(e.port, "POST", "/v1/ops/test.ledger.nope", TOK_ADMIN, NULL, "{}", &r);
    expect_error(&r, 404, "OP_NOT_FOUND");
    loom_test_http_res_free(&r);

    loom_test_http(e.port, "POST", "/v1/ops/test.ledger.balance", TOK_ADMIN, NULL, "[1]", &r);
    expect_error(&r, 400, "INVALID_JSON");
    loom_test_http_res_free(&r);

    loom_test_http(e.port, "POST", "/v1/ops/test.ledger.balance", TOK_ADMIN, NULL, "{}", &r);
    expect_error(&r, 400, "INVALID_ARGUMENT");
    loom_test_http_res_free(&r);

    /* The same through a service route (percent-decoded parameter). */
    loom_test_http(e.port, "GET", "/v1/test/accounts/acct%2D1", TOK_READER, NULL, NULL, &r);
    cr_expect_eq(r.status, 200, "%s", r.body);
    cr_expect_eq(json_integer_value(json_object_get(r.json, "credits")), 2, "%s", r.body);
    loom_test_http_res_free(&r);

    /* loom_op_call_http, the engine's client of this path, against it. */
    loom_op_ctx_t ctx = {.ray_id = "ray-client-1"};
    char base[64];
    snprintf(base, sizeof(base), "http://127.0.0.1:%d", e.port);
    int status = 0;
    json_t *body = NULL;
    loom_error_t err;
    json_t *req = json_pack("{s:s}", "account", "acct-1");
    cr_assert_eq(
        loom_op_call_http(base, TOK_ADMIN, &ctx, "test.ledger.balance", req, &status, &body, &err),
        0, "%s", err.message);
    cr_expect_eq(status, 200);
    cr_expect_eq(json_integer_value(json_object_get(body, "balance")), 12);
    json_decref(body);
    json_decref(req);

    loom_test_http(e.port, "GET", "/v1/commands/no-such-command", TOK_READER, NULL, NULL, &r);
    expect_error(&r, 404, "COMMAND_NOT_FOUND");
    loom_test_http_res_free(&r);
    env_free(&e);
}

/* ops:call reaches the op table, but each op also needs its own scope (by
 * default its service's read scope): ops:call alone reads nothing. */
Test(gateway, ops_need_ops_call_and_their_own_scope, .timeout = 120)
{
    gw_env_t e;
    env_init(&e, true, NULL);
    env_start(&e);
    loom_test_sql(e.url, "INSERT INTO test_ledger (message_id, account, amount) "
                         "VALUES ('m1', 'acct-1', 5)");
    static const struct {
        const char *token, *op, *body, *code;
        int status;
    } cases[] = {
        {TOK_OPS, "messages.get", "{\"id\":\"x\"}", "PERMISSION_DENIED", 403},
        {TOK_OPS, "test.ledger.balance", "{\"account\":\"acct-1\"}", "PERMISSION_DENIED", 403},
        {TOK_OPS, "registry.definitions.list", "{}", "PERMISSION_DENIED", 403},
        {TOK_OPS, "test.ledger.nope", "{}", "OP_NOT_FOUND", 404},
        {TOK_OPS_RD, "messages.get", "{\"id\":\"x\"}", "MESSAGE_NOT_FOUND", 404},
        {TOK_OPS_RD, "test.ledger.balance", "{\"account\":\"acct-1\"}", "", 200},
        {TOK_OPS_RD, "registry.definitions.list", "{}", "PERMISSION_DENIED", 403},
        {TOK_READER, "test.ledger.balance", "{\"account\":\"acct-1\"}", "PERMISSION_DENIED", 403},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char path[128];
        snprintf(path, sizeof(path), "/v1/ops/%s", cases[i].op);
        loom_test_http_res_t r;
        loom_test_http(e.port, "POST", path, cases[i].token, NULL, cases[i].body, &r);
        cr_expect_eq(r.status, cases[i].status, "case %zu: %d %s", i, r.status, r.body);
        cr_expect_str_eq(loom_test_http_error_code(&r), cases[i].code, "case %zu: %s", i, r.body);
        loom_test_http_res_free(&r);
    }
    /* The scope an op needs: its own, else its service's read scope. */
    char buf[64];
    static const loom_op_t own = {.name = "svc.thing.get", .scope = "svc:secret"};
    static const loom_op_t dflt = {.name = "svc.thing.get"};
    cr_expect_str_eq(loom_op_scope(&own, buf, sizeof(buf)), "svc:secret");
    cr_expect_str_eq(loom_op_scope(&dflt, buf, sizeof(buf)), "svc:read");
    env_free(&e);
}

/* LOOM_API_RATE_LIMIT: a bucket per token, else per address; 429 with
 * Retry-After beyond it, counted in the metrics. Counts, not timings: a
 * slow machine may refill a token between requests, so the test sends many
 * more than the burst and expects at least one refusal. */
Test(gateway, rate_limits_answer_429_with_retry_after, .timeout = 120)
{
    gw_env_t e;
    env_init(&e, false, NULL);
    e.opts.rate_limit = 1;
    e.opts.rate_burst = 2;
    env_start(&e);
    int ok = 0, limited = 0;
    for (int i = 0; i < 20; i++) {
        loom_test_http_res_t r;
        loom_test_http(e.port, "POST", "/v1/test/echo", TOK_ADMIN, NULL, "{}", &r);
        if (r.status == 200) {
            ok++;
        } else {
            expect_error(&r, 429, "RATE_LIMITED");
            const char *ra = hdr(&r, "Retry-After");
            cr_expect(ra && atoi(ra) >= 1, "Retry-After: %s", ra ? ra : "(none)");
            limited++;
        }
        loom_test_http_res_free(&r);
    }
    cr_expect_geq(ok, 2, "the burst passes");
    cr_expect_geq(limited, 1);
    /* Another token has a bucket of its own. */
    loom_test_http_res_t r;
    loom_test_http(e.port, "POST", "/v1/test/echo", TOK_WRITER, NULL, "{}", &r);
    cr_expect_eq(r.status, 200, "%s", r.body);
    loom_test_http_res_free(&r);
    /* No token: the remote address is the caller. */
    int addr_limited = 0;
    for (int i = 0; i < 20; i++) {
        loom_test_http(e.port, "GET", "/healthz", NULL, NULL, NULL, &r);
        addr_limited += r.status == 429;
        loom_test_http_res_free(&r);
    }
    cr_expect_geq(addr_limited, 1);
    char want[128];
    snprintf(want, sizeof(want), "loom_http_rate_limited_total{by=\"token\"} %d", limited);
    char *text = loom_metrics_render_string(e.metrics, NULL);
    cr_expect(strstr(text, want), "%s", text);
    cr_expect(strstr(text, "loom_http_rate_limited_total{by=\"address\"}"), "%s", text);
    free(text);
    env_free(&e);
}

/* ---- odd input ------------------------------------------------------------------------ */

/* Each of these was once answered wrongly (a misleading reason, a filter
 * silently dropped, a bad body accepted, a value cut at a %00). */
Test(gateway, odd_input_gets_exact_answers, .timeout = 120)
{
    gw_env_t e;
    env_init(&e, true, NULL);
    env_start(&e);
    static const struct {
        const char *method, *path, *body, *code, *says;
        int status;
    } cases[] = {
        {"GET", "/v1/messages/%ff", NULL, "INVALID_ARGUMENT", "path parameter \"id\"", 400},
        {"POST", "/v1/ops/%ff%fe", "{}", "INVALID_ARGUMENT", "path parameter \"name\"", 400},
        {"GET", "/v1/registry/instances?slug=%ff", NULL, "INVALID_ARGUMENT", "\"slug\"", 400},
        {"GET", "/v1/registry/instances?cursor=%ff", NULL, "INVALID_ARGUMENT", "\"cursor\"", 400},
        {"GET", "/v1/registry/instances?status=", NULL, "INVALID_ARGUMENT", "status: must not",
         400},
        {"GET", "/v1/registry/instances?limit=", NULL, "INVALID_ARGUMENT", "limit: must not", 400},
        {"GET", "/v1/registry/instances?=false", NULL, "INVALID_ARGUMENT", "unknown query", 400},
        {"GET", "/v1/registry/instances?stauts=x", NULL, "INVALID_ARGUMENT", "\"stauts\"", 400},
        {"POST", "/v1/messages:clean", "{{{", "INVALID_JSON", "not valid JSON", 400},
        {"POST", "/v1/messages:clean", "{\"all\":true}", "INVALID_ARGUMENT", "\"all\"", 400},
        {"POST", "/v1/messages:batchPut", "{\"msgs\":[],\"extra\":1}", "INVALID_ARGUMENT",
         "unknown field \"extra\"", 400},
        {"POST", "/v1/messages:batchGet", "{\"ids\":[],\"extra\":1}", "INVALID_ARGUMENT",
         "unknown field \"extra\"", 400},
        {"POST", "/v1/messages:clean?wait=5s%00x", NULL, "INVALID_ARGUMENT", "\"wait\"", 400},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        loom_test_http_res_t r;
        loom_test_http(e.port, cases[i].method, cases[i].path, TOK_ADMIN, NULL, cases[i].body, &r);
        expect_error(&r, cases[i].status, cases[i].code);
        const char *msg =
            json_string_value(json_object_get(json_object_get(r.json, "error"), "message"));
        cr_expect(msg && strstr(msg, cases[i].says), "case %zu (%s %s): %s", i, cases[i].method,
                  cases[i].path, r.body);
        loom_test_http_res_free(&r);
    }
    env_free(&e);
}

/* Error messages echo client bytes; whatever those are, the answer is JSON. */
Test(gateway, error_bodies_are_json_when_echoing_invalid_utf8, .timeout = 120)
{
    gw_env_t e;
    env_init(&e, true, NULL);
    env_start(&e);
    static const struct {
        const char *method, *path;
        int status;
    } cases[] = {
        {"POST", "/v1/messages:clean?wait=%C3", 400}, /* a character cut short */
        {"POST", "/v1/messages:clean?%ff=1", 400},    /* the name itself */
        {"GET", "/nowhere/\xff\xc3", 404},            /* raw bytes in the path */
        {"PUT", "/v1/messages/\xff", 405},
        {"GET", "/v1/test/accounts/%C3%28", 400},
        {"POST", "/v1/ops/test.ledger.balance", 400}, /* the body: see below */
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        loom_test_http_res_t r;
        loom_test_http(e.port, cases[i].method, cases[i].path, TOK_ADMIN, NULL,
                       i == 5 ? "{\"account\":\"\xc3\"}" : NULL, &r);
        cr_expect_eq(r.status, cases[i].status, "case %zu: %d %s", i, r.status, r.body);
        cr_expect(r.body_len > 0, "case %zu: empty body", i);
        cr_expect_not_null(r.json, "case %zu: not JSON: %s", i, r.body);
        const char *ct = hdr(&r, "Content-Type");
        cr_expect(ct && strstr(ct, "application/json"), "case %zu", i);
        loom_test_http_res_free(&r);
    }
    env_free(&e);
}

/* ---- the write path ------------------------------------------------------------------- */

static char *credit_body(const char *account, long amount, const char *extra)
{
    return loom_xasprintf("{\"account\":\"%s\",\"amount\":%ld%s%s}", account, amount,
                          extra ? "," : "", extra ? extra : "");
}

Test(gateway, write_answers_202_after_ack_and_wait_returns_the_applied_result, .timeout = 240)
{
    const char *brokers = loom_test_kafka_brokers();
    gw_env_t e;
    env_init(&e, true, brokers);
    env_start(&e);
    loom_test_worker_start(&e.worker, e.url, 3, false, loom_test_worker_opts(brokers, &e.led.def));
    loom_test_http_res_t r;

    /* Without ?wait: 202 with the command id once Kafka acknowledged it. */
    char *b = credit_body("w-1", 10, NULL);
    loom_test_http(e.port, "POST", "/v1/test/credits", TOK_WRITER, NULL, b, &r);
    free(b);
    cr_assert_eq(r.status, 202, "%s", r.body);
    const char *id = json_string_value(json_object_get(r.json, "command_id"));
    cr_assert_not_null(id, "%s", r.body);
    char first_id[64];
    snprintf(first_id, sizeof(first_id), "%s", id);
    char loc[128];
    snprintf(loc, sizeof(loc), "/v1/commands/%s", first_id);
    cr_expect_str_eq(hdr(&r, "Location"), loc);
    loom_test_http_res_free(&r);

    /* GET /v1/commands/{id} shows it applied once the worker got to it. */
    int64_t end = loom_mono_ms() + 60000;
    for (;;) {
        loom_test_http(e.port, "GET", loc, TOK_READER, NULL, NULL, &r);
        if (r.status == 200 || loom_mono_ms() > end)
            break;
        loom_test_http_res_free(&r);
        loom_sleep_ms(100);
    }
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_expect_str_eq(json_string_value(json_object_get(r.json, "status")), "applied");
    cr_expect_eq(json_integer_value(json_object_get(r.json, "attempts")), 1);
    cr_expect_eq(json_integer_value(json_object_get(json_object_get(r.json, "result"), "credited")),
                 10, "%s", r.body);
    cr_expect_eq(json_array_size(json_object_get(r.json, "consumers")), 1);
    loom_test_http_res_free(&r);

    /* With ?wait: 200 with the applied result... */
    b = credit_body("w-1", 32, NULL);
    loom_test_http(e.port, "POST", "/v1/test/credits?wait=20s", TOK_WRITER,
                   "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n", b,
                   &r);
    free(b);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_expect_str_eq(json_string_value(json_object_get(r.json, "status")), "applied");
    cr_expect_eq(json_integer_value(json_object_get(json_object_get(r.json, "result"), "credited")),
                 32, "%s", r.body);
    char ray[64];
    snprintf(ray, sizeof(ray), "%s", hdr(&r, "X-Ray-Id"));
    char wid[64];
    snprintf(wid, sizeof(wid), "%s", json_string_value(json_object_get(r.json, "command_id")));
    loom_test_http_res_free(&r);

    /* ...which an op reads back at once. */
    loom_test_http(e.port, "GET", "/v1/test/accounts/w-1", TOK_READER, NULL, NULL, &r);
    cr_expect_eq(r.status, 200, "%s", r.body);
    cr_expect_eq(json_integer_value(json_object_get(r.json, "balance")), 42, "%s", r.body);
    loom_test_http_res_free(&r);
    /* The ray id of the request travelled with the command. */
    char sql[256];
    snprintf(sql, sizeof(sql), "SELECT ray_id FROM loom_commands WHERE message_id = '%s'", wid);
    char *stored = loom_test_sql_value(e.url, sql);
    cr_expect_str_eq(stored, ray);
    free(stored);

    /* A rejected command under ?wait: 400 COMMAND_REJECTED with the reason. */
    b = credit_body("w-2", 1, "\"fail\":\"permanent\"");
    loom_test_http(e.port, "POST", "/v1/test/credits?wait=20s", TOK_WRITER, NULL, b, &r);
    free(b);
    expect_error(&r, 400, "COMMAND_REJECTED");
    cr_expect(strstr(r.body, "account w-2 is closed"), "%s", r.body);
    loom_test_http_res_free(&r);

    /* A Command-Deadline that passed before a worker took the command: not
     * applied, ?wait says so, and the command shows as expired. */
    b = credit_body("w-late", 5, NULL);
    loom_test_http(e.port, "POST", "/v1/test/credits?wait=20s", TOK_WRITER,
                   "Command-Deadline: 2020-01-01T00:00:00Z\r\n", b, &r);
    free(b);
    expect_error(&r, 504, "COMMAND_EXPIRED");
    loom_test_http_res_free(&r);
    cr_expect_eq(
        loom_test_sql_ll(e.url, "SELECT count(*) FROM test_ledger WHERE account = 'w-late'"), 0);
    cr_expect_eq(
        loom_test_sql_ll(e.url, "SELECT count(*) FROM loom_commands WHERE status = 'expired'"), 1);
    /* One in the future is applied; one that is not a time is refused. */
    b = credit_body("w-soon", 5, NULL);
    loom_test_http(e.port, "POST", "/v1/test/credits?wait=20s", TOK_WRITER,
                   "Command-Deadline: 2999-01-01T00:00:00Z\r\n", b, &r);
    cr_expect_eq(r.status, 200, "%s", r.body);
    loom_test_http_res_free(&r);
    loom_test_http(e.port, "POST", "/v1/test/credits?wait=20s", TOK_WRITER,
                   "Command-Deadline: tomorrow\r\n", b, &r);
    free(b);
    expect_error(&r, 400, "INVALID_ARGUMENT");
    loom_test_http_res_free(&r);

    /* A bad ?wait publishes nothing. */
    b = credit_body("w-3", 1, NULL);
    loom_test_http(e.port, "POST", "/v1/test/credits?wait=31s", TOK_WRITER, NULL, b, &r);
    expect_error(&r, 400, "INVALID_ARGUMENT");
    loom_test_http_res_free(&r);
    loom_test_http(e.port, "POST", "/v1/test/credits?wait=soon", TOK_WRITER, NULL, b, &r);
    expect_error(&r, 400, "INVALID_ARGUMENT");
    loom_test_http_res_free(&r);
    free(b);

    /* Body validation happens before publishing. */
    loom_test_http(e.port, "POST", "/v1/test/credits", TOK_WRITER, NULL, "{\"account\":1}", &r);
    expect_error(&r, 400, "INVALID_ARGUMENT");
    loom_test_http_res_free(&r);
    env_free(&e);
}

Test(gateway, idempotency_key_maps_retries_to_one_command, .timeout = 240)
{
    const char *brokers = loom_test_kafka_brokers();
    gw_env_t e;
    env_init(&e, true, brokers);
    env_start(&e);
    loom_test_worker_start(&e.worker, e.url, 3, false, loom_test_worker_opts(brokers, &e.led.def));
    loom_test_http_res_t r;
    char *b = credit_body("idem-1", 5, NULL);
    char ids[3][64];
    for (int i = 0; i < 3; i++) {
        loom_test_http(e.port, "POST", "/v1/test/credits?wait=20s", TOK_WRITER,
                       "Idempotency-Key: order-7781\r\n", b, &r);
        cr_assert_eq(r.status, 200, "try %d: %s", i, r.body);
        snprintf(ids[i], sizeof(ids[i]), "%s",
                 json_string_value(json_object_get(r.json, "command_id")));
        cr_expect_eq(
            json_integer_value(json_object_get(json_object_get(r.json, "result"), "credited")), 5);
        loom_test_http_res_free(&r);
    }
    cr_expect_str_eq(ids[0], ids[1]);
    cr_expect_str_eq(ids[0], ids[2]);
    char sql[256];
    snprintf(sql, sizeof(sql), "SELECT count(*) FROM test_ledger WHERE account = 'idem-1'");
    char *n = loom_test_sql_value(e.url, sql);
    cr_expect_str_eq(n, "1", "applied once");
    free(n);

    /* Another key, or another caller with the same key, is another command. */
    loom_test_http(e.port, "POST", "/v1/test/credits", TOK_WRITER,
                   "Idempotency-Key: order-7782\r\n", b, &r);
    cr_expect_str_neq(json_string_value(json_object_get(r.json, "command_id")), ids[0]);
    loom_test_http_res_free(&r);
    loom_test_http(e.port, "POST", "/v1/test/credits", TOK_ADMIN, "Idempotency-Key: order-7781\r\n",
                   b, &r);
    cr_expect_str_neq(json_string_value(json_object_get(r.json, "command_id")), ids[0]);
    loom_test_http_res_free(&r);

    /* A key that is too long or not printable. */
    char big[400] = "Idempotency-Key: ";
    memset(big + strlen(big), 'k', 250);
    strcat(big, "\r\n");
    loom_test_http(e.port, "POST", "/v1/test/credits", TOK_WRITER, big, b, &r);
    expect_error(&r, 400, "INVALID_ARGUMENT");
    loom_test_http_res_free(&r);
    free(b);
    env_free(&e);
}

Test(gateway, wait_that_runs_out_answers_202_with_the_status, .timeout = 120)
{
    const char *brokers = loom_test_kafka_brokers();
    gw_env_t e;
    env_init(&e, true, brokers);
    env_start(&e); /* no worker: nothing applies it */
    loom_test_http_res_t r;
    char *b = credit_body("late-1", 1, NULL);
    int64_t t0 = loom_mono_ms();
    loom_test_http(e.port, "POST", "/v1/test/credits?wait=700ms", TOK_WRITER, NULL, b, &r);
    free(b);
    int64_t took = loom_mono_ms() - t0;
    cr_expect_eq(r.status, 202, "%s", r.body);
    cr_expect_str_eq(json_string_value(json_object_get(r.json, "status")), "pending");
    cr_expect(took >= 600 && took < 5000, "took %lld ms", (long long)took);
    loom_test_http_res_free(&r);
    env_free(&e);
}

Test(gateway, broker_down_answers_503_with_retry_after, .timeout = 120)
{
    gw_env_t e;
    env_init(&e, false, NULL);
    /* A mock cluster whose only broker goes down; messages time out. */
    const char *bootstraps = NULL;
    e.mock_owner = loom_test_mock_cluster(1, &e.mc, &bootstraps);
    cr_assert_eq(rd_kafka_mock_topic_create(e.mc, g_topic, 1, 1), 0);
    loom_error_t err;
    loom_producer_opts_t o = {.brokers = bootstraps, .message_timeout_ms = 1500};
    cr_assert_eq(loom_producer_new(&o, &e.producer, &err), 0, "%s", err.message);
    e.opts.producer = e.producer;
    env_start(&e);
    loom_test_http_res_t r;
    char *b = credit_body("down-1", 1, NULL);
    loom_test_http(e.port, "POST", "/v1/test/credits", TOK_WRITER, NULL, b, &r);
    cr_expect_eq(r.status, 202, "the broker is up at first: %s", r.body);
    loom_test_http_res_free(&r);

    rd_kafka_mock_broker_set_down(e.mc, 1);
    int64_t t0 = loom_mono_ms();
    loom_test_http(e.port, "POST", "/v1/test/credits", TOK_WRITER, NULL, b, &r);
    expect_error(&r, 503, "BROKER_UNAVAILABLE");
    cr_expect_str_eq(hdr(&r, "Retry-After"), "1");
    cr_expect(loom_mono_ms() - t0 < 10000);
    loom_test_http_res_free(&r);

    /* No producer at all: 503 at once. */
    rd_kafka_mock_broker_set_up(e.mc, 1);
    free(b);
    env_free(&e);

    gw_env_t e2;
    env_init(&e2, false, NULL);
    env_start(&e2);
    b = credit_body("down-2", 1, NULL);
    loom_test_http(e2.port, "POST", "/v1/test/credits", TOK_WRITER, NULL, b, &r);
    expect_error(&r, 503, "BROKER_UNAVAILABLE");
    cr_expect_str_eq(hdr(&r, "Retry-After"), "1");
    loom_test_http_res_free(&r);
    free(b);
    env_free(&e2);
}

Test(gateway, full_producer_queue_answers_503_queue_full, .timeout = 120)
{
    gw_env_t e;
    env_init(&e, false, NULL);
    /* A queue of one message to a broker that is down: the second write finds it full. */
    const char *bootstraps = NULL;
    e.mock_owner = loom_test_mock_cluster(1, &e.mc, &bootstraps);
    rd_kafka_mock_broker_set_down(e.mc, 1);
    loom_error_t err;
    loom_producer_opts_t o = {
        .brokers = bootstraps, .message_timeout_ms = 3000, .queue_max_messages = 1};
    cr_assert_eq(loom_producer_new(&o, &e.producer, &err), 0, "%s", err.message);
    e.opts.producer = e.producer;
    env_start(&e);
    char *b = credit_body("full-1", 1, NULL);
    loom_test_http_conn_t *c = loom_test_http_open(e.port);
    char *req = loom_xasprintf("POST /v1/test/credits HTTP/1.1\r\nHost: x\r\n"
                               "Authorization: Bearer %s\r\nContent-Length: %zu\r\n\r\n%s",
                               TOK_WRITER, strlen(b), b);
    loom_test_http_sends(c, req);
    loom_sleep_ms(200);
    loom_test_http_res_t r;
    loom_test_http(e.port, "POST", "/v1/test/credits", TOK_WRITER, NULL, b, &r);
    expect_error(&r, 503, "QUEUE_FULL");
    cr_expect_str_eq(hdr(&r, "Retry-After"), "1");
    loom_test_http_res_free(&r);
    cr_assert(loom_test_http_read(c, 10000, &r));
    expect_error(&r, 503, "BROKER_UNAVAILABLE");
    loom_test_http_res_free(&r);
    loom_test_http_close(c);
    free(req);
    free(b);
    env_free(&e);
}

/* ---- shutdown ------------------------------------------------------------------------- */

typedef struct stopper {
    loom_gateway_t *gw;
    int64_t delay_ms;
} stopper_t;

static void *stop_later(void *arg)
{
    stopper_t *s = arg;
    loom_sleep_ms(s->delay_ms);
    loom_gateway_stop(s->gw, 10000);
    return NULL;
}

Test(gateway, graceful_shutdown_finishes_the_request_in_flight, .timeout = 60)
{
    gw_env_t e;
    env_init(&e, false, NULL);
    env_start(&e);
    loom_test_http_conn_t *busy = loom_test_http_open(e.port);
    loom_test_http_conn_t *idle = loom_test_http_open(e.port);
    char *req = loom_xasprintf("GET /v1/test/slow?ms=1500 HTTP/1.1\r\nHost: x\r\n"
                               "Authorization: Bearer %s\r\n\r\n",
                               TOK_ADMIN);
    loom_test_http_sends(busy, req);
    free(req);
    loom_sleep_ms(300);
    stopper_t s = {e.gw, 0};
    pthread_t t;
    pthread_create(&t, NULL, stop_later, &s);
    /* The idle connection is closed at once, new ones are refused... */
    cr_expect(loom_test_http_closed(idle, 3000));
    loom_sleep_ms(200);
    loom_test_http_conn_t *late = loom_test_http_try_open(e.port);
    cr_expect_null(late, "a connection was accepted during shutdown");
    loom_test_http_close(late);
    /* ...and the request in flight gets its answer, then the close. */
    loom_test_http_res_t r;
    cr_assert(loom_test_http_read(busy, 10000, &r));
    cr_expect_eq(r.status, 200, "%s", r.body);
    cr_expect_eq(json_integer_value(json_object_get(r.json, "slept_ms")), 1500);
    cr_expect_str_eq(hdr(&r, "Connection"), "close");
    cr_expect(loom_test_http_closed(busy, 5000));
    loom_test_http_res_free(&r);
    pthread_join(t, NULL);
    loom_test_http_close(busy);
    loom_test_http_close(idle);
    env_free(&e);
}

Test(gateway, shutdown_deadline_cuts_requests_that_run_too_long, .timeout = 60)
{
    gw_env_t e;
    env_init(&e, false, NULL);
    env_start(&e);
    loom_test_http_conn_t *busy = loom_test_http_open(e.port);
    char *req = loom_xasprintf("GET /v1/test/slow?ms=3000 HTTP/1.1\r\nHost: x\r\n"
                               "Authorization: Bearer %s\r\n\r\n",
                               TOK_ADMIN);
    loom_test_http_sends(busy, req);
    free(req);
    loom_sleep_ms(300);
    int64_t t0 = loom_mono_ms();
    loom_gateway_stop(e.gw, 500);
    int64_t took = loom_mono_ms() - t0;
    cr_expect(took < 6000, "stop took %lld ms", (long long)took);
    cr_expect(loom_test_http_closed(busy, 5000), "the cut request's connection is closed");
    loom_test_http_close(busy);
    env_free(&e);
}

/* ---- the loom api command -------------------------------------------------------------- */

Test(gateway, loom_api_serves_until_sigterm_then_exits_0, .timeout = 120)
{
    const char *brokers = loom_test_kafka_brokers();
    gw_env_t e;
    env_init(&e, true, NULL);
    char db_env[600], brokers_env[300], tokens_env[300];
    snprintf(db_env, sizeof(db_env), "LOOM_DATABASE_URL=%s", e.url);
    snprintf(brokers_env, sizeof(brokers_env), "LOOM_KAFKA_BROKERS=%s", brokers);
    snprintf(tokens_env, sizeof(tokens_env), "LOOM_API_TOKENS_FILE=%s", e.tokens_path);
    const char *env[] = {db_env, brokers_env, tokens_env, "LOOM_API_LISTEN=127.0.0.1:0", NULL};
    const char *argv[] = {loom_test_bin(), "api", NULL};
    int fd = -1;
    pid_t pid = loom_test_spawn(argv, env, &fd);
    char *out = NULL;
    cr_assert(loom_test_read_until(fd, "  routes ", 30000, &out), "no start line: %s", out);
    const char *at = strstr(out, "listening on http://127.0.0.1:");
    cr_assert_not_null(at, "%s", out);
    int port = atoi(at + strlen("listening on http://127.0.0.1:"));
    free(out);
    loom_test_http_res_t r;
    loom_test_http(port, "GET", "/readyz", NULL, NULL, NULL, &r);
    cr_expect_eq(r.status, 200, "%s", r.body);
    loom_test_http_res_free(&r);
    loom_test_http(port, "POST", "/v1/ops/engine.commands.get", TOK_ADMIN, NULL,
                   "{\"id\":\"nope\"}", &r);
    expect_error(&r, 404, "COMMAND_NOT_FOUND");
    loom_test_http_res_free(&r);
    loom_test_http(port, "POST", "/v1/ops/engine.commands.get", TOK_READER, NULL, "{}", &r);
    expect_error(&r, 403, "PERMISSION_DENIED");
    loom_test_http_res_free(&r);
    kill(pid, SIGTERM);
    cr_expect_eq(loom_test_wait(pid, 30000), 0, "loom api did not exit 0 on SIGTERM");
    close(fd);

    /* Configuration errors: exit 78 with one line. */
    char *so, *se;
    const char *env2[] = {db_env, NULL};
    unsetenv("LOOM_KAFKA_BROKERS");
    cr_expect_eq(loom_test_run(argv, env2, &so, &se), 78, "%s", se);
    cr_expect(strstr(se, "LOOM_KAFKA_BROKERS"), "%s", se);
    free(so);
    free(se);
    char bad[300];
    snprintf(bad, sizeof(bad), "/tmp/loom-gw-bad-%d", (int)getpid());
    FILE *f = fopen(bad, "w");
    fprintf(f, "# fine\nnot-a-hash slug scope\n");
    fclose(f);
    char bad_env[400];
    snprintf(bad_env, sizeof(bad_env), "LOOM_API_TOKENS_FILE=%s", bad);
    const char *env3[] = {db_env, brokers_env, bad_env, NULL};
    cr_expect_eq(loom_test_run(argv, env3, &so, &se), 78, "%s", se);
    cr_expect(strstr(se, "line 2"), "%s", se);
    free(so);
    free(se);
    unlink(bad);
    const char *help[] = {loom_test_bin(), "api", "--help", NULL};
    cr_expect_eq(loom_test_run(help, NULL, &so, &se), 0);
    cr_expect(strstr(so, "usage: loom api"), "%s", so);
    free(so);
    free(se);
    env_free(&e);
}
