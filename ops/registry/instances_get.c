/*
 * registry.instances.get: one instance by id or by url. The gateway calls it
 * before publishing a registration or a delete, to answer 404 and 403 at
 * once (the consumer checks again when it applies the command).
 *
 *   request  {"id": "inst-..."} or {"url": "http://host:port/..."}
 *   result   the instance; for a caller who neither owns it nor holds
 *            registry:admin only {"id", "url", "slug"}
 *   errors   INSTANCE_NOT_FOUND
 */
#include "../ops.h"
#include "access.h"

#include <string.h>

static const loom_db_stmt_t select_one = {
    "loom_op_registry_instances_get",
    "SELECT " REGISTRY_INSTANCE_COLUMNS " FROM registry_instances WHERE id = $1", 1};

static int instances_get(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                         loom_error_t *err)
{
    static const char *const keys[] = {"id", "url", NULL};
    const char *id = NULL, *url = NULL;
    int rc = loom_op_req_check_keys(req, keys, err);
    if (rc == 0)
        rc = loom_op_req_string(req, "id", false, REGISTRY_INSTANCE_ID_LEN, &id, err);
    if (rc == 0)
        rc = loom_op_req_string(req, "url", false, REGISTRY_URL_MAX, &url, err);
    if (rc != 0)
        return rc;
    if ((id != NULL) == (url != NULL))
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "give exactly one of \"id\" and \"url\"");
    char derived[REGISTRY_INSTANCE_ID_LEN + 1];
    if (url) {
        registry_instance_id(url, derived);
        id = derived;
    }
    const char *params[] = {id};
    PGresult *r = NULL;
    if ((rc = loom_db_exec(db, &select_one, params, &r, err)) != 0)
        return rc;
    if (PQntuples(r) == 0) {
        PQclear(r);
        if (url)
            return loom_error_setc(err, &registry_error_codes[REGISTRY_ERR_INSTANCE_NOT_FOUND],
                                   "no instance with url \"%s\"", url);
        return loom_error_setc(err, &registry_error_codes[REGISTRY_ERR_INSTANCE_NOT_FOUND],
                               "no instance \"%s\"", id);
    }
    json_t *inst = registry_instance_json(r, 0);
    PQclear(r);
    const char *slug = json_string_value(json_object_get(inst, "slug"));
    if (!registry_ctx_admin(ctx) && (!ctx->caller || strcmp(ctx->caller, slug) != 0)) {
        json_t *brief =
            json_pack("{s:O, s:O, s:O}", "id", json_object_get(inst, "id"), "url",
                      json_object_get(inst, "url"), "slug", json_object_get(inst, "slug"));
        json_decref(inst);
        inst = brief;
    }
    *res = inst;
    return 0;
}

const loom_op_t loom_op_registry_instances_get = {
    .name = "registry.instances.get",
    .fn = instances_get,
    .timeout_ms = 5000,
    .description = "one service instance by id or url",
};
