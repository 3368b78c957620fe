/*
 * The application handed to the engine: a name, a version and its services
 * (loom/service.h). cmd/loom/main.c lists the services, one line each, and
 * calls loom_main(); the engine itself knows no service.
 *
 *   static const loom_service_t *const services[] = {
 *       &loom_messages_service,
 *       &loom_registry_service,
 *   };
 *   loom_app_t app = {.name = "loom", .version = LOOM_VERSION,
 *                     .services = services, .n_services = LOOM_COUNT(services)};
 *   return loom_main(argc, argv, &app);
 */
#ifndef LOOM_APP_H
#define LOOM_APP_H

#include "loom/service.h"

#include <stddef.h>

typedef struct loom_app {
    const char *name;                      /* program name in messages: "loom" */
    const char *version;                   /* "0.1.0" */
    const loom_service_t *const *services; /* borrowed */
    size_t n_services;

    /* The tables of every service, the engine's first: filled by
     * loom_app_build(). */
    loom_migration_set_t migrations; /* sorted by version */
    const loom_config_var_t *config_vars;
    size_t n_config_vars;
    const loom_op_t *const *ops;
    size_t n_ops;
    const loom_error_catalogue_t *error_catalogues;
    size_t n_error_catalogues;
    const loom_consumer_def_t *consumers;
    size_t n_consumers;
    const loom_periodic_def_t *jobs;
    size_t n_jobs;
    const loom_projection_t *projections;
    size_t n_projections;
    const loom_route_t *routes;
    size_t n_routes;
    const loom_task_def_t *tasks;
    size_t n_tasks;
    const loom_oneshot_def_t *oneshots;
    size_t n_oneshots;
    void *built; /* what loom_app_build() allocated */
} loom_app_t;

/* Exit statuses of the loom command. */
enum {
    LOOM_EXIT_OK = 0,
    LOOM_EXIT_FAILURE = 1, /* the command ran and failed */
    LOOM_EXIT_USAGE = 2,   /* unknown command, bad flag or argument */
    LOOM_EXIT_CONFIG = 78, /* a LOOM_* variable is invalid (sysexits EX_CONFIG) */
};

/*
 * Fills the tables of app from the engine's service and app->services, in
 * that order, and declares the command routes of their consumers
 * (loom/topic.h). Refuses two services of one name, two migrations of one
 * version, two tasks or oneshot jobs of one name and a command routed to two
 * topics, naming them. Release with
 * loom_app_release().
 */
int loom_app_build(loom_app_t *app, loom_error_t *err);
void loom_app_release(loom_app_t *app);

/* Builds the app, then runs the loom command line; returns the process exit
 * status. */
int loom_main(int argc, char **argv, loom_app_t *app);

#endif
