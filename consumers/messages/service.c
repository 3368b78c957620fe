/*
 * service.c: the messages service as one unit (loom/service.h): temporary
 * storage of CloudEvents by id, with retention. Its parts:
 *   migrations/messages/        the messages table
 *   ops/messages/               messages.get, messages.batch_get, its error codes
 *   consumers/messages/store.c  the consumer messages.store and its projection
 *   consumers/messages/clean_job.c  the retention job
 *   api/messages.c              /v1/messages routes
 */
#include "messages.h"
#include "api.h"
#include "ops.h"

extern const loom_migration_set_t loom_migrations_messages;

static const loom_op_t *const ops[] = {
    &loom_op_messages_get,
    &loom_op_messages_batch_get,
    NULL,
};

static const loom_consumer_def_t consumers[] = {
    {.name = "messages.store",
     .batch_size = 50,
     .description = "stores, deletes and cleans messages (first write wins)",
     .commands = messages_commands},
    {0},
};

static const loom_periodic_def_t jobs[] = {
    {"messages.clean", "LOOM_MESSAGES_CLEAN_INTERVAL", 60000, messages_clean_job,
     "publishes messages.clean for messages older than LOOM_MESSAGES_RETENTION"},
    {0},
};

static const loom_projection_t projections[] = {
    {"messages", "messages.", "DELETE FROM messages", messages_projection_apply,
     "the messages table, from messages.stored/deleted/cleaned events"},
    {0},
};

static const loom_config_var_t config_vars[] = {
    {"LOOM_MESSAGES_RETENTION", LOOM_CFG_DURATION, "168h", NULL, 1000, 3650LL * 86400 * 1000, false,
     "how long stored messages are kept (measured from when they were stored)"},
    {"LOOM_MESSAGES_CLEAN_INTERVAL", LOOM_CFG_DURATION, "1m", NULL, 1000, 86400LL * 1000, false,
     "how often one node publishes the retention clean of the messages service"},
    {0},
};

const loom_service_t loom_messages_service = {
    .name = "messages",
    .description = "temporary storage of CloudEvents by id, with retention",
    .migrations = &loom_migrations_messages,
    .ops = ops,
    .consumers = consumers,
    .routes = api_messages_routes,
    .jobs = jobs,
    .projections = projections,
    .config_vars = config_vars,
    .errors = &loom_messages_errors,
};
