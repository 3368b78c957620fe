/* consumers/notes/store.c: applies notes.add commands. */
#include "notes.h"

static const loom_db_stmt_t insert_note = {
    "notes_insert",
    "INSERT INTO tutorial_notes (id, text) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING", 2};

static int add_note(loom_msg_t *msg, json_t *data, loom_error_t *err)
{
    const char *id = json_string_value(json_object_get(data, "id"));
    const char *text = json_string_value(json_object_get(data, "text"));
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

/* The command table: type -> handler. Every notes.* command travels on
 * loom.cmd.notes, keyed by the note id, so one note's commands stay in order. */
const loom_command_t notes_commands[] = {
    {"notes.add", add_note, NULL},
    {0},
};
