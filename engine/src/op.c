/*
 * op.c: the op table and the dispatcher.
 *
 * The table keeps borrowed pointers to loom_op_t, sorted by name for
 * listings, and a hash index over them, so a lookup is a hash of the name's
 * ends and, most of the time, one string comparison. A call looks the op up, checks the request is
 * an object, works out its deadline, opens a READ ONLY transaction (loom_tx_run, which also retries
 * serialization failures and lost connections while the deadline allows), sets statement_timeout to
 * the time left, runs the handler, and maps what came back: 25006 and 57014 become errors that name
 * the op, a result produced after the deadline is discarded. An op that
 * declares LOOM_OP_ONE_STATEMENT runs its statement without BEGIN and COMMIT
 * on a read-only session (loom_tx_opts_t.single_statement).
 */
#include "loom/op.h"
#include "loom/clock.h"
#include "loom/log.h"
#include "loom/mem.h"
#include "loom/uuid.h"

#include <stdlib.h>
#include <string.h>

struct loom_op_table {
    const loom_op_t **ops; /* sorted by name, for listings */
    size_t n, cap;
    const loom_op_t **index; /* open addressing by name_hash(); at most half full */
    size_t index_cap;        /* a power of two; 0: no index yet */
};

/* A cheap hash of a name: its length and its first and last 8 bytes, which
 * tell "svc01.things.get" from "svc02.things.get" and "x.list" from
 * "x.get". A collision only costs one more comparison. */
static uint64_t name_hash(const char *name, size_t len)
{
    uint64_t head = 0, tail = 0;
    memcpy(&head, name, len < 8 ? len : 8);
    if (len > 8)
        memcpy(&tail, name + len - 8, 8);
    uint64_t h = (head * 0x9e3779b97f4a7c15ULL) ^ (tail * 0xc2b2ae3d27d4eb4fULL) ^ len;
    return h ^ (h >> 29);
}

static void index_rebuild(loom_op_table_t *table)
{
    size_t cap = 16;
    while (cap < table->n * 2)
        cap *= 2;
    const loom_op_t **index = loom_xcalloc(cap, sizeof(*index));
    for (size_t i = 0; i < table->n; i++) {
        const char *name = table->ops[i]->name;
        size_t k = (size_t)name_hash(name, strlen(name)) & (cap - 1);
        while (index[k])
            k = (k + 1) & (cap - 1);
        index[k] = table->ops[i];
    }
    free(table->index);
    table->index = index;
    table->index_cap = cap;
}

/* ---- the table ------------------------------------------------------------------- */

loom_op_table_t *loom_op_table_new(void)
{
    return loom_xcalloc(1, sizeof(loom_op_table_t));
}

void loom_op_table_free(loom_op_table_t *table)
{
    if (!table)
        return;
    free(table->ops);
    free(table->index);
    free(table);
}

bool loom_op_name_valid(const char *name)
{
    if (!name || !*name || strlen(name) > LOOM_OP_NAME_MAX)
        return false;
    bool part_empty = true;
    for (const char *p = name; *p; p++) {
        if (*p == '.') {
            if (part_empty)
                return false;
            part_empty = true;
        } else if ((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_') {
            part_empty = false;
        } else {
            return false;
        }
    }
    return !part_empty;
}

static int op_cmp(const void *a, const void *b)
{
    const loom_op_t *x = *(const loom_op_t *const *)a;
    const loom_op_t *y = *(const loom_op_t *const *)b;
    return strcmp(x->name, y->name);
}

int loom_op_table_add(loom_op_table_t *table, const loom_op_t *const *ops, size_t n,
                      loom_error_t *err)
{
    if (!table || (n && !ops))
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "no op table or ops given");
    for (size_t i = 0; i < n; i++) {
        const loom_op_t *op = ops[i];
        if (!op || !loom_op_name_valid(op->name))
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                                  "invalid op name \"%s\": expected [a-z0-9_] parts joined by "
                                  "'.', at most %d characters",
                                  op && op->name ? op->name : "(null)", LOOM_OP_NAME_MAX);
        if (!op->fn == !op->stmt)
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                                  "op \"%s\" needs a handler or a statement, and not both",
                                  op->name);
        if (op->stmt &&
            (!op->stmt->stmt || !op->stmt->bind || !op->stmt->result ||
             op->stmt->stmt->nparams < 0 || op->stmt->stmt->nparams > LOOM_OP_STMT_PARAMS_MAX ||
             (op->flags & LOOM_OP_NO_DB)))
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                                  "statement op \"%s\" needs a statement of at most %d "
                                  "parameters, bind and result, and a database",
                                  op->name, LOOM_OP_STMT_PARAMS_MAX);
        if (op->timeout_ms < 0)
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                                  "op \"%s\" has a negative timeout", op->name);
        bool dup = loom_op_find(table, op->name) != NULL;
        for (size_t j = 0; j < i && !dup; j++)
            dup = strcmp(ops[j]->name, op->name) == 0;
        if (dup)
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "op \"%s\" is registered twice",
                                  op->name);
    }
    if (table->n + n > table->cap) {
        table->cap = table->n + n;
        table->ops = loom_xrealloc(table->ops, table->cap * sizeof(*table->ops));
    }
    for (size_t i = 0; i < n; i++)
        table->ops[table->n++] = ops[i];
    qsort(table->ops, table->n, sizeof(*table->ops), op_cmp);
    index_rebuild(table);
    loom_error_clear(err);
    return 0;
}

const loom_op_t *loom_op_find(const loom_op_table_t *table, const char *name)
{
    if (!table || !name || !table->index_cap)
        return NULL;
    size_t len = strlen(name);
    size_t mask = table->index_cap - 1;
    for (size_t k = (size_t)name_hash(name, len) & mask; table->index[k]; k = (k + 1) & mask)
        if (strcmp(table->index[k]->name, name) == 0)
            return table->index[k];
    return NULL;
}

size_t loom_op_table_count(const loom_op_table_t *table)
{
    return table ? table->n : 0;
}

const loom_op_t *loom_op_table_at(const loom_op_table_t *table, size_t i)
{
    return table && i < table->n ? table->ops[i] : NULL;
}

/* ---- runtime and context ------------------------------------------------------------ */

/* Latency buckets for reads, in seconds: 0.5 ms to 10 s. */
static const double op_buckets[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                    0.1,    0.25,  0.5,    1,     2.5,  5,     10};

void loom_op_runtime_init(loom_op_runtime_t *rt, const loom_op_table_t *table, loom_db_pool_t *pool,
                          loom_metrics_t *metrics)
{
    memset(rt, 0, sizeof(*rt));
    rt->table = table;
    rt->pool = pool;
    rt->metrics = metrics;
    if (metrics) {
        static const char *const calls_labels[] = {"op", "result", NULL};
        static const char *const duration_labels[] = {"op", NULL};
        rt->calls = loom_metrics_counter(metrics, "loom_op_calls_total",
                                         "Op calls by op and result (\"ok\" or the error code).",
                                         calls_labels);
        rt->duration = loom_metrics_histogram(
            metrics, "loom_op_duration_seconds", "Time from the op call to its result, in seconds.",
            duration_labels, op_buckets, sizeof(op_buckets) / sizeof(op_buckets[0]));
    }
}

bool loom_op_ctx_has_scope(const loom_op_ctx_t *ctx, const char *scope)
{
    if (!ctx || !ctx->scopes || !scope)
        return false;
    for (const char *const *s = ctx->scopes; *s; s++)
        if (strcmp(*s, scope) == 0)
            return true;
    return false;
}

int64_t loom_op_ctx_remaining_ms(const loom_op_ctx_t *ctx)
{
    if (!ctx || !ctx->op_deadline_mono_ms)
        return 0;
    int64_t left = ctx->op_deadline_mono_ms - loom_mono_ms();
    return left > 0 ? left : 0;
}

/* ---- request helpers ------------------------------------------------------------------ */

const char *loom_op_scope(const loom_op_t *op, char *buf, size_t size)
{
    if (op->scope)
        snprintf(buf, size, "%s", op->scope);
    else
        snprintf(buf, size, "%.*s:read", (int)strcspn(op->name, "."), op->name);
    return buf;
}

int loom_op_req_check_keys(const json_t *req, const char *const *allowed, loom_error_t *err)
{
    const char *key;
    json_t *value;
    json_object_foreach((json_t *)req, key, value)
    {
        (void)value;
        bool ok = false;
        for (const char *const *a = allowed; a && *a && !ok; a++)
            ok = strcmp(*a, key) == 0;
        if (!ok)
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "unknown field \"%.100s\"", key);
    }
    return 0;
}

int loom_op_req_string(const json_t *req, const char *key, bool required, size_t max_len,
                       const char **out, loom_error_t *err)
{
    *out = NULL;
    json_t *v = json_object_get(req, key);
    if (!v || json_is_null(v)) {
        if (required)
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "missing field \"%s\"", key);
        return 0;
    }
    if (!json_is_string(v))
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "field \"%s\" must be a string",
                              key);
    size_t len = json_string_length(v);
    if (len == 0 || len > max_len)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "field \"%s\" must be 1 to %zu bytes long", key, max_len);
    if (strlen(json_string_value(v)) != len)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "field \"%s\" must not contain NUL characters", key);
    *out = json_string_value(v);
    return 0;
}

/* ---- calling ---------------------------------------------------------------------------- */

/* How far past the deadline a single statement may run when the op keeps
 * its own timeout on the session (see tx_body). */
#define LOOM_OP_TIMEOUT_SLACK_MS 10

typedef struct call {
    loom_op_ctx_t *ctx;
    const json_t *req;
    json_t *res;
    int attempts;
    int64_t start_ms; /* loom_mono_ms() at the call */
    bool callers;     /* the deadline is the caller's, earlier than the op's */
} call_t;

static int stmt_run(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                    loom_error_t *err);

static int tx_body(loom_db_t *db, void *arg, loom_error_t *err)
{
    call_t *c = arg;
    /* A retried body starts afresh. */
    json_decref(c->res);
    c->res = NULL;
    int64_t left = c->ctx->op_deadline_mono_ms - loom_mono_ms();
    if (left <= 0)
        return loom_error_set(err, LOOM_CODE_DEADLINE_EXCEEDED, "deadline passed");
    /* statement_timeout is the time left, sent with the first statement.
     * A single statement sets it on the session, so one that comes with the
     * op's own timeout barely started asks for that timeout itself: the
     * session keeps the value and the next call sends no SET. The statement
     * may then run up to a few ms past the deadline, and its result is
     * discarded as late like any other. */
    int64_t timeout = c->ctx->op_deadline_mono_ms - c->start_ms;
    if (!c->callers && c->attempts == 0 && timeout - left <= LOOM_OP_TIMEOUT_SLACK_MS)
        left = timeout;
    c->attempts++;
    int rc = loom_db_statement_timeout(db, left, err);
    if (rc != 0)
        return rc;
    loom_error_clear(err);
    rc = c->ctx->op->stmt ? stmt_run(c->ctx, db, c->req, &c->res, err)
                          : c->ctx->op->fn(c->ctx, db, c->req, &c->res, err);
    if (rc != 0 && loom_db_single(db) && loom_error_is(err, LOOM_CODE_INTERNAL)) {
        char reason[LOOM_ERROR_MESSAGE_MAX];
        snprintf(reason, sizeof(reason), "%s", err->message);
        loom_error_set(err, LOOM_CODE_INTERNAL, "op \"%s\" declares one statement: %s",
                       c->ctx->op->name, reason);
    }
    if (rc == 0 && !loom_db_single(db) && !loom_db_in_tx(db)) {
        /* The op ended the engine's transaction (COMMIT/ROLLBACK of its own):
         * whatever it ran after that was outside the READ ONLY guard. */
        return loom_error_set(err, LOOM_CODE_INTERNAL,
                              "op \"%s\" ended its transaction; ops must not run COMMIT or "
                              "ROLLBACK",
                              c->ctx->op->name);
    }
    return rc;
}

static void record(const loom_op_ctx_t *ctx, const char *op_label, const char *result,
                   int64_t start_ns, int64_t end_ns)
{
    const loom_op_runtime_t *rt = ctx->rt;
    if (!rt->calls && !rt->duration)
        return;
    if (!end_ns)
        end_ns = loom_mono_fast_ns();
    double seconds = (double)(end_ns - start_ns) / 1e9;
    const char *calls_values[] = {op_label, result};
    const char *duration_values[] = {op_label};
    loom_metrics_counter_inc(rt->calls, calls_values);
    loom_metrics_histogram_observe(rt->duration, duration_values, seconds);
}

/* The handler of a statement op: bind, run, make the result. */
static int stmt_run(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                    loom_error_t *err)
{
    const loom_op_stmt_t *st = ctx->op->stmt;
    loom_op_params_t params;
    memset(params.v, 0, sizeof(params.v));
    int rc = st->bind(ctx, req, &params, err);
    if (rc != 0)
        return rc;
    PGresult *r = NULL;
    rc = loom_db_exec(db, st->stmt, params.v, &r, err);
    if (rc != 0)
        return rc;
    rc = st->result(ctx, req, r, res, err);
    PQclear(r);
    return rc;
}

/* Looks the op up, checks the request, fills ctx's op and deadline. */
static int call_begin(loom_op_ctx_t *ctx, const loom_op_t *op, const char *name, const json_t *req,
                      int64_t start_ns, bool *callers, loom_error_t *e)
{
    if (!ctx->ray_id) {
        loom_uuid_v7_string(ctx->ray_buf);
        ctx->ray_id = ctx->ray_buf;
    }
    if (!op) {
        int rc = loom_error_set(e, LOOM_CODE_OP_NOT_FOUND, "unknown op \"%.*s\"", LOOM_OP_NAME_MAX,
                                name ? name : "");
        /* Unknown names share one series: callers must not grow the label set. */
        record(ctx, "_unknown", e->code, start_ns, 0);
        return rc;
    }
    if (req && !json_is_object(req)) {
        int rc = loom_error_set(e, LOOM_CODE_INVALID_JSON,
                                "op \"%s\" takes a JSON object as its request", op->name);
        record(ctx, op->name, e->code, start_ns, 0);
        return rc;
    }
    int64_t now = start_ns / 1000000;
    int64_t timeout = op->timeout_ms > 0 ? op->timeout_ms : LOOM_OP_DEFAULT_TIMEOUT_MS;
    int64_t deadline = now + timeout;
    *callers = ctx->deadline_mono_ms > 0 && ctx->deadline_mono_ms < deadline;
    if (*callers)
        deadline = ctx->deadline_mono_ms;
    ctx->op = op;
    ctx->op_deadline_mono_ms = deadline;
    return 0;
}

/* Maps what the call came to (rc, e, *res) as loom_op_call() reports it,
 * counts it, and clears ctx->op. */
static int call_end(loom_op_ctx_t *ctx, int rc, loom_error_t *e, json_t **res, int64_t start_ns,
                    bool callers, loom_error_t *err)
{
    const loom_op_t *op = ctx->op;
    int64_t now = start_ns / 1000000;
    int64_t deadline = ctx->op_deadline_mono_ms;
    int64_t end_ns = loom_mono_fast_ns();
    int64_t end = end_ns / 1000000;
    if (rc == 0 && !*res)
        rc = loom_error_set(e, LOOM_CODE_INTERNAL, "op \"%s\" returned no result", op->name);
    if (rc == 0 && end > deadline)
        rc = loom_error_set(e, LOOM_CODE_DEADLINE_EXCEEDED, "ran %lld ms", (long long)(end - now));
    if (rc != 0) {
        json_decref(*res);
        *res = NULL;
        char reason[LOOM_ERROR_MESSAGE_MAX];
        snprintf(reason, sizeof(reason), "%s", e->message);
        if (!e->code) {
            loom_error_set(e, LOOM_CODE_INTERNAL, "op \"%s\" failed: %s", op->name,
                           loom_strerror(rc));
        } else if (loom_error_is(e, LOOM_CODE_DEADLINE_EXCEEDED)) {
            loom_error_set(e, LOOM_CODE_DEADLINE_EXCEEDED,
                           "op \"%s\" did not finish within %s %lld ms: %s", op->name,
                           callers ? "the caller's deadline of" : "its timeout of",
                           (long long)(deadline - now), reason);
        } else if (loom_error_is(e, LOOM_CODE_READ_ONLY_VIOLATION)) {
            loom_error_set(e, LOOM_CODE_READ_ONLY_VIOLATION,
                           "op \"%s\" tried to write; ops are read-only: %s", op->name, reason);
        }
        if (e->cls == LOOM_ERR_INTERNAL)
            LOOM_ERROR("op failed", "op=%s ray_id=%s code=%s error=%s", op->name, ctx->ray_id,
                       e->code, e->message);
    }
    record(ctx, op->name, rc == 0 ? "ok" : e->code, start_ns, end_ns);
    ctx->op = NULL;
    if (rc == 0) {
        loom_error_clear(err); /* not a copy of e: that is 600 bytes per call */
        return 0;
    }
    if (err && err != e)
        *err = *e;
    return rc < 0 ? rc : LOOM_EIO;
}

int loom_op_call(loom_op_ctx_t *ctx, const char *name, const json_t *req, json_t **res,
                 loom_error_t *err)
{
    if (res)
        *res = NULL;
    if (!ctx || !ctx->rt || !name || !res)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "loom_op_call needs a context with a runtime, a name and a result");
    int64_t start_ns = loom_mono_fast_ns();
    loom_error_t e;
    loom_error_clear(&e);
    const loom_op_t *op = loom_op_find(ctx->rt->table, name);
    bool callers = false;
    int rc = call_begin(ctx, op, name, req, start_ns, &callers, &e);
    if (rc != 0) {
        if (err)
            *err = e;
        return rc;
    }

    json_t *empty = NULL;
    if (!req)
        req = empty = json_object();
    int64_t now = start_ns / 1000000;
    call_t c = {.ctx = ctx, .req = req, .res = NULL, .start_ms = now, .callers = callers};
    if (ctx->op_deadline_mono_ms <= now) {
        rc = loom_error_set(&e, LOOM_CODE_DEADLINE_EXCEEDED, "deadline passed");
    } else if (op->flags & LOOM_OP_NO_DB) {
        rc = op->fn(ctx, NULL, req, &c.res, &e);
    } else if (!ctx->rt->pool) {
        rc = loom_error_set(&e, LOOM_CODE_INTERNAL, "op \"%s\" needs a database and none is set",
                            op->name);
    } else {
        bool one = (op->flags & LOOM_OP_ONE_STATEMENT) || op->stmt;
        loom_tx_opts_t opts = {.read_only = true,
                               .deadline_mono_ms = ctx->op_deadline_mono_ms,
                               .single_statement = one};
        rc = loom_tx_run(ctx->rt->pool, &opts, tx_body, &c, &e);
    }
    json_decref(empty);
    *res = c.res;
    return call_end(ctx, rc, &e, res, start_ns, callers, err);
}

int loom_op_stmt_begin(loom_op_ctx_t *ctx, const loom_op_t *op, const json_t *req, int64_t start_ns,
                       loom_op_params_t *params, loom_error_t *err)
{
    loom_error_clear(err);
    bool callers = false;
    int rc = call_begin(ctx, op, op ? op->name : "", req, start_ns, &callers, err);
    if (rc != 0)
        return rc;
    if (!op->stmt) {
        rc = loom_error_set(err, LOOM_CODE_INTERNAL, "op \"%s\" is not a statement op", op->name);
    } else if (ctx->op_deadline_mono_ms <= start_ns / 1000000) {
        rc = loom_error_set(err, LOOM_CODE_DEADLINE_EXCEEDED, "deadline passed");
    } else {
        memset(params->v, 0, sizeof(params->v));
        rc = op->stmt->bind(ctx, req, params, err);
    }
    if (rc == 0)
        return 0;
    json_t *none = NULL;
    return call_end(ctx, rc, err, &none, start_ns, callers, err);
}

/* After call_begin: the call's deadline is the caller's (earlier than the
 * op's own timeout), for the wording of DEADLINE_EXCEEDED. */
static bool deadline_is_callers(const loom_op_ctx_t *ctx)
{
    return ctx->deadline_mono_ms > 0 && ctx->deadline_mono_ms == ctx->op_deadline_mono_ms;
}

int loom_op_stmt_end_sent(loom_op_ctx_t *ctx, int64_t start_ns, loom_error_t *err)
{
    bool callers = deadline_is_callers(ctx);
    json_t *mark = json_true(); /* stands for the result the caller sends */
    loom_error_t e;
    loom_error_clear(&e);
    return call_end(ctx, 0, &e, &mark, start_ns, callers, err);
}

int loom_op_stmt_end(loom_op_ctx_t *ctx, const json_t *req, const PGresult *rows, int64_t start_ns,
                     json_t **res, loom_error_t *err)
{
    *res = NULL;
    const loom_op_t *op = ctx->op;
    bool callers = deadline_is_callers(ctx);
    int rc;
    if (rows) {
        loom_error_clear(err);
        rc = op->stmt->result(ctx, req, rows, res, err);
    } else {
        rc = err->code ? LOOM_EIO : loom_error_set(err, LOOM_CODE_INTERNAL, "no result");
    }
    return call_end(ctx, rc, err, res, start_ns, callers, err);
}
