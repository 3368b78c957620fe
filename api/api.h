/*
 * api.h: the gateway's routes of this build, grouped by service, handed to
 * the engine by cmd/loom/main.c (loom_app_t.routes).
 *
 * Each service file (api/messages.c, ...) exports one table of loom_route_t
 * {method, pattern, handler, scope}; api.c concatenates the tables. Handlers
 * validate the request and call ops or publish commands through the helpers
 * of loom/gateway.h; api/ never opens a database connection.
 */
#ifndef LOOM_API_H
#define LOOM_API_H

#include "loom/envelope.h"
#include "loom/gateway.h"

#include <stddef.h>

/* Every route of the application (built once; never NULL). */
const loom_route_t *loom_app_routes(size_t *n);

/* service "engine": POST /v1/ops/{name}, GET /v1/commands/{id} */
extern const loom_route_t api_engine_routes[];
extern const size_t api_engine_n_routes;

/* service "messages" (SERVICES.md section 1) */
extern const loom_route_t api_messages_routes[];
extern const size_t api_messages_n_routes;

/* service "registry" (SERVICES.md section 2) */
extern const loom_route_t api_registry_routes[];
extern const size_t api_registry_n_routes;

#endif
