/*
 * messages.get: one stored message by id, as it was put.
 *
 *   request  {"id": "..."}
 *   result   the CloudEvent (JSON event format)
 *   errors   MESSAGE_NOT_FOUND
 */
#include "../ops.h"
#include "model.h"

static const loom_db_stmt_t select_one = {"loom_op_messages_get",
                                          "SELECT event FROM messages WHERE id = $1", 1};

static int messages_get(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                        loom_error_t *err)
{
    (void)ctx;
    static const char *const keys[] = {"id", NULL};
    const char *id = NULL;
    int rc = loom_op_req_check_keys(req, keys, err);
    if (rc == 0)
        rc = loom_op_req_string(req, "id", true, MESSAGES_ID_MAX, &id, err);
    if (rc != 0)
        return rc;
    const char *params[] = {id};
    PGresult *r = NULL;
    rc = loom_db_exec(db, &select_one, params, &r, err);
    if (rc != 0)
        return rc;
    if (PQntuples(r) == 0) {
        PQclear(r);
        return loom_error_setc(err, &loom_messages_error_codes[0], "no message \"%s\"", id);
    }
    json_error_t jerr;
    *res = json_loads(PQgetvalue(r, 0, 0), 0, &jerr);
    PQclear(r);
    if (!*res)
        return loom_error_set(err, LOOM_CODE_INTERNAL, "stored message \"%s\" is not JSON: %s", id,
                              jerr.text);
    return 0;
}

const loom_op_t loom_op_messages_get = {
    .name = "messages.get",
    .fn = messages_get,
    .timeout_ms = 5000,
    .description = "one stored message by id, as it was put",
    .flags = LOOM_OP_ONE_STATEMENT, /* one SELECT: no transaction needed */
};
