/*
 * The gateway's pieces without sockets: route matching and table checks,
 * Idempotency-Key ids, JSON bodies, and the HTTP connection state machine
 * fed by hand through a session (pipelining, chunked bodies, limits, bytes
 * arriving one at a time); then the server over loopback sockets, answering
 * from other threads (pipelining on many connections, input past what a
 * connection buffers, clients gone mid-request).
 */
#include "http_client.h"
#include "loom/gateway.h"
#include "loom/http.h"
#include "loom/mem.h"
#include "loom/uuid.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <jansson.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int h(loom_http_req_t *req, loom_http_res_t *res)
{
    (void)req;
    (void)res;
    return 0;
}

static const loom_route_t routes[] = {
    {"GET", "/v1/registry/nodes/{id}", h, NULL},
    {"GET", "/v1/registry/nodes/self", h, NULL},
    {"DELETE", "/v1/registry/nodes/{id}", h, NULL},
    {"POST", "/v1/messages:batchGet", h, NULL},
    {"GET", "/v1/messages/{id}", h, NULL},
    {"POST", "/v1/ops/{name}", h, NULL},
    {"GET", "/", h, NULL},
};
#define N_ROUTES (sizeof(routes) / sizeof(routes[0]))

Test(route, literal_segments_win_and_parameters_take_one_segment)
{
    bool known;
    char allow[64];
    const loom_route_t *r =
        loom_route_match(routes, N_ROUTES, "GET", "/v1/registry/nodes/self", &known, allow, 64);
    cr_assert_eq(r, &routes[1]);
    r = loom_route_match(routes, N_ROUTES, "GET", "/v1/registry/nodes/n-1", &known, allow, 64);
    cr_assert_eq(r, &routes[0]);
    r = loom_route_match(routes, N_ROUTES, "POST", "/v1/messages:batchGet", &known, allow, 64);
    cr_assert_eq(r, &routes[3]);
    r = loom_route_match(routes, N_ROUTES, "GET", "/", &known, allow, 64);
    cr_assert_eq(r, &routes[6]);
    cr_assert_null(loom_route_match(routes, N_ROUTES, "GET", "/v1/messages/a/b", &known, NULL, 0));
    cr_assert_not(known);
    cr_assert_null(loom_route_match(routes, N_ROUTES, "GET", "/v1/messages/", &known, NULL, 0));
    cr_assert_null(loom_route_match(routes, N_ROUTES, "GET", "/v1/ops", &known, NULL, 0));
    cr_assert_null(loom_route_match(routes, N_ROUTES, "GET", "v1/ops/x", &known, NULL, 0));

    const char *v;
    size_t len;
    cr_assert(loom_route_param("/v1/messages/{id}", "/v1/messages/a%2Fb", "id", &v, &len));
    cr_assert_eq(len, 5);
    cr_assert_eq(strncmp(v, "a%2Fb", 5), 0);
    cr_assert_not(loom_route_param("/v1/messages/{id}", "/v1/messages/x", "name", &v, &len));
}

Test(route, wrong_method_lists_the_allowed_ones)
{
    bool known = false;
    char allow[64];
    cr_assert_null(loom_route_match(routes, N_ROUTES, "PUT", "/v1/registry/nodes/n-1", &known,
                                    allow, sizeof(allow)));
    cr_assert(known);
    cr_assert_str_eq(allow, "GET, DELETE");
    /* "self" is the literal route: only GET there. */
    cr_assert_null(loom_route_match(routes, N_ROUTES, "DELETE", "/v1/registry/nodes/self", &known,
                                    allow, sizeof(allow)));
    cr_assert_str_eq(allow, "GET");
}

Test(route, table_check_names_the_bad_route)
{
    loom_error_t err;
    cr_assert_eq(loom_route_table_check(routes, N_ROUTES, &err), 0);
    const loom_route_t bad_method[] = {{"FETCH", "/x", h, NULL}};
    cr_assert_neq(loom_route_table_check(bad_method, 1, &err), 0);
    cr_assert(strstr(err.message, "FETCH"));
    const loom_route_t bad_pattern[] = {{"GET", "/x/{Id}", h, NULL}};
    cr_assert_neq(loom_route_table_check(bad_pattern, 1, &err), 0);
    const loom_route_t bad_pattern2[] = {{"GET", "/x/a{id}", h, NULL}};
    cr_assert_neq(loom_route_table_check(bad_pattern2, 1, &err), 0);
    const loom_route_t dup[] = {{"GET", "/x", h, NULL}, {"GET", "/x", h, "s"}};
    cr_assert_neq(loom_route_table_check(dup, 2, &err), 0);
    cr_assert(strstr(err.message, "twice"));
    const loom_route_t none[] = {{"GET", "/x", NULL, NULL}};
    cr_assert_neq(loom_route_table_check(none, 1, &err), 0);
}

Test(gateway_ids, idempotency_keys_give_stable_version_8_ids)
{
    char a[37], b[37], c[37], d[37];
    loom_gateway_idempotent_id("alice", "POST /v1/x", "k1", a);
    loom_gateway_idempotent_id("alice", "POST /v1/x", "k1", b);
    loom_gateway_idempotent_id("bob", "POST /v1/x", "k1", c);
    loom_gateway_idempotent_id("alice", "POST /v1/y", "k1", d);
    cr_assert_str_eq(a, b);
    cr_assert_str_neq(a, c);
    cr_assert_str_neq(a, d);
    loom_uuid_t u;
    cr_assert_eq(loom_uuid_parse(a, &u), 0);
    cr_assert_eq(loom_uuid_version(&u), 8);
    /* No ambiguity between fields: ("ab","c") and ("a","bc"). */
    loom_gateway_idempotent_id("ab", "c", "k", a);
    loom_gateway_idempotent_id("a", "bc", "k", b);
    cr_assert_str_neq(a, b);
}

Test(gateway_ids, json_bodies)
{
    json_t *v = NULL;
    loom_error_t err;
    cr_assert_eq(loom_gateway_parse_json("  \r\n", 4, true, &v, &err), 0);
    cr_assert(json_is_object(v) && json_object_size(v) == 0);
    json_decref(v);
    cr_assert_neq(loom_gateway_parse_json("[1]", 3, true, &v, &err), 0);
    cr_assert_str_eq(err.code, "INVALID_JSON");
    cr_assert_eq(loom_gateway_parse_json("[1]", 3, false, &v, &err), 0);
    json_decref(v);
    cr_assert_neq(loom_gateway_parse_json("{\"a\":1,\"a\":2}", 13, true, &v, &err), 0);
    cr_assert(strstr(err.message, "line 1"), "%s", err.message);
}

/* ---- sessions ---------------------------------------------------------------------- */

typedef struct out {
    char buf[65536];
    size_t len;
    int requests, done;
} out_t;

static void write_out(void *arg, const char *data, size_t len)
{
    out_t *o = arg;
    if (o->len + len < sizeof(o->buf)) {
        memcpy(o->buf + o->len, data, len);
        o->len += len;
        o->buf[o->len] = '\0';
    }
}

static void echo(loom_http_req_t *req, loom_http_res_t *res, void *opaque)
{
    out_t *o = opaque;
    o->requests++;
    size_t len;
    const char *body = loom_http_req_body(req, &len);
    const char *q = loom_http_req_query(req, "q");
    char *text = loom_xasprintf("%s %s q=%s body=%.*s", loom_http_req_method(req),
                                loom_http_req_path(req), q ? q : "-", (int)len, body);
    loom_http_res_header(res, "Content-Type", "text/plain");
    loom_http_res_body_take(res, text, strlen(text));
    loom_http_res_send(res);
}

static void on_done(loom_http_req_t *req, loom_http_res_t *res, void *opaque)
{
    (void)req;
    (void)res;
    ((out_t *)opaque)->done++;
}

static int count(const char *hay, const char *needle)
{
    int n = 0;
    for (const char *p = strstr(hay, needle); p; p = strstr(p + 1, needle))
        n++;
    return n;
}

Test(session, pipelined_requests_byte_by_byte_answer_in_order)
{
    out_t *o = loom_xcalloc(1, sizeof(*o));
    loom_http_session_t *s = loom_http_session_new(NULL, echo, on_done, o, write_out, o);
    const char *in = "GET /a?q=x+y%21 HTTP/1.1\r\nHost: h\r\n\r\n"
                     "POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
                     "POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n"
                     "0\r\n\r\n";
    for (size_t i = 0; in[i]; i++)
        cr_assert(loom_http_session_feed(s, in + i, 1));
    cr_assert_eq(o->requests, 3);
    cr_assert_eq(o->done, 3);
    const char *a = strstr(o->buf, "GET /a q=x y! body=");
    const char *b = strstr(o->buf, "POST /b q=- body=abc");
    const char *c = strstr(o->buf, "POST /c q=- body=hi");
    cr_assert(a && b && c && a < b && b < c, "%s", o->buf);
    cr_assert_eq(count(o->buf, "HTTP/1.1 200 OK\r\n"), 3);
    loom_http_session_free(s);
    free(o);
}

Test(session, limits_and_garbage_close_the_session)
{
    static const struct {
        const char *in;
        const char *status;
    } cases[] = {
        {"GET /", "414"},
        {"GET / HTTP/1.1\r\nX: ", "431"},
        {"POST / HTTP/1.1\r\nContent-Length: 5000\r\n\r\n", "413"},
        {"\x01\x02\x03", "400"},
        {"GET / HTTP/1.1\r\nHost: h\r\nExpect: nothing\r\n\r\n", "417"},
        /* A method http_parser does not know: not implemented, not "bad". */
        {"QUERY / HTTP/1.1\r\nHost: h\r\n\r\n", "501"},
        /* HTTP/1.1 requires Host (RFC 9112 section 3.2). */
        {"GET / HTTP/1.1\r\n\r\n", "400"},
        /* A chunk larger than max_body is refused when its size arrives. */
        {"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n7fffffffffffffff\r\n",
         "413"},
        /* Request smuggling: both a length and chunked coding. */
        {"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", "400"},
        {"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", "400"},
    };
    loom_http_limits_t limits = {.max_url = 64, .max_header_bytes = 256, .max_body = 1024};
    char pad[1000];
    memset(pad, 'a', sizeof(pad) - 1);
    pad[sizeof(pad) - 1] = '\0';
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        out_t *o = loom_xcalloc(1, sizeof(*o));
        loom_http_session_t *s = loom_http_session_new(&limits, echo, on_done, o, write_out, o);
        bool open = loom_http_session_feed(s, cases[i].in, strlen(cases[i].in));
        if (open)
            open = loom_http_session_feed(s, pad, strlen(pad));
        cr_assert_not(open, "case %zu still open", i);
        char want[32];
        snprintf(want, sizeof(want), "HTTP/1.1 %s ", cases[i].status);
        cr_assert_eq(strncmp(o->buf, want, strlen(want)), 0, "case %zu: %s", i, o->buf);
        cr_assert(strstr(o->buf, "Connection: close\r\n"));
        cr_assert_eq(o->requests, 0);
        cr_assert_eq(o->done, 1, "one access-log line per refused request");
        loom_http_session_free(s);
        free(o);
    }
}

Test(session, refusals_echoing_invalid_utf8_are_still_json)
{
    /* \xff is never UTF-8; \xc3 alone is a character cut short. */
    static const char *const cases[] = {
        "GET / HTTP/1.1\r\nHost: h\r\nExpect: \xff\xc3\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue-\xc3\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        out_t *o = loom_xcalloc(1, sizeof(*o));
        loom_http_session_t *s = loom_http_session_new(NULL, echo, on_done, o, write_out, o);
        loom_http_session_feed(s, cases[i], strlen(cases[i]));
        cr_assert_eq(strncmp(o->buf, "HTTP/1.1 417 ", 13), 0, "%s", o->buf);
        cr_assert(strstr(o->buf, "Content-Type: application/json\r\n"), "%s", o->buf);
        const char *body = strstr(o->buf, "\r\n\r\n");
        cr_assert(body);
        json_error_t jerr;
        json_t *doc = json_loads(body + 4, 0, &jerr);
        cr_assert(doc, "case %zu: not JSON: %s", i, jerr.text);
        cr_assert(strstr(
            json_string_value(json_object_get(json_object_get(doc, "error"), "message")), "?"));
        json_decref(doc);
        loom_http_session_free(s);
        free(o);
    }
}

Test(utf8, valid_and_repaired)
{
    cr_assert(loom_http_utf8_valid("h\xc3\xa9llo \xf0\x9f\x98\x80", 11));
    cr_assert_not(loom_http_utf8_valid("\xff", 1));
    cr_assert_not(loom_http_utf8_valid("\xc3", 1));             /* cut short */
    cr_assert_not(loom_http_utf8_valid("\xc0\xaf", 2));         /* overlong '/' */
    cr_assert_not(loom_http_utf8_valid("\xed\xa0\x80", 3));     /* a surrogate */
    cr_assert_not(loom_http_utf8_valid("\xf4\x90\x80\x80", 4)); /* above U+10FFFF */
    char s[] = "a\xc3\xa9\xff"
               "b\xc3";
    cr_assert_eq(loom_http_utf8_repair(s), 2);
    cr_assert_str_eq(s, "a\xc3\xa9?b?");
}

Test(rate_limit, token_buckets_refill_and_say_when)
{
    const int64_t s = 1000000000;
    loom_rate_limiter_t *l = loom_rate_limiter_new(2, 3, 2);
    int retry = 0;
    for (int i = 0; i < 3; i++)
        cr_assert(loom_rate_limiter_take(l, "token:a", 0, &retry), "burst %d", i);
    cr_assert_not(loom_rate_limiter_take(l, "token:a", 0, &retry));
    cr_assert_eq(retry, 1);
    /* Another caller has its own bucket. */
    for (int i = 0; i < 3; i++)
        cr_assert(loom_rate_limiter_take(l, "token:b", 0, &retry));
    /* Half a second at 2/s: one token back. */
    cr_assert(loom_rate_limiter_take(l, "token:a", s / 2, &retry));
    cr_assert_not(loom_rate_limiter_take(l, "token:a", s / 2, &retry));
    /* The table is full (2 keys): a third caller shares the overflow bucket... */
    for (int i = 0; i < 3; i++)
        cr_assert(loom_rate_limiter_take(l, "addr:10.0.0.1", s / 2, &retry));
    cr_assert_not(loom_rate_limiter_take(l, "addr:10.0.0.2", s / 2, &retry));
    /* ...until idle buckets have refilled and are dropped. */
    cr_assert(loom_rate_limiter_take(l, "addr:10.0.0.3", 10 * s, &retry));
    loom_rate_limiter_free(l);
    /* A slow rate says how long to wait. */
    l = loom_rate_limiter_new(1, 1, 0);
    cr_assert(loom_rate_limiter_take(l, "k", 0, &retry));
    cr_assert_not(loom_rate_limiter_take(l, "k", s / 10, &retry));
    cr_assert_eq(retry, 1);
    loom_rate_limiter_free(l);
    cr_assert_null(loom_rate_limiter_new(0, 5, 0));
    cr_assert(loom_rate_limiter_take(NULL, "k", 0, &retry), "no limiter: no limit");

    char key[64];
    loom_rate_limiter_key("alice", "1.2.3.4:5", key, sizeof(key));
    cr_assert_str_eq(key, "token:alice");
    loom_rate_limiter_key(NULL, "1.2.3.4:5678", key, sizeof(key));
    cr_assert_str_eq(key, "addr:1.2.3.4");
    loom_rate_limiter_key(NULL, "[::1]:5678", key, sizeof(key));
    cr_assert_str_eq(key, "addr:::1");
    loom_rate_limiter_key(NULL, "", key, sizeof(key));
    cr_assert_str_eq(key, "addr:");
}

/* ---- the server over sockets: answers from other threads, pipelining -------------- */

/*
 * Requests to /async/... are answered from a helper thread through
 * loom_http_req_post(), those to /hold/... when the test releases them,
 * anything else at once. Every answer's body is the request's path, so a
 * client sees whether its pipelined answers came back whole and in order.
 */
typedef struct srv_state {
    pthread_mutex_t mu;
    pthread_cond_t cond;
    loom_http_req_t *queue[4096]; /* for the helper thread */
    size_t nq;
    loom_http_req_t *held[256];
    size_t nheld;
    bool stop;
    atomic_int handled, done, dropped;
} srv_state_t;

static void answer_path(loom_http_req_t *req, loom_http_res_t *res)
{
    const char *path = loom_http_req_path(req);
    loom_http_res_body(res, path, strlen(path));
    loom_http_res_send(res);
}

static void answer_posted(loom_http_req_t *req, void *arg, bool cancelled)
{
    (void)arg;
    if (!cancelled && !loom_http_req_detached(req))
        answer_path(req, loom_http_req_res(req));
    loom_http_req_unref(req);
}

static void *helper_main(void *arg)
{
    srv_state_t *st = arg;
    pthread_mutex_lock(&st->mu);
    for (;;) {
        while (st->nq == 0 && !st->stop)
            pthread_cond_wait(&st->cond, &st->mu);
        if (st->nq == 0)
            break;
        loom_http_req_t *req = st->queue[0];
        memmove(st->queue, st->queue + 1, --st->nq * sizeof(st->queue[0]));
        pthread_mutex_unlock(&st->mu);
        loom_http_req_post(req, answer_posted, NULL);
        pthread_mutex_lock(&st->mu);
    }
    pthread_mutex_unlock(&st->mu);
    return NULL;
}

#define BIG_BODY ((size_t)48 << 20)

static void srv_handler(loom_http_req_t *req, loom_http_res_t *res, void *opaque)
{
    srv_state_t *st = opaque;
    atomic_fetch_add(&st->handled, 1);
    const char *path = loom_http_req_path(req);
    bool async = strncmp(path, "/async/", 7) == 0, hold = strncmp(path, "/hold/", 6) == 0;
    if (strncmp(path, "/big/", 5) == 0) {
        /* More than loopback socket buffers take at once: written in parts. */
        char *body = loom_xmalloc(BIG_BODY);
        for (size_t i = 0; i < BIG_BODY; i++)
            body[i] = (char)('a' + i % 26);
        loom_http_res_body_take(res, body, BIG_BODY);
        loom_http_res_send(res);
        return;
    }
    if (!async && !hold) {
        answer_path(req, res);
        return;
    }
    loom_http_req_ref(req);
    pthread_mutex_lock(&st->mu);
    if (async) {
        cr_assert_lt(st->nq, 4096);
        st->queue[st->nq++] = req;
        pthread_cond_signal(&st->cond);
    } else {
        cr_assert_lt(st->nheld, 256);
        st->held[st->nheld++] = req;
    }
    pthread_mutex_unlock(&st->mu);
}

static void srv_done(loom_http_req_t *req, loom_http_res_t *res, void *opaque)
{
    (void)req;
    srv_state_t *st = opaque;
    atomic_fetch_add(&st->done, 1);
    if (loom_http_res_get_status(res) == 499)
        atomic_fetch_add(&st->dropped, 1);
}

static size_t held_count(srv_state_t *st)
{
    pthread_mutex_lock(&st->mu);
    size_t n = st->nheld;
    pthread_mutex_unlock(&st->mu);
    return n;
}

/* Answers every held request (from this thread, through the loops). */
static void release_held(srv_state_t *st)
{
    pthread_mutex_lock(&st->mu);
    size_t n = st->nheld;
    loom_http_req_t *reqs[256];
    memcpy(reqs, st->held, n * sizeof(reqs[0]));
    st->nheld = 0;
    pthread_mutex_unlock(&st->mu);
    for (size_t i = 0; i < n; i++)
        loom_http_req_post(reqs[i], answer_posted, NULL);
}

/* Waits (up to 30 s, a bound for a broken server, not a timing) until
 * cond(st, want) holds. */
static bool wait_for(srv_state_t *st, bool (*cond)(srv_state_t *, int), int want)
{
    for (int i = 0; i < 3000; i++) {
        if (cond(st, want))
            return true;
        usleep(10000);
    }
    return cond(st, want);
}

static bool done_is(srv_state_t *st, int want)
{
    return atomic_load(&st->done) == want;
}

static bool held_is(srv_state_t *st, int want)
{
    return held_count(st) == (size_t)want;
}

typedef struct srv {
    srv_state_t st;
    pthread_t helper;
    loom_http_opts_t opts;
    loom_http_server_t *http;
    int port;
} srv_t;

static srv_t *srv_start(void)
{
    srv_t *s = loom_xcalloc(1, sizeof(*s));
    pthread_mutex_init(&s->st.mu, NULL);
    pthread_cond_init(&s->st.cond, NULL);
    cr_assert_eq(pthread_create(&s->helper, NULL, helper_main, &s->st), 0);
    s->opts = (loom_http_opts_t){.listen = "127.0.0.1:0",
                                 .threads = 2,
                                 .handler = srv_handler,
                                 .on_done = srv_done,
                                 .opaque = &s->st};
    loom_error_t err;
    cr_assert_eq(loom_http_server_start(&s->opts, &s->http, &err), 0, "%s", err.message);
    s->port = loom_http_server_port(s->http, 0);
    return s;
}

static void srv_free(srv_t *s)
{
    release_held(&s->st);
    loom_http_server_free(s->http);
    pthread_mutex_lock(&s->st.mu);
    s->st.stop = true;
    pthread_cond_signal(&s->st.cond);
    pthread_mutex_unlock(&s->st.mu);
    pthread_join(s->helper, NULL);
    pthread_mutex_destroy(&s->st.mu);
    pthread_cond_destroy(&s->st.cond);
    free(s);
}

/* Reads n answers and checks each body is "/KIND/CONN/I", in order. */
static void expect_paths(loom_test_http_conn_t *c, int conn, int from, int n, int kinds)
{
    static const char *const kind[] = {"sync", "async"};
    for (int i = from; i < from + n; i++) {
        loom_test_http_res_t r;
        cr_assert(loom_test_http_read(c, 30000, &r), "connection %d: no answer %d", conn, i);
        char want[64];
        snprintf(want, sizeof(want), "/%s/%d/%d", kind[i % kinds], conn, i);
        cr_assert_eq(r.status, 200);
        cr_assert_str_eq(r.body, want, "connection %d: answer %d", conn, i);
        loom_test_http_res_free(&r);
    }
}

/* The server still serves: a request for path on a new connection is
 * answered with it. */
static void expect_still_serves(srv_t *s, const char *path)
{
    loom_test_http_conn_t *c = loom_test_http_open(s->port);
    char req[128];
    snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: h\r\n\r\n", path);
    cr_assert(loom_test_http_sends(c, req));
    loom_test_http_res_t r;
    cr_assert(loom_test_http_read(c, 30000, &r));
    cr_assert_str_eq(r.body, path);
    loom_test_http_res_free(&r);
    loom_test_http_close(c);
}

Test(server, pipelined_requests_on_many_connections_answer_in_order, .timeout = 120)
{
    srv_t *s = srv_start();
    enum { CONNS = 24, PER = 60 };
    loom_test_http_conn_t *c[CONNS];
    for (int k = 0; k < CONNS; k++) {
        c[k] = loom_test_http_open(s->port);
        /* All requests in one send: each waits in the buffer until the
         * answer before it (at once or from the helper thread) is written. */
        char *all = loom_xcalloc(1, PER * 80);
        size_t len = 0;
        for (int i = 0; i < PER; i++)
            len += (size_t)snprintf(all + len, PER * 80 - len,
                                    "GET /%s/%d/%d HTTP/1.1\r\nHost: h\r\n\r\n",
                                    i % 2 ? "async" : "sync", k, i);
        cr_assert(loom_test_http_send(c[k], all, len));
        free(all);
    }
    for (int k = 0; k < CONNS; k++)
        expect_paths(c[k], k, 0, PER, 2);
    cr_assert(wait_for(&s->st, done_is, CONNS * PER), "on_done ran %d times, not %d",
              atomic_load(&s->st.done), CONNS * PER);
    cr_assert_eq(atomic_load(&s->st.handled), CONNS * PER);
    cr_assert_eq(atomic_load(&s->st.dropped), 0);
    for (int k = 0; k < CONNS; k++)
        loom_test_http_close(c[k]);
    srv_free(s);
}

Test(server, input_past_the_bound_waits_for_the_answer_then_is_served, .timeout = 120)
{
    srv_t *s = srv_start();
    loom_test_http_conn_t *c = loom_test_http_open(s->port);
    cr_assert(loom_test_http_sends(c, "GET /hold/0/0 HTTP/1.1\r\nHost: h\r\n\r\n"));
    cr_assert(wait_for(&s->st, held_is, 1));
    /* About 400 KiB of pipelined requests while the first is held: far more
     * than the server buffers unparsed, so its reading must stop and start
     * again. The sends block when the socket buffers are full: send from
     * this thread in non-blocking steps, reading nothing yet. */
    enum { N = 4000 };
    size_t cap = (size_t)N * 100, len = 0;
    char *all = loom_xmalloc(cap);
    for (int i = 1; i <= N; i++)
        len += (size_t)snprintf(all + len, cap - len,
                                "GET /sync/0/%d HTTP/1.1\r\nHost: h\r\nX-Pad: "
                                "0123456789012345678901234567890123456789\r\n\r\n",
                                i);
    size_t off = 0;
    while (off < len) {
        ssize_t n = send(c->fd, all + off, len - off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            off += (size_t)n;
            continue;
        }
        cr_assert(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK), "send: %s", strerror(errno));
        break; /* the buffers are full: the server holds at most its bound */
    }
    cr_assert_eq(atomic_load(&s->st.handled), 1, "a request was parsed before the held answer");
    release_held(&s->st);
    /* The rest goes out as the server reads on; answers are read meanwhile
     * so neither side blocks for good. */
    loom_test_http_res_t r;
    cr_assert(loom_test_http_read(c, 30000, &r));
    cr_assert_str_eq(r.body, "/hold/0/0");
    loom_test_http_res_free(&r);
    int got = 0;
    while (got < N) {
        if (off < len) {
            ssize_t n = send(c->fd, all + off, len - off, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (n > 0)
                off += (size_t)n;
        }
        struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
        if (off < len && poll(&pfd, 1, 10) == 0)
            continue;
        cr_assert(loom_test_http_read(c, 30000, &r), "no answer %d", got + 1);
        char want[64];
        snprintf(want, sizeof(want), "/sync/0/%d", got + 1);
        cr_assert_str_eq(r.body, want);
        loom_test_http_res_free(&r);
        got++;
    }
    cr_assert_eq(off, len);
    free(all);
    cr_assert(wait_for(&s->st, done_is, N + 1));
    cr_assert_eq(atomic_load(&s->st.handled), N + 1);
    loom_test_http_close(c);
    srv_free(s);
}

Test(server, clients_closing_mid_request_are_reported_once_each, .timeout = 120)
{
    srv_t *s = srv_start();
    enum { CONNS = 20 };
    for (int k = 0; k < CONNS; k++) {
        loom_test_http_conn_t *c = loom_test_http_open(s->port);
        char req[128];
        snprintf(req, sizeof(req), "GET /hold/%d/0 HTTP/1.1\r\nHost: h\r\n\r\n", k);
        cr_assert(loom_test_http_sends(c, req));
        cr_assert(wait_for(&s->st, held_is, k + 1));
        if (k % 2) {
            /* A reset: unread bytes in the client's buffer make close() send RST. */
            struct linger lg = {.l_onoff = 1, .l_linger = 0};
            setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
        }
        loom_test_http_close(c);
    }
    /* Every client is gone; answering now must neither crash nor count twice. */
    release_held(&s->st);
    cr_assert(wait_for(&s->st, done_is, CONNS), "on_done ran %d times, not %d",
              atomic_load(&s->st.done), CONNS);
    expect_still_serves(s, "/async/7/0");
    cr_assert(wait_for(&s->st, done_is, CONNS + 1));
    cr_assert_eq(atomic_load(&s->st.handled), CONNS + 1);
    srv_free(s);
}

Test(server, requests_sent_before_a_half_close_are_all_answered, .timeout = 120)
{
    srv_t *s = srv_start();
    loom_test_http_conn_t *c = loom_test_http_open(s->port);
    /* Three pipelined requests, the first held, then the client's half of
     * the connection closes (as `nc -N` does): the EOF comes while the first
     * is answered, the other two wait in the buffer. */
    cr_assert(loom_test_http_sends(c, "GET /hold/0/0 HTTP/1.1\r\nHost: h\r\n\r\n"
                                      "GET /sync/0/1 HTTP/1.1\r\nHost: h\r\n\r\n"
                                      "GET /sync/0/2 HTTP/1.1\r\nHost: h\r\n\r\n"));
    cr_assert_eq(shutdown(c->fd, SHUT_WR), 0);
    cr_assert(wait_for(&s->st, held_is, 1));
    usleep(50000); /* the EOF reaches the server while /hold/0/0 is held */
    release_held(&s->st);
    static const char *const want[] = {"/hold/0/0", "/sync/0/1", "/sync/0/2"};
    for (int i = 0; i < 3; i++) {
        loom_test_http_res_t r;
        cr_assert(loom_test_http_read(c, 30000, &r), "answer %d missing", i);
        cr_assert_str_eq(r.body, want[i]);
        loom_test_http_res_free(&r);
    }
    cr_assert(wait_for(&s->st, done_is, 3));
    cr_assert_eq(atomic_load(&s->st.handled), 3);
    loom_test_http_close(c);
    srv_free(s);
}

Test(server, a_reset_after_an_expect_100_continue_request_is_dropped_cleanly, .timeout = 120)
{
    /* The server answers "100 Continue" while it reads the headers; when the
     * client has already reset the connection that write fails and the
     * request is gone, and the parser must not go on into its body. Many
     * times over, since whether the reset comes first is up to the kernel. */
    srv_t *s = srv_start();
    for (int k = 0; k < 200; k++) {
        loom_test_http_conn_t *c = loom_test_http_open(s->port);
        char req[256];
        snprintf(req, sizeof(req),
                 "POST /sync/%d/0 HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
                 "Content-Length: 10\r\n\r\n0123456789",
                 k);
        cr_assert(loom_test_http_sends(c, req));
        struct linger lg = {.l_onoff = 1, .l_linger = 0};
        setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
        loom_test_http_close(c);
    }
    expect_still_serves(s, "/async/9/0");
    srv_free(s);
}

Test(server, big_answers_written_in_parts_arrive_whole_and_in_order, .timeout = 120)
{
    srv_t *s = srv_start();
    loom_test_http_conn_t *c = loom_test_http_open(s->port);
    cr_assert(loom_test_http_sends(c, "GET /big/0/0 HTTP/1.1\r\nHost: h\r\n\r\n"
                                      "GET /sync/0/1 HTTP/1.1\r\nHost: h\r\n\r\n"
                                      "GET /big/0/2 HTTP/1.1\r\nHost: h\r\n\r\n"
                                      "GET /async/0/3 HTTP/1.1\r\nHost: h\r\n\r\n"));
    for (int i = 0; i < 4; i++) {
        loom_test_http_res_t r;
        cr_assert(loom_test_http_read(c, 30000, &r), "no answer %d", i);
        cr_assert_eq(r.status, 200);
        if (i % 2 == 0) {
            cr_assert_eq(r.body_len, BIG_BODY, "answer %d: %zu bytes", i, r.body_len);
            size_t bad = 0;
            while (bad < BIG_BODY && r.body[bad] == (char)('a' + bad % 26))
                bad++;
            cr_assert_eq(bad, BIG_BODY, "answer %d differs at byte %zu", i, bad);
        } else {
            char want[32];
            snprintf(want, sizeof(want), "/%s/0/%d", i == 1 ? "sync" : "async", i);
            cr_assert_str_eq(r.body, want);
        }
        loom_test_http_res_free(&r);
    }
    cr_assert(wait_for(&s->st, done_is, 4));
    loom_test_http_close(c);
    srv_free(s);
}
