/*
 * service.c: the engine's own service, which every Loom binary has before
 * its own services (loom/service.h): the engine's tables
 * (migrations/engine/), the ops engine.commands.get/list/counts/story and
 * engine.nodes.list and engine.consumers.list (ops/engine/), the consumer engine.commands that
 * parks and replays commands (command_admin.c), and the routes of api/engine.c (the op and command
 * routes, and the console's). Those files are built into the engine library, so a service binary
 * needs none of them in its own tables; the gateway's ?wait relies on engine.commands.get being
 * there.
 */
#include "loom/command_admin.h"
#include "loom/service.h"

extern const loom_migration_set_t loom_migrations_engine;
extern const loom_op_t loom_op_engine_commands_get;
extern const loom_op_t loom_op_engine_commands_list;
extern const loom_op_t loom_op_engine_commands_counts;
extern const loom_op_t loom_op_engine_commands_story;
extern const loom_op_t loom_op_engine_nodes_list;
extern const loom_op_t loom_op_engine_consumers_list;
extern const loom_route_t loom_engine_routes[];

static const loom_op_t *const engine_ops[] = {
    &loom_op_engine_commands_get,
    &loom_op_engine_commands_list,
    &loom_op_engine_commands_counts,
    &loom_op_engine_commands_story,
    &loom_op_engine_nodes_list,
    &loom_op_engine_consumers_list,
    NULL,
};

const loom_service_t loom_engine_service = {
    .name = "engine",
    .description = "commands, nodes, the op and command routes and the console every gateway has",
    .migrations = &loom_migrations_engine,
    .ops = engine_ops,
    .consumers = loom_engine_consumers,
    .routes = loom_engine_routes,
};
