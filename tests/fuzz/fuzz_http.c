/*
 * fuzz_http.c: libFuzzer target for everything the gateway does with bytes
 * from a client before a handler's own logic: HTTP/1.1 parsing and limits
 * (http.c, through a socket-less session), routing and path parameters
 * (gateway_route.c, against the application's real route table), query
 * parameters and JSON body decoding.
 *
 * The input is split in two at a point taken from its first byte, so
 * requests also arrive cut at arbitrary places, as they do off a socket.
 * Build and run: `make fuzz` (clang, -fsanitize=fuzzer,address,undefined).
 */
#include "loom/app.h"
#include "loom/gateway.h"
#include "messages/messages.h"
#include "registry/registry.h"
#include "loom/http.h"
#include "loom/log.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static size_t written;

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

static void handler(loom_http_req_t *req, loom_http_res_t *res, void *opaque)
{
    (void)opaque;
    size_t n = 0;
    const loom_route_t *routes = app_routes(&n);
    bool known = false;
    char allow[128];
    const char *path = loom_http_req_path(req);
    const loom_route_t *r =
        loom_route_match(routes, n, loom_http_req_method(req), path, &known, allow, sizeof(allow));
    if (!r) {
        loom_http_res_status(res, known ? 405 : 404);
        if (known)
            loom_http_res_header(res, "Allow", allow);
        loom_http_res_send(res);
        return;
    }
    const char *v;
    size_t vl;
    loom_route_param(r->pattern, path, "name", &v, &vl);
    loom_route_param(r->pattern, path, "id", &v, &vl);
    const char *wait = loom_http_req_query(req, "wait");
    (void)wait;
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
