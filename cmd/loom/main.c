/*
 * main.c: the `loom` binary. It hands the service tables to the engine and
 * nothing else; every command lives in engine/src/cli_*.c.
 */
#include "loom/app.h"
#include "ops.h"

extern const loom_migration_set_t loom_app_migrations;

int main(int argc, char **argv)
{
    loom_app_t app = {
        .name = "loom",
        .version = LOOM_VERSION,
        .migrations = loom_app_migrations,
        .ops = loom_app_ops,
        .n_ops = loom_app_n_ops,
    };
    return loom_main(argc, argv, &app);
}
