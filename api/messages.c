/*
 * messages.c: HTTP routes of the messages service (README.md, "HTTP API").
 *
 *   POST /v1/messages:batchPut     {"msgs":[CloudEvent...]}  command messages.put_batch
 *   POST /v1/messages:batchGet     {"ids":[...]}             op messages.batch_get
 *   GET  /v1/messages/{id}                                   op messages.get
 *   POST /v1/messages:batchDelete  {"ids":[...]}             command messages.delete_batch
 *   POST /v1/messages:clean                                  command messages.clean
 *
 * Every message of a batch is checked before anything is published: the
 * first bad one answers 400 naming its index and field. A batch holds at most
 * 1000 messages (413 beyond); the gateway caps bodies at 4 MiB (413).
 */
#include "api.h"
#include "../ops/messages/model.h"

#include <string.h>

#define BATCH_MAX MESSAGES_BATCH_MAX

static int too_large(loom_http_req_t *req, loom_http_res_t *res, const char *what, size_t n)
{
    loom_error_t err;
    loom_error_set(&err, LOOM_CODE_PAYLOAD_TOO_LARGE, "%s holds %zu entries; the limit is %d", what,
                   n, BATCH_MAX);
    return loom_gateway_fail(req, res, &err);
}

/* The body as an object holding no key but `allowed` (one rule for every
 * route of the gateway: unknown keys are refused, naming the first). */
static int body_of(loom_http_req_t *req, const char *const *allowed, json_t **body,
                   loom_error_t *err)
{
    if (loom_gateway_body_json(req, true, body, err) != 0)
        return -1;
    return loom_op_req_check_keys(*body, allowed, err);
}

static int batch_put(loom_http_req_t *req, loom_http_res_t *res)
{
    json_t *body;
    loom_error_t err;
    static const char *const keys[] = {"msgs", NULL};
    if (body_of(req, keys, &body, &err) != 0)
        return loom_gateway_fail(req, res, &err);
    json_t *msgs = json_object_get(body, "msgs");
    if (!json_is_array(msgs)) {
        loom_error_set(&err, LOOM_CODE_INVALID_ARGUMENT, "\"msgs\" must be an array of messages");
        return loom_gateway_fail(req, res, &err);
    }
    if (json_array_size(msgs) > BATCH_MAX)
        return too_large(req, res, "\"msgs\"", json_array_size(msgs));
    size_t i;
    json_t *m;
    json_array_foreach(msgs, i, m)
    {
        loom_error_t cerr;
        if (loom_ce_check_json(m, NULL, &cerr) != 0) {
            loom_error_set(&err, LOOM_CODE_INVALID_ARGUMENT, "msgs[%zu].%s", i, cerr.message);
            return loom_gateway_fail(req, res, &err);
        }
    }
    const char *key = NULL;
    if (loom_gateway_partition_key(req, &key, &err) != 0)
        return loom_gateway_fail(req, res, &err);
    loom_gateway_command_t cmd = {
        .type = "messages.put_batch", .key = key, .data = json_pack("{s:O}", "msgs", msgs)};
    return loom_gateway_publish(req, res, &cmd);
}

/* {"ids":[string...]} of at most BATCH_MAX; answers the error itself. */
static json_t *ids_of(loom_http_req_t *req, loom_http_res_t *res)
{
    json_t *body;
    loom_error_t err;
    static const char *const keys[] = {"ids", NULL};
    if (body_of(req, keys, &body, &err) != 0) {
        loom_gateway_fail(req, res, &err);
        return NULL;
    }
    json_t *ids = json_object_get(body, "ids");
    if (!json_is_array(ids)) {
        loom_error_set(&err, LOOM_CODE_INVALID_ARGUMENT, "\"ids\" must be an array of ids");
        loom_gateway_fail(req, res, &err);
        return NULL;
    }
    if (json_array_size(ids) > BATCH_MAX) {
        too_large(req, res, "\"ids\"", json_array_size(ids));
        return NULL;
    }
    size_t i;
    json_t *v;
    json_array_foreach(ids, i, v)
    {
        if (!json_is_string(v) || json_string_length(v) == 0 ||
            json_string_length(v) > MESSAGES_ID_MAX) {
            loom_error_set(&err, LOOM_CODE_INVALID_ARGUMENT,
                           "ids[%zu] must be a string of 1 to %d bytes", i, MESSAGES_ID_MAX);
            loom_gateway_fail(req, res, &err);
            return NULL;
        }
    }
    return ids;
}

static int batch_get(loom_http_req_t *req, loom_http_res_t *res)
{
    json_t *ids = ids_of(req, res);
    if (!ids)
        return 0;
    return loom_gateway_op_answer(req, res, "messages.batch_get", json_pack("{s:O}", "ids", ids));
}

static int get_one(loom_http_req_t *req, loom_http_res_t *res)
{
    return loom_gateway_op_answer(req, res, "messages.get",
                                  json_pack("{s:s}", "id", loom_gateway_param(req, "id")));
}

static int batch_delete(loom_http_req_t *req, loom_http_res_t *res)
{
    loom_error_t err;
    const char *key = NULL;
    if (loom_gateway_partition_key(req, &key, &err) != 0)
        return loom_gateway_fail(req, res, &err);
    json_t *ids = ids_of(req, res);
    if (!ids)
        return 0;
    loom_gateway_command_t cmd = {
        .type = "messages.delete_batch", .key = key, .data = json_pack("{s:O}", "ids", ids)};
    return loom_gateway_publish(req, res, &cmd);
}

static int clean(loom_http_req_t *req, loom_http_res_t *res)
{
    /* The worker applies its LOOM_MESSAGES_RETENTION; the body, when there
     * is one, is an empty object. */
    json_t *body;
    loom_error_t err;
    static const char *const keys[] = {NULL};
    if (body_of(req, keys, &body, &err) != 0)
        return loom_gateway_fail(req, res, &err);
    loom_gateway_command_t cmd = {.type = "messages.clean", .data = json_object()};
    return loom_gateway_publish(req, res, &cmd);
}

const loom_route_t api_messages_routes[] = {
    {"POST", "/v1/messages:batchPut", batch_put, "messages:write",
     "{\"msgs\":[{\"id\":\"hello-1\",\"source\":\"urn:demo\",\"specversion\":\"1.0\","
     "\"type\":\"demo.greeting\",\"data\":{\"text\":\"hello\"}}]}"},
    {"POST", "/v1/messages:batchGet", batch_get, "messages:read"},
    {"GET", "/v1/messages/{id}", get_one, "messages:read", "/v1/messages/hello-1"},
    {"POST", "/v1/messages:batchDelete", batch_delete, "messages:write", "{\"ids\":[\"hello-1\"]}"},
    {"POST", "/v1/messages:clean", clean, "messages:write"},
    {0},
};
