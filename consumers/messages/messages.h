/*
 * messages.h: the write side of the messages service (README.md, "HTTP API").
 *
 * Commands (topic loom.cmd.messages; Kafka key = the caller's partition key,
 * else the command id):
 *   messages.put_batch     {"msgs": [CloudEvent...]}   -> {"ack_count": N}
 *   messages.delete_batch  {"ids": [id...]}            -> {"ack_count": deleted}
 *   messages.clean         {"older_than_ms": N}        -> {"deleted": N}
 * Events (stream per command): messages.stored, messages.deleted,
 * messages.cleaned; the "messages" projection rebuilds the table from them.
 */
#ifndef LOOM_CONSUMERS_MESSAGES_H
#define LOOM_CONSUMERS_MESSAGES_H

#include "loom/service.h"

/* Limits of one batch: MESSAGES_BATCH_MAX and MESSAGES_ID_MAX (shared with
 * the routes and the ops); the body limit is the gateway's. */
#include "../../ops/messages/model.h"
#define MESSAGES_BODY_MAX (4 * 1024 * 1024)

/* store.c */
extern const loom_command_t messages_commands[];
int messages_projection_apply(loom_db_t *db, const loom_event_row_t *ev, loom_error_t *err);
/* clean_job.c */
int messages_clean_job(loom_job_ctx_t *ctx, loom_error_t *err);

/* service.c: the whole service, registered in cmd/loom/main.c. */
extern const loom_service_t loom_messages_service;

#endif
