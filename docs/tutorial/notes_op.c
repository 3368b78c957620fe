/* ops/notes/get.c: one note by id. Runs in a READ ONLY transaction. */
#include "notes.h"

static const loom_db_stmt_t select_note = {"notes_get",
                                           "SELECT id, text FROM tutorial_notes WHERE id = $1", 1};

static int notes_get(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                     loom_error_t *err)
{
    (void)ctx;
    const char *id = NULL;
    int rc = loom_op_req_string(req, "id", true, 200, &id, err);
    if (rc != 0)
        return rc;
    const char *params[] = {id};
    PGresult *r = NULL;
    rc = loom_db_exec(db, &select_note, params, &r, err);
    if (rc != 0)
        return rc;
    if (PQntuples(r) == 0) {
        PQclear(r);
        return loom_error_set(err, LOOM_CODE_NOT_FOUND, "no note \"%s\"", id);
    }
    *res = json_pack("{s:s, s:s}", "id", PQgetvalue(r, 0, 0), "text", PQgetvalue(r, 0, 1));
    PQclear(r);
    return 0;
}

const loom_op_t notes_get_op = {
    .name = "notes.get", .fn = notes_get, .timeout_ms = 2000, .description = "one note by id"};
