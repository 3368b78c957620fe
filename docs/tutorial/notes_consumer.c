/* consumers/notes/store.c: applies notes.add commands. */
#include "notes.h"

static const loom_db_stmt_t insert_note = {
    "notes_insert",
    "INSERT INTO tutorial_notes (id, text) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING", 2};

int notes_store(loom_msg_t *msg, loom_error_t *err)
{
    json_t *d = loom_msg_json(msg, err);
    if (!d)
        return LOOM_EINVAL;
    const char *id = json_string_value(json_object_get(d, "id"));
    const char *text = json_string_value(json_object_get(d, "text"));
    if (!id || !text) /* a 4xx class: the command is rejected, never retried */
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "\"id\" and \"text\" are required");
    const char *params[] = {id, text};
    int rc = loom_db_exec(loom_msg_db(msg), &insert_note, params, NULL, err);
    if (rc != 0)
        return rc; /* a database error is transient: retried with backoff */
    char stream[300];
    snprintf(stream, sizeof(stream), "note-%s", id);
    rc = loom_emit(msg, stream, -1, "notes.added", json_pack("{s:s, s:s}", "id", id, "text", text),
                   err);
    if (rc == 0)
        loom_msg_set_result(msg, json_pack("{s:s}", "id", id));
    return rc;
}

const char *const notes_topics[] = {"loom.cmd.notes.add", NULL};
