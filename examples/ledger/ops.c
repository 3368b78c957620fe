/* ops.c: ledger.accounts.get, an account's balance and version. */
#include "ledger.h"

#include <stdlib.h>

static const loom_db_stmt_t select_account = {
    "ledger_accounts_get", "SELECT balance, version FROM ledger_accounts WHERE id = $1", 1,
    .plan_once = true};

static int account_get(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                       loom_error_t *err)
{
    (void)ctx;
    const char *id = NULL;
    int rc = loom_op_req_string(req, "id", true, 200, &id, err);
    if (rc != 0)
        return rc;
    const char *params[] = {id};
    PGresult *r = NULL;
    rc = loom_db_exec(db, &select_account, params, &r, err);
    if (rc != 0)
        return rc;
    if (PQntuples(r) == 0) {
        PQclear(r);
        return loom_error_set(err, LOOM_CODE_NOT_FOUND, "no account \"%s\"", id);
    }
    *res = json_pack("{s:s, s:I, s:I}", "id", id, "balance", (json_int_t)atoll(PQgetvalue(r, 0, 0)),
                     "version", (json_int_t)atoll(PQgetvalue(r, 0, 1)));
    PQclear(r);
    return 0;
}

const loom_op_t ledger_account_get_op = {.name = "ledger.accounts.get",
                                         .fn = account_get,
                                         .timeout_ms = 2000,
                                         .description = "an account's balance and version"};
