/*
 * test_app.c: `loom_test_app`, the loom command line with the test service
 * (the test consumer and its table), so tests can run real worker processes
 * (kill -9, two workers sharing partitions) exactly as `loom worker` runs.
 *
 * LOOM_TEST_LEDGER_SUFFIX=S renames the consumer to test.ledger.S reading
 * loom.cmd.test.credit.S, so tests running at once keep to their own topic
 * and consumer group.
 *
 * LOOM_TEST_TASKS=1 adds the service kinds of loom/task.h: the headless
 * singleton task "test.ticker" (counts rounds in test_claims row "ticks-<node
 * id>") and the oneshot job "test.seed" (adds the test_claims row "seeded";
 * fails while test_blocks holds the account "seed").
 */
#include "loom/app.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern const loom_consumer_def_t loom_test_consumers[];
extern const loom_migration_t loom_test_ledger_migration;

static int sql(loom_db_pool_t *pool, const char *text, const char *param, PGresult **res,
               loom_error_t *err)
{
    loom_db_t *db = NULL;
    int rc = loom_db_acquire(pool, &db, err);
    if (rc != 0)
        return rc;
    const char *p[] = {param};
    rc = loom_db_query(db, text, param ? 1 : 0, param ? p : NULL, res, err);
    loom_db_release(db);
    return rc;
}

static int ticker(loom_task_ctx_t *ctx, loom_error_t *err)
{
    char name[80];
    snprintf(name, sizeof(name), "ticks-%s", loom_task_config(ctx)->node_id);
    while (!loom_task_sleep(ctx, 100)) {
        int rc = sql(loom_task_pool(ctx),
                     "INSERT INTO test_claims (name, message_id) VALUES ($1, '1') ON CONFLICT "
                     "(name) DO UPDATE SET message_id = (test_claims.message_id::int + 1)::text",
                     name, NULL, err);
        if (rc != 0)
            return rc;
    }
    return 0;
}

static int seed(loom_task_ctx_t *ctx, loom_error_t *err)
{
    PGresult *res = NULL;
    int rc =
        sql(loom_task_pool(ctx), "SELECT 1 FROM test_blocks WHERE account = $1", "seed", &res, err);
    if (rc != 0)
        return rc;
    int blocked = PQntuples(res);
    PQclear(res);
    if (blocked)
        return loom_error_set(err, LOOM_CODE_DB_UNAVAILABLE, "seeding is blocked");
    return sql(loom_task_pool(ctx),
               "INSERT INTO test_claims (name, message_id) VALUES ('seeded', '1') ON CONFLICT "
               "(name) DO UPDATE SET message_id = (test_claims.message_id::int + 1)::text",
               NULL, NULL, err);
}

static const loom_task_def_t test_tasks[] = {
    {.name = "test.ticker", .run = ticker, .singleton = true, .description = "counts rounds"},
    {0},
};
static const loom_oneshot_def_t test_oneshots[] = {
    {.name = "test.seed", .run = seed, .description = "adds the row \"seeded\""},
    {0},
};

int main(int argc, char **argv)
{
    static char name[128], topic[160];
    static const char *topics[2] = {topic, NULL};
    static loom_consumer_def_t consumers[2];
    consumers[0] = loom_test_consumers[0];
    const char *suffix = getenv("LOOM_TEST_LEDGER_SUFFIX");
    if (suffix && *suffix) {
        snprintf(name, sizeof(name), "test.ledger.%s", suffix);
        snprintf(topic, sizeof(topic), "loom.cmd.test.credit.%s", suffix);
        consumers[0].name = name;
        consumers[0].topics = topics;
    }
    static const loom_migration_set_t migrations = {&loom_test_ledger_migration, 1};
    static loom_service_t test_service = {
        .name = "test",
        .description = "the test ledger",
        .migrations = &migrations,
        .consumers = consumers,
    };
    const char *tasks = getenv("LOOM_TEST_TASKS");
    if (tasks && strcmp(tasks, "1") == 0) {
        test_service.tasks = test_tasks;
        test_service.oneshots = test_oneshots;
    }
    static const loom_service_t *const services[] = {&test_service};
    loom_app_t app = {
        .name = "loom",
        .version = "test",
        .services = services,
        .n_services = LOOM_COUNT(services),
    };
    return loom_main(argc, argv, &app);
}
