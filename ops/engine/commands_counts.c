/*
 * engine.commands.counts: how many commands need a person: retrying
 * (stuck: their partition waits), parked and rejected, for the console's
 * overview. Counted from the partial index of the commands that are not
 * applied (loom_commands_open), so the million applied rows cost nothing;
 * each count stops at 100,000 ("capped": true).
 *
 *   request  {}
 *   result   {"retrying": N, "parked": N, "rejected": N, "capped": false}
 */
#include "loom/op.h"
#include "../row.h"

#include <string.h>

#define COUNT_CAP 100000

static const loom_db_stmt_t select_counts = {
    "loom_op_engine_commands_counts",
    "SELECT 'retrying', (SELECT count(*) FROM (SELECT 1 FROM loom_commands "
    "WHERE status = 'retrying' LIMIT 100001) x) UNION ALL "
    "SELECT 'parked', (SELECT count(*) FROM (SELECT 1 FROM loom_commands "
    "WHERE status = 'parked' LIMIT 100001) x) UNION ALL "
    "SELECT 'rejected', (SELECT count(*) FROM (SELECT 1 FROM loom_commands "
    "WHERE status = 'rejected' LIMIT 100001) x)",
    0};

static int commands_counts(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                           loom_error_t *err)
{
    (void)ctx;
    static const char *const keys[] = {NULL};
    int rc = loom_op_req_check_keys(req, keys, err);
    if (rc != 0)
        return rc;
    PGresult *r = NULL;
    rc = loom_db_exec(db, &select_counts, NULL, &r, err);
    if (rc != 0)
        return rc;
    json_t *out = json_object();
    bool capped = false;
    for (int i = 0; i < PQntuples(r); i++) {
        long long n = strtoll(PQgetvalue(r, i, 1), NULL, 10);
        if (n > COUNT_CAP) {
            n = COUNT_CAP;
            capped = true;
        }
        json_object_set_new(out, PQgetvalue(r, i, 0), json_integer(n));
    }
    PQclear(r);
    json_object_set_new(out, "capped", json_boolean(capped));
    *res = out;
    return 0;
}

const loom_op_t loom_op_engine_commands_counts = {
    .name = "engine.commands.counts",
    .fn = commands_counts,
    .timeout_ms = 5000,
    .description = "how many commands are retrying, parked and rejected",
};
