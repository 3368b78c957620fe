/* cmd/loom/main.c, with the notes service added to the tables. */
#include "loom/app.h"
#include "notes.h"

extern const loom_migration_set_t loom_app_migrations;
extern const loom_op_t *const loom_app_ops[]; /* ops/ops.c: engine and services */
extern const size_t loom_app_n_ops;

int main(int argc, char **argv)
{
    /* migrations: the build's, then the service's own (a file in migrations/
     * normally; embedded here so the tutorial stays in one folder) */
    static loom_migration_t migrations[64];
    size_t n = 0;
    for (size_t i = 0; i < loom_app_migrations.count && n < 63; i++)
        migrations[n++] = loom_app_migrations.items[i];
    migrations[n++] = (loom_migration_t){9100, "tutorial_notes", notes_migration_sql,
                                         "DROP TABLE tutorial_notes;"};
    static const loom_consumer_def_t consumers[] = {
        {"notes.store", notes_topics, notes_store, 100, "stores notes"}};
    /* ops: the build's (the gateway's ?wait reads engine.commands.get), then ours */
    static const loom_op_t *ops[64];
    size_t n_ops = 0;
    for (size_t i = 0; i < loom_app_n_ops && n_ops < 63; i++)
        ops[n_ops++] = loom_app_ops[i];
    ops[n_ops++] = &notes_get_op;
    loom_app_t app = {
        .name = "loom",
        .version = "tutorial",
        .migrations = {migrations, n},
        .consumers = consumers,
        .n_consumers = 1,
        .ops = ops,
        .n_ops = n_ops,
        .routes = notes_routes,
        .n_routes = 2,
    };
    return loom_main(argc, argv, &app);
}
