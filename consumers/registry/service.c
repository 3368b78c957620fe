/*
 * service.c: the registry service as one unit (loom/service.h): service
 * definitions, instance registrations owned by the caller's slug, their
 * health, and the nodes. Its parts:
 *   migrations/registry/          its tables
 *   ops/registry/                 registry.* ops, the model checks, error codes
 *   consumers/registry/store.c    the consumer registry.store
 *   consumers/registry/probe*.c   the health probe job
 *   api/registry.c                /v1/registry routes
 */
#include "registry.h"
#include "api.h"
#include "ops.h"

extern const loom_migration_set_t loom_migrations_registry;

static const loom_op_t *const ops[] = {
    &loom_op_registry_definitions_get, &loom_op_registry_definitions_list,
    &loom_op_registry_instances_get,   &loom_op_registry_instances_list,
    &loom_op_registry_nodes_get,       NULL,
};

static const loom_consumer_def_t consumers[] = {
    {.name = "registry.store",
     .batch_size = 100,
     .description = "applies service definitions, instance registrations (ownership by slug) "
                    "and instance health statuses",
     .commands = registry_commands},
    {0},
};

static const loom_periodic_def_t jobs[] = {
    {"registry.probe", "LOOM_REGISTRY_PROBE_INTERVAL", 15000, registry_probe_job,
     "connects to every registered instance and publishes registry.instance_status for each "
     "status that changed"},
    {0},
};

static const loom_config_var_t config_vars[] = {
    {"LOOM_REGISTRY_PROBE_INTERVAL", LOOM_CFG_DURATION, "15s", NULL, 1000, 86400LL * 1000, false,
     "how often one node probes the health of every registered service instance"},
    {"LOOM_REGISTRY_PROBE_TIMEOUT", LOOM_CFG_DURATION, "3s", NULL, 10, 60000, false,
     "how long a health probe may take to connect before the instance is unreachable"},
    {"LOOM_REGISTRY_PROBE_DEGRADED_AFTER", LOOM_CFG_DURATION, "1s", NULL, 1, 60000, false,
     "a health probe that connects slower than this marks the instance degraded"},
    {"LOOM_REGISTRY_PROBE_CONCURRENCY", LOOM_CFG_INT, "256", NULL, 1, 10000, false,
     "health probes (sockets) open at once"},
    {"LOOM_REGISTRY_PROBE_ALLOW", LOOM_CFG_STRING, REGISTRY_PROBE_ALLOW_DEFAULT, NULL, 0, 0, false,
     "CIDR blocks and host-name suffixes the health probe may connect to; others are "
     "not_probed (169.254.0.0/16 and fd00:ec2::254 never)",
     registry_probe_allow_valid},
    {0},
};

const loom_service_t loom_registry_service = {
    .name = "registry",
    .description = "service definitions, instances with health probes, nodes",
    .migrations = &loom_migrations_registry,
    .ops = ops,
    .consumers = consumers,
    .routes = api_registry_routes,
    .jobs = jobs,
    .config_vars = config_vars,
    .errors = &loom_registry_errors,
};
