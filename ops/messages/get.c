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

static int get_bind(loom_op_ctx_t *ctx, const json_t *req, loom_op_params_t *params,
                    loom_error_t *err)
{
    (void)ctx;
    static const char *const keys[] = {"id", NULL};
    int rc = loom_op_req_check_keys(req, keys, err);
    if (rc == 0)
        rc = loom_op_req_string(req, "id", true, MESSAGES_ID_MAX, &params->v[0], err);
    return rc;
}

static int get_result(loom_op_ctx_t *ctx, const json_t *req, const PGresult *rows, json_t **res,
                      loom_error_t *err)
{
    (void)ctx;
    const char *id = json_string_value(json_object_get(req, "id"));
    if (PQntuples(rows) == 0)
        return loom_error_setc(err, &loom_messages_error_codes[0], "no message \"%s\"", id);
    json_error_t jerr;
    *res = json_loadb(PQgetvalue(rows, 0, 0), (size_t)PQgetlength(rows, 0, 0), 0, &jerr);
    if (!*res)
        return loom_error_set(err, LOOM_CODE_INTERNAL, "stored message \"%s\" is not JSON: %s", id,
                              jerr.text);
    return 0;
}

/* One SELECT by primary key: a statement op, which the gateway pipelines on
 * its event loops. */
static const loom_op_stmt_t get_stmt = {&select_one, get_bind, get_result, .json_column = true};

const loom_op_t loom_op_messages_get = {
    .name = "messages.get",
    .stmt = &get_stmt,
    .timeout_ms = 5000,
    .description = "one stored message by id, as it was put",
};
