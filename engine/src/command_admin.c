/*
 * command_admin.c: parking and replaying commands (loom/command_admin.h),
 * for `loom commands park|replay` and the engine's consumer engine.commands.
 */
#include "loom/command_admin.h"

#include <string.h>

static const loom_db_stmt_t stmt_park = {
    "loom_command_park",
    "UPDATE loom_commands SET status = 'parked', updated_at = now() "
    "WHERE message_id = $1 AND ($2::TEXT IS NULL OR consumer = $2) "
    "AND status = 'retrying' RETURNING consumer",
    2};

static const loom_db_stmt_t stmt_replay_take = {
    "loom_command_replay_take",
    "UPDATE loom_commands SET status = 'retrying', updated_at = now() "
    "WHERE message_id = $1 AND ($2::TEXT IS NULL OR consumer = $2) "
    "AND status IN ('parked', 'rejected') AND payload IS NOT NULL "
    "RETURNING consumer, topic, stream_id, headers::TEXT, payload, msg_key",
    2};

static const loom_db_stmt_t stmt_outbox_raw = {
    "loom_command_replay_outbox",
    "INSERT INTO loom_outbox (topic, msg_key, headers, payload) "
    "VALUES ($1, $2, $3::JSONB, $4::BYTEA)",
    4};

int loom_command_park(loom_db_t *db, const char *id, const char *consumer, PGresult **rows,
                      loom_error_t *err)
{
    const char *p[] = {id, consumer};
    return loom_db_exec(db, &stmt_park, p, rows, err);
}

int loom_command_replay_take(loom_db_t *db, const char *id, const char *consumer, PGresult **rows,
                             loom_error_t *err)
{
    const char *p[] = {id, consumer};
    return loom_db_exec(db, &stmt_replay_take, p, rows, err);
}

/* ---- the engine's consumer ------------------------------------------------------------ */

static int target(json_t *data, const char **id, const char **consumer, loom_error_t *err)
{
    json_t *jid = json_object_get(data, "id"), *jc = json_object_get(data, "consumer");
    *id = json_string_value(jid);
    *consumer = json_is_string(jc) ? json_string_value(jc) : NULL;
    if (!*id || !**id || strlen(*id) > 200)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "field \"id\" must be a command id (1 to 200 bytes)");
    if (jc && !json_is_null(jc) && (!*consumer || !**consumer || strlen(*consumer) > 200))
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "field \"consumer\" must be a consumer name (1 to 200 bytes)");
    return 0;
}

static json_t *consumers_of(PGresult *r)
{
    json_t *a = json_array();
    for (int i = 0; i < PQntuples(r); i++)
        json_array_append_new(a, json_string(PQgetvalue(r, i, 0)));
    return a;
}

static int park_command(loom_msg_t *msg, json_t *data, loom_error_t *err)
{
    const char *id, *consumer;
    int rc = target(data, &id, &consumer, err);
    if (rc != 0)
        return rc;
    PGresult *r = NULL;
    rc = loom_command_park(loom_msg_db(msg), id, consumer, &r, err);
    if (rc != 0)
        return rc;
    int n = PQntuples(r);
    json_t *parked = consumers_of(r);
    PQclear(r);
    if (n == 0) {
        json_decref(parked);
        return loom_error_set(err, LOOM_CODE_COMMAND_NOT_FOUND,
                              "no retrying command \"%s\" to park", id);
    }
    loom_msg_set_result(msg, json_pack("{s:s, s:o}", "id", id, "parked", parked));
    return 0;
}

static int replay_command(loom_msg_t *msg, json_t *data, loom_error_t *err)
{
    const char *id, *consumer;
    int rc = target(data, &id, &consumer, err);
    if (rc != 0)
        return rc;
    PGresult *r = NULL;
    rc = loom_command_replay_take(loom_msg_db(msg), id, consumer, &r, err);
    if (rc != 0)
        return rc;
    int n = PQntuples(r);
    for (int i = 0; i < n && rc == 0; i++) {
        const char *p[] = {PQgetvalue(r, i, 1), PQgetisnull(r, i, 2) ? NULL : PQgetvalue(r, i, 2),
                           PQgetvalue(r, i, 3), PQgetvalue(r, i, 4)};
        rc = loom_db_exec(loom_msg_db(msg), &stmt_outbox_raw, p, NULL, err);
    }
    json_t *replayed = consumers_of(r);
    PQclear(r);
    if (rc != 0) {
        json_decref(replayed);
        return rc;
    }
    if (n == 0) {
        json_decref(replayed);
        return loom_error_set(err, LOOM_CODE_COMMAND_NOT_FOUND,
                              "no parked or rejected command \"%s\" to replay", id);
    }
    loom_msg_set_result(msg, json_pack("{s:s, s:o}", "id", id, "replayed", replayed));
    return 0;
}

static const loom_command_t engine_commands[] = {
    {"engine.park_command", park_command, NULL},
    {"engine.replay_command", replay_command, NULL},
    {0},
};

const loom_consumer_def_t loom_engine_consumers[] = {
    {.name = "engine.commands",
     .batch_size = 10,
     .description = "parks and replays commands (POST /v1/commands/{id}/park, /replay)",
     .commands = engine_commands},
    {0},
};
