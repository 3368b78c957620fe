/*
 * service.c: the engine's own service, which every Loom binary has before
 * its own services (loom/service.h): the engine's tables
 * (migrations/engine/), the ops engine.commands.get and engine.nodes.list
 * (ops/engine/), and the routes POST /v1/ops/{name} and GET
 * /v1/commands/{id} (api/engine.c). Those files are built into the engine
 * library, so a service binary needs none of them in its own tables; the
 * gateway's ?wait relies on engine.commands.get being there.
 */
#include "loom/service.h"

extern const loom_migration_set_t loom_migrations_engine;
extern const loom_op_t loom_op_engine_commands_get;
extern const loom_op_t loom_op_engine_nodes_list;
extern const loom_route_t loom_engine_routes[];

static const loom_op_t *const engine_ops[] = {
    &loom_op_engine_commands_get,
    &loom_op_engine_nodes_list,
    NULL,
};

const loom_service_t loom_engine_service = {
    .name = "engine",
    .description = "commands, nodes, and the op and command routes every gateway has",
    .migrations = &loom_migrations_engine,
    .ops = engine_ops,
    .routes = loom_engine_routes,
};
