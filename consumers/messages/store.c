/*
 * store.c: consumer "messages.store": applies put, delete and clean commands
 * to the messages table and records what changed as events, and the
 * "messages" projection that replays those events.
 *
 * First write wins: a put of an id that exists is acknowledged and the stored
 * copy kept (INSERT ... ON CONFLICT DO NOTHING); only the events newly stored
 * go into the messages.stored event.
 */
#include "messages.h"

#include <stdlib.h>
#include <string.h>

/* ---- commands ----------------------------------------------------------------- */

static const loom_db_stmt_t stmt_put = {
    "messages_put",
    "INSERT INTO messages (id, event) SELECT * FROM unnest($1::text[], $2::text[]) "
    "ON CONFLICT (id) DO NOTHING RETURNING id, stored_at::text",
    2, .plan_once = true}; /* an INSERT from unnest(): no plan but one (loom/db.h) */

static const loom_db_stmt_t stmt_delete = {
    "messages_delete", "DELETE FROM messages WHERE id = ANY($1::text[]) RETURNING id", 1};

static const loom_db_stmt_t stmt_clean = {
    "messages_clean",
    "WITH cutoff AS (SELECT now() - $1::bigint * interval '1 millisecond' AS t), "
    "gone AS (DELETE FROM messages WHERE stored_at < (SELECT t FROM cutoff) RETURNING 1) "
    "SELECT (SELECT count(*) FROM gone), (SELECT t FROM cutoff)::text",
    1};

/* A stream of one command's event: "messages.put-<command id>". The
 * worker applies a command id once per consumer (its loom_commands row), so
 * the stream is new when its event is appended: the appends below are plain
 * (expected version -1, numbered 1 by the INSERT), which spares a query of
 * the stream's version per command that an expected version 0 costs. */
static char *stream_of(loom_msg_t *msg, const char *what)
{
    return loom_arena_sprintf(loom_msg_arena(msg), "messages.%s-%s", what, loom_msg_event(msg)->id);
}

static int put_batch(loom_msg_t *msg, json_t *d, loom_error_t *err)
{
    json_t *msgs = json_object_get(d, "msgs");
    if (!json_is_array(msgs) || json_array_size(msgs) > MESSAGES_BATCH_MAX)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "\"msgs\" must be an array of at most %d messages",
                              MESSAGES_BATCH_MAX);
    size_t n = json_array_size(msgs);
    char **texts = calloc(n + 1, sizeof(char *));
    if (!texts)
        abort();
    loom_db_array_t ids = {0}, events = {0};
    size_t i;
    json_t *m;
    int rc = 0;
    json_array_foreach(msgs, i, m)
    {
        const char *field = NULL;
        loom_error_t cerr;
        if (loom_ce_check_json(m, &field, &cerr) != 0) {
            rc = loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "msgs[%zu].%s", i, cerr.message);
            break;
        }
        texts[i] = json_dumps(m, JSON_COMPACT);
        loom_db_array_add(&ids, json_string_value(json_object_get(m, "id")));
        loom_db_array_add(&events, texts[i]);
    }
    PGresult *res = NULL;
    if (rc == 0) {
        const char *p[] = {loom_db_array_str(&ids), loom_db_array_str(&events)};
        rc = loom_db_exec(loom_msg_db(msg), &stmt_put, p, &res, err);
    }
    loom_db_array_free(&ids);
    loom_db_array_free(&events);
    int stored = rc == 0 ? PQntuples(res) : 0;
    if (stored > 0) {
        /* The event holds the exact text newly stored, so a replay stores the
         * same bytes (loom_events.data is jsonb, which would reorder keys). */
        json_t *kept = json_array();
        for (int r = 0; r < stored; r++) {
            const char *id = PQgetvalue(res, r, 0);
            json_array_foreach(msgs, i, m)
            {
                if (strcmp(json_string_value(json_object_get(m, "id")), id) == 0) {
                    json_array_append_new(kept, json_string(texts[i]));
                    break;
                }
            }
        }
        rc = loom_emit(msg, stream_of(msg, "put"), -1, "messages.stored",
                       json_pack("{s:s, s:o}", "stored_at", PQgetvalue(res, 0, 1), "msgs", kept),
                       err);
    }
    PQclear(res);
    for (i = 0; i < n; i++)
        free(texts[i]);
    free(texts);
    if (rc == 0)
        loom_msg_set_result(msg,
                            json_pack("{s:I}", "ack_count", (json_int_t)json_array_size(msgs)));
    return rc;
}

static int delete_batch(loom_msg_t *msg, json_t *d, loom_error_t *err)
{
    json_t *list = json_object_get(d, "ids");
    if (!json_is_array(list) || json_array_size(list) > MESSAGES_BATCH_MAX)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "\"ids\" must be an array of at most %d ids", MESSAGES_BATCH_MAX);
    loom_db_array_t ids = {0};
    size_t i;
    json_t *v;
    json_array_foreach(list, i, v)
    {
        if (!json_is_string(v)) {
            loom_db_array_free(&ids);
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "ids[%zu] must be a string", i);
        }
        loom_db_array_add(&ids, json_string_value(v));
    }
    const char *p[] = {loom_db_array_str(&ids)};
    PGresult *res = NULL;
    int rc = loom_db_exec(loom_msg_db(msg), &stmt_delete, p, &res, err);
    loom_db_array_free(&ids);
    if (rc != 0)
        return rc;
    int n = PQntuples(res);
    if (n > 0) {
        json_t *gone = json_array();
        for (int r = 0; r < n; r++)
            json_array_append_new(gone, json_string(PQgetvalue(res, r, 0)));
        rc = loom_emit(msg, stream_of(msg, "delete"), -1, "messages.deleted",
                       json_pack("{s:o}", "ids", gone), err);
    }
    PQclear(res);
    if (rc == 0)
        loom_msg_set_result(msg, json_pack("{s:i}", "ack_count", n));
    return rc;
}

#define MESSAGES_CLEAN_MAX_MS (100LL * 36525 * 24 * 3600 * 10) /* 100 years */

static int clean(loom_msg_t *msg, json_t *d, loom_error_t *err)
{
    /* older_than_ms, or this worker's LOOM_MESSAGES_RETENTION */
    json_t *older = json_object_get(d, "older_than_ms");
    long long older_ms;
    if (older) {
        /* now() minus more than this leaves PostgreSQL's timestamp range
         * (22008, which would fail the same way on every retry). */
        if (!json_is_integer(older) || json_integer_value(older) < 0 ||
            json_integer_value(older) > MESSAGES_CLEAN_MAX_MS)
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                                  "\"older_than_ms\" must be an integer from 0 to %lld (100 years)",
                                  (long long)MESSAGES_CLEAN_MAX_MS);
        older_ms = (long long)json_integer_value(older);
    } else {
        const loom_config_t *cfg = loom_msg_config(msg);
        const loom_config_value_t *v = cfg ? loom_config_get(cfg, "LOOM_MESSAGES_RETENTION") : NULL;
        older_ms = v && v->raw ? (long long)v->num : 168LL * 3600 * 1000;
    }
    char ms[32];
    snprintf(ms, sizeof(ms), "%lld", older_ms);
    const char *p[] = {ms};
    PGresult *res = NULL;
    int rc = loom_db_exec(loom_msg_db(msg), &stmt_clean, p, &res, err);
    if (rc != 0)
        return rc;
    long long n = atoll(PQgetvalue(res, 0, 0));
    rc = loom_emit(
        msg, stream_of(msg, "clean"), -1, "messages.cleaned",
        json_pack("{s:s, s:I}", "before", PQgetvalue(res, 0, 1), "deleted", (json_int_t)n), err);
    PQclear(res);
    if (rc == 0)
        loom_msg_set_result(msg, json_pack("{s:I}", "deleted", (json_int_t)n));
    return rc;
}

/* Every command travels on loom.cmd.messages: a put and a delete of one id
 * given the same partition key are applied in the order they were sent. */
const loom_command_t messages_commands[] = {
    {"messages.put_batch", put_batch, NULL},
    {"messages.delete_batch", delete_batch, NULL},
    {"messages.clean", clean, NULL},
    {0},
};

/* ---- the projection ------------------------------------------------------------ */

static const loom_db_stmt_t stmt_replay_put = {
    "messages_replay_put",
    "INSERT INTO messages (id, stored_at, event) "
    "SELECT u.id, $1::timestamptz, u.ev FROM unnest($2::text[], $3::text[]) AS u(id, ev) "
    "ON CONFLICT (id) DO NOTHING",
    3};

static const loom_db_stmt_t stmt_replay_clean = {
    "messages_replay_clean", "DELETE FROM messages WHERE stored_at < $1::timestamptz", 1};

int messages_projection_apply(loom_db_t *db, const loom_event_row_t *ev, loom_error_t *err)
{
    if (strcmp(ev->type, "messages.stored") == 0) {
        loom_db_array_t ids = {0}, events = {0};
        size_t i;
        json_t *m;
        json_array_foreach(json_object_get(ev->data, "msgs"), i, m)
        {
            json_t *obj = json_loads(json_string_value(m) ? json_string_value(m) : "", 0, NULL);
            const char *id = json_string_value(json_object_get(obj, "id"));
            if (id) {
                loom_db_array_add(&ids, id);
                loom_db_array_add(&events, json_string_value(m));
            }
            json_decref(obj);
        }
        const char *p[] = {json_string_value(json_object_get(ev->data, "stored_at")),
                           loom_db_array_str(&ids), loom_db_array_str(&events)};
        int rc = loom_db_exec(db, &stmt_replay_put, p, NULL, err);
        loom_db_array_free(&ids);
        loom_db_array_free(&events);
        return rc;
    }
    if (strcmp(ev->type, "messages.deleted") == 0) {
        loom_db_array_t ids = {0};
        size_t i;
        json_t *v;
        json_array_foreach(json_object_get(ev->data, "ids"), i, v)
            loom_db_array_add(&ids, json_string_value(v));
        const char *p[] = {loom_db_array_str(&ids)};
        int rc = loom_db_exec(db, &stmt_delete, p, NULL, err);
        loom_db_array_free(&ids);
        return rc;
    }
    if (strcmp(ev->type, "messages.cleaned") == 0) {
        const char *p[] = {json_string_value(json_object_get(ev->data, "before"))};
        return loom_db_exec(db, &stmt_replay_clean, p, NULL, err);
    }
    return 0; /* an event this version does not know changes nothing */
}
