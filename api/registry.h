/*
 * registry.h: the routes of the registry service (README.md, "HTTP API"),
 * api/registry.c, ending with an empty entry; the service's descriptor
 * (consumers/registry/service.c) names them.
 */
#ifndef LOOM_API_REGISTRY_H
#define LOOM_API_REGISTRY_H

#include "loom/gateway.h"

#include <stddef.h>

extern const loom_route_t api_registry_routes[];

#endif
