/* consumers/notes/service.c: the notes service as one unit. */
#include "notes.h"

static const loom_migration_t migrations[] = {
    /* normally migrations/notes/9100_tutorial_notes.up.sql and .down.sql,
     * embedded by the build; written out here so the tutorial stays in one
     * folder */
    {9100, "tutorial_notes", notes_migration_sql, "DROP TABLE tutorial_notes;"},
};
static const loom_migration_set_t migration_set = {migrations, 1};

static const loom_op_t *const ops[] = {&notes_get_op, NULL};

static const loom_consumer_def_t consumers[] = {
    {.name = "notes.store", .description = "stores notes", .commands = notes_commands},
    {0},
};

const loom_service_t notes_service = {
    .name = "notes",
    .description = "short notes by id",
    .migrations = &migration_set,
    .ops = ops,
    .consumers = consumers,
    .routes = notes_routes,
};
