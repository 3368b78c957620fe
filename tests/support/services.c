/*
 * services.c: the application of cmd/loom/main.c (the engine's service, then
 * messages and registry), built once, for tests that need its tables.
 */
#include "services.h"
#include "messages/messages.h"
#include "registry/registry.h"
#include "support.h"
#include "loom/bus.h"

#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const loom_service_t *const services[] = {
    &loom_messages_service,
    &loom_registry_service,
};
static loom_app_t app = {
    .name = "loom", .version = "test", .services = services, .n_services = LOOM_COUNT(services)};
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void build(void)
{
    loom_error_t err;
    if (loom_app_build(&app, &err) != 0) {
        fprintf(stderr, "loom_test_full_app: %s\n", err.message);
        abort();
    }
}

const loom_app_t *loom_test_full_app(void)
{
    pthread_once(&once, build);
    return &app;
}

const loom_consumer_def_t *loom_test_app_consumer(const char *name)
{
    const loom_app_t *a = loom_test_full_app();
    for (size_t i = 0; i < a->n_consumers; i++)
        if (strcmp(a->consumers[i].name, name) == 0)
            return &a->consumers[i];
    return NULL;
}

void loom_test_app_sub_init(loom_test_app_sub_t *s, const char *consumer, const char *prefix,
                            const char *brokers, int partitions)
{
    memset(s, 0, sizeof(*s));
    loom_test_topic_prefix(prefix, s->prefix, sizeof(s->prefix));
    loom_topic_prefix_set(s->prefix);
    const loom_consumer_def_t *def = loom_test_app_consumer(consumer);
    cr_assert_not_null(def, "no consumer %s", consumer);
    s->def = *def;
    s->n_topics = loom_consumer_topics(&s->def, s->topics_buf, LOOM_TEST_APP_SUB_TOPICS);
    cr_assert(s->n_topics >= 1 && s->n_topics <= LOOM_TEST_APP_SUB_TOPICS, "%s reads %zu topics",
              consumer, s->n_topics);
    for (size_t i = 0; i < s->n_topics; i++)
        s->topics[i] = s->topics_buf[i];
    int created;
    loom_error_t err;
    cr_assert_eq(
        loom_kafka_create_topics(brokers, NULL, s->topics, s->n_topics, partitions, &created, &err),
        0, "%s", err.message);
    snprintf(s->group, sizeof(s->group), "%s.", s->prefix);
}
