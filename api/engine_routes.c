/*
 * engine_routes.c: the routes every Loom gateway has, whatever its services.
 *
 *   POST /v1/ops/{name}     any op, body = its request      scope ops:call and the op's
 *                                                           (loom_op_scope: by default
 *                                                           "<service>:read")
 *   GET  /v1/commands/{id}  a command's status and result   any valid token
 *
 * POST /v1/ops/{name} is the RPC path of DESIGN.md section 1: the op table
 * over HTTP, so an op can move to another process without its callers
 * changing (loom_op_call_http and `loom op --url` are its clients).
 *
 * GET /v1/commands/{id} answers from the op engine.commands.get:
 *   {"command_id", "status", "attempts", "last_error", "result",
 *    "consumers": [{"consumer", "status", ...}, ...]}
 * where status is "rejected" when a consumer rejected it, else "parked" or
 * "retrying" when one is, else "applied". Any valid token may read a
 * command by id: callers poll the ids their writes returned.
 */
#include "api.h"

#include <string.h>

static int call_op(loom_http_req_t *req, loom_http_res_t *res)
{
    json_t *body;
    loom_error_t err;
    const char *name = loom_gateway_param(req, "name");
    /* ops:call lets a caller reach the op table; each op's own scope
     * (messages:read for messages.get, ...) decides whether it may call
     * that op, as the service's routes would. */
    if (loom_gateway_op_authorize(req, name, &err) != 0 ||
        loom_gateway_body_json(req, true, &body, &err) != 0)
        return loom_gateway_fail(req, res, &err);
    return loom_gateway_op_answer(req, res, name, json_incref(body));
}

static int rank(const char *status)
{
    static const char *const order[] = {"applied", "retrying", "parked", "rejected"};
    for (int i = 0; i < 4; i++)
        if (status && strcmp(status, order[i]) == 0)
            return i;
    return 1;
}

static int command_answer(loom_http_req_t *req, loom_http_res_t *res, int rc, json_t *result,
                          const loom_error_t *err, void *arg)
{
    (void)arg;
    if (rc != 0)
        return loom_gateway_fail(req, res, err);
    json_t *rows = json_object_get(result, "commands");
    const char *status = "applied";
    json_int_t attempts = 0;
    json_t *last_error = json_null(), *applied_result = json_null();
    size_t i;
    json_t *row;
    json_array_foreach(rows, i, row)
    {
        const char *st = json_string_value(json_object_get(row, "status"));
        if (rank(st) > rank(status))
            status = st;
        json_int_t a = json_integer_value(json_object_get(row, "attempts"));
        attempts = a > attempts ? a : attempts;
        json_t *le = json_object_get(row, "last_error");
        if (json_is_string(le) && json_is_null(last_error))
            last_error = le;
        if (st && strcmp(st, "applied") == 0 && json_is_null(applied_result) &&
            json_object_get(row, "result"))
            applied_result = json_object_get(row, "result");
    }
    json_t *body = json_pack("{s:O, s:s, s:I, s:O, s:O, s:O}", "command_id",
                             json_object_get(result, "id"), "status", status, "attempts", attempts,
                             "last_error", last_error, "result", applied_result, "consumers", rows);
    return loom_gateway_reply(req, res, 200, body);
}

static int get_command(loom_http_req_t *req, loom_http_res_t *res)
{
    return loom_gateway_op_call(req, res, "engine.commands.get",
                                json_pack("{s:s}", "id", loom_gateway_param(req, "id")),
                                command_answer, NULL);
}

const loom_route_t api_engine_routes[] = {
    {"POST", "/v1/ops/{name}", call_op, "ops:call"},
    {"GET", "/v1/commands/{id}", get_command, NULL},
};
const size_t api_engine_n_routes = sizeof(api_engine_routes) / sizeof(api_engine_routes[0]);
