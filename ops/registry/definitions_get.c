/*
 * registry.definitions.get: one service definition by id.
 *
 *   request  {"id": "...", "owner"?: true}
 *   result   the definition; with "owner": {"definition", "slug"} where slug
 *            is the caller that put it first (null for a definition stored
 *            before definitions had owners: only an admin may change it)
 *   errors   DEFINITION_NOT_FOUND
 */
#include "../ops.h"
#include "model.h"

static const loom_db_stmt_t select_one = {
    "loom_op_registry_definitions_get",
    "SELECT definition::TEXT, slug FROM registry_definitions WHERE id = $1", 1};

static int definitions_get(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                           loom_error_t *err)
{
    (void)ctx;
    static const char *const keys[] = {"id", "owner", NULL};
    const char *id = NULL;
    int rc = loom_op_req_check_keys(req, keys, err);
    if (rc == 0)
        rc = loom_op_req_string(req, "id", true, REGISTRY_ID_MAX, &id, err);
    json_t *owner = json_object_get(req, "owner");
    if (rc == 0 && owner && !json_is_boolean(owner))
        rc = loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "owner: must be true or false");
    if (rc != 0)
        return rc;
    const char *params[] = {id};
    PGresult *r = NULL;
    if ((rc = loom_db_exec(db, &select_one, params, &r, err)) != 0)
        return rc;
    if (PQntuples(r) == 0) {
        PQclear(r);
        return loom_error_setc(err, &registry_error_codes[REGISTRY_ERR_DEFINITION_NOT_FOUND],
                               "no definition \"%s\"", id);
    }
    json_t *def = json_loads(PQgetvalue(r, 0, 0), 0, NULL);
    json_t *slug = PQgetisnull(r, 0, 1) ? json_null() : json_string(PQgetvalue(r, 0, 1));
    PQclear(r);
    if (!def) {
        json_decref(slug);
        return loom_error_set(err, LOOM_CODE_INTERNAL, "stored definition \"%s\" is not JSON", id);
    }
    if (json_is_true(owner)) {
        *res = json_pack("{s:o, s:o}", "definition", def, "slug", slug);
    } else {
        json_decref(slug);
        *res = def;
    }
    return 0;
}

const loom_op_t loom_op_registry_definitions_get = {
    .name = "registry.definitions.get",
    .fn = definitions_get,
    .timeout_ms = 5000,
    .description = "one service definition by id",
};
