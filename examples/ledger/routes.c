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

#include <stdio.h>

/* Publishes `type` with the request's JSON object (and the path's {id} as
 * member `key`) as its data, keyed by that member. */
static int publish(loom_http_req_t *req, loom_http_res_t *res, const char *type, const char *key)
{
    json_t *body; /* borrowed: the request owns it */
    loom_error_t err;
    if (loom_gateway_body_json(req, true, &body, &err) != 0)
        return loom_gateway_fail(req, res, &err);
    json_t *data = json_copy(body);
    const char *id = loom_gateway_param(req, "id");
    if (id) /* the account of the path */
        json_object_set_new(data, key, json_string(id));
    const char *k = json_string_value(json_object_get(data, key));
    if (!k || !*k) {
        json_decref(data);
        loom_error_set(&err, LOOM_CODE_INVALID_ARGUMENT, "\"%s\" must be a string", key);
        return loom_gateway_fail(req, res, &err); /* 400 before anything is published */
    }
    char k_copy[256]; /* the key outlives data, which publishing frees */
    snprintf(k_copy, sizeof(k_copy), "%s", k);
    loom_gateway_command_t cmd = {.type = type, .key = k_copy, .data = data}; /* data is stolen */
    return loom_gateway_publish(req, res, &cmd); /* 202, or 200 with ?wait */
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
