/*
 * gateway_app.c: `loom` for bench/run's HTTP figures: the real ops and routes, plus one
 * write route that the reference services do not need but a benchmark does
 * (a minimal command, so the figure measures the gateway's write path and
 * not a service's validation):
 *
 *   POST /v1/bench/commands  {...}  -> command bench.noop (202 after the ack)
 *
 * Everything else is loom_main(): run it as `gateway_app api`.
 */
#include "api.h"
#include "loom/app.h"
#include "ops.h"

#include <stdlib.h>
#include <string.h>

extern const loom_migration_set_t loom_app_migrations;

static int bench_command(loom_http_req_t *req, loom_http_res_t *res)
{
    json_t *body;
    loom_error_t err;
    if (loom_gateway_body_json(req, true, &body, &err) != 0)
        return loom_gateway_fail(req, res, &err);
    loom_gateway_command_t cmd = {.type = "bench.noop", .data = json_incref(body)};
    return loom_gateway_publish(req, res, &cmd);
}

int main(int argc, char **argv)
{
    size_t n = 0;
    const loom_route_t *app_routes = loom_app_routes(&n);
    loom_route_t *routes = calloc(n + 1, sizeof(*routes));
    if (!routes)
        return 1;
    memcpy(routes, app_routes, n * sizeof(*routes));
    routes[n] = (loom_route_t){"POST", "/v1/bench/commands", bench_command, NULL};
    loom_app_t app = {
        .name = "loom",
        .version = "bench",
        .migrations = loom_app_migrations,
        .ops = loom_app_ops,
        .n_ops = loom_app_n_ops,
        .routes = routes,
        .n_routes = n + 1,
    };
    int rc = loom_main(argc, argv, &app);
    free(routes);
    return rc;
}
