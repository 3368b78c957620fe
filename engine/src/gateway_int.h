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

/* The shared poller of ?wait (gateway_write.c): one thread per gateway that,
 * every tick while requests wait, reads the status of all their commands in
 * a bounded number of queries. */
typedef struct pub pub_t;
typedef struct gw_poller {
    pthread_mutex_t mu;
    pthread_cond_t cond; /* on CLOCK_MONOTONIC: a waiter came, or stop */
    pthread_t thread;
    bool running, stop;
    pub_t **waiting; /* the waiters, in no order; each knows its slot */
    size_t n, cap, cursor;
    int64_t warned_ms; /* the poller's last warning (its thread only) */
    int warnings_held; /* warnings not logged since */
} gw_poller_t;

/* The adaptive bound on ?wait requests (gateway_limit.c): every window of
 * GW_WAIT_WINDOW_MS, if more than one in ten of the requests that ended in
 * it were held longer than the target, the bound comes down by a tenth (to
 * min at the lowest), else it goes up by a sixteenth (to max). With the bound, a gateway whose
 * workers fall behind holds about as many requests as can be answered within the target and refuses
 * the rest at once, instead of holding max_waiters requests that all end late.
 *
 * Two things keep it from refusing loads the machine answers. A slow window
 * brings the bound down only when the gateway held at least half of the
 * bound at some time in it: slow waits with fewer held are slow for another
 * reason (a busy machine, a slow database), and refusing would not make them
 * faster. And a wait is judged slow against the larger of the target and
 * GW_WAIT_BASE_FACTOR times the machine's unloaded wait: the quickest wait
 * of the last GW_WAIT_BASE_WINDOWS windows that had one, among those that ended while the
 * gateway held at most 1/32 of its maximum (so a deep queue of waiters
 * never raises it). */
/*
 * The poller's status lookup of waiting commands: one probe of
 * loom_commands_by_message per id, whatever the statistics say. The ids are
 * unnested and each is looked up by a LATERAL subquery; OFFSET 0 keeps it
 * from being turned into a join. The plain `message_id = ANY($1)` planned a
 * scan of the whole table on a table not yet analyzed, and the gateway's
 * read-only connections keep a prepared statement's generic plan, made when
 * the table was empty: every tick of a fresh deployment's poller then read
 * every row of loom_commands, and PostgreSQL spent most of its time there.
 * Exported so that tests/integration/test_dedup_plan.c can EXPLAIN it.
 */
#define LOOM_SQL_WAIT_STATUS                                                      \
    "SELECT c.message_id, c.status, c.last_error, c.result::TEXT AS result "      \
    "FROM unnest($1::TEXT[]) AS u(id) CROSS JOIN LATERAL ("                       \
    "SELECT message_id, consumer, status, last_error, result FROM loom_commands " \
    "WHERE message_id = u.id OFFSET 0) AS c ORDER BY c.message_id, c.consumer"

#define GW_WAIT_WINDOW_MS    100
#define GW_WAIT_BASE_WINDOWS 100
#define GW_WAIT_BASE_FACTOR  3
typedef struct gw_wait_limit {
    pthread_mutex_t mu;
    int64_t target_ns; /* 0: off, the bound stays max */
    int64_t judge_ns;  /* what a wait is slow against: max(target, factor x base) */
    int min, max;
    double limit;
    atomic_int now; /* (int)limit, read by admissions without the mutex */
    int64_t window_ns;
    int n, slow; /* requests that ended in the window, and how many took longer than judge_ns */
    int peak;    /* the most held at once when one of them ended */
    int64_t light_min_ns; /* the quickest of the window's waits that ended with few held; -1 none */
    int64_t base[GW_WAIT_BASE_WINDOWS]; /* light_min_ns of the last windows, -1: none */
    int base_i;
    loom_metrics_family_t *gauge; /* set to the bound when it changes (NULL: none) */
} gw_wait_limit_t;

void gw_wait_limit_init(gw_wait_limit_t *l, int max, int min, int64_t target_ms);
void gw_wait_limit_destroy(gw_wait_limit_t *l);
/* A ?wait request held held_ns ended at now_ns (monotonic). held: the most
 * requests held (itself included) when it was admitted or when it ended;
 * crowd: at least the most held at any time while it waited (light waits,
 * crowd small, measure the machine's unloaded wait). Returns the bound from
 * now on. */
int gw_wait_limit_done(gw_wait_limit_t *l, int64_t held_ns, int64_t now_ns, int held, int crowd);
/* What a wait is judged slow against now (ns; 0: the bound is off). */
int64_t gw_wait_limit_judge(gw_wait_limit_t *l);

struct loom_gateway {
    loom_gateway_opts_t opts;
    loom_http_server_t *http;
    loom_metrics_t *metrics; /* opts.metrics or own_metrics */
    loom_metrics_t *own_metrics;
    loom_metrics_family_t *requests, *duration, *in_flight, *connections, *rate_limited;
    loom_metrics_family_t *op_paths; /* loom_http_op_calls_total{path} */
    loom_rate_limiter_t *limiter;    /* NULL: no rate limit */

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

    /* Overload bounds (gateway_limit.c): what is held now, what is allowed. */
    atomic_int waiters;      /* ?wait requests from publish to answer */
    atomic_llong admissions; /* ?wait requests admitted so far */
    atomic_int queued;       /* tasks queued for the workers, not yet taken */
    int max_waiters, max_queue;
    gw_wait_limit_t wait_limit; /* how many ?wait requests may be held now */
    loom_metrics_family_t *shed, *waiters_gauge, *wait_ticks, *wait_queries;
    gw_poller_t poller;

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
    bool answers_result; /* the route answers with the op's result as it is */
    char *json;          /* that result as JSON text already (a statement op's
                          * json_column), sent instead of result; owned */
    size_t json_len;
};
/* Starts t (filled: gw, name, op_req, fin; cb/arg as fin needs). */
void gw_op_start(loom_http_req_t *req, gw_op_task_t *t);
/* Ties t to req (the caller's token and ray id; the request is answered
 * later), for the worker threads and the loops alike. */
void gw_op_attach(loom_http_req_t *req, gw_op_task_t *t);
/* The op context of t's call: the gateway's runtime, the caller, its scopes. */
loom_op_ctx_t gw_op_ctx(const gw_op_task_t *t);

/* ---- statement ops on the loops (gateway_pipe.c) ---- */

typedef struct gw_pipe gw_pipe_t;
/* The HTTP server's loop hooks: one pipelined connection per loop. */
void *gw_pipe_loop_start(uv_loop_t *loop, void *opaque);
void gw_pipe_loop_stop(uv_loop_t *loop, void *loop_data, void *opaque);
/* Runs t on the request's loop when t's op is a statement op and the loop's
 * connection can take it; false (t untouched) otherwise. */
bool gw_pipe_call(loom_http_req_t *req, gw_op_task_t *t);
/* Frees t's JSON and t. */
void gw_op_task_free(gw_op_task_t *t);

/* ---- overload (gateway_limit.c) ---- */

/* Sets the bounds from the options and registers the metrics. */
void gw_limits_init(loom_gateway_t *gw);
/* Takes a place among the ?wait requests; false (nothing taken) when as
 * many are held as the adaptive bound allows (at most max_waiters).
 * *held: how many it holds now, itself included; *seq: its number among
 * the admissions. gw_waiter_release gives it back, saying how long the wait
 * took (0: counts as on time; < 0: not counted, the request was never
 * published), and the held and seq it was admitted with. */
bool gw_waiter_admit(loom_gateway_t *gw, int *held, int64_t *seq);
void gw_waiter_release(loom_gateway_t *gw, int64_t held_ns, int held_at_admit, int64_t seq);
/* True when the workers' queue holds max_queue tasks already. */
bool gw_queue_full(loom_gateway_t *gw);
/* Answers 503 OVERLOADED with Retry-After, naming the bound (`what`: "waiters"
 * or "queue"), and counts it in loom_http_shed_total. Returns 0. */
int gw_shed(loom_http_req_t *req, loom_http_res_t *res, const char *what);

/* ---- the ?wait poller (gateway_write.c) ---- */

/* Starts the poller thread (when the gateway has an op pool). */
int gw_poller_start(loom_gateway_t *gw);
/* Stops it after the loops stopped; waiters left are cancelled. */
void gw_poller_stop(loom_gateway_t *gw);

#endif
