/*
 * engine.c: the routes every Loom gateway has, whatever its services. Built
 * into the engine library, which registers them itself (loom_engine_service).
 *
 *   POST /v1/ops/{name}     any op, body = its request      scope ops:call and the op's
 *                                                           (loom_op_scope: by default
 *                                                           "<service>:read")
 *   GET  /v1/commands/{id}  a command's status and result   any valid token
 *
 * and the console's (docs/console.md), each answered by an engine op or
 * published as an engine command:
 *
 *   GET  /v1/nodes                      engine.nodes.list          nodes:read
 *   GET  /v1/consumers                  engine.consumers.list      nodes:read
 *   GET  /v1/commands?status=&consumer=&type=&key=&ray_id=&from=&to=&limit=&cursor=
 *                                       engine.commands.list       commands:read
 *   GET  /v1/commands:counts            engine.commands.counts     commands:read
 *   GET  /v1/commands/{id}/story        engine.commands.story      commands:read
 *   GET  /v1/rays/{id}/story            engine.commands.story      commands:read
 *   POST /v1/commands/{id}/park         engine.park_command        commands:admin
 *   POST /v1/commands/{id}/replay       engine.replay_command      commands:admin
 *
 * Park and replay are writes, so they are commands like any other (the
 * gateway opens no database connection): 202 once Kafka has them, or with
 * ?wait the consumer engine.commands' answer, 400 COMMAND_REJECTED when
 * there was nothing to park or replay. Their body may name one consumer:
 * {"consumer": "messages.store"}; without it every consumer's row is taken.
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

/* A query parameter, with "" taken as absent. */
static const char *query(loom_http_req_t *req, const char *name)
{
    const char *v = loom_http_req_query(req, name);
    return v && *v ? v : NULL;
}

static int bad_query(loom_http_req_t *req, loom_http_res_t *res, json_t *op_req, const char *name)
{
    json_decref(op_req);
    loom_error_t err;
    loom_error_set(&err, LOOM_CODE_INVALID_ARGUMENT,
                   name[0] == 'l' ? "limit: must be an integer from 1 to 200"
                                  : "%s: must be UTF-8 text",
                   name);
    return loom_gateway_fail(req, res, &err);
}

static int list_commands(loom_http_req_t *req, loom_http_res_t *res)
{
    static const char *const filters[] = {"status", "consumer", "type",   "key", "ray_id",
                                          "from",   "to",       "cursor", NULL};
    json_t *op_req = json_object();
    for (const char *const *f = filters; *f; f++) {
        const char *v = query(req, *f);
        json_t *s = v ? json_string(v) : NULL;
        if (v && !s)
            return bad_query(req, res, op_req, *f);
        if (s)
            json_object_set_new(op_req, *f, s);
    }
    const char *limit = query(req, "limit");
    if (limit) {
        char *end;
        long long n = strtoll(limit, &end, 10);
        if (*end || end == limit || n < 1 || n > 200 || strlen(limit) > 9)
            return bad_query(req, res, op_req, "limit");
        json_object_set_new(op_req, "limit", json_integer(n));
    }
    return loom_gateway_op_answer(req, res, "engine.commands.list", op_req);
}

static int command_counts(loom_http_req_t *req, loom_http_res_t *res)
{
    return loom_gateway_op_answer(req, res, "engine.commands.counts", NULL);
}

static int list_nodes(loom_http_req_t *req, loom_http_res_t *res)
{
    return loom_gateway_op_answer(req, res, "engine.nodes.list", NULL);
}

static int list_consumers(loom_http_req_t *req, loom_http_res_t *res)
{
    return loom_gateway_op_answer(req, res, "engine.consumers.list", NULL);
}

static int command_story(loom_http_req_t *req, loom_http_res_t *res)
{
    return loom_gateway_op_answer(req, res, "engine.commands.story",
                                  json_pack("{s:s}", "id", loom_gateway_param(req, "id")));
}

static int ray_story(loom_http_req_t *req, loom_http_res_t *res)
{
    return loom_gateway_op_answer(req, res, "engine.commands.story",
                                  json_pack("{s:s}", "ray_id", loom_gateway_param(req, "id")));
}

/* park and replay: {"consumer"?} in, the engine command out, keyed by the
 * command id so two steers of one command are applied in order. */
static int steer(loom_http_req_t *req, loom_http_res_t *res, const char *type)
{
    json_t *body;
    loom_error_t err;
    if (loom_gateway_body_json(req, true, &body, &err) != 0)
        return loom_gateway_fail(req, res, &err);
    const char *id = loom_gateway_param(req, "id");
    json_t *consumer = json_object_get(body, "consumer");
    const char *key;
    json_t *extra;
    json_object_foreach(body, key, extra)
    {
        if (strcmp(key, "consumer") != 0) {
            loom_error_set(&err, LOOM_CODE_INVALID_ARGUMENT,
                           "unknown field \"%.100s\": the body may hold only \"consumer\"", key);
            return loom_gateway_fail(req, res, &err);
        }
    }
    if (consumer && !json_is_null(consumer) &&
        (!json_is_string(consumer) || json_string_length(consumer) == 0 ||
         json_string_length(consumer) > 200)) {
        loom_error_set(&err, LOOM_CODE_INVALID_ARGUMENT,
                       "field \"consumer\" must be a consumer name (1 to 200 bytes)");
        return loom_gateway_fail(req, res, &err);
    }
    if (!id || strlen(id) > 200) {
        loom_error_set(&err, LOOM_CODE_INVALID_ARGUMENT, "a command id has 1 to 200 bytes");
        return loom_gateway_fail(req, res, &err);
    }
    json_t *data = json_pack("{s:s}", "id", id);
    if (!data) {
        loom_error_set(&err, LOOM_CODE_INVALID_ARGUMENT, "a command id must be UTF-8 text");
        return loom_gateway_fail(req, res, &err);
    }
    if (json_is_string(consumer))
        json_object_set(data, "consumer", consumer);
    loom_gateway_command_t cmd = {.type = type, .key = id, .data = data};
    return loom_gateway_publish(req, res, &cmd);
}

static int park_command(loom_http_req_t *req, loom_http_res_t *res)
{
    return steer(req, res, "engine.park_command");
}

static int replay_command(loom_http_req_t *req, loom_http_res_t *res)
{
    return steer(req, res, "engine.replay_command");
}

extern const loom_route_t loom_engine_routes[];
const loom_route_t loom_engine_routes[] = {
    {"POST", "/v1/ops/{name}", call_op, "ops:call"},
    {"GET", "/v1/commands/{id}", get_command, NULL},
    {"GET", "/v1/nodes", list_nodes, "nodes:read"},
    {"GET", "/v1/consumers", list_consumers, "nodes:read"},
    {"GET", "/v1/commands", list_commands, "commands:read"},
    {"GET", "/v1/commands:counts", command_counts, "commands:read"},
    {"GET", "/v1/commands/{id}/story", command_story, "commands:read"},
    {"GET", "/v1/rays/{id}/story", ray_story, "commands:read"},
    {"POST", "/v1/commands/{id}/park", park_command, "commands:admin"},
    {"POST", "/v1/commands/{id}/replay", replay_command, "commands:admin"},
    {0},
};
