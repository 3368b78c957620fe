/*
 * engine.nodes.list: every Loom process that ever sent a heartbeat, with a
 * computed "stale" flag: a node is stale when its last heartbeat is older
 * than 20 s (nodes beat every 5 s). The age is computed
 * by the database, against the same clock that stamped the heartbeats.
 *
 *   request  {"role": "worker"?, "stale": false?}
 *   result   {"stale_after_ms": 20000, "nodes": [{"id", "role", "url",
 *             "site", "version", "started_at", "last_heartbeat",
 *             "heartbeat_age_ms", "stale"}]}
 */
#include "loom/op.h"
#include "../row.h"

#include <string.h>

#define STALE_AFTER_MS 20000

static const loom_db_stmt_t select_nodes = {
    "loom_op_engine_nodes_list",
    "SELECT id::TEXT AS id, role, url, site, version, "
    "(extract(epoch FROM started_at) * 1000000)::BIGINT AS started_us, "
    "(extract(epoch FROM last_heartbeat) * 1000000)::BIGINT AS heartbeat_us, "
    "greatest(0, (extract(epoch FROM (now() - last_heartbeat)) * 1000)::BIGINT) AS age_ms "
    "FROM loom_nodes WHERE ($1::TEXT IS NULL OR role = $1::TEXT) "
    "ORDER BY role, id LIMIT 10000",
    1};

static int nodes_list(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                      loom_error_t *err)
{
    (void)ctx;
    static const char *const keys[] = {"role", "stale", NULL};
    const char *role = NULL;
    int rc = loom_op_req_check_keys(req, keys, err);
    if (rc == 0)
        rc = loom_op_req_string(req, "role", false, 63, &role, err);
    if (rc != 0)
        return rc;
    json_t *stale_filter = json_object_get(req, "stale");
    if (stale_filter && !json_is_boolean(stale_filter) && !json_is_null(stale_filter))
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "field \"stale\" must be true or false");

    const char *params[] = {role};
    PGresult *r = NULL;
    rc = loom_db_exec(db, &select_nodes, params, &r, err);
    if (rc != 0)
        return rc;
    json_t *list = json_array();
    for (int i = 0; i < PQntuples(r); i++) {
        const char *age_text = row_text(r, i, "age_ms");
        long long age = age_text ? strtoll(age_text, NULL, 10) : 0;
        bool stale = age > STALE_AFTER_MS;
        if (json_is_boolean(stale_filter) && json_is_true(stale_filter) != stale)
            continue;
        json_t *n = json_object();
        json_object_set_new(n, "id", row_string(r, i, "id"));
        json_object_set_new(n, "role", row_string(r, i, "role"));
        json_object_set_new(n, "url", row_string(r, i, "url"));
        json_object_set_new(n, "site", row_string(r, i, "site"));
        json_object_set_new(n, "version", row_string(r, i, "version"));
        json_object_set_new(n, "started_at", row_time(r, i, "started_us"));
        json_object_set_new(n, "last_heartbeat", row_time(r, i, "heartbeat_us"));
        json_object_set_new(n, "heartbeat_age_ms", json_integer(age));
        json_object_set_new(n, "stale", json_boolean(stale));
        json_array_append_new(list, n);
    }
    PQclear(r);
    *res = json_pack("{s:I, s:o}", "stale_after_ms", (json_int_t)STALE_AFTER_MS, "nodes", list);
    return 0;
}

const loom_op_t loom_op_engine_nodes_list = {
    .name = "engine.nodes.list",
    .fn = nodes_list,
    .timeout_ms = 5000,
    .description = "Loom processes with their last heartbeat; stale when older than 20 s",
};
