/*
 * test_app.c: `loom_test_app`, the loom command line with the test consumer
 * and its table, so tests can run real worker processes (kill -9, two
 * workers sharing partitions) exactly as `loom worker` runs.
 *
 * LOOM_TEST_LEDGER_SUFFIX=S renames the consumer to test.ledger.S reading
 * loom.cmd.test.credit.S, so tests running at once keep to their own topic
 * and consumer group.
 */
#include "loom/app.h"
#include "loom/consumer.h"

#include <stdio.h>
#include <stdlib.h>

extern const loom_consumer_def_t loom_test_consumers[];
extern const size_t loom_test_n_consumers;
loom_migration_set_t loom_test_migrations(void);

int main(int argc, char **argv)
{
    static char name[128], topic[160];
    static const char *topics[2] = {topic, NULL};
    loom_consumer_def_t def = loom_test_consumers[0];
    const char *suffix = getenv("LOOM_TEST_LEDGER_SUFFIX");
    if (suffix && *suffix) {
        snprintf(name, sizeof(name), "test.ledger.%s", suffix);
        snprintf(topic, sizeof(topic), "loom.cmd.test.credit.%s", suffix);
        def.name = name;
        def.topics = topics;
    }
    loom_app_t app = {
        .name = "loom",
        .version = "test",
        .migrations = loom_test_migrations(),
        .consumers = &def,
        .n_consumers = loom_test_n_consumers,
    };
    return loom_main(argc, argv, &app);
}
