/*
 * engine.commands.story: what a command caused, for the console's story page
 * (docs/console.md). From a command id, the story starts at the first
 * command of its causation chain (walking up causation_id while the cause is
 * a recorded command); from a ray id, at every command of that ray (one HTTP
 * request, or one job run). It then follows the follow-ups: the commands
 * whose causation_id is a command of the story, recorded by the consumers
 * that applied them, to 32 levels.
 *
 *   request  {"id": "..."} or {"ray_id": "..."}
 *   result   {"id", "ray_id", "truncated": false,
 *             "commands": [{"id", "type", "causation_id", "ray_id",
 *               "stream_id", "depth", "received_at", "request": {"method",
 *               "path", "route", "principal", "at"} or null (not from HTTP),
 *               "consumers": [{"consumer", "status", "attempts",
 *                 "last_error", "result", "updated_at"}],
 *               "events": [{"stream_id", "version", "type", "event_id",
 *                 "recorded_at"}]}],
 *             "outbox": [{"id", "type", "causation_id", "topic",
 *               "created_at"}]}
 *
 * commands are in the order they were received; a command's causation_id
 * names its parent in the list (or a cause outside the story). outbox holds
 * follow-ups written but not yet sent to Kafka. COMMAND_NOT_FOUND when no
 * command has that id or ray id. At most 1000 commands and 2000 events
 * ("truncated": true beyond).
 */
#include "loom/mem.h"
#include "loom/op.h"
#include "../row.h"

#include <string.h>

#define STORY_MAX_COMMANDS 1000
#define STORY_MAX_EVENTS   2000

static const loom_db_stmt_t select_root = {
    "loom_op_engine_story_root",
    "WITH RECURSIVE up(id, depth) AS ("
    " SELECT message_id, 0 FROM loom_commands WHERE message_id = $1 "
    " UNION ALL "
    " SELECT p.message_id, up.depth + 1 FROM up "
    " JOIN LATERAL (SELECT causation_id FROM loom_commands "
    "   WHERE message_id = up.id AND causation_id IS NOT NULL LIMIT 1) c ON true "
    " JOIN LATERAL (SELECT message_id FROM loom_commands "
    "   WHERE message_id = c.causation_id LIMIT 1) p ON true "
    " WHERE up.depth < 32) "
    "SELECT id FROM up ORDER BY depth DESC LIMIT 1",
    1};

static const loom_db_stmt_t select_ray_roots = {
    "loom_op_engine_story_ray",
    "SELECT DISTINCT message_id FROM loom_commands WHERE ray_id = $1 LIMIT 1001", 1};

static const loom_db_stmt_t select_tree = {
    "loom_op_engine_story_tree",
    "WITH RECURSIVE t(id, depth) AS ("
    " SELECT r, 0 FROM unnest($1::TEXT[]) AS r "
    " UNION "
    " SELECT c.message_id, t.depth + 1 FROM t JOIN loom_commands c ON c.causation_id = t.id "
    " WHERE t.depth < 32), "
    "ids AS (SELECT id, min(depth) AS depth FROM t GROUP BY id LIMIT 1001) "
    "SELECT c.message_id, c.consumer, c.type, c.status, c.attempts, c.last_error, "
    "c.result::TEXT AS result, c.stream_id, c.ray_id, c.causation_id, ids.depth, "
    "c.request::TEXT AS request, "
    "(extract(epoch FROM c.received_at) * 1000000)::BIGINT AS received_us, "
    "(extract(epoch FROM c.updated_at) * 1000000)::BIGINT AS updated_us "
    "FROM ids JOIN loom_commands c ON c.message_id = ids.id "
    "ORDER BY c.received_at, c.message_id, c.consumer",
    1};

static const loom_db_stmt_t select_events = {
    "loom_op_engine_story_events",
    "SELECT causation_id, stream_id, version, event_id, type, "
    "(extract(epoch FROM recorded_at) * 1000000)::BIGINT AS recorded_us "
    "FROM loom_events WHERE causation_id = ANY($1::TEXT[]) "
    "ORDER BY recorded_at, stream_id, version LIMIT 2001",
    1};

/* The outbox is small (the relay deletes what it sent): no index needed. */
static const loom_db_stmt_t select_outbox = {
    "loom_op_engine_story_outbox",
    "SELECT headers->>'ce_id' AS id, headers->>'ce_type' AS type, "
    "headers->>'ce_causationid' AS causation_id, topic, "
    "(extract(epoch FROM created_at) * 1000000)::BIGINT AS created_us "
    "FROM loom_outbox WHERE headers->>'ce_causationid' = ANY($1::TEXT[]) ORDER BY id LIMIT 1000",
    1};

/* A Postgres text[] literal of the keys of o: {"a","b"}, each element
 * quoted with its backslashes and double quotes escaped. */
static char *text_array(json_t *ids)
{
    size_t size = 3;
    const char *k;
    json_t *v;
    json_object_foreach(ids, k, v) size += 2 * strlen(k) + 3;
    char *s = loom_xmalloc(size), *o = s;
    *o++ = '{';
    json_object_foreach(ids, k, v)
    {
        if (o > s + 1)
            *o++ = ',';
        *o++ = '"';
        for (const char *c = k; *c; c++) {
            if (*c == '"' || *c == '\\')
                *o++ = '\\';
            *o++ = *c;
        }
        *o++ = '"';
    }
    *o++ = '}';
    *o = '\0';
    return s;
}

static int story(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                 loom_error_t *err)
{
    (void)ctx;
    static const char *const keys[] = {"id", "ray_id", NULL};
    const char *id = NULL, *ray = NULL;
    int rc = loom_op_req_check_keys(req, keys, err);
    if (rc == 0)
        rc = loom_op_req_string(req, "id", false, 200, &id, err);
    if (rc == 0)
        rc = loom_op_req_string(req, "ray_id", false, 200, &ray, err);
    if (rc != 0)
        return rc;
    if (!id == !ray)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "give one of the fields \"id\" and \"ray_id\"");

    /* The roots: the first recorded cause of id, or every command of the ray. */
    json_t *roots = json_object();
    PGresult *r = NULL;
    const char *p1[] = {id ? id : ray};
    rc = loom_db_exec(db, id ? &select_root : &select_ray_roots, p1, &r, err);
    if (rc != 0) {
        json_decref(roots);
        return rc;
    }
    for (int i = 0; i < PQntuples(r); i++)
        json_object_set_new(roots, PQgetvalue(r, i, 0), json_true());
    PQclear(r);
    if (json_object_size(roots) == 0) {
        json_decref(roots);
        return loom_error_set(err, LOOM_CODE_COMMAND_NOT_FOUND, "no command with %s \"%s\"",
                              id ? "id" : "ray id", id ? id : ray);
    }

    char *arr = text_array(roots);
    json_decref(roots);
    const char *p2[] = {arr};
    rc = loom_db_exec(db, &select_tree, p2, &r, err);
    free(arr);
    if (rc != 0)
        return rc;
    json_t *by_id = json_object(), *list = json_array();
    bool truncated = false;
    for (int i = 0; i < PQntuples(r); i++) {
        const char *mid = PQgetvalue(r, i, 0);
        json_t *c = json_object_get(by_id, mid);
        if (!c) {
            if (json_array_size(list) >= STORY_MAX_COMMANDS) {
                truncated = true;
                continue;
            }
            c = json_object();
            json_object_set_new(c, "id", row_string(r, i, "message_id"));
            json_object_set_new(c, "type", row_string(r, i, "type"));
            json_object_set_new(c, "causation_id", row_string(r, i, "causation_id"));
            json_object_set_new(c, "ray_id", row_string(r, i, "ray_id"));
            json_object_set_new(c, "stream_id", row_string(r, i, "stream_id"));
            json_object_set_new(c, "depth", row_integer(r, i, "depth"));
            json_object_set_new(c, "received_at", row_time(r, i, "received_us"));
            json_object_set_new(c, "request", json_null());
            json_object_set_new(c, "consumers", json_array());
            json_object_set_new(c, "events", json_array());
            json_object_set(by_id, mid, c);
            json_array_append_new(list, c);
        }
        if (json_is_null(json_object_get(c, "request")) && row_text(r, i, "request"))
            json_object_set_new(c, "request", row_json(r, i, "request"));
        json_t *row = json_object();
        json_object_set_new(row, "consumer", row_string(r, i, "consumer"));
        json_object_set_new(row, "status", row_string(r, i, "status"));
        json_object_set_new(row, "attempts", row_integer(r, i, "attempts"));
        json_object_set_new(row, "last_error", row_string(r, i, "last_error"));
        json_object_set_new(row, "result", row_json(r, i, "result"));
        json_object_set_new(row, "updated_at", row_time(r, i, "updated_us"));
        json_array_append_new(json_object_get(c, "consumers"), row);
    }
    PQclear(r);

    /* The events of those commands, and follow-ups still in the outbox. */
    arr = text_array(by_id);
    const char *p3[] = {arr};
    rc = loom_db_exec(db, &select_events, p3, &r, err);
    for (int i = 0; rc == 0 && i < PQntuples(r); i++) {
        if (i >= STORY_MAX_EVENTS) {
            truncated = true;
            break;
        }
        json_t *c = json_object_get(by_id, PQgetvalue(r, i, 0));
        json_t *e = json_object();
        json_object_set_new(e, "stream_id", row_string(r, i, "stream_id"));
        json_object_set_new(e, "version", row_integer(r, i, "version"));
        json_object_set_new(e, "type", row_string(r, i, "type"));
        json_object_set_new(e, "event_id", row_string(r, i, "event_id"));
        json_object_set_new(e, "recorded_at", row_time(r, i, "recorded_us"));
        json_array_append_new(json_object_get(c, "events"), e);
    }
    PQclear(r);
    r = NULL;
    json_t *outbox = json_array();
    if (rc == 0)
        rc = loom_db_exec(db, &select_outbox, p3, &r, err);
    for (int i = 0; rc == 0 && i < PQntuples(r); i++) {
        json_t *o = json_object();
        json_object_set_new(o, "id", row_string(r, i, "id"));
        json_object_set_new(o, "type", row_string(r, i, "type"));
        json_object_set_new(o, "causation_id", row_string(r, i, "causation_id"));
        json_object_set_new(o, "topic", row_string(r, i, "topic"));
        json_object_set_new(o, "created_at", row_time(r, i, "created_us"));
        json_array_append_new(outbox, o);
    }
    PQclear(r);
    free(arr);
    json_decref(by_id);
    if (rc != 0) {
        json_decref(list);
        json_decref(outbox);
        return rc;
    }
    *res = json_pack("{s:s?, s:s?, s:b, s:o, s:o}", "id", id, "ray_id", ray, "truncated", truncated,
                     "commands", list, "outbox", outbox);
    return 0;
}

const loom_op_t loom_op_engine_commands_story = {
    .name = "engine.commands.story",
    .fn = story,
    .timeout_ms = 5000,
    .description = "what a command (or a ray) caused: commands, their events and follow-ups",
};
