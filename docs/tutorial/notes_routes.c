/* api/notes.c: POST /v1/notes (a command) and GET /v1/notes/{id} (an op). */
#include "notes.h"

static int add_note(loom_http_req_t *req, loom_http_res_t *res)
{
    json_t *body;
    loom_error_t err;
    if (loom_gateway_body_json(req, true, &body, &err) != 0)
        return loom_gateway_fail(req, res, &err);
    json_t *id = json_object_get(body, "id"), *text = json_object_get(body, "text");
    if (!json_is_string(id) || !json_is_string(text)) {
        loom_error_set(&err, LOOM_CODE_INVALID_ARGUMENT, "\"id\" and \"text\" must be strings");
        return loom_gateway_fail(req, res, &err); /* 400 before anything is published */
    }
    loom_gateway_command_t cmd = {.type = "notes.add",
                                  .key = json_string_value(id),
                                  .data = json_pack("{s:O, s:O}", "id", id, "text", text)};
    return loom_gateway_publish(req, res, &cmd); /* 202, or 200 with ?wait */
}

static int get_note(loom_http_req_t *req, loom_http_res_t *res)
{
    return loom_gateway_op_answer(req, res, "notes.get",
                                  json_pack("{s:s}", "id", loom_gateway_param(req, "id")));
}

/* method, path, handler, scope, and an example `loom dev` prints */
const loom_route_t notes_routes[] = {
    {"POST", "/v1/notes", add_note, "notes:write", "{\"id\":\"n1\",\"text\":\"hi\"}"},
    {"GET", "/v1/notes/{id}", get_note, "notes:read", "/v1/notes/n1"},
    {0},
};
