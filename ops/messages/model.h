/*
 * model.h: the limits of the messages service (README.md, "HTTP API"), in
 * one place for its three layers: the routes (api/messages.c) check them
 * before publishing, the consumer (consumers/messages/) again when it
 * applies a command, the ops (ops/messages/) on their requests, and
 * test_openapi checks that docs/openapi.json states the same figures.
 */
#ifndef LOOM_OPS_MESSAGES_MODEL_H
#define LOOM_OPS_MESSAGES_MODEL_H

#include "loom/envelope.h"

/* Messages or ids in one batch (batchPut, batchGet, batchDelete). */
#define MESSAGES_BATCH_MAX 1000
/* A message id is 1 to this many bytes (the CloudEvent id). */
#define MESSAGES_ID_MAX LOOM_CE_JSON_ID_MAX

#endif
