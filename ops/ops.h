/*
 * ops.h: the op table of this build, handed to the engine by cmd/loom/main.c
 * (loom_app_t.ops) and used by the tests.
 *
 * Every op lives in its own file, grouped by service (ops/engine/nodes_list.c
 * defines loom_op_engine_nodes_list) and is listed once in ops.c.
 */
#ifndef LOOM_OPS_H
#define LOOM_OPS_H

#include "loom/op.h"

#include <stddef.h>

/* Every op of the application, in any order (the engine sorts them). */
extern const loom_op_t *const loom_app_ops[];
extern const size_t loom_app_n_ops;

/* service "engine": what the workers and nodes are doing */
extern const loom_op_t loom_op_engine_commands_get;
extern const loom_op_t loom_op_engine_nodes_list;

/* service "messages": temporary message storage (SERVICES.md section 1) */
extern const loom_op_t loom_op_messages_get;
extern const loom_op_t loom_op_messages_batch_get;
extern const loom_error_code_t loom_messages_error_codes[]; /* [0] MESSAGE_NOT_FOUND */
extern const loom_error_catalogue_t loom_messages_errors;

/* service "registry": definitions, instances, nodes (SERVICES.md section 2) */
extern const loom_op_t loom_op_registry_definitions_get;
extern const loom_op_t loom_op_registry_definitions_list;
extern const loom_op_t loom_op_registry_instances_get;
extern const loom_op_t loom_op_registry_instances_list;
extern const loom_op_t loom_op_registry_nodes_get;
extern const loom_error_catalogue_t loom_registry_errors;

#endif
