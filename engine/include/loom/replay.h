/*
 * Read models rebuilt from the event log (`loom replay PROJECTION`).
 *
 * A projection names the events it is built from (a type prefix), how to
 * empty its tables and how to apply one event. loom_replay() empties the
 * tables and applies every matching event of loom_events in the order they
 * were recorded, all in ONE transaction: readers see the old read model until
 * the new one is complete.
 */
#ifndef LOOM_REPLAY_H
#define LOOM_REPLAY_H

#include "loom/db.h"
#include "loom/error.h"

#include <jansson.h>
#include <stdint.h>

typedef struct loom_event_row {
    const char *stream_id;
    int64_t version;
    const char *type;
    const json_t *data; /* borrowed */
    const char *recorded_at;
} loom_event_row_t;

typedef int (*loom_projection_apply_fn)(loom_db_t *db, const loom_event_row_t *ev,
                                        loom_error_t *err);

typedef struct loom_projection {
    const char *name;         /* "messages" */
    const char *event_prefix; /* events whose type starts so: "messages." */
    const char *reset_sql;    /* empties the read model: "DELETE FROM messages" */
    loom_projection_apply_fn apply;
    const char *description;
} loom_projection_t;

/* Rebuilds p from the event log; *applied counts the events. */
int loom_replay(loom_db_pool_t *pool, const loom_projection_t *p, int64_t *applied,
                loom_error_t *err);

#endif
