/*
 * test_app.c: `loom_test_app`, the loom command line with the test service
 * (the test consumer and its table), so tests can run real worker processes
 * (kill -9, two workers sharing partitions) exactly as `loom worker` runs.
 *
 * LOOM_TEST_LEDGER_SUFFIX=S renames the consumer to test.ledger.S reading
 * loom.cmd.test.credit.S, so tests running at once keep to their own topic
 * and consumer group.
 */
#include "loom/app.h"

#include <stdio.h>
#include <stdlib.h>

extern const loom_consumer_def_t loom_test_consumers[];
extern const loom_migration_t loom_test_ledger_migration;

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
    static const loom_service_t *const services[] = {&test_service};
    loom_app_t app = {
        .name = "loom",
        .version = "test",
        .services = services,
        .n_services = LOOM_COUNT(services),
    };
    return loom_main(argc, argv, &app);
}
