/*
 * commands.c: the ledger's commands. Every command of an account travels on
 * loom.cmd.ledger keyed by the account id, so an account's commands are
 * applied in order. A transfer debits its source and sends the credit of its
 * target as a follow-up command through the outbox: it commits with the
 * debit, or not at all, and is applied on the target's partition.
 *
 *   ledger.open     {"id"}                             a new account, balance 0
 *   ledger.deposit  {"account", "amount"}              money in
 *   ledger.transfer {"id", "from", "to", "amount"}     key: "from"
 *   ledger.credit   {"transfer", "account", "amount"}  the follow-up, key: "account"
 */
#include "ledger.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const loom_db_stmt_t account_get = {
    "ledger_account_get", "SELECT balance, version FROM ledger_accounts WHERE id = $1", 1,
    .plan_once = true};
static const loom_db_stmt_t account_insert = {
    "ledger_account_insert",
    "INSERT INTO ledger_accounts (id, balance, version) VALUES ($1, 0, 1) "
    "ON CONFLICT (id) DO NOTHING RETURNING id",
    1, .plan_once = true};
static const loom_db_stmt_t account_add = {
    "ledger_account_add",
    "UPDATE ledger_accounts SET balance = balance + $2::bigint, version = version + 1 "
    "WHERE id = $1",
    2, .plan_once = true};

/* The account's balance and stream version; NOT_FOUND when there is none. */
static int read_account(loom_msg_t *msg, const char *id, long long *balance, long long *version,
                        loom_error_t *err)
{
    const char *p[] = {id};
    PGresult *r = NULL;
    int rc = loom_db_exec(loom_msg_db(msg), &account_get, p, &r, err);
    if (rc != 0)
        return rc;
    if (PQntuples(r) == 0) {
        PQclear(r);
        return loom_error_set(err, LOOM_CODE_NOT_FOUND, "no account \"%s\"", id);
    }
    *balance = atoll(PQgetvalue(r, 0, 0));
    *version = atoll(PQgetvalue(r, 0, 1));
    PQclear(r);
    return 0;
}

/* Adds amount (may be negative) to the account at `version` and appends the
 * event that says so, expecting the stream at that version: a stream that
 * moved on fails the command with VERSION_CONFLICT. */
static int change(loom_msg_t *msg, const char *id, long long version, long long amount,
                  const char *type, json_t *event, loom_error_t *err)
{
    char stream[300], num[32];
    snprintf(stream, sizeof(stream), "account-%s", id);
    int rc = loom_emit(msg, stream, version, type, event, err);
    if (rc != 0)
        return rc;
    snprintf(num, sizeof(num), "%lld", amount);
    const char *p[] = {id, num};
    return loom_db_exec(loom_msg_db(msg), &account_add, p, NULL, err);
}

static int amount_of(json_t *data, long long *amount, loom_error_t *err)
{
    json_t *a = json_object_get(data, "amount");
    if (!json_is_integer(a) || json_integer_value(a) <= 0)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "\"amount\" must be a positive integer");
    *amount = json_integer_value(a);
    return 0;
}

static int open_account(loom_msg_t *msg, json_t *data, loom_error_t *err)
{
    const char *id = json_string_value(json_object_get(data, "id"));
    if (!id || !*id)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "\"id\" is required");
    const char *p[] = {id};
    PGresult *r = NULL;
    int rc = loom_db_exec(loom_msg_db(msg), &account_insert, p, &r, err);
    if (rc != 0)
        return rc;
    int created = PQntuples(r);
    PQclear(r);
    if (!created)
        return loom_error_set(err, LOOM_CODE_ALREADY_EXISTS, "account \"%s\" exists", id);
    char stream[300];
    snprintf(stream, sizeof(stream), "account-%s", id);
    rc = loom_emit(msg, stream, 0, "ledger.opened", json_pack("{s:s}", "id", id), err);
    if (rc == 0)
        loom_msg_set_result(msg, json_pack("{s:s, s:i}", "id", id, "balance", 0));
    return rc;
}

static int deposit(loom_msg_t *msg, json_t *data, loom_error_t *err)
{
    const char *id = json_string_value(json_object_get(data, "account"));
    long long amount = 0, balance = 0, version = 0;
    if (!id)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "\"account\" is required");
    int rc = amount_of(data, &amount, err);
    if (rc == 0)
        rc = read_account(msg, id, &balance, &version, err);
    if (rc == 0)
        rc = change(msg, id, version, amount, "ledger.deposited",
                    json_pack("{s:I}", "amount", (json_int_t)amount), err);
    if (rc == 0)
        loom_msg_set_result(msg, json_pack("{s:I}", "balance", (json_int_t)(balance + amount)));
    return rc;
}

static int transfer(loom_msg_t *msg, json_t *data, loom_error_t *err)
{
    const char *id = json_string_value(json_object_get(data, "id"));
    const char *from = json_string_value(json_object_get(data, "from"));
    const char *to = json_string_value(json_object_get(data, "to"));
    long long amount = 0, balance = 0, version = 0, to_balance = 0, to_version = 0;
    if (!id || !from || !to || strcmp(from, to) == 0)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "\"id\", \"from\" and \"to\" are required, and differ");
    int rc = amount_of(data, &amount, err);
    if (rc == 0)
        rc = read_account(msg, from, &balance, &version, err);
    if (rc == 0) /* the target must exist: a credit cannot be rejected later */
        rc = read_account(msg, to, &to_balance, &to_version, err);
    if (rc != 0)
        return rc;
    if (balance < amount)
        return loom_error_setc(err, &ledger_error_codes[0], "account \"%s\" holds %lld, not %lld",
                               from, balance, amount);
    rc = change(
        msg, from, version, -amount, "ledger.debited",
        json_pack("{s:s, s:s, s:I}", "transfer", id, "to", to, "amount", (json_int_t)amount), err);
    if (rc != 0)
        return rc;
    /* The credit, sent by the outbox relay once this transaction commits. */
    char topic[LOOM_TOPIC_MAX];
    loom_topic_for_command("ledger.credit", topic, sizeof(topic));
    rc = loom_publish(msg, topic, to, "ledger.credit",
                      json_pack("{s:s, s:s, s:s, s:I}", "transfer", id, "from", from, "account", to,
                                "amount", (json_int_t)amount),
                      err);
    if (rc == 0)
        loom_msg_set_result(msg, json_pack("{s:s, s:I}", "transfer", id, "balance",
                                           (json_int_t)(balance - amount)));
    return rc;
}

static int credit(loom_msg_t *msg, json_t *data, loom_error_t *err)
{
    const char *transfer_id = json_string_value(json_object_get(data, "transfer"));
    const char *from = json_string_value(json_object_get(data, "from"));
    const char *id = json_string_value(json_object_get(data, "account"));
    long long amount = 0, balance = 0, version = 0;
    if (!transfer_id || !from || !id)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "\"transfer\", \"from\" and \"account\" are required");
    int rc = amount_of(data, &amount, err);
    if (rc == 0)
        rc = read_account(msg, id, &balance, &version, err);
    if (rc == 0)
        rc = change(msg, id, version, amount, "ledger.credited",
                    json_pack("{s:s, s:s, s:I}", "transfer", transfer_id, "from", from, "amount",
                              (json_int_t)amount),
                    err);
    return rc;
}

const loom_command_t ledger_commands[] = {
    {"ledger.open", open_account, NULL},
    {"ledger.deposit", deposit, NULL},
    {"ledger.transfer", transfer, NULL},
    {"ledger.credit", credit, NULL},
    {0},
};
