/*
 * api.h: the gateway's routes of this tree's services, one file each
 * (api/messages.c, ...). Each exports one table of loom_route_t
 * {method, pattern, handler, scope} ending with an empty entry, which its
 * service's descriptor (consumers/<service>/service.c) names. Handlers
 * validate the request and call ops or publish commands through the helpers
 * of loom/gateway.h; api/ never opens a database connection. The engine's
 * own routes (api/engine.c) are built into the engine library.
 */
#ifndef LOOM_API_H
#define LOOM_API_H

#include "loom/envelope.h"
#include "loom/gateway.h"

/* service "messages" (README.md, "HTTP API") */
extern const loom_route_t api_messages_routes[];

/* service "registry" (README.md, "HTTP API") */
extern const loom_route_t api_registry_routes[];

#endif
