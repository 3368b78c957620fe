/*
 * gateway_int.h: what the gateway's files (gateway.c, gateway_ops.c,
 * gateway_write.c) share. Private to the engine.
 */
#ifndef LOOM_GATEWAY_INT_H
#define LOOM_GATEWAY_INT_H

#include "loom/gateway.h"
#include "loom/sha256.h"

#include <pthread.h>
#include <stdatomic.h>

/* One accepted token. Never freed before the gateway, so requests may keep
 * pointers to it. */
typedef struct gw_token {
    uint8_t hash[LOOM_SHA256_LEN];
    char *slug;
    char **scopes; /* NULL-terminated */
    bool all;      /* holds "*" */
} gw_token_t;

/* Work for the worker threads. run() runs there; then done is posted to
 * the request's loop. */
typedef struct gw_task gw_task_t;
struct gw_task {
    gw_task_t *next;
    void (*run)(gw_task_t *t);
    loom_http_req_t *req;
    loom_http_post_fn done;
};

struct loom_gateway {
    loom_gateway_opts_t opts;
    loom_http_server_t *http;
    loom_metrics_t *metrics; /* opts.metrics or own_metrics */
    loom_metrics_t *own_metrics;
    loom_metrics_family_t *requests, *duration, *in_flight, *connections, *rate_limited;
    loom_rate_limiter_t *limiter; /* NULL: no rate limit */

    pthread_rwlock_t tokens_mu;
    gw_token_t **tokens;
    size_t n_tokens, cap_tokens;

    pthread_mutex_t tasks_mu;
    pthread_cond_t tasks_cond;
    gw_task_t *tasks, *tasks_tail;
    pthread_t *workers;
    int n_workers;
    atomic_bool stopping;

    pthread_mutex_t ready_mu; /* one readiness check at a time; guards the cache */
    int64_t ready_at;         /* loom_mono_ms() of the cached answer; 0: none */
    bool ready_ok;
    char ready_db[200], ready_kafka[200];

    bool stopped;
};

/* Per request, in the request's arena. */
typedef struct gw_req {
    loom_gateway_t *gw;
    const loom_route_t *route;
    const char *route_label;
    const gw_token_t *token;
    const char *ray_id, *request_id, *traceparent;
    json_t *body; /* parsed body, released when the request is over */
    bool async;   /* a helper answers later */
} gw_req_t;

gw_req_t *gw_req(const loom_http_req_t *req);

/* Queues a task; its done function runs on the request's loop (or is
 * cancelled). Takes a reference on the request, which done must drop. */
void gw_task_submit(loom_gateway_t *gw, gw_task_t *t);

/* Runs an op on a worker thread and calls fin on the loop thread. */
typedef struct gw_op_task gw_op_task_t;
typedef void (*gw_op_fin)(loom_http_req_t *req, gw_op_task_t *t, bool cancelled);
struct gw_op_task {
    gw_task_t task;
    loom_gateway_t *gw;
    const gw_token_t *token;
    const char *ray_id; /* borrowed from the request arena */
    char name[LOOM_OP_NAME_MAX + 1];
    json_t *op_req;
    json_t *result;
    int rc;
    loom_error_t err;
    gw_op_fin fin;
    loom_gateway_op_cb cb;
    void *arg;
};
/* Starts t (filled: gw, name, op_req, fin; cb/arg as fin needs). */
void gw_op_start(loom_http_req_t *req, gw_op_task_t *t);
/* Frees t's JSON and t. */
void gw_op_task_free(gw_op_task_t *t);

#endif
