/*
 * registry.definitions.list: every service definition, by id.
 *
 *   request  {}
 *   result   {"definitions": [definition, ...]}   (an empty registry gives [])
 */
#include "../ops.h"
#include "model.h"

static const loom_db_stmt_t select_all = {
    "loom_op_registry_definitions_list",
    "SELECT definition::TEXT FROM registry_definitions ORDER BY id LIMIT 100000", 0};

static int definitions_list(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                            loom_error_t *err)
{
    (void)ctx;
    static const char *const keys[] = {NULL};
    int rc = loom_op_req_check_keys(req, keys, err);
    if (rc != 0)
        return rc;
    PGresult *r = NULL;
    if ((rc = loom_db_exec(db, &select_all, NULL, &r, err)) != 0)
        return rc;
    json_t *list = json_array();
    for (int i = 0; i < PQntuples(r); i++) {
        json_t *d = json_loads(PQgetvalue(r, i, 0), 0, NULL);
        if (d)
            json_array_append_new(list, d);
    }
    PQclear(r);
    *res = json_pack("{s:o}", "definitions", list);
    return 0;
}

const loom_op_t loom_op_registry_definitions_list = {
    .name = "registry.definitions.list",
    .fn = definitions_list,
    .timeout_ms = 10000,
    .description = "every service definition of the registry, by id",
};
