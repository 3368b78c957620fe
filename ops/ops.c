/*
 * ops.c: the op table. Add a line here for each new op file.
 */
#include "ops.h"

const loom_op_t *const loom_app_ops[] = {
    &loom_op_engine_commands_get,      &loom_op_engine_nodes_list,
    &loom_op_messages_batch_get,       &loom_op_messages_get,
    &loom_op_registry_definitions_get, &loom_op_registry_definitions_list,
    &loom_op_registry_instances_get,   &loom_op_registry_instances_list,
    &loom_op_registry_nodes_get,
};
const size_t loom_app_n_ops = sizeof(loom_app_ops) / sizeof(loom_app_ops[0]);
