/*
 * console_app.c: `loom` with its services (messages, registry) and a small
 * "demo" service whose commands show every part of a story, for the
 * console's browser test (tests/console/test_console.py) under `dev`.
 *
 *   POST /v1/demo/orders {"order": "o1", "fail"?: "permanent", "hold"?: PATH}
 *     publishes demo.place, keyed by the order.
 *   demo.place  emits demo.placed on stream order-o1 and publishes the
 *               follow-up demo.ship through the outbox; "fail":"permanent"
 *               rejects it; "hold": PATH fails transiently while that file
 *               exists (a stuck command the test parks and replays).
 *   demo.ship   emits demo.shipped on stream order-o1.
 */
#include "loom/app.h"
#include "loom/gateway.h"
#include "messages/messages.h"
#include "registry/registry.h"

#include <string.h>
#include <unistd.h>

static int place(loom_msg_t *msg, json_t *data, loom_error_t *err)
{
    const char *order = json_string_value(json_object_get(data, "order"));
    const char *fail = json_string_value(json_object_get(data, "fail"));
    const char *hold = json_string_value(json_object_get(data, "hold"));
    if (!order || !*order)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "an order needs \"order\"");
    if (fail && strcmp(fail, "permanent") == 0)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "order %s cannot be placed", order);
    if (hold && access(hold, F_OK) == 0)
        return loom_error_set(err, LOOM_CODE_DB_UNAVAILABLE, "order %s is on hold", order);
    char stream[300];
    snprintf(stream, sizeof(stream), "order-%s", order);
    int rc = loom_emit(msg, stream, -1, "demo.placed", json_pack("{s:s}", "order", order), err);
    if (rc == 0)
        rc = loom_publish(msg, "loom.cmd.demo", order, "demo.ship",
                          json_pack("{s:s}", "order", order), err);
    if (rc == 0)
        loom_msg_set_result(msg, json_pack("{s:s}", "placed", order));
    return rc;
}

static int ship(loom_msg_t *msg, json_t *data, loom_error_t *err)
{
    const char *order = json_string_value(json_object_get(data, "order"));
    if (!order || !*order)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "a shipment needs \"order\"");
    char stream[300];
    snprintf(stream, sizeof(stream), "order-%s", order);
    int rc = loom_emit(msg, stream, -1, "demo.shipped", json_pack("{s:s}", "order", order), err);
    if (rc == 0)
        loom_msg_set_result(msg, json_pack("{s:s}", "shipped", order));
    return rc;
}

static const loom_command_t demo_commands[] = {
    {"demo.place", place, NULL},
    {"demo.ship", ship, NULL},
    {0},
};

static const loom_consumer_def_t demo_consumers[] = {
    {.name = "demo.orders",
     .description = "places and ships demo orders",
     .commands = demo_commands},
    {0},
};

static int post_order(loom_http_req_t *req, loom_http_res_t *res)
{
    json_t *body;
    loom_error_t err;
    if (loom_gateway_body_json(req, true, &body, &err) != 0)
        return loom_gateway_fail(req, res, &err);
    const char *order = json_string_value(json_object_get(body, "order"));
    if (!order || !*order) {
        loom_error_set(&err, LOOM_CODE_INVALID_ARGUMENT, "field \"order\" is required");
        return loom_gateway_fail(req, res, &err);
    }
    loom_gateway_command_t cmd = {.type = "demo.place", .key = order, .data = json_incref(body)};
    return loom_gateway_publish(req, res, &cmd);
}

static const loom_route_t demo_routes[] = {
    {"POST", "/v1/demo/orders", post_order, "demo:write"},
    {0},
};

static const loom_service_t demo_service = {
    .name = "demo",
    .description = "demo orders for the console's browser test",
    .consumers = demo_consumers,
    .routes = demo_routes,
};

int main(int argc, char **argv)
{
    static const loom_service_t *const services[] = {
        &loom_messages_service,
        &loom_registry_service,
        &demo_service,
    };
    loom_app_t app = {
        .name = "loom",
        .version = "console-test",
        .services = services,
        .n_services = LOOM_COUNT(services),
    };
    return loom_main(argc, argv, &app);
}
