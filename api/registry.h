/*
 * registry.h: the routes of the registry service (SERVICES.md section 2),
 * api/registry.c. api.c adds them to the route table.
 */
#ifndef LOOM_API_REGISTRY_H
#define LOOM_API_REGISTRY_H

#include "loom/gateway.h"

#include <stddef.h>

extern const loom_route_t api_registry_routes[];
extern const size_t api_registry_n_routes;

#endif
