/*
 * services.c: the application of cmd/loom/main.c (the engine's service, then
 * messages and registry), built once, for tests that need its tables.
 */
#include "services.h"
#include "messages/messages.h"
#include "registry/registry.h"

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
