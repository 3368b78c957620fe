/*
 * The application handed to the engine: everything service-specific arrives
 * here as tables (migrations, configuration variables, and later ops,
 * consumers, routes and periodic jobs). cmd/loom/main.c fills one loom_app_t
 * and calls loom_main(); the engine itself knows no service.
 */
#ifndef LOOM_APP_H
#define LOOM_APP_H

#include "loom/config.h"
#include "loom/consumer.h"
#include "loom/gateway.h"
#include "loom/periodic.h"
#include "loom/replay.h"
#include "loom/migrate.h"
#include "loom/op.h"

#include <stddef.h>

typedef struct loom_app {
    const char *name;    /* program name in messages: "loom" */
    const char *version; /* "0.1.0" */
    loom_migration_set_t migrations;
    const loom_config_var_t *config_vars; /* service variables, borrowed */
    size_t n_config_vars;
    const loom_op_t *const *ops; /* the read side: pointers to ops, borrowed */
    size_t n_ops;
    const loom_error_catalogue_t *error_catalogues; /* services' error codes, borrowed */
    size_t n_error_catalogues;
    const loom_consumer_def_t *consumers; /* the write side, borrowed */
    size_t n_consumers;
    const loom_periodic_def_t *jobs; /* periodic jobs (run by worker and dev), borrowed */
    size_t n_jobs;
    const loom_projection_t *projections; /* read models `loom replay` rebuilds, borrowed */
    size_t n_projections;
    const loom_route_t *routes; /* HTTP routes of the gateway (api/), borrowed */
    size_t n_routes;
} loom_app_t;

/* Exit statuses of the loom command. */
enum {
    LOOM_EXIT_OK = 0,
    LOOM_EXIT_FAILURE = 1, /* the command ran and failed */
    LOOM_EXIT_USAGE = 2,   /* unknown command, bad flag or argument */
    LOOM_EXIT_CONFIG = 78, /* a LOOM_* variable is invalid (sysexits EX_CONFIG) */
};

/* Runs the loom command line; returns the process exit status. */
int loom_main(int argc, char **argv, const loom_app_t *app);

#endif
