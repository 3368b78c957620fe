/*
 * registry.nodes.get: one Loom process by node id, with its last heartbeat
 * and the computed "stale" flag (no heartbeat for 20 s), as
 * engine.nodes.list shows every node. GET /v1/registry/nodes/self asks it
 * for the node that serves the request.
 *
 *   request  {"id": "uuid"}
 *   result   {"id", "role", "url", "site", "version", "started_at",
 *             "last_heartbeat", "heartbeat_age_ms", "stale"}
 *   errors   NODE_NOT_FOUND
 */
#include "../ops.h"
#include "../row.h"
#include "loom/node.h"
#include "loom/uuid.h"
#include "model.h"

static const loom_db_stmt_t select_node = {
    "loom_op_registry_nodes_get",
    "SELECT id::TEXT AS id, role, url, site, version, "
    "(extract(epoch FROM started_at) * 1000000)::BIGINT AS started_us, "
    "(extract(epoch FROM last_heartbeat) * 1000000)::BIGINT AS heartbeat_us, "
    "greatest(0, (extract(epoch FROM (now() - last_heartbeat)) * 1000)::BIGINT) AS age_ms "
    "FROM loom_nodes WHERE id = $1::UUID",
    1};

static int nodes_get(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                     loom_error_t *err)
{
    (void)ctx;
    static const char *const keys[] = {"id", NULL};
    const char *id = NULL;
    int rc = loom_op_req_check_keys(req, keys, err);
    if (rc == 0)
        rc = loom_op_req_string(req, "id", true, 36, &id, err);
    if (rc != 0)
        return rc;
    if (!loom_uuid_is_valid(id))
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "id: must be a UUID");
    const char *params[] = {id};
    PGresult *r = NULL;
    if ((rc = loom_db_exec(db, &select_node, params, &r, err)) != 0)
        return rc;
    if (PQntuples(r) == 0) {
        PQclear(r);
        return loom_error_setc(err, &registry_error_codes[REGISTRY_ERR_NODE_NOT_FOUND],
                               "no node \"%s\"", id);
    }
    const char *age_text = row_text(r, 0, "age_ms");
    long long age = age_text ? strtoll(age_text, NULL, 10) : 0;
    json_t *n = json_object();
    json_object_set_new(n, "id", row_string(r, 0, "id"));
    json_object_set_new(n, "role", row_string(r, 0, "role"));
    json_object_set_new(n, "url", row_string(r, 0, "url"));
    json_object_set_new(n, "site", row_string(r, 0, "site"));
    json_object_set_new(n, "version", row_string(r, 0, "version"));
    json_object_set_new(n, "started_at", row_time(r, 0, "started_us"));
    json_object_set_new(n, "last_heartbeat", row_time(r, 0, "heartbeat_us"));
    json_object_set_new(n, "heartbeat_age_ms", json_integer(age));
    json_object_set_new(n, "stale", json_boolean(age > LOOM_NODE_STALE_MS));
    PQclear(r);
    *res = n;
    return 0;
}

const loom_op_t loom_op_registry_nodes_get = {
    .name = "registry.nodes.get",
    .fn = nodes_get,
    .timeout_ms = 5000,
    .description = "one Loom node by id, with its last heartbeat and stale flag",
};
