/*
 * Loom's built-in services, for a binary that wants them next to its own
 * (docs/writing-a-service.md): the library loom_services, or Loom::services
 * in CMake, or pkg-config loom-services.
 *
 *   static const loom_service_t *const services[] = {
 *       &loom_messages_service, // CloudEvents by id (/v1/messages)
 *       &loom_registry_service, // service definitions and instances
 *       &ledger_service,        // your own
 *   };
 */
#ifndef LOOM_SERVICES_H
#define LOOM_SERVICES_H

#include "loom/service.h"

/* messages: store, read and delete CloudEvents by id (migration 0002). */
extern const loom_service_t loom_messages_service;
/* registry: service definitions, their instances and health probes
 * (migration 0003). */
extern const loom_service_t loom_registry_service;

#endif
