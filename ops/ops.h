/*
 * ops.h: the ops of this tree's services, one file each, grouped by service
 * (ops/messages/get.c defines loom_op_messages_get). Each service's
 * descriptor (consumers/<service>/service.c) lists its own; the engine's ops
 * (ops/engine/) are built into the engine library and registered by it.
 */
#ifndef LOOM_OPS_H
#define LOOM_OPS_H

#include "loom/op.h"

/* service "messages": temporary message storage (README.md, "HTTP API") */
extern const loom_op_t loom_op_messages_get;
extern const loom_op_t loom_op_messages_batch_get;
extern const loom_error_code_t loom_messages_error_codes[]; /* [0] MESSAGE_NOT_FOUND */
extern const loom_error_catalogue_t loom_messages_errors;

/* service "registry": definitions, instances, nodes (README.md, "HTTP API") */
extern const loom_op_t loom_op_registry_definitions_get;
extern const loom_op_t loom_op_registry_definitions_list;
extern const loom_op_t loom_op_registry_instances_get;
extern const loom_op_t loom_op_registry_instances_list;
extern const loom_op_t loom_op_registry_nodes_get;
extern const loom_error_catalogue_t loom_registry_errors;

#endif
