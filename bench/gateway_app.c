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
#include "loom/app.h"
#include "messages/messages.h"
#include "registry/registry.h"

static int bench_command(loom_http_req_t *req, loom_http_res_t *res)
{
    json_t *body;
    loom_error_t err;
    if (loom_gateway_body_json(req, true, &body, &err) != 0)
        return loom_gateway_fail(req, res, &err);
    loom_gateway_command_t cmd = {.type = "bench.noop", .data = json_incref(body)};
    return loom_gateway_publish(req, res, &cmd);
}

static const loom_route_t bench_routes[] = {
    {"POST", "/v1/bench/commands", bench_command, NULL},
    {0},
};

static const loom_service_t bench_service = {
    .name = "bench",
    .description = "a minimal command for the gateway's write figures",
    .routes = bench_routes,
};

int main(int argc, char **argv)
{
    static const loom_service_t *const services[] = {
        &loom_messages_service,
        &loom_registry_service,
        &bench_service,
    };
    loom_app_t app = {
        .name = "loom",
        .version = "bench",
        .services = services,
        .n_services = LOOM_COUNT(services),
    };
    return loom_main(argc, argv, &app);
}
