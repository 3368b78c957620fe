/*
 * node.c: the heartbeat thread of a Loom process.
 */
#include "loom/node.h"
#include "loom/clock.h"
#include "loom/log.h"
#include "loom/mem.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

struct loom_node {
    loom_node_opts_t opts;
    char started_at[40];
    pthread_t thread;
    atomic_int stop;
    atomic_llong beats;
    pthread_mutex_t report_mu; /* report, report_arg */
    json_t *(*report)(void *arg);
    void *report_arg;
};

static const loom_db_stmt_t stmt_beat = {
    "loom_nodes_beat",
    "INSERT INTO loom_nodes (id, role, url, site, version, started_at, last_heartbeat, "
    "consumers) VALUES ($1, $2, $3, $4, $5, $6::timestamptz, now(), $7::jsonb) "
    "ON CONFLICT (id) DO UPDATE SET role = EXCLUDED.role, url = EXCLUDED.url, "
    "site = EXCLUDED.site, version = EXCLUDED.version, started_at = EXCLUDED.started_at, "
    "last_heartbeat = now(), consumers = EXCLUDED.consumers",
    7};

typedef struct beat_arg {
    loom_node_t *n;
    const char *consumers; /* JSON text, or NULL */
} beat_arg_t;

static int beat_body(loom_db_t *db, void *arg, loom_error_t *err)
{
    beat_arg_t *b = arg;
    loom_node_t *n = b->n;
    const char *p[] = {n->opts.id,      n->opts.role,  n->opts.url, n->opts.site,
                       n->opts.version, n->started_at, b->consumers};
    return loom_db_exec(db, &stmt_beat, p, NULL, err);
}

static int beat(loom_node_t *n, loom_error_t *err)
{
    loom_tx_opts_t o = {.max_attempts = 2};
    beat_arg_t b = {.n = n};
    pthread_mutex_lock(&n->report_mu);
    json_t *report = n->report ? n->report(n->report_arg) : NULL;
    pthread_mutex_unlock(&n->report_mu);
    char *text = report ? json_dumps(report, JSON_COMPACT) : NULL;
    json_decref(report);
    b.consumers = text;
    int rc = loom_tx_run(n->opts.pool, &o, beat_body, &b, err);
    free(text);
    if (rc == 0)
        atomic_fetch_add(&n->beats, 1);
    return rc;
}

static void *node_run(void *arg)
{
    loom_node_t *n = arg;
    while (!atomic_load(&n->stop)) {
        for (int64_t t = 0; t < n->opts.interval_ms && !atomic_load(&n->stop); t += 50)
            loom_sleep_ms(50);
        if (atomic_load(&n->stop))
            break;
        loom_error_t err;
        if (beat(n, &err) != 0)
            LOOM_WARN("could not write heartbeat", "node=%s error=%s", n->opts.id, err.message);
    }
    return NULL;
}

int loom_node_start(const loom_node_opts_t *opts, loom_node_t **out, loom_error_t *err)
{
    loom_node_t *n = loom_xcalloc(1, sizeof(*n));
    n->opts = *opts;
    pthread_mutex_init(&n->report_mu, NULL);
    if (n->opts.interval_ms <= 0)
        n->opts.interval_ms = LOOM_NODE_HEARTBEAT_MS;
    loom_rfc3339_format(loom_now_us(), n->started_at, sizeof(n->started_at));
    int rc = beat(n, err);
    if (rc != 0 || pthread_create(&n->thread, NULL, node_run, n) != 0) {
        pthread_mutex_destroy(&n->report_mu);
        free(n);
        return rc != 0 ? rc : loom_error_set(err, LOOM_CODE_INTERNAL, "could not start heartbeats");
    }
    *out = n;
    return 0;
}

void loom_node_stop(loom_node_t *n)
{
    if (!n)
        return;
    atomic_store(&n->stop, 1);
    pthread_join(n->thread, NULL);
    pthread_mutex_destroy(&n->report_mu);
    free(n);
}

void loom_node_set_report(loom_node_t *n, json_t *(*report)(void *arg), void *arg)
{
    if (!n)
        return;
    pthread_mutex_lock(&n->report_mu);
    n->report = report;
    n->report_arg = arg;
    pthread_mutex_unlock(&n->report_mu);
}

int64_t loom_node_beats(loom_node_t *n)
{
    return atomic_load(&n->beats);
}
