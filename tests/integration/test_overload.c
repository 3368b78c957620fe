/*
 * The gateway under overload, against Postgres and the real Kafka broker:
 *
 * - 1,000 ?wait requests whose commands nobody applies (no worker yet) cost
 *   the database a bounded number of queries: the ?wait poller's own
 *   counters (loom_http_wait_queries_total against loom_http_wait_ticks_total)
 *   and, as a second opinion, the transactions Postgres counted for the
 *   test's database, both held against the time that passed;
 * - with LOOM_API_MAX_WAITERS of them held, one more ?wait request is refused
 *   at once with 503 OVERLOADED and Retry-After (nothing published), while a
 *   write without ?wait is still taken;
 * - once a worker starts, every one of the 1,000 held requests completes
 *   with 200 and its applied result;
 * - op calls past LOOM_API_MAX_QUEUE queued for the workers are refused with
 *   503 OVERLOADED, and the ones taken complete.
 *
 * No assertion depends on how fast the machine is: the bounds are computed
 * from the time measured around each observation.
 */
#include "http_client.h"
#include "prom.h"
#include "support.h"
#include "loom/bus.h"
#include "loom/clock.h"
#include "loom/gateway.h"
#include "loom/mem.h"
#include "loom/worker.h"

#include <criterion/criterion.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#define TOK "tok-overload-0123456789"

/* The poller's figures (gateway_write.c): a tick every 5 ms at most (longer
 * when its queries are slow), at most 4 queries of at most 500 ids a tick. */
#define TICK_MS         5
#define IDS_PER_QUERY   500
#define QUERIES_PER_TCK 4

#define N_WAITERS 1000

static char g_topic[200];

/* While closed, test.sleep with ms < 0 waits until the test opens it (at
 * most 60 s): calls that stay running however slow the machine is. */
static atomic_int g_gate_open = 1;

static int op_sleep(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                    loom_error_t *err)
{
    (void)ctx;
    (void)db;
    (void)err;
    json_int_t ms = json_integer_value(json_object_get(req, "ms"));
    if (ms < 0)
        for (int i = 0; i < 12000 && !atomic_load(&g_gate_open); i++)
            loom_sleep_ms(5);
    else
        loom_sleep_ms(ms);
    *res = json_pack("{s:I}", "slept_ms", ms);
    return 0;
}
static const loom_op_t sleep_op = {
    .name = "test.sleep", .fn = op_sleep, .timeout_ms = 30000, .flags = LOOM_OP_NO_DB};

static int route_credit(loom_http_req_t *req, loom_http_res_t *res)
{
    json_t *body;
    loom_error_t err;
    if (loom_gateway_body_json(req, true, &body, &err) != 0)
        return loom_gateway_fail(req, res, &err);
    const char *account = json_string_value(json_object_get(body, "account"));
    loom_gateway_command_t cmd = {
        .type = "test.credit", .topic = g_topic, .key = account, .data = json_incref(body)};
    return loom_gateway_publish(req, res, &cmd);
}

static int route_slow(loom_http_req_t *req, loom_http_res_t *res)
{
    const char *ms = loom_http_req_query(req, "ms");
    return loom_gateway_op_answer(req, res, "test.sleep",
                                  json_pack("{s:I}", "ms", (json_int_t)(ms ? atoi(ms) : 0)));
}

static const loom_route_t routes[] = {
    {"POST", "/v1/test/credits", route_credit, NULL},
    {"GET", "/v1/test/slow", route_slow, NULL},
};

typedef struct env {
    char url[512];
    char tokens_path[256];
    loom_test_ledger_t led; /* the test consumer; its topic is g_topic */
    loom_op_table_t *table;
    loom_db_pool_t *read_pool;
    loom_op_runtime_t rt;
    loom_metrics_t *metrics;
    loom_producer_t *producer;
    loom_gateway_opts_t opts;
    loom_gateway_t *gw;
    loom_test_worker_t worker;
    int port;
} env_t;

static void env_init(env_t *e, bool kafka)
{
    memset(e, 0, sizeof(*e));
    /* 1,000 client sockets and as many on the server side. */
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    if (rl.rlim_cur < 4 * N_WAITERS + 256 && rl.rlim_max >= 4 * N_WAITERS + 256) {
        rl.rlim_cur = 4 * N_WAITERS + 256;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    loom_test_ledger_init(&e->led, "ov");
    snprintf(g_topic, sizeof(g_topic), "%s", e->led.topic);
    snprintf(e->tokens_path, sizeof(e->tokens_path), "/tmp/loom-ov-tokens-%d", (int)getpid());
    loom_test_token_t t[] = {{TOK, "over *"}};
    loom_test_tokens_file(e->tokens_path, t, 1);
    loom_error_t err;
    e->table = loom_op_table_new();
    const loom_op_t *mine[] = {&sleep_op};
    cr_assert_eq(loom_op_table_add(e->table, mine, 1, &err), 0, "%s", err.message);
    e->metrics = loom_metrics_new();
    loom_test_db_create_ledger(e->url, sizeof(e->url));
    e->read_pool = loom_test_read_pool(e->url, 4);
    loom_op_runtime_init(&e->rt, e->table, e->read_pool, e->metrics);
    if (kafka) {
        const char *brokers = loom_test_kafka_brokers();
        int created = 0;
        const char *tp[] = {g_topic};
        cr_assert_eq(loom_kafka_create_topics(brokers, NULL, tp, 1, 3, &created, &err), 0, "%s",
                     err.message);
        loom_producer_opts_t o = {.brokers = brokers, .message_timeout_ms = 30000};
        cr_assert_eq(loom_producer_new(&o, &e->producer, &err), 0, "%s", err.message);
    }
    e->opts = (loom_gateway_opts_t){.listen = "127.0.0.1:0",
                                    .threads = 2,
                                    .routes = routes,
                                    .n_routes = sizeof(routes) / sizeof(routes[0]),
                                    .ops = &e->rt,
                                    .producer = e->producer,
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

/* Starts a worker that applies the test consumer's commands. */
static void env_worker_start(env_t *e)
{
    loom_test_worker_start(&e->worker, e->url, 3, false,
                           loom_test_worker_opts(loom_test_kafka_brokers(), &e->led.def));
}

static void env_free(env_t *e)
{
    loom_gateway_free(e->gw);
    loom_test_worker_stop(&e->worker);
    loom_producer_free(e->producer);
    loom_db_pool_free(e->read_pool);
    loom_op_table_free(e->table);
    loom_metrics_free(e->metrics);
    unlink(e->tokens_path);
}

/* A sample of the gateway's /metrics (0 when absent). */
static double metric(env_t *e, const char *key)
{
    return prom_scrape(e->port, key);
}

static long long xact_commits(env_t *e)
{
    /* A fresh connection each time: a fresh statistics snapshot. */
    return loom_test_sql_ll(e->url, "SELECT xact_commit FROM pg_stat_database "
                                    "WHERE datname = current_database()");
}

static char *request(const char *method, const char *path, const char *body)
{
    return loom_xasprintf("%s %s HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer " TOK
                          "\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
                          method, path, body ? strlen(body) : 0, body ? body : "");
}

static const char *header(const loom_test_http_res_t *r, const char *name)
{
    static char buf[256];
    return loom_test_http_header(r, name, buf, sizeof(buf));
}

Test(overload, waiters_cost_bounded_queries_the_excess_is_refused_and_the_rest_complete,
     .timeout = 600)
{
    env_t e;
    env_init(&e, true);
    e.opts.max_waiters = N_WAITERS;
    env_start(&e);

    /* 1,000 ?wait requests; no worker, so none is applied. */
    loom_test_http_conn_t **c = loom_xcalloc(N_WAITERS, sizeof(*c));
    for (int i = 0; i < N_WAITERS; i++) {
        c[i] = loom_test_http_open(e.port);
        char body[128];
        snprintf(body, sizeof(body), "{\"account\":\"ov-%d\",\"amount\":%d}", i, i + 1);
        char *req = request("POST", "/v1/test/credits?wait=30s", body);
        loom_test_http_sends(c[i], req);
        free(req);
    }
    int64_t end = loom_mono_ms() + 120000;
    double held = 0;
    while ((held = metric(&e, "loom_http_waiters")) < N_WAITERS && loom_mono_ms() < end)
        loom_sleep_ms(100);
    cr_assert_eq(held, N_WAITERS, "%.0f requests held, want %d", held, N_WAITERS);

    /* Let them wait a while, counting the poller's queries and what the
     * database saw. The clock starts before the first counts are read and
     * stops after the last, so the ticks counted all fall inside it. */
    int64_t t0 = loom_mono_ms();
    double ticks0 = metric(&e, "loom_http_wait_ticks_total");
    double queries0 = metric(&e, "loom_http_wait_queries_total");
    long long x0 = xact_commits(&e);
    loom_sleep_ms(3000);
    long long x1 = xact_commits(&e);
    double queries1 = metric(&e, "loom_http_wait_queries_total");
    double ticks1 = metric(&e, "loom_http_wait_ticks_total");
    int64_t elapsed = loom_mono_ms() - t0;
    double ticks = ticks1 - ticks0, queries = queries1 - queries0;
    cr_log_info("%d waiting for %lld ms: %.0f poller ticks, %.0f queries, %lld transactions",
                N_WAITERS, (long long)elapsed, ticks, queries, x1 - x0);
    cr_assert_gt(ticks, 0, "the poller did not run");
    /* One tick every TICK_MS at most... */
    cr_expect_leq(ticks, (double)elapsed / TICK_MS + 2, "%.0f ticks in %lld ms", ticks,
                  (long long)elapsed);
    /* ...each with ceil(1000 / 500) queries: never one per waiter. */
    int per_tick = (N_WAITERS + IDS_PER_QUERY - 1) / IDS_PER_QUERY;
    cr_expect_leq(queries, ticks * per_tick + per_tick, "%.0f queries in %.0f ticks", queries,
                  ticks);
    cr_expect_geq(queries, ticks - 1, "%.0f queries in %.0f ticks", queries, ticks);
    /* Postgres counts a transaction per statement: the poller's, and this
     * test's own reads. Its statistics may lag up to about a second behind
     * each backend, hence the margin of a second more. Polling each waiter
     * on its own every 25 ms would be about 40 a millisecond. */
    double bound = (double)(elapsed + 1000) / TICK_MS * QUERIES_PER_TCK + 50;
    cr_expect_leq((double)(x1 - x0), bound, "%lld transactions in %lld ms with %d waiting", x1 - x0,
                  (long long)elapsed, N_WAITERS);

    /* At the bound: one more ?wait is refused at once, nothing published... */
    loom_test_http_res_t r;
    loom_test_http(e.port, "POST", "/v1/test/credits?wait=30s", TOK, NULL,
                   "{\"account\":\"ov-extra\",\"amount\":1}", &r);
    cr_expect_eq(r.status, 503, "%s", r.body);
    cr_expect_str_eq(loom_test_http_error_code(&r), "OVERLOADED", "%s", r.body);
    cr_expect_not_null(header(&r, "Retry-After"));
    cr_expect(json_is_string(json_object_get(json_object_get(r.json, "error"), "ray_id")), "%s",
              r.body);
    loom_test_http_res_free(&r);
    cr_expect_eq(metric(&e, "loom_http_shed_total{bound=\"waiters\"}"), 1);
    /* ...and a write without ?wait is still taken. */
    loom_test_http(e.port, "POST", "/v1/test/credits", TOK, NULL,
                   "{\"account\":\"ov-nowait\",\"amount\":1}", &r);
    cr_expect_eq(r.status, 202, "%s", r.body);
    loom_test_http_res_free(&r);

    /* A worker comes: every held request completes with its result. */
    env_worker_start(&e);
    int applied = 0;
    for (int i = 0; i < N_WAITERS; i++) {
        loom_test_http_res_t a;
        cr_assert(loom_test_http_read(c[i], 120000, &a), "request %d got no answer", i);
        if (a.status == 200 &&
            strcmp(json_string_value(json_object_get(a.json, "status")), "applied") == 0 &&
            json_integer_value(json_object_get(json_object_get(a.json, "result"), "credited")) ==
                i + 1)
            applied++;
        else
            cr_expect_fail("request %d: %d %s", i, a.status, a.body);
        loom_test_http_res_free(&a);
        loom_test_http_close(c[i]);
    }
    free(c);
    cr_expect_eq(applied, N_WAITERS);
    cr_expect_eq(metric(&e, "loom_http_waiters"), 0);
    cr_expect_eq(loom_test_sql_ll(e.url, "SELECT count(*) FROM test_ledger WHERE account = "
                                         "'ov-extra'"),
                 0, "the refused request published nothing");
    env_free(&e);
}

/* Sends one ?wait request on each of n new connections. */
static void send_waits(env_t *e, loom_test_http_conn_t **c, int n, const char *tag,
                       const char *wait)
{
    (void)e;
    for (int i = 0; i < n; i++) {
        c[i] = loom_test_http_open(e->port);
        char body[128], path[80];
        snprintf(body, sizeof(body), "{\"account\":\"%s-%d\",\"amount\":1}", tag, i);
        snprintf(path, sizeof(path), "/v1/test/credits?wait=%s", wait);
        char *req = request("POST", path, body);
        loom_test_http_sends(c[i], req);
        free(req);
    }
}

/* Sends rounds of ROUND ?wait requests and reads every answer (2xx or 503)
 * until the adaptive bound is at most `until`, or `rounds` rounds ran.
 * Returns the rounds sent. */
enum { ROUND = 20 };
static int wait_rounds(env_t *e, const char *wait, double until, int rounds)
{
    loom_test_http_conn_t *c[ROUND];
    int n = 0;
    int64_t end = loom_mono_ms() + 120000;
    while (n < rounds && metric(e, "loom_http_waiters_limit") > until && loom_mono_ms() < end) {
        char tag[32];
        snprintf(tag, sizeof(tag), "round%d-%s", n++, wait);
        send_waits(e, c, ROUND, tag, wait);
        for (int i = 0; i < ROUND; i++) {
            loom_test_http_res_t a;
            cr_assert(loom_test_http_read(c[i], 30000, &a), "round %d: no answer", n);
            cr_assert(a.status == 200 || a.status == 202 || a.status == 503, "round %d: %d %s", n,
                      a.status, a.body);
            loom_test_http_res_free(&a);
            loom_test_http_close(c[i]);
        }
    }
    return n;
}

Test(overload, waits_slower_than_the_target_lower_the_bound_and_the_excess_is_refused,
     .timeout = 300)
{
    env_t e;
    env_init(&e, true);
    /* Rounds of ROUND requests fill half of the bound or more: slow waits
     * lower it only then (with fewer held, their number is not what makes
     * them slow). */
    e.opts.max_waiters = 2 * ROUND;
    e.opts.wait_target_ms = 1; /* every wait through Kafka and a worker takes longer */
    env_start(&e);
    cr_assert_eq(metric(&e, "loom_http_waiters_limit"), 2 * ROUND);

    /* No worker: waits that run out say nothing of how fast commands are
     * applied (a stopped consumer must not shut every route out). */
    wait_rounds(&e, "150ms", 0, 5);
    cr_assert_eq(metric(&e, "loom_http_waiters_limit"), 2 * ROUND,
                 "waits that ran out lowered the bound");

    /* A worker applies them, each slower than the target: rounds until the
     * bound is at its floor, never rising on the way. */
    env_worker_start(&e);
    int rounds = wait_rounds(&e, "10s", LOOM_GATEWAY_MIN_WAITERS, 1000);
    cr_assert_eq(metric(&e, "loom_http_waiters_limit"), LOOM_GATEWAY_MIN_WAITERS,
                 "the bound after %d rounds", rounds);
    cr_log_info("the bound fell from %d to %d in %d rounds", 2 * ROUND, LOOM_GATEWAY_MIN_WAITERS,
                rounds);
    loom_test_worker_stop(&e.worker);
    int64_t end = loom_mono_ms() + 30000;
    while (metric(&e, "loom_http_waiters") > 0 && loom_mono_ms() < end)
        loom_sleep_ms(20);
    cr_assert_eq(metric(&e, "loom_http_waiters"), 0);

    /* 40 more at once, with no worker: the bound's 16 are held, the other
     * 24 refused. */
    enum { N = 40 };
    loom_test_http_conn_t *c[N];
    double shed0 = metric(&e, "loom_http_shed_total{bound=\"waiters\"}");
    send_waits(&e, c, N, "held", "30s");
    end = loom_mono_ms() + 60000;
    while (metric(&e, "loom_http_shed_total{bound=\"waiters\"}") - shed0 <
               N - LOOM_GATEWAY_MIN_WAITERS &&
           loom_mono_ms() < end)
        loom_sleep_ms(20);
    cr_assert_eq(metric(&e, "loom_http_shed_total{bound=\"waiters\"}") - shed0,
                 N - LOOM_GATEWAY_MIN_WAITERS, "%.0f refused, %.0f held, bound %.0f",
                 metric(&e, "loom_http_shed_total{bound=\"waiters\"}") - shed0,
                 metric(&e, "loom_http_waiters"), metric(&e, "loom_http_waiters_limit"));
    cr_assert_eq(metric(&e, "loom_http_waiters"), LOOM_GATEWAY_MIN_WAITERS);

    /* A worker comes back: the held ones complete; the refused ones said
     * why. */
    env_worker_start(&e);
    int applied = 0, refused = 0;
    for (int i = 0; i < N; i++) {
        loom_test_http_res_t a;
        cr_assert(loom_test_http_read(c[i], 120000, &a), "request %d got no answer", i);
        if (a.status == 200 &&
            strcmp(json_string_value(json_object_get(a.json, "status")), "applied") == 0) {
            applied++;
        } else if (a.status == 503 && strcmp(loom_test_http_error_code(&a), "OVERLOADED") == 0 &&
                   strstr(a.body, "LOOM_API_WAIT_TARGET") && header(&a, "Retry-After")) {
            refused++;
        } else {
            cr_expect_fail("request %d: %d %s", i, a.status, a.body);
        }
        loom_test_http_res_free(&a);
        loom_test_http_close(c[i]);
    }
    cr_expect_eq(applied, LOOM_GATEWAY_MIN_WAITERS);
    cr_expect_eq(refused, N - LOOM_GATEWAY_MIN_WAITERS);
    cr_expect_eq(loom_test_sql_ll(e.url, "SELECT count(*) FROM test_ledger WHERE account LIKE "
                                         "'held-%'"),
                 LOOM_GATEWAY_MIN_WAITERS, "only the held requests were published");
    env_free(&e);
}

Test(overload, op_calls_past_the_queue_bound_get_503_and_the_rest_complete, .timeout = 300)
{
    env_t e;
    env_init(&e, false);
    e.opts.workers = 1;
    e.opts.max_queue = 2;
    env_start(&e);

    /* One worker, two places in its queue, and no call finishes until the
     * gate opens: the first two calls are always taken, three at most, so
     * once three are refused the rest are decided whatever the timing. */
    enum { N = 6 };
    atomic_store(&g_gate_open, 0);
    loom_test_http_conn_t *c[N];
    char *req = request("GET", "/v1/test/slow?ms=-1", NULL);
    for (int i = 0; i < N; i++) {
        c[i] = loom_test_http_open(e.port);
        loom_test_http_sends(c[i], req);
    }
    free(req);
    for (int i = 0; i < 6000 && metric(&e, "loom_http_shed_total{bound=\"queue\"}") < N - 3; i++)
        loom_sleep_ms(10);
    atomic_store(&g_gate_open, 1);
    int ok = 0, refused = 0;
    for (int i = 0; i < N; i++) {
        loom_test_http_res_t r;
        cr_assert(loom_test_http_read(c[i], 60000, &r), "call %d got no answer", i);
        if (r.status == 200) {
            ok++;
            cr_expect_eq(json_integer_value(json_object_get(r.json, "slept_ms")), -1);
        } else {
            refused++;
            cr_expect_eq(r.status, 503, "%s", r.body);
            cr_expect_str_eq(loom_test_http_error_code(&r), "OVERLOADED", "%s", r.body);
            cr_expect_not_null(header(&r, "Retry-After"));
        }
        loom_test_http_res_free(&r);
        loom_test_http_close(c[i]);
    }
    /* The running one and two queued are taken (or two queued before the
     * worker took the first); the rest were refused. */
    cr_expect(ok >= 2 && ok <= 3, "%d taken, %d refused", ok, refused);
    cr_expect_eq(ok + refused, N);
    cr_expect_eq(metric(&e, "loom_http_shed_total{bound=\"queue\"}"), refused);
    env_free(&e);
}

Test(overload, clients_that_leave_while_waiting_free_their_place, .timeout = 300)
{
    env_t e;
    env_init(&e, true);
    e.opts.max_waiters = 50;
    env_start(&e);

    /* 50 ?wait requests (the bound), nobody applies them; their clients go
     * away. */
    enum { N = 50 };
    loom_test_http_conn_t *c[N];
    for (int i = 0; i < N; i++) {
        c[i] = loom_test_http_open(e.port);
        char body[128];
        snprintf(body, sizeof(body), "{\"account\":\"gone-%d\",\"amount\":1}", i);
        char *req = request("POST", "/v1/test/credits?wait=30s", body);
        loom_test_http_sends(c[i], req);
        free(req);
    }
    int64_t end = loom_mono_ms() + 60000;
    while (metric(&e, "loom_http_waiters") < N && loom_mono_ms() < end)
        loom_sleep_ms(50);
    cr_assert_eq(metric(&e, "loom_http_waiters"), N);
    for (int i = 0; i < N; i++)
        loom_test_http_close(c[i]);
    end = loom_mono_ms() + 60000;
    double held;
    while ((held = metric(&e, "loom_http_waiters")) > 0 && loom_mono_ms() < end)
        loom_sleep_ms(50);
    cr_assert_eq(held, 0, "%.0f places still held after the clients left", held);

    /* Their places are free again: a new ?wait is taken (and runs out). */
    loom_test_http_res_t r;
    loom_test_http(e.port, "POST", "/v1/test/credits?wait=300ms", TOK, NULL,
                   "{\"account\":\"back\",\"amount\":1}", &r);
    cr_expect_eq(r.status, 202, "%s", r.body);
    cr_expect_str_eq(json_string_value(json_object_get(r.json, "status")), "pending", "%s", r.body);
    loom_test_http_res_free(&r);
    cr_expect_eq(metric(&e, "loom_http_shed_total{bound=\"waiters\"}"), 0);
    env_free(&e);
}

Test(overload, a_gateway_stopped_with_requests_waiting_answers_or_drops_them, .timeout = 300)
{
    env_t e;
    env_init(&e, true);
    env_start(&e);
    enum { N = 20 };
    loom_test_http_conn_t *c[N];
    for (int i = 0; i < N; i++) {
        c[i] = loom_test_http_open(e.port);
        char body[128];
        snprintf(body, sizeof(body), "{\"account\":\"stop-%d\",\"amount\":1}", i);
        char *req = request("POST", "/v1/test/credits?wait=30s", body);
        loom_test_http_sends(c[i], req);
        free(req);
    }
    int64_t end = loom_mono_ms() + 60000;
    while (metric(&e, "loom_http_waiters") < N && loom_mono_ms() < end)
        loom_sleep_ms(50);
    cr_assert_eq(metric(&e, "loom_http_waiters"), N);
    /* A stop with a short deadline closes the waiting requests' connections;
     * nothing is left behind (the sanitizer build checks for leaks). */
    loom_gateway_stop(e.gw, 200);
    for (int i = 0; i < N; i++) {
        cr_expect(loom_test_http_closed(c[i], 10000), "request %d still open", i);
        loom_test_http_close(c[i]);
    }
    env_free(&e);
}
