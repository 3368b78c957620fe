/*
 * registry.c: HTTP routes of the registry service (README.md, "HTTP API").
 *
 *   PUT    /v1/registry/definitions        {"definition":{...}}  command registry.put_definition
 *   GET    /v1/registry/definitions                              op registry.definitions.list
 *   DELETE /v1/registry/definitions/{id}                         command registry.delete_definition
 *   PUT    /v1/registry/instances          {url, deployment_id?, node_url?, tags?}
 *                                                                command registry.put_instance
 *   GET    /v1/registry/instances?slug=&deployment_id=&status=&host=&limit=&cursor=
 *                                                                op registry.instances.list
 *   DELETE /v1/registry/instances/{id}                           command registry.delete_instance
 *   GET    /v1/registry/nodes                                    op engine.nodes.list
 *   GET    /v1/registry/nodes/self                               op registry.nodes.get
 *
 * Requests are checked with the service's model (ops/registry/model.h and
 * model.c, the field tables the consumer checks its commands with too): a
 * bad field answers 400 naming it before anything is published. Instance
 * ids come from the url, so a registration's id is known here and is the
 * command's Kafka key. Writes that need an existing thing or its owner ask
 * an op first, so HTTP callers get 404 and 403 at once; the consumer decides
 * for good when it applies the command (with ?wait, a late refusal comes
 * back as 400 COMMAND_REJECTED). The caller's slug and whether it holds
 * registry:admin travel in the command. Definitions and instances alike
 * belong to the slug that put them first; only it or a registry:admin
 * caller may change or delete them.
 */
#include "registry.h"
#include "api.h"
#include "../ops/registry/model.h"

#include <stdlib.h>
#include <string.h>

static const loom_error_code_t *code(int i)
{
    return &registry_error_codes[i];
}

static bool is_admin(const loom_http_req_t *req)
{
    return loom_gateway_has_scope(req, REGISTRY_SCOPE_ADMIN);
}

/* ---- definitions ---------------------------------------------------------------------- */

/* Whether the caller may change the definition the op found (or did not:
 * DEFINITION_NOT_FOUND is fine unless must_exist); answers the error itself
 * and returns false otherwise. */
static bool may_write_definition(loom_http_req_t *req, loom_http_res_t *res, int rc, json_t *found,
                                 const loom_error_t *err, bool must_exist)
{
    bool missing = rc != 0 && err && err->code &&
                   strcmp(err->code, code(REGISTRY_ERR_DEFINITION_NOT_FOUND)->name) == 0;
    if (rc != 0 && (!missing || must_exist)) {
        loom_gateway_fail(req, res, err);
        return false;
    }
    if (rc != 0 || is_admin(req))
        return true;
    json_t *slug = json_object_get(found, "slug");
    const char *owner = json_string_value(slug);
    const char *caller = loom_gateway_caller(req);
    if (owner && strcmp(owner, caller) == 0)
        return true;
    loom_error_t e;
    loom_error_setc(&e, code(REGISTRY_ERR_DEFINITION_OWNED_BY_OTHER),
                    "definition \"%s\" belongs to \"%s\", not to \"%s\"",
                    json_string_value(json_object_get(json_object_get(found, "definition"), "id")),
                    owner ? owner : "(no owner: admins only)", caller);
    loom_gateway_fail(req, res, &e);
    return false;
}

static int put_definition_checked(loom_http_req_t *req, loom_http_res_t *res, int rc,
                                  json_t *result, const loom_error_t *err, void *arg)
{
    (void)arg;
    if (!may_write_definition(req, res, rc, result, err, false))
        return 0;
    json_t *body; /* checked before the op was asked; it lives with the request */
    loom_error_t e;
    if (loom_gateway_body_json(req, true, &body, &e) != 0)
        return loom_gateway_fail(req, res, &e);
    json_t *def = json_object_get(body, "definition");
    loom_gateway_command_t cmd = {.type = "registry.put_definition",
                                  .key = json_string_value(json_object_get(def, "id")),
                                  .data =
                                      json_pack("{s:O, s:s, s:b}", "definition", def, "caller",
                                                loom_gateway_caller(req), "admin", is_admin(req))};
    return loom_gateway_publish(req, res, &cmd);
}

static int put_definition(loom_http_req_t *req, loom_http_res_t *res)
{
    json_t *body;
    loom_error_t err;
    static const char *const keys[] = {"definition", NULL};
    if (loom_gateway_body_json(req, true, &body, &err) != 0 ||
        registry_keys(body, "body", keys, &err) != 0)
        return loom_gateway_fail(req, res, &err);
    json_t *def = json_object_get(body, "definition");
    if (!def) {
        loom_error_set(&err, LOOM_CODE_INVALID_ARGUMENT, "definition: is required");
        return loom_gateway_fail(req, res, &err);
    }
    if (registry_definition_check(def, "definition", &err) != 0)
        return loom_gateway_fail(req, res, &err);
    /* Who owns it decides whether the caller may replace it. */
    return loom_gateway_op_call(
        req, res, "registry.definitions.get",
        json_pack("{s:O, s:b}", "id", json_object_get(def, "id"), "owner", 1),
        put_definition_checked, NULL);
}

static int list_definitions(loom_http_req_t *req, loom_http_res_t *res)
{
    return loom_gateway_op_answer(req, res, "registry.definitions.list", NULL);
}

static int delete_definition_found(loom_http_req_t *req, loom_http_res_t *res, int rc,
                                   json_t *result, const loom_error_t *err, void *arg)
{
    (void)arg;
    if (!may_write_definition(req, res, rc, result, err, true))
        return 0; /* 404 DEFINITION_NOT_FOUND, 403, or why not */
    const char *id = loom_gateway_param(req, "id");
    loom_gateway_command_t cmd = {.type = "registry.delete_definition",
                                  .key = id,
                                  .data =
                                      json_pack("{s:s, s:s, s:b}", "id", id, "caller",
                                                loom_gateway_caller(req), "admin", is_admin(req))};
    return loom_gateway_publish(req, res, &cmd);
}

static int delete_definition(loom_http_req_t *req, loom_http_res_t *res)
{
    const char *id = loom_gateway_param(req, "id");
    if (!registry_slug_valid(id, REGISTRY_ID_MAX)) { /* cannot exist */
        loom_error_t err;
        loom_error_setc(&err, code(REGISTRY_ERR_DEFINITION_NOT_FOUND), "no definition \"%.64s\"",
                        id);
        return loom_gateway_fail(req, res, &err);
    }
    return loom_gateway_op_call(req, res, "registry.definitions.get",
                                json_pack("{s:s, s:b}", "id", id, "owner", 1),
                                delete_definition_found, NULL);
}

/* ---- instances ------------------------------------------------------------------------ */

/* Whether the instance the op found (or did not) may be written by the
 * caller; answers 403/other errors itself and returns false then. */
static bool may_write(loom_http_req_t *req, loom_http_res_t *res, int rc, json_t *found,
                      const loom_error_t *err, bool must_exist)
{
    bool missing = rc != 0 && err && err->code &&
                   strcmp(err->code, code(REGISTRY_ERR_INSTANCE_NOT_FOUND)->name) == 0;
    if (rc != 0 && (!missing || must_exist)) {
        loom_gateway_fail(req, res, err);
        return false;
    }
    const char *owner = rc == 0 ? json_string_value(json_object_get(found, "slug")) : NULL;
    const char *caller = loom_gateway_caller(req);
    if (owner && strcmp(owner, caller) != 0 && !is_admin(req)) {
        loom_error_t e;
        loom_error_setc(&e, code(REGISTRY_ERR_INSTANCE_OWNED_BY_OTHER),
                        "instance \"%s\" belongs to \"%s\", not to \"%s\"",
                        json_string_value(json_object_get(found, "url")), owner, caller);
        loom_gateway_fail(req, res, &e);
        return false;
    }
    return true;
}

static int put_instance_checked(loom_http_req_t *req, loom_http_res_t *res, int rc, json_t *result,
                                const loom_error_t *err, void *arg)
{
    (void)arg;
    if (!may_write(req, res, rc, result, err, false))
        return 0;
    /* The body was checked before the op was asked; it lives with the request. */
    json_t *body;
    loom_error_t e;
    registry_instance_in_t in;
    if (loom_gateway_body_json(req, true, &body, &e) != 0 ||
        registry_instance_check(body, NULL, &in, &e) != 0)
        return loom_gateway_fail(req, res, &e);
    json_t *data = json_pack("{s:s, s:s, s:s, s:b}", "id", in.id, "url", in.url, "caller",
                             loom_gateway_caller(req), "admin", is_admin(req));
    if (in.deployment_id)
        json_object_set_new(data, "deployment_id", json_string(in.deployment_id));
    if (in.node_url)
        json_object_set_new(data, "node_url", json_string(in.node_url));
    if (in.tags)
        json_object_set(data, "tags", in.tags);
    loom_gateway_command_t cmd = {.type = "registry.put_instance", .key = in.id, .data = data};
    return loom_gateway_publish(req, res, &cmd);
}

static int put_instance(loom_http_req_t *req, loom_http_res_t *res)
{
    json_t *body;
    loom_error_t err;
    registry_instance_in_t in;
    if (loom_gateway_body_json(req, true, &body, &err) != 0 ||
        registry_instance_check(body, NULL, &in, &err) != 0)
        return loom_gateway_fail(req, res, &err);
    return loom_gateway_op_call(req, res, "registry.instances.get", json_pack("{s:s}", "id", in.id),
                                put_instance_checked, NULL);
}

static int list_instances(loom_http_req_t *req, loom_http_res_t *res)
{
    static const char *const filters[] = {"slug", "deployment_id", "status",
                                          "host", "cursor",        NULL};
    loom_error_t err;
    /* Unknown parameters are refused, as unknown body keys are: a typo must
     * not silently list everything. */
    const char *qn, *qv;
    for (size_t i = 0; loom_http_req_query_at(req, i, &qn, &qv); i++) {
        bool known = strcmp(qn, "limit") == 0;
        for (const char *const *f = filters; *f && !known; f++)
            known = strcmp(qn, *f) == 0;
        if (!known) {
            loom_error_set(&err, LOOM_CODE_INVALID_ARGUMENT, "unknown query parameter \"%.64s\"",
                           qn);
            return loom_gateway_fail(req, res, &err);
        }
    }
    /* A filter given empty is refused, not dropped: "?status=" does not
     * mean "every status". (The gateway refused values that are not UTF-8.) */
    for (const char *const *f = filters; *f; f++) {
        const char *v = loom_http_req_query(req, *f);
        if (v && !*v) {
            loom_error_set(&err, LOOM_CODE_INVALID_ARGUMENT, "%s: must not be empty", *f);
            return loom_gateway_fail(req, res, &err);
        }
    }
    const char *limit = loom_http_req_query(req, "limit");
    if (limit && !*limit) {
        loom_error_set(&err, LOOM_CODE_INVALID_ARGUMENT, "limit: must not be empty");
        return loom_gateway_fail(req, res, &err);
    }
    json_t *op_req = json_object();
    for (const char *const *f = filters; *f; f++) {
        const char *v = loom_http_req_query(req, *f);
        if (v)
            json_object_set_new(op_req, *f, json_string(v));
    }
    if (limit) {
        char *end;
        long long n = strtoll(limit, &end, 10);
        if (*end || end == limit || n < 1 || strlen(limit) > 9) {
            json_decref(op_req);
            loom_error_set(&err, LOOM_CODE_INVALID_ARGUMENT,
                           "limit: must be an integer from 1 to %d", REGISTRY_LIST_LIMIT_MAX);
            return loom_gateway_fail(req, res, &err);
        }
        json_object_set_new(op_req, "limit", json_integer(n)); /* the op caps it at 500 */
    }
    /* The op shows a caller without registry:admin its own slug only. */
    return loom_gateway_op_answer(req, res, "registry.instances.list", op_req);
}

static int delete_instance_checked(loom_http_req_t *req, loom_http_res_t *res, int rc,
                                   json_t *result, const loom_error_t *err, void *arg)
{
    (void)arg;
    if (!may_write(req, res, rc, result, err, true))
        return 0;
    const char *id = loom_gateway_param(req, "id");
    loom_gateway_command_t cmd = {.type = "registry.delete_instance",
                                  .key = id,
                                  .data =
                                      json_pack("{s:s, s:s, s:b}", "id", id, "caller",
                                                loom_gateway_caller(req), "admin", is_admin(req))};
    return loom_gateway_publish(req, res, &cmd);
}

static int delete_instance(loom_http_req_t *req, loom_http_res_t *res)
{
    const char *id = loom_gateway_param(req, "id");
    if (!registry_instance_id_valid(id)) { /* cannot exist */
        loom_error_t err;
        loom_error_setc(&err, code(REGISTRY_ERR_INSTANCE_NOT_FOUND), "no instance \"%.64s\"", id);
        return loom_gateway_fail(req, res, &err);
    }
    return loom_gateway_op_call(req, res, "registry.instances.get", json_pack("{s:s}", "id", id),
                                delete_instance_checked, NULL);
}

/* ---- nodes ------------------------------------------------------------------------------ */

static int list_nodes(loom_http_req_t *req, loom_http_res_t *res)
{
    return loom_gateway_op_answer(req, res, "engine.nodes.list", NULL);
}

/* The node serving this request, from its own heartbeat row. */
static int self_node(loom_http_req_t *req, loom_http_res_t *res)
{
    return loom_gateway_op_answer(req, res, "registry.nodes.get",
                                  json_pack("{s:s}", "id", loom_gateway_node(req)));
}

const loom_route_t api_registry_routes[] = {
    {"PUT", "/v1/registry/definitions", put_definition, "registry:write"},
    {"GET", "/v1/registry/definitions", list_definitions, "registry:read"},
    {"DELETE", "/v1/registry/definitions/{id}", delete_definition, "registry:write"},
    {"PUT", "/v1/registry/instances", put_instance, "registry:write"},
    {"GET", "/v1/registry/instances", list_instances, "registry:read"},
    {"DELETE", "/v1/registry/instances/{id}", delete_instance, "registry:write"},
    {"GET", "/v1/registry/nodes", list_nodes, "registry:read"},
    {"GET", "/v1/registry/nodes/self", self_node, "registry:read"},
    {0},
};
