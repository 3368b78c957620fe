/*
 * The HTTP gateway (docs/architecture.md, "Gateway"): how people and non-C
 * services reach Loom. It calls ops and publishes commands, nothing else.
 *
 * Services describe their endpoints as a route table in api/ (one file per
 * service, named by its descriptor, loom/service.h):
 *
 *   static int get_message(loom_http_req_t *req, loom_http_res_t *res)
 *   {
 *       json_t *op_req = json_pack("{s:[s]}", "ids", loom_gateway_param(req, "id"));
 *       return loom_gateway_op_answer(req, res, "messages.get_batch", op_req);
 *   }
 *   const loom_route_t loom_messages_routes[] = {
 *       {"GET", "/v1/messages/{id}", get_message, "messages:read"},
 *       ...
 *   };
 *
 * A handler runs on an event-loop thread and must not block: it validates
 * the request, then answers at once (loom_gateway_reply, loom_gateway_fail)
 * or hands the request to one of the asynchronous helpers, which answer for
 * it: loom_gateway_op_answer / loom_gateway_op_call run an op on the
 * gateway's worker threads; loom_gateway_publish publishes a command and
 * answers 202 after the broker acknowledged it, or 200 with the applied
 * result under ?wait=DURATION, keeping Idempotency-Key retries on one command
 * id, and 503 with Retry-After when Kafka cannot take it. Every handler
 * returns 0 (the value of those helpers).
 *
 * Before a handler runs, the gateway has applied the caller's rate limit
 * (429 with Retry-After, when LOOM_API_RATE_LIMIT is set), matched the route
 * (404, or 405 with Allow), authenticated the caller (bearer token from
 * LOOM_API_TOKENS_FILE, 401), checked the route's scope (403) and refused
 * path and query parameters that do not decode to UTF-8 text (400). It serves /healthz, /readyz and
 * /metrics itself, without a token, and logs one access line per request
 * with its X-Request-ID and ray id.
 */
#ifndef LOOM_GATEWAY_H
#define LOOM_GATEWAY_H

#include "loom/bus.h"
#include "loom/config.h"
#include "loom/error.h"
#include "loom/http.h"
#include "loom/metrics.h"
#include "loom/op.h"

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct loom_gateway loom_gateway_t;

/* A route handler; see the top of this file. Returns 0. */
typedef int (*loom_route_fn)(loom_http_req_t *req, loom_http_res_t *res);

/*
 * One route. pattern is a path whose segments are literal ("v1",
 * "messages:batchGet") or a parameter "{name}" matching one non-empty
 * segment; a literal segment wins over a parameter at the same place.
 */
typedef struct loom_route {
    const char *method;    /* "GET", "POST", "PUT", "PATCH", "DELETE" */
    const char *pattern;   /* "/v1/messages/{id}" */
    loom_route_fn handler; /* required */
    const char *scope;     /* scope the caller's token needs; NULL: any valid token */
    /* For `loom dev`'s banner, which prints a ready-to-paste call of each
     * route that has one: the JSON body (POST, PUT, PATCH) or the concrete
     * path to ask (GET, DELETE). NULL: not shown. */
    const char *example;
} loom_route_t;

/* The scope that grants every scope (the development token has it). */
#define LOOM_GATEWAY_SCOPE_ALL "*"
/* Longest Idempotency-Key. */
#define LOOM_GATEWAY_IDEMPOTENCY_KEY_MAX 200
/* Longest ?wait. */
#define LOOM_GATEWAY_WAIT_MAX_MS 30000

/* Defaults of the overload bounds (opts.max_waiters, opts.max_queue). */
#define LOOM_GATEWAY_MAX_WAITERS 128
#define LOOM_GATEWAY_MAX_QUEUE   1024
/* Default of opts.wait_target_ms, and the fewest ?wait requests the adaptive
 * bound comes down to. */
#define LOOM_GATEWAY_WAIT_TARGET_MS 50
#define LOOM_GATEWAY_MIN_WAITERS    16

typedef struct loom_gateway_opts {
    const char *listen;        /* LOOM_API_LISTEN: "host:port[,host:port]"; port 0 picks one */
    int threads;               /* event loops; 0: one per core */
    loom_http_limits_t limits; /* zero fields: defaults (http.h) */
    const loom_route_t *routes;
    size_t n_routes;              /* the routes of every service (loom_app_t), borrowed */
    const loom_op_runtime_t *ops; /* borrowed; NULL: op calls answer 503 */
    loom_producer_t *producer;    /* borrowed; NULL: writes answer 503. Its message
                                   * timeout bounds how long a write waits for the
                                   * broker before answering 503 */
    loom_metrics_t *metrics;      /* borrowed; NULL: a registry of the gateway's own */
    const char *tokens_file;      /* LOOM_API_TOKENS_FILE; NULL: no tokens */
    const char *site;             /* CloudEvents source loom://SITE/NODE; NULL: "local" */
    const char *node;             /* NULL: "gateway" */
    int workers;                  /* threads that run ops; 0: 8 */
    int64_t ready_cache_ms;       /* how long a /readyz answer is reused; 0: 1000 */
    int64_t ready_timeout_ms;     /* per check of /readyz; 0: 1000 */
    bool no_access_log;           /* skip the access log line (benchmarks) */
    int rate_limit;               /* LOOM_API_RATE_LIMIT: requests a second per caller
                                   * (token slug, else remote address); 0: no limit */
    int rate_burst;               /* LOOM_API_RATE_BURST: bucket size; 0: rate_limit */
    int max_waiters;              /* LOOM_API_MAX_WAITERS: ?wait requests held at once;
                                   * beyond, 503 OVERLOADED; 0: LOOM_GATEWAY_MAX_WAITERS */
    int max_queue;                /* LOOM_API_MAX_QUEUE: op calls queued for the workers;
                                   * beyond, 503 OVERLOADED; 0: LOOM_GATEWAY_MAX_QUEUE */
    bool no_op_pipeline;          /* LOOM_API_OP_PIPELINE=off: statement ops run on the
                                   * worker threads too, not on the loops */
    int64_t wait_target_ms;       /* LOOM_API_WAIT_TARGET: while more than 1 in 10 ?wait
                                   * requests take longer, fewer are held (gateway_limit.c);
                                   * 0: LOOM_GATEWAY_WAIT_TARGET_MS; < 0: off */
} loom_gateway_opts_t;

/*
 * Loads the tokens, checks the routes (a bad pattern or a duplicate
 * method+pattern fails naming it), binds the listen addresses and starts the
 * event loops and worker threads. The options' pointers must outlive the
 * gateway. On failure nothing runs and err says why (a tokens file error
 * names the line).
 */
int loom_gateway_start(const loom_gateway_opts_t *opts, loom_gateway_t **out, loom_error_t *err);

/* The bound addresses ("127.0.0.1:8080"), with the real port when 0 was asked. */
size_t loom_gateway_naddrs(const loom_gateway_t *gw);
const char *loom_gateway_addr(const loom_gateway_t *gw, size_t i);
int loom_gateway_port(const loom_gateway_t *gw, size_t i);

/*
 * Makes a random development token ("loomdev_" + 32 hex characters), writes
 * it to out (size >= 48) and accepts it from now on with every scope, as
 * caller "dev". For `loom dev`, which prints it. Thread-safe.
 */
int loom_gateway_dev_token(loom_gateway_t *gw, char *out, size_t size);
/* Accepts token for caller slug with scopes ("a,b" or "*"). Thread-safe. */
int loom_gateway_add_token(loom_gateway_t *gw, const char *token, const char *slug,
                           const char *scopes, loom_error_t *err);

/*
 * Graceful shutdown: stop accepting, answer /readyz with 503, let requests in
 * progress finish (a write waits for its broker acknowledgement) until
 * timeout_ms, close the rest, stop the worker threads, then flush the
 * producer with the time left. Idempotent.
 */
void loom_gateway_stop(loom_gateway_t *gw, int64_t timeout_ms);
/* Stops (at once, when not stopped yet) and frees. Free the gateway before
 * the producer, the op runtime and the metrics registry it borrowed. */
void loom_gateway_free(loom_gateway_t *gw);

/* Parses a tokens file into nothing, only to check it (`loom api` checks at
 * start); 0 or CONFIG_INVALID naming the line. *count gets the tokens. */
int loom_gateway_tokens_check(const char *path, size_t *count, loom_error_t *err);

/* ---- for handlers -------------------------------------------------------------------- */

/* A path parameter of the matched route, percent-decoded; NULL when the
 * route has no such parameter. Borrowed (request arena). */
const char *loom_gateway_param(loom_http_req_t *req, const char *name);
/* The caller's slug (the token's), "dev" for the development token. */
const char *loom_gateway_caller(const loom_http_req_t *req);
/* The node id of the process serving the request (opts.node; "gateway"
 * when none was given). */
const char *loom_gateway_node(const loom_http_req_t *req);
/* True when the caller's token holds scope (or "*"). */
bool loom_gateway_has_scope(const loom_http_req_t *req, const char *scope);
/* The request's ray id (X-Ray-Id when the client sent a valid one, else a new
 * UUIDv7); the request id (X-Request-ID, else the ray id). */
const char *loom_gateway_ray_id(const loom_http_req_t *req);
const char *loom_gateway_request_id(const loom_http_req_t *req);

/*
 * The body as a JSON value (borrowed; freed with the request). An empty body
 * is {}. Not JSON, or not an object when want_object: INVALID_JSON with line
 * and column. Then answer with loom_gateway_fail(req, res, &err).
 */
int loom_gateway_body_json(loom_http_req_t *req, bool want_object, json_t **out, loom_error_t *err);
/* Parses text as the body decoder does (for the fuzz target and tests);
 * *out is a new reference. */
int loom_gateway_parse_json(const char *text, size_t len, bool want_object, json_t **out,
                            loom_error_t *err);

/* Answers status with body as JSON (stolen; NULL sends no body). Returns 0. */
int loom_gateway_reply(loom_http_req_t *req, loom_http_res_t *res, int status, json_t *body);
/* Answers {"error":{"code","message","ray_id"}} with the HTTP status of the
 * error's class, and Retry-After: 1 when it is retriable and 503/429.
 * Returns 0. */
int loom_gateway_fail(loom_http_req_t *req, loom_http_res_t *res, const loom_error_t *err);

/*
 * Runs op `name` with op_req (stolen; NULL means {}) on a worker thread, as
 * the caller (slug, scopes, ray id), and answers 200 with its result or the
 * op's error. Returns 0.
 */
int loom_gateway_op_answer(loom_http_req_t *req, loom_http_res_t *res, const char *name,
                           json_t *op_req);

/*
 * Whether the caller may call op `name` directly (POST /v1/ops/{name}): the
 * op exists (else OP_NOT_FOUND) and the caller's token holds the op's scope
 * (loom_op_scope; else PERMISSION_DENIED naming it). 0 when it may.
 */
int loom_gateway_op_authorize(loom_http_req_t *req, const char *name, loom_error_t *err);

/* What loom_gateway_op_call hands back, on the request's loop thread: rc 0
 * with result (borrowed; take a reference to keep it) or rc < 0 with err.
 * The callback must answer (reply/fail/another helper) and return 0. */
typedef int (*loom_gateway_op_cb)(loom_http_req_t *req, loom_http_res_t *res, int rc,
                                  json_t *result, const loom_error_t *err, void *arg);
/* Same, but the callback shapes the answer. name is copied; arg borrowed. */
int loom_gateway_op_call(loom_http_req_t *req, loom_http_res_t *res, const char *name,
                         json_t *op_req, loom_gateway_op_cb cb, void *arg);

/* A command to publish. */
typedef struct loom_gateway_command {
    const char *type;  /* CloudEvents type "messages.put_batch" (required) */
    const char *topic; /* NULL: loom.cmd.<type> */
    const char *key;   /* Kafka key (the stream id); NULL: the command id */
    json_t *data;      /* the command's data (stolen) */
} loom_gateway_command_t;

/*
 * The write path. Checks ?wait (a duration up to 30s, else 400) and
 * Idempotency-Key (printable, at most 200 bytes, else 400) and
 * Command-Deadline (an RFC 3339 time, else 400: a worker taking the command
 * later records it as expired and does not apply it); derives the
 * command id from (caller, route, key) when a key is given, else a new
 * UUIDv7; publishes the command as a CloudEvent with the request's ray id
 * and traceparent; then answers
 *   202 {"command_id"}                    once the broker acknowledged it
 *   200 {"command_id","status":"applied","result"}  with ?wait, once applied
 *   400 COMMAND_REJECTED (the consumer's reason)     with ?wait, if rejected
 *   202 {"command_id","status"}            with ?wait, when the wait ran out
 *   503 QUEUE_FULL / BROKER_UNAVAILABLE with Retry-After   when Kafka cannot take it
 * Returns 0.
 */
int loom_gateway_publish(loom_http_req_t *req, loom_http_res_t *res,
                         const loom_gateway_command_t *cmd);

/* Longest Partition-Key, in bytes. */
#define LOOM_GATEWAY_PARTITION_KEY_MAX 256
/*
 * The request's `Partition-Key` header, for routes whose command spans
 * entities (a batch): commands published with the same key are applied in
 * the order Kafka acknowledged them. *key is NULL when the header is absent
 * (then the command id is the key); 400 INVALID_ARGUMENT when it is empty,
 * longer than 256 bytes, or not printable UTF-8. Returns 0 or the error.
 */
int loom_gateway_partition_key(loom_http_req_t *req, const char **key, loom_error_t *err);

/* The command id an Idempotency-Key maps to: a UUID (version 8) from
 * SHA-256(caller NUL route NUL key). out has room for 37 bytes. */
void loom_gateway_idempotent_id(const char *caller, const char *route, const char *key,
                                char out[37]);

/* ---- rate limits (gateway_limit.c; public for tests and the fuzz target) ------------ */

/* Token buckets, one per key, at most max_keys of them (0: 100000); new keys
 * beyond share one bucket. NULL (no limit) when rate <= 0. Thread-safe. */
typedef struct loom_rate_limiter loom_rate_limiter_t;
loom_rate_limiter_t *loom_rate_limiter_new(int rate, int burst, size_t max_keys);
void loom_rate_limiter_free(loom_rate_limiter_t *l);
/* Takes a token of key's bucket at now_ns (monotonic); false when there is
 * none, with *retry_after_s the whole seconds until there is (>= 1). A NULL
 * limiter always allows. */
bool loom_rate_limiter_take(loom_rate_limiter_t *l, const char *key, int64_t now_ns,
                            int *retry_after_s);
/* The key of a caller: "token:SLUG", else "addr:ADDRESS" from a remote
 * "1.2.3.4:5678" or "[::1]:5678" (the port left out). */
void loom_rate_limiter_key(const char *slug, const char *remote, char *out, size_t size);

/* ---- routing (also for tests and the fuzz target) ---------------------------------- */

/* Checks a route table: methods, patterns, handlers, duplicates. */
int loom_route_table_check(const loom_route_t *routes, size_t n, loom_error_t *err);

/*
 * Finds the route for method and path (raw, not decoded) among routes: the
 * one whose pattern matches with the most literal segments first. Returns
 * NULL when none matches; then *path_known says whether a route has that
 * path with another method (a 405), and allow (when not NULL) gets those
 * methods, "GET, POST".
 */
const loom_route_t *loom_route_match(const loom_route_t *routes, size_t n, const char *method,
                                     const char *path, bool *path_known, char *allow,
                                     size_t allow_size);

/* Percent-decodes a raw path parameter (v, len) into the arena, as
 * loom_gateway_param does (no '+' rule in paths; a bad escape is kept as it
 * is). *clean (when not NULL) becomes false when the result holds a NUL or
 * is not UTF-8; the gateway refuses such parameters with 400. */
char *loom_gateway_param_decode(loom_arena_t *a, const char *v, size_t len, bool *clean);

/* The raw value of parameter `name` of pattern in path (no decoding), as a
 * pointer into path and a length; false when the pattern has no such
 * parameter or does not match. */
bool loom_route_param(const char *pattern, const char *path, const char *name, const char **value,
                      size_t *len);

#endif
