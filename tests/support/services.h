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

#endif
