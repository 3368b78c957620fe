/*
 * services.h: the application of cmd/loom/main.c for tests (services.c,
 * library loom_test_services).
 */
#ifndef LOOM_TEST_SERVICES_H
#define LOOM_TEST_SERVICES_H

#include "loom/app.h"

/* The engine's service, then messages and registry, built (never NULL). */
const loom_app_t *loom_test_full_app(void);
/* A consumer of that app by name; NULL when there is none. */
const loom_consumer_def_t *loom_test_app_consumer(const char *name);

#include "loom/topic.h"

#define LOOM_TEST_APP_SUB_TOPICS 6

/* A consumer of that app on topics of the test's own: a fresh topic prefix
 * (loom_test_topic_prefix) set for the process (loom_topic_prefix_set), the
 * consumer's topics under it created on brokers with `partitions` partitions
 * each, and group, "<prefix>.", a group prefix for the worker
 * (loom_worker_opts_t.group_prefix) that keeps its consumer group apart too.
 * topics points into the struct: do not copy it. Aborts the test when the
 * consumer is not there or reads more than LOOM_TEST_APP_SUB_TOPICS topics. */
typedef struct loom_test_app_sub {
    char prefix[64], group[80];
    char topics_buf[LOOM_TEST_APP_SUB_TOPICS][LOOM_TOPIC_MAX];
    const char *topics[LOOM_TEST_APP_SUB_TOPICS + 1];
    size_t n_topics;
    loom_consumer_def_t def;
} loom_test_app_sub_t;
void loom_test_app_sub_init(loom_test_app_sub_t *s, const char *consumer, const char *prefix,
                            const char *brokers, int partitions);

#endif
