/*
 * The gateway's pieces without sockets: route matching and table checks,
 * Idempotency-Key ids, JSON bodies, and the HTTP connection state machine
 * fed by hand through a session (pipelining, chunked bodies, limits, bytes
 * arriving one at a time).
 */
#include "loom/gateway.h"
#include "loom/http.h"
#include "loom/mem.h"
#include "loom/uuid.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
