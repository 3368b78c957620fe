/*
 * routes.c: the ledger over HTTP. Routes check the request, then publish a
 * command or call an op; they never touch the database.
 *
 *   POST /v1/ledger/accounts                {"id"}                          ledger.open
 *   POST /v1/ledger/accounts/{id}/deposits  {"amount"}                      ledger.deposit
 *   POST /v1/ledger/transfers               {"id", "from", "to", "amount"}  ledger.transfer
 *   GET  /v1/ledger/accounts/{id}                                           ledger.accounts.get
 */
#include "ledger.h"

/* Publishes `type` with the request's JSON object as its data, keyed by the
 * string member `key` of the body (or the path's {id}). */
static int publish(loom_http_req_t *req, loom_http_res_t *res, const char *type, const char *key)
{
    json_t *body;
    loom_error_t err;
    if (loom_gateway_body_json(req, true, &body, &err) != 0)
        return loom_gateway_fail(req, res, &err);
    const char *id = loom_gateway_param(req, "id");
    if (id) /* the account of the path */
        json_object_set_new(body, key, json_string(id));
    const char *k = json_string_value(json_object_get(body, key));
    if (!k || !*k) {
        json_decref(body);
        loom_error_set(&err, LOOM_CODE_INVALID_ARGUMENT, "\"%s\" must be a string", key);
        return loom_gateway_fail(req, res, &err); /* 400 before anything is published */
    }
    loom_gateway_command_t cmd = {.type = type, .key = k, .data = json_incref(body)};
    int rc = loom_gateway_publish(req, res, &cmd); /* 202, or 200 with ?wait */
    json_decref(body);
    return rc;
}

static int open_account(loom_http_req_t *req, loom_http_res_t *res)
{
    return publish(req, res, "ledger.open", "id");
}

static int deposit(loom_http_req_t *req, loom_http_res_t *res)
{
    return publish(req, res, "ledger.deposit", "account");
}

static int transfer(loom_http_req_t *req, loom_http_res_t *res)
{
    return publish(req, res, "ledger.transfer", "from"); /* in order with the source's commands */
}

static int get_account(loom_http_req_t *req, loom_http_res_t *res)
{
    return loom_gateway_op_answer(req, res, "ledger.accounts.get",
                                  json_pack("{s:s}", "id", loom_gateway_param(req, "id")));
}

/* method, path, handler, scope, and an example `ledger dev` prints */
const loom_route_t ledger_routes[] = {
    {"POST", "/v1/ledger/accounts", open_account, "ledger:write", "{\"id\":\"alice\"}"},
    {"POST", "/v1/ledger/accounts/{id}/deposits", deposit, "ledger:write", "{\"amount\":100}"},
    {"POST", "/v1/ledger/transfers", transfer, "ledger:write",
     "{\"id\":\"t1\",\"from\":\"alice\",\"to\":\"bob\",\"amount\":30}"},
    {"GET", "/v1/ledger/accounts/{id}", get_account, "ledger:read", "/v1/ledger/accounts/alice"},
    {0},
};
