/*
 * access.h: who may see which instances, for the registry's ops.
 */
#ifndef LOOM_OPS_REGISTRY_ACCESS_H
#define LOOM_OPS_REGISTRY_ACCESS_H

#include "loom/op.h"
#include "model.h"

/*
 * Whether the op's caller sees every slug's instances. Calls through the
 * gateway carry the token's scopes: they need registry:admin (or "*"),
 * else they see their own slug only. Calls without scopes come from inside
 * the process (the probe job, tests) or from `loom op` run by an operator
 * who holds the database credentials; they see everything.
 */
static inline bool registry_ctx_admin(const loom_op_ctx_t *ctx)
{
    return ctx->scopes == NULL || loom_op_ctx_has_scope(ctx, REGISTRY_SCOPE_ADMIN) ||
           loom_op_ctx_has_scope(ctx, "*");
}

#endif
