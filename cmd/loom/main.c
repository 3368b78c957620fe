/*
 * main.c: the `loom` binary. It hands the service tables to the engine and
 * nothing else; every command lives in engine/src/cli_*.c.
 */
#include "loom/app.h"
#include "consumers.h"
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
        .consumers = loom_app_consumers,
        .n_consumers = loom_app_n_consumers,
        .jobs = loom_app_jobs,
        .n_jobs = loom_app_n_jobs,
        .projections = loom_app_projections,
        .n_projections = loom_app_n_projections,
        .config_vars = loom_app_config_vars,
        .n_config_vars = loom_app_n_config_vars,
        .error_catalogues = &loom_messages_errors,
        .n_error_catalogues = 1,
    };
    return loom_main(argc, argv, &app);
}
