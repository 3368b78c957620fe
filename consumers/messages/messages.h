/*
 * messages.h: the write side of the messages service (SERVICES.md section 1).
 *
 * Commands (topic loom.cmd.<type>):
 *   messages.put_batch     {"msgs": [CloudEvent...]}   -> {"ack_count": N}
 *   messages.delete_batch  {"ids": [id...]}            -> {"ack_count": deleted}
 *   messages.clean         {"older_than_ms": N}        -> {"deleted": N}
 * Events (stream per command): messages.stored, messages.deleted,
 * messages.cleaned; the "messages" projection rebuilds the table from them.
 */
#ifndef LOOM_CONSUMERS_MESSAGES_H
#define LOOM_CONSUMERS_MESSAGES_H

#include "loom/config.h"
#include "loom/consumer.h"
#include "loom/periodic.h"
#include "loom/replay.h"

/* Limits of one batch: MESSAGES_BATCH_MAX and MESSAGES_ID_MAX (shared with
 * the routes and the ops); the body limit is the gateway's. */
#include "../../ops/messages/model.h"
#define MESSAGES_BODY_MAX (4 * 1024 * 1024)

/* store.c */
int messages_store_handler(loom_msg_t *msg, loom_error_t *err);
int messages_projection_apply(loom_db_t *db, const loom_event_row_t *ev, loom_error_t *err);
extern const char *const messages_store_topics[];
/* clean_job.c */
int messages_clean_job(loom_job_ctx_t *ctx, loom_error_t *err);

/* The entries this service adds to the tables of consumers.c (initializers,
 * so the tables stay constant arrays). */
#define MESSAGES_CONSUMERS                                                   \
    {                                                                        \
        "messages.store", messages_store_topics, messages_store_handler, 50, \
            "stores, deletes and cleans messages (first write wins)"         \
    }

#define MESSAGES_JOBS                                                                  \
    {                                                                                  \
        "messages.clean", "LOOM_MESSAGES_CLEAN_INTERVAL", 60000, messages_clean_job,   \
            "publishes messages.clean for messages older than LOOM_MESSAGES_RETENTION" \
    }

#define MESSAGES_PROJECTIONS                                                        \
    {                                                                               \
        "messages", "messages.", "DELETE FROM messages", messages_projection_apply, \
            "the messages table, from messages.stored/deleted/cleaned events"       \
    }

#define MESSAGES_CONFIG_VARS                                                                  \
    {"LOOM_MESSAGES_RETENTION",                                                               \
     LOOM_CFG_DURATION,                                                                       \
     "168h",                                                                                  \
     NULL,                                                                                    \
     1000,                                                                                    \
     3650LL * 86400 * 1000,                                                                   \
     false,                                                                                   \
     "how long stored messages are kept (measured from when they were stored)"},              \
    {                                                                                         \
        "LOOM_MESSAGES_CLEAN_INTERVAL", LOOM_CFG_DURATION, "1m", NULL, 1000, 86400LL * 1000,  \
            false, "how often one node publishes the retention clean of the messages service" \
    }

#endif
