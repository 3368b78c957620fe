/*
 * fuzz_http.c: libFuzzer target for everything the gateway does with bytes
 * from a client before a handler's own logic: HTTP/1.1 parsing and limits
 * (http.c, through a socket-less session), routing and path parameters
 * (gateway_route.c, against the application's real route table) with their
 * percent-decoding and UTF-8 checks, query parameters, the rate limiter's
 * caller keys and buckets (gateway_limit.c), the probe allow-list of the
 * registry (LOOM_REGISTRY_PROBE_ALLOW, consumers/registry/probe.c) and JSON
 * body decoding. Error texts built from client bytes are repaired to UTF-8
 * and must then encode as JSON.
 *
 * Headers steer the extra parsers: X-Remote (a remote address for the rate
 * limiter's key), X-Allow (an allow-list) checked against X-Addr (an IPv4 or
 * IPv6 address) for host X-Host.
 *
 * The input is split in two at a point taken from its first byte, so
 * requests also arrive cut at arbitrary places, as they do off a socket.
 * Build and run: `make fuzz` (clang, -fsanitize=fuzzer,address,undefined).
 */
#include "loom/app.h"
#include "api.h"
#include "registry/registry.h"
#include "loom/gateway.h"
#include "messages/messages.h"
#include "registry/registry.h"
#include "loom/http.h"
#include "loom/log.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static size_t written;
static loom_rate_limiter_t *limiter;
static int64_t clock_ns;

/* The routes of cmd/loom/main.c's services, the engine's first. */
static const loom_route_t *app_routes(size_t *n)
{
    static const loom_service_t *const services[] = {&loom_messages_service,
                                                     &loom_registry_service};
    static loom_app_t app = {.services = services, .n_services = LOOM_COUNT(services)};
    if (!app.built) {
        loom_error_t err;
        if (loom_app_build(&app, &err) != 0)
            abort();
    }
    *n = app.n_routes;
    return app.routes;
}

static void on_write(void *arg, const char *data, size_t len)
{
    (void)arg;
    (void)data;
    written += len;
}

/* A message echoing client bytes, as error bodies do: once repaired it must
 * encode as JSON. */
static void check_echo(const char *what, const char *bytes)
{
    char msg[300];
    snprintf(msg, sizeof(msg), "%s \"%.200s\"", what, bytes ? bytes : "");
    loom_http_utf8_repair(msg);
    if (!loom_http_utf8_valid(msg, strlen(msg)))
        abort();
    json_t *v = json_pack("{s:s}", "message", msg);
    char *text = v ? json_dumps(v, JSON_COMPACT) : NULL;
    if (!text)
        abort();
    free(text);
    json_decref(v);
}

static void fuzz_allow(loom_http_req_t *req)
{
    const char *list = loom_http_req_header(req, "X-Allow");
    if (!list)
        return;
    registry_probe_allow_t *allow = NULL;
    loom_error_t err;
    char why[256];
    bool ok = registry_probe_allow_valid(list, why, sizeof(why));
    if (registry_probe_allow_parse(list, &allow, &err) != 0) {
        if (ok)
            abort(); /* the config check and the parser must agree */
        return;
    }
    if (!ok)
        abort();
    const char *addr = loom_http_req_header(req, "X-Addr");
    const char *host = loom_http_req_header(req, "X-Host");
    struct sockaddr_in a4 = {.sin_family = AF_INET};
    struct sockaddr_in6 a6 = {.sin6_family = AF_INET6};
    if (addr && inet_pton(AF_INET, addr, &a4.sin_addr) == 1)
        registry_probe_allow_check(allow, host ? host : addr, (struct sockaddr *)&a4);
    else if (addr && inet_pton(AF_INET6, addr, &a6.sin6_addr) == 1)
        registry_probe_allow_check(allow, host ? host : addr, (struct sockaddr *)&a6);
    registry_probe_allow_free(allow);
}

static void handler(loom_http_req_t *req, loom_http_res_t *res, void *opaque)
{
    (void)opaque;
    size_t n = 0;
    const loom_route_t *routes = app_routes(&n);
    bool known = false;
    char allow[128];
    const char *path = loom_http_req_path(req);
    check_echo("no route for", path);

    /* Rate limit: the caller's key from a remote address or a slug. */
    char key[200];
    const char *remote = loom_http_req_header(req, "X-Remote");
    loom_rate_limiter_key(NULL, remote ? remote : loom_http_req_remote(req), key, sizeof(key));
    int retry = 0;
    clock_ns += 1000000;
    if (!loom_rate_limiter_take(limiter, key, clock_ns, &retry) && retry < 1)
        abort();
    loom_rate_limiter_key(loom_http_req_header(req, "X-Slug"), NULL, key, sizeof(key));

    fuzz_allow(req);

    /* Query parameters: decoded, checked, iterated. */
    const char *bad = loom_http_req_query_unclean(req);
    if (bad)
        check_echo("query parameter", bad);
    const char *qn, *qv;
    for (size_t i = 0; loom_http_req_query_at(req, i, &qn, &qv); i++)
        if (!bad &&
            (!loom_http_utf8_valid(qn, strlen(qn)) || !loom_http_utf8_valid(qv, strlen(qv))))
            abort(); /* "clean" must mean UTF-8 */

    const loom_route_t *r =
        loom_route_match(routes, n, loom_http_req_method(req), path, &known, allow, sizeof(allow));
    if (!r) {
        loom_http_res_status(res, known ? 405 : 404);
        if (known)
            loom_http_res_header(res, "Allow", allow);
        loom_http_res_send(res);
        return;
    }
    static const char *const names[] = {"name", "id"};
    for (size_t k = 0; k < 2; k++) {
        const char *v;
        size_t vl;
        if (!loom_route_param(r->pattern, path, names[k], &v, &vl))
            continue;
        bool clean = true;
        char *dec = loom_gateway_param_decode(loom_http_req_arena(req), v, vl, &clean);
        if (clean && !loom_http_utf8_valid(dec, strlen(dec)))
            abort();
        check_echo("path parameter", dec);
    }
    (void)loom_http_req_header(req, "Authorization");
    size_t len;
    const char *body = loom_http_req_body(req, &len);
    json_t *doc = NULL;
    loom_error_t err;
    if (loom_gateway_parse_json(body, len, true, &doc, &err) == 0) {
        char *text = json_dumps(doc, JSON_COMPACT);
        if (text)
            loom_http_res_body_take(res, text, strlen(text));
        json_decref(doc);
        loom_http_res_status(res, 200);
    } else {
        loom_http_res_status(res, 400);
        check_echo(err.message, "");
        loom_http_res_body(res, err.message, strlen(err.message));
    }
    loom_http_res_header(res, "Content-Type", "application/json");
    loom_http_res_send(res);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static bool init;
    if (!init) {
        loom_log_level = LOOM_LOG_OFF;
        limiter = loom_rate_limiter_new(5, 10, 64); /* small: the overflow path runs too */
        init = true;
    }
    loom_http_limits_t limits = {
        .max_url = 512, .max_header_bytes = 2048, .max_headers = 16, .max_body = 4096};
    loom_http_session_t *s = loom_http_session_new(&limits, handler, NULL, NULL, on_write, NULL);
    size_t cut = size ? (size_t)data[0] % (size + 1) : 0;
    const char *p = (const char *)data;
    if (cut > 0)
        loom_http_session_feed(s, p, cut);
    if (size > cut)
        loom_http_session_feed(s, p + cut, size - cut);
    loom_http_session_feed(s, NULL, 0);
    loom_http_session_free(s);
    return 0;
}
