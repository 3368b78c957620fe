/*
 * engine.commands.get: the status of a command by its message id.
 *
 * One message can be applied by several consumers (one loom_commands row
 * each), so the answer lists every row of that message id, by consumer; pass
 * "consumer" to get only that one. COMMAND_NOT_FOUND when there is none: the
 * message was never received, or the id is wrong.
 *
 *   request  {"id": "0191b2c4-...", "consumer": "messages"?}
 *   result   {"id": "...", "commands": [{"consumer", "type", "status",
 *             "attempts", "last_error", "result", "stream_id", "topic",
 *             "partition", "offset", "ray_id", "causation_id", "received_at",
 *             "updated_at", "headers", "data"}],
 *             "conflicts": [...]?}
 *
 * "conflicts" (only when there are some) lists the other commands that came
 * with this id but another type or data: they were not applied, and are
 * recorded with status "conflict" (docs/operations.md).
 *
 * headers (the Kafka headers: the CloudEvent's ce_* attributes) and data
 * are kept only while a command is not applied (rejected, retrying,
 * parked), so it can be replayed; for an applied command both are null.
 * data is the JSON value of the payload, or its text when it is not JSON,
 * or null when it is not UTF-8 either.
 */
#include "loom/op.h"
#include "../row.h"

static const loom_db_stmt_t select_commands = {
    "loom_op_engine_commands_get",
    "SELECT consumer, type, status, attempts, last_error, result::TEXT AS result, stream_id, "
    "topic, kafka_partition, kafka_offset, ray_id, causation_id, headers::TEXT AS headers, "
    "payload, "
    "(extract(epoch FROM received_at) * 1000000)::BIGINT AS received_us, "
    "(extract(epoch FROM updated_at) * 1000000)::BIGINT AS updated_us "
    "FROM loom_commands WHERE message_id = $1 AND ($2::TEXT IS NULL OR consumer = $2::TEXT) "
    "ORDER BY consumer LIMIT 1000",
    2};

static const loom_db_stmt_t select_conflicts = {
    "loom_op_engine_commands_get_conflicts",
    "SELECT consumer, message_id, type, status, source, last_error, topic, kafka_partition, "
    "kafka_offset, (extract(epoch FROM received_at) * 1000000)::BIGINT AS received_us "
    "FROM loom_commands WHERE conflict_of = $1 AND ($2::TEXT IS NULL OR consumer = $2::TEXT) "
    "ORDER BY received_at, message_id LIMIT 1000",
    2};

/* The payload column (bytea in its hex text form) as JSON: its value, else
 * its text, else null. */
static json_t *payload_json(const char *bytea)
{
    if (!bytea)
        return json_null();
    size_t len = 0;
    unsigned char *raw = PQunescapeBytea((const unsigned char *)bytea, &len);
    if (!raw)
        return json_null();
    json_t *v = json_loadb((const char *)raw, len, JSON_DECODE_ANY, NULL);
    if (!v)
        v = json_stringn((const char *)raw, len);
    PQfreemem(raw);
    return v ? v : json_null();
}

static int commands_get(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                        loom_error_t *err)
{
    (void)ctx;
    static const char *const keys[] = {"id", "consumer", NULL};
    const char *id = NULL, *consumer = NULL;
    int rc = loom_op_req_check_keys(req, keys, err);
    if (rc == 0)
        rc = loom_op_req_string(req, "id", true, 200, &id, err);
    if (rc == 0)
        rc = loom_op_req_string(req, "consumer", false, 200, &consumer, err);
    if (rc != 0)
        return rc;

    const char *params[] = {id, consumer};
    PGresult *r = NULL;
    rc = loom_db_exec(db, &select_commands, params, &r, err);
    if (rc != 0)
        return rc;
    int n = PQntuples(r);
    if (n == 0) {
        PQclear(r);
        if (consumer)
            return loom_error_set(err, LOOM_CODE_COMMAND_NOT_FOUND,
                                  "no command \"%s\" for consumer \"%s\"", id, consumer);
        return loom_error_set(err, LOOM_CODE_COMMAND_NOT_FOUND, "no command \"%s\"", id);
    }
    json_t *list = json_array();
    for (int i = 0; i < n; i++) {
        json_t *c = json_object();
        json_object_set_new(c, "consumer", row_string(r, i, "consumer"));
        json_object_set_new(c, "type", row_string(r, i, "type"));
        json_object_set_new(c, "status", row_string(r, i, "status"));
        json_object_set_new(c, "attempts", row_integer(r, i, "attempts"));
        json_object_set_new(c, "last_error", row_string(r, i, "last_error"));
        json_object_set_new(c, "result", row_json(r, i, "result"));
        json_object_set_new(c, "stream_id", row_string(r, i, "stream_id"));
        json_object_set_new(c, "topic", row_string(r, i, "topic"));
        json_object_set_new(c, "partition", row_integer(r, i, "kafka_partition"));
        json_object_set_new(c, "offset", row_integer(r, i, "kafka_offset"));
        json_object_set_new(c, "ray_id", row_string(r, i, "ray_id"));
        json_object_set_new(c, "causation_id", row_string(r, i, "causation_id"));
        json_object_set_new(c, "received_at", row_time(r, i, "received_us"));
        json_object_set_new(c, "updated_at", row_time(r, i, "updated_us"));
        json_object_set_new(c, "headers", row_json(r, i, "headers"));
        json_object_set_new(c, "data", payload_json(row_text(r, i, "payload")));
        json_array_append_new(list, c);
    }
    PQclear(r);
    *res = json_pack("{s:s, s:o}", "id", id, "commands", list);
    rc = loom_db_exec(db, &select_conflicts, params, &r, err);
    if (rc != 0) {
        json_decref(*res);
        *res = NULL;
        return rc;
    }
    if (PQntuples(r) > 0) {
        json_t *conflicts = json_array();
        for (int i = 0; i < PQntuples(r); i++) {
            json_t *c = json_object();
            json_object_set_new(c, "consumer", row_string(r, i, "consumer"));
            json_object_set_new(c, "message_id", row_string(r, i, "message_id"));
            json_object_set_new(c, "type", row_string(r, i, "type"));
            json_object_set_new(c, "status", row_string(r, i, "status"));
            json_object_set_new(c, "source", row_string(r, i, "source"));
            json_object_set_new(c, "last_error", row_string(r, i, "last_error"));
            json_object_set_new(c, "topic", row_string(r, i, "topic"));
            json_object_set_new(c, "partition", row_integer(r, i, "kafka_partition"));
            json_object_set_new(c, "offset", row_integer(r, i, "kafka_offset"));
            json_object_set_new(c, "received_at", row_time(r, i, "received_us"));
            json_array_append_new(conflicts, c);
        }
        json_object_set_new(*res, "conflicts", conflicts);
    }
    PQclear(r);
    return 0;
}

const loom_op_t loom_op_engine_commands_get = {
    .name = "engine.commands.get",
    .fn = commands_get,
    .timeout_ms = 5000,
    .description = "a command's status by message id: consumer, status, attempts, last error, "
                   "result",
};
