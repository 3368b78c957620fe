/*
 * A service: everything one part of an application brings to Loom, in one
 * descriptor (docs/writing-a-service.md). A binary lists its services in
 * main.c, one line each; the engine adds its own service ("engine": its
 * tables, the ops engine.commands.get and engine.nodes.list, and the routes
 * /v1/ops/{name} and /v1/commands/{id}) before them.
 *
 *   const loom_service_t notes_service = {
 *       .name = "notes",
 *       .description = "short notes by id",
 *       .migrations = &loom_migrations_notes,
 *       .ops = notes_ops,             // {&notes_get_op, NULL}
 *       .consumers = notes_consumers, // {{.name = "notes.store", ...}, {0}}
 *       .routes = notes_routes,       // {{"POST", "/v1/notes", ...}, {0}}
 *   };
 *
 * Tables end with an empty entry (NULL for the op list), as getopt_long's
 * options do, so a table defined in one file can be named in another and the
 * count never drifts. Every table is borrowed and must live as long as the
 * process; any may be NULL.
 */
#ifndef LOOM_SERVICE_H
#define LOOM_SERVICE_H

#include "loom/config.h"
#include "loom/consumer.h"
#include "loom/error.h"
#include "loom/gateway.h"
#include "loom/migrate.h"
#include "loom/op.h"
#include "loom/periodic.h"
#include "loom/replay.h"
#include "loom/task.h"

#include <stddef.h>

/* The number of elements of an array. */
#define LOOM_COUNT(a) (sizeof(a) / sizeof((a)[0]))

typedef struct loom_service {
    const char *name;        /* "registry": its commands are "registry.*" */
    const char *description; /* one line */
    /* Schema: migration versions are unique across the whole binary. */
    const loom_migration_set_t *migrations;
    /* The read side: pointers to ops, then NULL. */
    const loom_op_t *const *ops;
    /* The write side: consumers with their command tables (the topics
     * follow from those). */
    const loom_consumer_def_t *consumers;
    /* The gateway's routes (the empty entry has method NULL). */
    const loom_route_t *routes;
    /* Jobs that publish commands on a schedule, once per cluster. */
    const loom_periodic_def_t *jobs;
    /* Read models `loom replay` rebuilds from events. */
    const loom_projection_t *projections;
    /* The service's LOOM_* variables (checked at start, in `loom config`). */
    const loom_config_var_t *config_vars;
    /* The service's own error codes (docs/errors.md lists them). */
    const loom_error_catalogue_t *errors;
    /* Headless tasks: long-running work the worker starts and stops
     * (loom/task.h; the empty entry has name NULL). */
    const loom_task_def_t *tasks;
    /* Oneshot jobs: named work run once per deployment by `loom run NAME`. */
    const loom_oneshot_def_t *oneshots;
} loom_service_t;

/* The engine's own service; loom_main() adds it first. */
extern const loom_service_t loom_engine_service;

#endif
