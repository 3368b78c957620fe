/*
 * main.c: the `loom` binary. It hands the service tables to the engine and
 * nothing else; every command lives in engine/src/cli_*.c.
 */
#include "api.h"
#include "loom/app.h"
#include "consumers.h"
#include "ops.h"

extern const loom_migration_set_t loom_app_migrations;

int main(int argc, char **argv)
{
    /* Every service's error codes (copied: a catalogue is a small struct). */
    const loom_error_catalogue_t catalogues[] = {loom_messages_errors, loom_registry_errors};
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
        .error_catalogues = catalogues,
        .n_error_catalogues = sizeof(catalogues) / sizeof(catalogues[0]),
    };
    app.routes = loom_app_routes(&app.n_routes);
    return loom_main(argc, argv, &app);
}
