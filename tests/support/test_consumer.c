/*
 * test_consumer.c: the consumer and schema the messaging tests drive.
 *
 * Consumer "test.ledger" reads loom.cmd.test.credit. A command's data is
 * {"account": A, "amount": N, "fail": ..., "fail_times": K, "notify": bool}:
 *   - it appends a row to test_ledger (no unique key, so a double apply
 *     shows up as a duplicate row) and an event to stream "account-A";
 *   - "fail": "permanent" rejects it; "transient" fails the first K attempts;
 *     "blocked" fails while test_blocks holds A;
 *   - "notify": true publishes test.credited through the outbox;
 *   - "expect": N appends the event only when the stream is at version N;
 *   - "claim": NAME adds a row to test_claims (unique name) with
 *     loom_msg_add_row(): a second claim of NAME is refused by the database.
 */
#include "support.h"
#include "loom/consumer.h"
#include "loom/migrate.h"

#include <stdlib.h>
#include <string.h>

extern const loom_migration_set_t loom_app_migrations;

/* One row per command, written for the whole batch at once. */
static const loom_db_stmt_t insert_ledger = {
    "test_ledger_insert",
    "INSERT INTO test_ledger (message_id, account, amount, kafka_partition, kafka_offset) "
    "SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::int[], $5::bigint[])",
    5, .plan_once = true};
static const loom_db_stmt_t insert_claim = {
    "test_claims_insert",
    "INSERT INTO test_claims (name, message_id) SELECT * FROM unnest($1::text[], $2::text[])", 2,
    .plan_once = true};
static const loom_db_stmt_t is_blocked = {"test_blocks_get",
                                          "SELECT 1 FROM test_blocks WHERE account = $1", 1};

int loom_test_ledger_handler(loom_msg_t *msg, loom_error_t *err)
{
    json_t *d = loom_msg_json(msg, err);
    if (!d)
        return LOOM_EINVAL;
    const char *account = json_string_value(json_object_get(d, "account"));
    json_t *amount = json_object_get(d, "amount");
    if (!account || !json_is_integer(amount))
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "\"account\" (string) and \"amount\" (integer) are required");
    const char *fail = json_string_value(json_object_get(d, "fail"));
    if (fail && strcmp(fail, "permanent") == 0)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "account %s is closed", account);
    if (fail && strcmp(fail, "transient") == 0 &&
        loom_msg_attempt(msg) <= json_integer_value(json_object_get(d, "fail_times")))
        return loom_error_set(err, LOOM_CODE_BROKER_UNAVAILABLE, "ledger busy (attempt %d)",
                              loom_msg_attempt(msg));
    if (fail && strcmp(fail, "blocked") == 0) {
        const char *p[] = {account};
        PGresult *res = NULL;
        int rc = loom_db_exec(loom_msg_db(msg), &is_blocked, p, &res, err);
        if (rc != 0)
            return rc;
        int blocked = PQntuples(res);
        PQclear(res);
        if (blocked)
            return loom_error_set(err, LOOM_CODE_DB_UNAVAILABLE, "account %s is blocked", account);
    }
    char amt[32], part[16], off[32];
    snprintf(amt, sizeof(amt), "%lld", (long long)json_integer_value(amount));
    snprintf(part, sizeof(part), "%d", (int)loom_msg_partition(msg));
    snprintf(off, sizeof(off), "%lld", (long long)loom_msg_offset(msg));
    const char *p[] = {loom_msg_event(msg)->id, account, amt, part, off};
    int rc = loom_msg_add_row(msg, &insert_ledger, p, err);
    if (rc != 0)
        return rc;
    const char *claim = json_string_value(json_object_get(d, "claim"));
    if (claim) {
        const char *cp[] = {claim, loom_msg_event(msg)->id};
        rc = loom_msg_add_row(msg, &insert_claim, cp, err);
        if (rc != 0)
            return rc;
    }
    char stream[300];
    snprintf(stream, sizeof(stream), "account-%s", account);
    /* "expect": N appends only if the stream is at version N. */
    json_t *expect = json_object_get(d, "expect");
    rc = loom_emit(msg, stream, json_is_integer(expect) ? json_integer_value(expect) : -1,
                   "test.credited", json_pack("{s:s, s:O}", "account", account, "amount", amount),
                   err);
    if (rc != 0)
        return rc;
    if (json_is_true(json_object_get(d, "notify"))) {
        rc = loom_publish(msg, "loom.evt.test.credited", account, "test.credited",
                          json_pack("{s:s, s:O}", "account", account, "amount", amount), err);
        if (rc != 0)
            return rc;
    }
    loom_msg_set_result(msg, json_pack("{s:O}", "credited", amount));
    return 0;
}

static const char *const ledger_topics[] = {"loom.cmd.test.credit", NULL};

const loom_consumer_def_t loom_test_consumers[] = {
    {"test.ledger", ledger_topics, loom_test_ledger_handler, 100,
     "credits accounts in test_ledger"},
    {0},
};
const size_t loom_test_n_consumers = 1;

const loom_migration_t loom_test_ledger_migration = {
    9001, "test_ledger",
    "CREATE TABLE test_ledger (message_id TEXT NOT NULL, account TEXT NOT NULL, "
    "amount BIGINT NOT NULL, kafka_partition INT, kafka_offset BIGINT);"
    "CREATE TABLE test_blocks (account TEXT PRIMARY KEY);"
    "CREATE TABLE test_claims (name TEXT PRIMARY KEY, message_id TEXT NOT NULL);",
    "DROP TABLE test_claims; DROP TABLE test_blocks; DROP TABLE test_ledger;"};

loom_migration_set_t loom_test_migrations(void)
{
    static loom_migration_t all[64];
    size_t n = 0;
    for (size_t i = 0; i < loom_app_migrations.count && n < 63; i++)
        all[n++] = loom_app_migrations.items[i];
    all[n++] = loom_test_ledger_migration;
    return (loom_migration_set_t){all, n};
}
