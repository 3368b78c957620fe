/*
 * Node heartbeats (docs/architecture.md): every Loom process upserts its row in
 * loom_nodes (id, role, url, site, version, started_at, last_heartbeat, and
 * what its consumers do) every 5 s from a thread of its own. A node is stale after 20 s without
 * one.
 */
#ifndef LOOM_NODE_H
#define LOOM_NODE_H

#include "loom/db.h"
#include "loom/error.h"

#include <jansson.h>
#include <stdint.h>

#define LOOM_NODE_HEARTBEAT_MS 5000
#define LOOM_NODE_STALE_MS     20000

typedef struct loom_node loom_node_t;

typedef struct loom_node_opts {
    loom_db_pool_t *pool; /* borrowed */
    const char *id;       /* UUID (LOOM_NODE_ID) */
    const char *role;     /* "api", "worker", "dev" */
    const char *url;      /* where it can be reached; may be NULL */
    const char *site;
    const char *version;
    int64_t interval_ms; /* 0: LOOM_NODE_HEARTBEAT_MS */
} loom_node_opts_t;

/* Writes the first heartbeat at once (an error is returned, not retried),
 * then keeps beating from a thread; later failures are logged and retried. */
int loom_node_start(const loom_node_opts_t *opts, loom_node_t **out, loom_error_t *err);
void loom_node_stop(loom_node_t *n);
/* Adds report(arg) to every heartbeat from now on: a JSON object stored as
 * loom_nodes.consumers (the worker's loom_worker_report). NULL stops it;
 * once this returns, report is no longer running or called. */
void loom_node_set_report(loom_node_t *n, json_t *(*report)(void *arg), void *arg);
/* Heartbeats written since start. */
int64_t loom_node_beats(loom_node_t *n);

#endif
