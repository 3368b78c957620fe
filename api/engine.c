/*
 * engine.c: the routes every Loom gateway has, whatever its services. Built
 * into the engine library, which registers them itself (loom_engine_service).
 *
 *   POST /v1/ops/{name}     any op, body = its request      scope ops:call
 *   GET  /v1/commands/{id}  a command's status and result   any valid token
 *
 * POST /v1/ops/{name} is the RPC path of docs/architecture.md: the op table
 * over HTTP, so an op can move to another process without its callers
 * changing (loom_op_call_http and `loom op --url` are its clients).
 *
 * GET /v1/commands/{id} answers from the op engine.commands.get:
 *   {"command_id", "status", "attempts", "last_error", "result",
 *    "consumers": [{"consumer", "status", ...}, ...]}
 * where status is "rejected" when a consumer rejected it, else "expired",
 * "parked" or "retrying" when one is, else "applied". Any valid token may read a
 * command by id: callers poll the ids their writes returned.
 */
#include "loom/gateway.h"

#include <string.h>

static int call_op(loom_http_req_t *req, loom_http_res_t *res)
{
    json_t *body;
    loom_error_t err;
    if (loom_gateway_body_json(req, true, &body, &err) != 0)
        return loom_gateway_fail(req, res, &err);
    return loom_gateway_op_answer(req, res, loom_gateway_param(req, "name"), json_incref(body));
}

static int rank(const char *status)
{
    static const char *const order[] = {"applied", "retrying", "parked", "expired", "rejected"};
    for (int i = 0; i < 5; i++)
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

extern const loom_route_t loom_engine_routes[];
const loom_route_t loom_engine_routes[] = {
    {"POST", "/v1/ops/{name}", call_op, "ops:call"},
    {"GET", "/v1/commands/{id}", get_command, NULL},
    {0},
};
