/*
 * Operations: the reads of Loom (docs/architecture.md, "Operations").
 *
 * An op is a C function in a table, found by name and called as a plain C
 * call: loom_op_call(ctx, "engine.nodes.list", req, &res, &err). Request and
 * result are jansson values. The same table is reachable over HTTP
 * (POST /v1/ops/{name}), so an op can move to another process without its
 * callers changing; loom_op_call_http() is the client side of that.
 *
 * Read-only by construction: the engine opens the transaction an op runs in,
 * and it is always READ ONLY (on a pool from LOOM_DATABASE_READ_URL when one
 * is set, which is read-only at the session level too). A write fails with
 * SQLSTATE 25006, reported as READ_ONLY_VIOLATION naming the op.
 *
 * Deadlines: each op has a timeout; the caller may bring an earlier deadline
 * in the context. The engine sets the transaction's statement_timeout to the
 * time left, so the server cancels a statement that runs past it and the
 * connection stays usable; an op whose own C code runs past it has its result
 * discarded. Either way the caller gets DEADLINE_EXCEEDED naming the op.
 *
 * Metrics: with a registry, every call counts in loom_op_calls_total{op,result}
 * (result "ok" or the error code) and loom_op_duration_seconds{op}.
 */
#ifndef LOOM_OP_H
#define LOOM_OP_H

#include "loom/db.h"
#include "loom/error.h"
#include "loom/metrics.h"

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct loom_op loom_op_t;
typedef struct loom_op_table loom_op_table_t;
typedef struct loom_op_ctx loom_op_ctx_t;

/* Timeout of an op that declares none. */
#define LOOM_OP_DEFAULT_TIMEOUT_MS 5000
/* Longest op name. */
#define LOOM_OP_NAME_MAX 128

/*
 * An op handler. req is a JSON object (borrowed; never NULL: an absent
 * request is {}). db is a connection inside the op's READ ONLY transaction
 * (NULL for an op with LOOM_OP_NO_DB). On success return 0 and set *res to a
 * new reference (the caller owns it). On failure return a negative LOOM_E*
 * code with err filled (loom_error_set), and leave *res NULL. The handler may
 * run more than once when the database asks for a retry, so it must not have
 * side effects outside the transaction.
 */
typedef int (*loom_op_fn)(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                          loom_error_t *err);

/* loom_op_t.flags */
enum {
    LOOM_OP_NO_DB = 1u << 0, /* runs without a transaction; db is NULL */
    /* Runs exactly one statement. On a read-only session (the read pool)
     * that statement goes alone, in one round trip: no BEGIN READ ONLY, no
     * COMMIT, and statement_timeout set on the session only when it changes.
     * A second statement fails with INTERNAL naming the op. Elsewhere the op
     * runs in its READ ONLY transaction as usual. */
    LOOM_OP_ONE_STATEMENT = 1u << 1,
};

/* Most parameters a statement op binds, and the bytes of text it may
 * format for them (numbers, joined values). */
#define LOOM_OP_STMT_PARAMS_MAX  8
#define LOOM_OP_STMT_SCRATCH_MAX 256

/* What a statement op's bind fills: the statement's parameters as text
 * (NULL: SQL NULL), borrowed from the request or written into scratch. */
typedef struct loom_op_params {
    const char *v[LOOM_OP_STMT_PARAMS_MAX];
    char scratch[LOOM_OP_STMT_SCRATCH_MAX];
} loom_op_params_t;

/*
 * A statement op: an op that is one prepared statement, given in parts so
 * that the engine can run it wherever it is cheapest. loom_op_call() runs it
 * on the calling thread like any one-statement op; the gateway runs it on its
 * event loops, pipelined with other calls on one connection per loop, with
 * no thread in between (docs/architecture.md, "Operations").
 *
 * bind checks the request and fills the parameters; result turns the rows
 * into the op's result. Both run on whatever thread the engine chooses, must
 * not block, and have the handler's contract for errors (a negative LOOM_E*
 * code with err filled; *res a new reference on success). ctx is the call's
 * context (the caller, its scopes).
 */
typedef struct loom_op_stmt {
    const loom_db_stmt_t *stmt; /* at most LOOM_OP_STMT_PARAMS_MAX parameters */
    int (*bind)(loom_op_ctx_t *ctx, const json_t *req, loom_op_params_t *params, loom_error_t *err);
    int (*result)(loom_op_ctx_t *ctx, const json_t *req, const PGresult *rows, json_t **res,
                  loom_error_t *err);
    /* Optional: the result is exactly the JSON document in the first
     * column of the first row (one Loom stored, such as a message). A
     * caller that answers with the result as it is (the gateway's
     * loom_gateway_op_answer) may then send those bytes without parsing and
     * printing them again. result still runs for every other caller, and
     * when there is no row or the column does not look like a JSON object or
     * array of UTF-8 text. */
    bool json_column;
} loom_op_stmt_t;

/* One op. Define them `const` with static storage, one per file. */
struct loom_op {
    const char *name;           /* "service.noun.verb": [a-z0-9_] parts joined by '.' */
    loom_op_fn fn;              /* the handler; NULL when stmt is set */
    int64_t timeout_ms;         /* 0: LOOM_OP_DEFAULT_TIMEOUT_MS */
    const char *description;    /* one line for `loom op --list` */
    unsigned flags;             /* LOOM_OP_* */
    const char *scope;          /* scope a caller of POST /v1/ops/{name} needs besides
                                 * ops:call; NULL: its service's read scope,
                                 * "<service>:read" (loom_op_scope) */
    const loom_op_stmt_t *stmt; /* a statement op, instead of fn; it runs one
                                 * statement (as LOOM_OP_ONE_STATEMENT) */
};

/* Longest scope. */
#define LOOM_OP_SCOPE_MAX 128

/* The scope op needs (its own, or "<service>:read" from the first part of
 * its name), written to buf; returns buf. */
const char *loom_op_scope(const loom_op_t *op, char *buf, size_t size);

/* ---- the table -------------------------------------------------------------------- */

/* A new, empty table (never NULL). Not thread-safe while ops are added; safe
 * for concurrent lookups afterwards. */
loom_op_table_t *loom_op_table_new(void);
void loom_op_table_free(loom_op_table_t *table);

/*
 * Adds ops (an array of n pointers to ops; the ops are borrowed and must
 * outlive the table) and re-sorts the index. Fails with INVALID_ARGUMENT, and
 * adds none of them, when a name is malformed, an op has no handler, or a
 * name is registered already.
 */
int loom_op_table_add(loom_op_table_t *table, const loom_op_t *const *ops, size_t n,
                      loom_error_t *err);

/* Finds an op by name (a hash lookup); NULL when unknown. */
const loom_op_t *loom_op_find(const loom_op_table_t *table, const char *name);

/* Ops in name order, for listings: index 0 .. count-1. */
size_t loom_op_table_count(const loom_op_table_t *table);
const loom_op_t *loom_op_table_at(const loom_op_table_t *table, size_t i);

/* True when name is a well-formed op name. */
bool loom_op_name_valid(const char *name);

/* ---- calling ------------------------------------------------------------------------ */

/*
 * What ops run against: set up once per process and shared by every call.
 * Initialise with loom_op_runtime_init(); it holds no resources of its own.
 */
typedef struct loom_op_runtime {
    const loom_op_table_t *table;    /* borrowed */
    loom_db_pool_t *pool;            /* borrowed; the read pool when there is one */
    loom_metrics_t *metrics;         /* borrowed; NULL: no metrics */
    loom_metrics_family_t *calls;    /* loom_op_calls_total{op,result} */
    loom_metrics_family_t *duration; /* loom_op_duration_seconds{op} */
} loom_op_runtime_t;

/* Fills rt and registers the op metrics in metrics (when not NULL). pool may
 * be NULL when every op called is LOOM_OP_NO_DB. */
void loom_op_runtime_init(loom_op_runtime_t *rt, const loom_op_table_t *table, loom_db_pool_t *pool,
                          loom_metrics_t *metrics);

/*
 * The context of one call: who calls, on behalf of which request, until
 * when. The caller fills the first fields (zero means "none"); loom_op_call()
 * fills the rest for the handler. One context serves one call at a time.
 */
struct loom_op_ctx {
    const loom_op_runtime_t *rt; /* borrowed; required */
    const char *ray_id;          /* borrowed; NULL: loom_op_call makes a UUIDv7 */
    const char *caller;          /* who calls: a token's slug, "cli"; NULL: anonymous */
    const char *const *scopes;   /* the caller's scopes, NULL-terminated; NULL: none */
    int64_t deadline_mono_ms;    /* loom_mono_ms() to give up at; 0: the op's timeout */

    /* Set by loom_op_call() while the handler runs. */
    const loom_op_t *op;         /* the op being called */
    int64_t op_deadline_mono_ms; /* min(op timeout, caller's deadline) */
    char ray_buf[40];            /* holds a generated ray id */
};

/*
 * Calls the op `name` with req (borrowed; NULL means {}), in a READ ONLY
 * transaction unless the op is LOOM_OP_NO_DB. On success returns 0 and sets
 * *res to a new reference. On failure returns a negative LOOM_E* code, sets
 * *res to NULL and fills err:
 *   OP_NOT_FOUND         no op of that name (the message names it)
 *   INVALID_JSON         req is not a JSON object
 *   DEADLINE_EXCEEDED    the op ran past its timeout or the caller's deadline
 *   READ_ONLY_VIOLATION  the op tried to write (class internal; names the op)
 *   ...                  whatever the op or the database reported
 * Thread-safe: calls may run concurrently, each with its own ctx.
 */
int loom_op_call(loom_op_ctx_t *ctx, const char *name, const json_t *req, json_t **res,
                 loom_error_t *err);

/*
 * For engines that run a statement op's statement themselves (the gateway's
 * event loops). loom_op_stmt_begin() looks the op up and checks the request
 * like loom_op_call(), fills ctx (its op and deadline) and binds the
 * parameters; it returns 0, or an error already counted in the metrics.
 * loom_op_stmt_end() takes the statement's result (rows NULL: the statement
 * failed with *err, e.g. from loom_db_error), makes the op's result or
 * error exactly as loom_op_call() would (deadline passed, errors that name
 * the op), counts the call in the metrics, and clears ctx->op.
 */
int loom_op_stmt_begin(loom_op_ctx_t *ctx, const loom_op_t *op, const json_t *req, int64_t start_ns,
                       loom_op_params_t *params, loom_error_t *err);
int loom_op_stmt_end(loom_op_ctx_t *ctx, const json_t *req, const PGresult *rows, int64_t start_ns,
                     json_t **res, loom_error_t *err);
/* Instead of loom_op_stmt_end(), for an op with json_column whose caller
 * sends the first column's bytes itself: checks the deadline and counts the
 * call the same way (0, or DEADLINE_EXCEEDED), and clears ctx->op. */
int loom_op_stmt_end_sent(loom_op_ctx_t *ctx, int64_t start_ns, loom_error_t *err);

/* True when the caller holds `scope` (exact match). */
bool loom_op_ctx_has_scope(const loom_op_ctx_t *ctx, const char *scope);

/* Milliseconds left before the call's deadline (at least 0); for handlers. */
int64_t loom_op_ctx_remaining_ms(const loom_op_ctx_t *ctx);

/* ---- request helpers for handlers ----------------------------------------------------- */

/* Fails with INVALID_ARGUMENT naming the first key of req not in `allowed`
 * (a NULL-terminated list). */
int loom_op_req_check_keys(const json_t *req, const char *const *allowed, loom_error_t *err);

/* Reads a string field. Missing: *out = NULL, or INVALID_ARGUMENT when
 * required. Present but not a string, empty, or longer than max_len bytes:
 * INVALID_ARGUMENT naming the field. *out is borrowed from req. */
int loom_op_req_string(const json_t *req, const char *key, bool required, size_t max_len,
                       const char **out, loom_error_t *err);

/* ---- calling an op over HTTP ----------------------------------------------------------- */

/*
 * Calls POST {base_url}/v1/ops/{name} on a running gateway with req as the
 * body (NULL means {}), over plain HTTP/1.1 (base_url "http://host[:port][/prefix]").
 * Sends "Authorization: Bearer {token}" when token is not NULL, and the ray
 * id of ctx (when set) as "X-Ray-Id". Gives up at ctx->deadline_mono_ms
 * (when set; ctx may be NULL).
 *
 * Returns 0 when the gateway answered, whatever the status: *status gets the
 * HTTP status and *body the parsed JSON body (new reference) -- the op's
 * result, or {"error":{...}} for a failed call; for an error status whose body
 * is not JSON (a proxy's page), *body is NULL. Otherwise returns a
 * negative code with err filled: INVALID_ARGUMENT (bad URL), GATEWAY_UNAVAILABLE
 * (cannot connect, connection lost), DEADLINE_EXCEEDED, GATEWAY_BAD_RESPONSE
 * (not HTTP, or a body that is not JSON).
 */
int loom_op_call_http(const char *base_url, const char *token, const loom_op_ctx_t *ctx,
                      const char *name, const json_t *req, int *status, json_t **body,
                      loom_error_t *err);

#endif
