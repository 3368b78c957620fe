/*
 * db.c: libpq connection pool, lazily prepared statements, SQLSTATE mapping
 * and the retrying transaction runner.
 *
 * The pool is a fixed array of slots guarded by one mutex. A slot's PGconn is
 * created on first use and replaced after it breaks, so a database restart
 * costs each slot one failed attempt and nothing else.
 */
#include "loom/db.h"
#include "loom/clock.h"
#include "loom/log.h"
#include "loom/mem.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* A statement queued by loom_db_exec_deferred(), with its own copy of the
 * parameters. */
typedef struct deferred {
    const loom_db_stmt_t *stmt;
    char **params;
} deferred_t;

struct loom_db {
    loom_db_pool_t *pool;
    PGconn *pg;
    bool in_use;
    const loom_db_stmt_t **prepared; /* statements prepared on this pg */
    size_t n_prepared, cap_prepared;
    /* Round trips saved: the BEGIN of loom_tx_run() (and its begin_extra)
     * waits for the transaction's first statement, and deferred statements
     * wait for the next statement that needs an answer; then all of them go
     * in one pipeline. */
    char begin[128];
    char begin_extra[128];
    deferred_t *deferred;
    size_t n_deferred, cap_deferred;
    /* The COMMIT of a read-only transaction was sent and its answer is read
     * when the connection is next acquired: the op's caller does not wait
     * for it. */
    bool commit_in_flight;
    /* A single-statement attempt (loom_tx_opts_t.single_statement) on a
     * read-only session: no BEGIN, no COMMIT; one statement, which is its own
     * snapshot. begin_extra then holds a session-level SET of
     * statement_timeout, sent with that statement when the value changes. */
    bool single;
    bool single_used;           /* its statement was run */
    int64_t session_timeout_ms; /* statement_timeout this session has; -1: not known */
    int plan_mode;              /* the session's plan_cache_mode: PLAN_* */
};

/*
 * A session's plan_cache_mode. PLAN_POOL is the pool's own: force_custom_plan
 * on write pools, the server's default on read-only ones. PLAN_ONCE is
 * force_generic_plan, for statements marked plan_once. PLAN_UNKNOWN follows
 * whatever may have undone a SET (a rollback, a script, raw use of the
 * connection): the next statement sets the mode it needs. PLAN_NONE: the
 * server has no such setting (older CockroachDB); nothing is ever set.
 */
enum { PLAN_NONE, PLAN_UNKNOWN, PLAN_POOL, PLAN_ONCE };

struct loom_db_pool {
    char *conninfo;
    loom_db_pool_opts_t opts;
    pthread_mutex_t mu;
    pthread_cond_t cond;
    loom_db_t *slots;
    int size;
};

/* ---- errors --------------------------------------------------------------- */

static const char *first_line(const char *msg, char *buf, size_t size)
{
    if (!msg || !*msg)
        return "no message";
    size_t n = strcspn(msg, "\n");
    snprintf(buf, size, "%.*s", (int)n, msg);
    return buf;
}

/*
 * What each SQLSTATE means for a caller, in one place: the longest prefix
 * that matches wins. "Transient" ones may succeed when run again (the
 * transaction runner and the workers retry them); the others fail the same
 * way every time. A consumer rejects a command that fails with a permanent
 * one (DB_REJECTED, ALREADY_EXISTS) and holds its partition on the others.
 * States not listed are DB_ERROR: a bug or a schema that does not match
 * (42P01 undefined table...), which an operator must fix; a worker holds
 * the partition rather than reject every command meanwhile.
 */
typedef struct sqlstate_rule {
    const char *prefix;
    loom_code_t code;
} sqlstate_rule_t;

static const sqlstate_rule_t sqlstate_rules[] = {
    {"40", LOOM_CODE_SERIALIZATION_FAILURE}, /* 40001 serialization, 40P01 deadlock */
    {"40002", LOOM_CODE_DB_REJECTED},        /* a deferred constraint failed at COMMIT */
    {"08", LOOM_CODE_DB_UNAVAILABLE},        /* connection exceptions */
    {"57P", LOOM_CODE_DB_UNAVAILABLE},       /* admin/crash shutdown, cannot connect now */
    {"53", LOOM_CODE_DB_BUSY},               /* insufficient resources: disk, memory, connections */
    {"55P03", LOOM_CODE_DB_BUSY},            /* lock_not_available (lock_timeout) */
    {"55006", LOOM_CODE_DB_BUSY},            /* object_in_use */
    {"57014", LOOM_CODE_DEADLINE_EXCEEDED},  /* query_canceled (statement_timeout) */
    {"25006", LOOM_CODE_READ_ONLY_VIOLATION},
    {"22", LOOM_CODE_DB_REJECTED}, /* data exceptions: bad encoding, out of range, ... */
    {"23505", LOOM_CODE_ALREADY_EXISTS},
    {"23", LOOM_CODE_DB_REJECTED}, /* integrity constraint violations */
    {"54", LOOM_CODE_DB_REJECTED}, /* program limits: index row too large, too many columns */
};

loom_code_t loom_db_sqlstate_code(const char *state)
{
    size_t best = 0;
    loom_code_t code = LOOM_CODE_DB_ERROR;
    for (size_t i = 0; state && i < sizeof(sqlstate_rules) / sizeof(sqlstate_rules[0]); i++) {
        size_t n = strlen(sqlstate_rules[i].prefix);
        if (n > best && strncmp(state, sqlstate_rules[i].prefix, n) == 0) {
            best = n;
            code = sqlstate_rules[i].code;
        }
    }
    return code;
}

int loom_db_error(PGconn *pg, const PGresult *res, loom_error_t *err)
{
    char line[LOOM_ERROR_MESSAGE_MAX];
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    const char *msg = res ? PQresultErrorMessage(res) : NULL;
    if ((!msg || !*msg) && pg)
        msg = PQerrorMessage(pg);
    const char *text = first_line(msg, line, sizeof(line));
    /* libpq prefixes "ERROR:  "; keep the reason only. */
    if (strncmp(text, "ERROR:  ", 8) == 0)
        text += 8;

    loom_code_t code = loom_db_sqlstate_code(state);
    int rc;
    if (code == LOOM_CODE_DB_UNAVAILABLE || (pg && PQstatus(pg) == CONNECTION_BAD) ||
        (!state && !res)) {
        loom_error_set(err, LOOM_CODE_DB_UNAVAILABLE, "database connection lost: %s", text);
        rc = LOOM_EDBCONN;
    } else {
        switch (code) {
        case LOOM_CODE_DEADLINE_EXCEEDED:
            rc = loom_error_set(err, code, "statement canceled: %s", text);
            break;
        case LOOM_CODE_READ_ONLY_VIOLATION:
        case LOOM_CODE_ALREADY_EXISTS:
            rc = loom_error_set(err, code, "%s", text);
            break;
        case LOOM_CODE_DB_ERROR:
            loom_error_set(err, code, "%s (SQLSTATE %s)", text, state ? state : "none");
            rc = LOOM_EDB;
            break;
        default:
            rc = loom_error_set(err, code, "%s (SQLSTATE %s)", text, state);
        }
    }
    if (err) {
        const char *c = res ? PQresultErrorField(res, PG_DIAG_CONSTRAINT_NAME) : NULL;
        snprintf(err->sqlstate, sizeof(err->sqlstate), "%s", state ? state : "");
        snprintf(err->constraint, sizeof(err->constraint), "%s", c ? c : "");
    }
    return rc;
}

bool loom_db_error_is_transient(const loom_error_t *err)
{
    return err && err->code &&
           (loom_error_is(err, LOOM_CODE_SERIALIZATION_FAILURE) ||
            loom_error_is(err, LOOM_CODE_DB_UNAVAILABLE) || loom_error_is(err, LOOM_CODE_DB_BUSY));
}

/* ---- connections ----------------------------------------------------------- */

/* Server notices (e.g. "relation already exists, skipping") go to the debug log. */
void loom_db_notice_log(void *arg, const char *message)
{
    (void)arg;
    LOOM_DEBUG("database notice", "notice=%.*s", (int)strcspn(message, "\n"), message);
}

/* The SET that gives the session the plan mode a statement needs (plan_once
 * or not), or NULL when it has it. */
static const char *plan_set(const loom_db_t *db, bool once)
{
    int want = once ? PLAN_ONCE : PLAN_POOL;
    if (db->plan_mode == PLAN_NONE || db->plan_mode == want)
        return NULL;
    if (once)
        return "SET plan_cache_mode = force_generic_plan";
    return db->pool->opts.read_only ? "SET plan_cache_mode TO DEFAULT"
                                    : "SET plan_cache_mode = force_custom_plan";
}

/* A SET of the mode may have been undone (a rollback undoes the SETs of its
 * transaction): the next statement sets the one it needs. */
static void plan_forget(loom_db_t *db)
{
    if (db->plan_mode != PLAN_NONE)
        db->plan_mode = PLAN_UNKNOWN;
}

static int db_connect(loom_db_t *db, loom_error_t *err)
{
    loom_db_pool_t *pool = db->pool;
    /* Defaults first: values inside the conninfo (expanded from dbname) win. */
    const char *keys[] = {"connect_timeout", "application_name", "dbname", NULL};
    const char *vals[] = {"5", pool->opts.application_name, pool->conninfo, NULL};
    db->pg = PQconnectdbParams(keys, vals, 1);
    db->n_prepared = 0;
    if (!db->pg)
        return loom_error_set(err, LOOM_CODE_DB_UNAVAILABLE, "could not connect: out of memory");
    if (PQstatus(db->pg) != CONNECTION_OK) {
        char line[LOOM_ERROR_MESSAGE_MAX];
        loom_error_set(err, LOOM_CODE_DB_UNAVAILABLE, "could not connect to the database: %s",
                       first_line(PQerrorMessage(db->pg), line, sizeof(line)));
        PQfinish(db->pg);
        db->pg = NULL;
        return LOOM_EDBCONN;
    }
    PQsetNoticeProcessor(db->pg, loom_db_notice_log, NULL);
    db->session_timeout_ms = -1;
    /* A prepared statement's generic plan is made once per connection, from
     * the table's size at that moment: made on a new, empty table it may scan
     * the table, and keep scanning it as it grows (the dedup lookup of a
     * fresh worker once got slower with every batch). So write pools plan at
     * each execution, which follows the table's size; read-only pools keep
     * the server's default. Statements marked plan_once are planned once
     * either way (plan_set). Servers without the setting (older CockroachDB)
     * keep their own planning. */
    PGresult *pr = PQexec(db->pg, pool->opts.read_only ? "SET plan_cache_mode TO DEFAULT"
                                                       : "SET plan_cache_mode = force_custom_plan");
    db->plan_mode = PQresultStatus(pr) == PGRES_COMMAND_OK ? PLAN_POOL : PLAN_NONE;
    if (db->plan_mode == PLAN_NONE)
        LOOM_DEBUG("plan_cache_mode not set", "error=%s", PQresultErrorMessage(pr));
    PQclear(pr);
    if (pool->opts.read_only) {
        PGresult *r = PQexec(db->pg, "SET default_transaction_read_only = on");
        bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
        PQclear(r);
        if (!ok) {
            int rc = loom_db_error(db->pg, NULL, err);
            PQfinish(db->pg);
            db->pg = NULL;
            return rc;
        }
    }
    return 0;
}

static void deferred_clear(loom_db_t *db)
{
    for (size_t i = 0; i < db->n_deferred; i++) {
        for (int k = 0; k < db->deferred[i].stmt->nparams; k++)
            free(db->deferred[i].params[k]);
        free(db->deferred[i].params);
    }
    db->n_deferred = 0;
}

/* Forgets what waits to be sent (a transaction that ends before it ran). */
static void pending_clear(loom_db_t *db)
{
    db->begin[0] = '\0';
    db->begin_extra[0] = '\0';
    deferred_clear(db);
}

static void db_disconnect(loom_db_t *db)
{
    if (db->pg)
        PQfinish(db->pg);
    db->pg = NULL;
    db->n_prepared = 0;
    db->commit_in_flight = false;
    db->session_timeout_ms = -1;
}

/* Reads the answer of a COMMIT sent without waiting. */
static void commit_finish(loom_db_t *db)
{
    if (!db->commit_in_flight)
        return;
    db->commit_in_flight = false;
    bool bad = false;
    char why[LOOM_ERROR_MESSAGE_MAX] = "";
    /* The COMMIT's result and its NULL, then the sync. */
    for (int nulls = 0; nulls < 2;) {
        PGresult *r = PQgetResult(db->pg);
        if (!r) {
            nulls++;
            continue;
        }
        ExecStatusType st = PQresultStatus(r);
        if (st != PGRES_PIPELINE_SYNC && st != PGRES_COMMAND_OK) {
            bad = true;
            snprintf(why, sizeof(why), "%s", PQresultErrorMessage(r));
        }
        PQclear(r);
        if (st == PGRES_PIPELINE_SYNC)
            break;
    }
    if (!PQexitPipelineMode(db->pg) || bad || PQstatus(db->pg) != CONNECTION_OK) {
        LOOM_WARN("read-only COMMIT failed; reconnecting", "error=%.*s", (int)strcspn(why, "\n"),
                  why[0] ? why : PQerrorMessage(db->pg));
        db_disconnect(db);
    }
}

int loom_db_pool_new(const char *conninfo, const loom_db_pool_opts_t *opts, loom_db_pool_t **out,
                     loom_error_t *err)
{
    if (!conninfo || !out)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "no database URL given");
    loom_db_pool_t *pool = loom_xcalloc(1, sizeof(*pool));
    if (opts)
        pool->opts = *opts;
    if (pool->opts.size <= 0)
        pool->opts.size = 4;
    if (pool->opts.acquire_timeout_ms <= 0)
        pool->opts.acquire_timeout_ms = 30000;
    if (!pool->opts.application_name)
        pool->opts.application_name = "loom";
    pool->conninfo = loom_xstrdup(conninfo);
    pool->size = pool->opts.size;
    pool->slots = loom_xcalloc((size_t)pool->size, sizeof(*pool->slots));
    for (int i = 0; i < pool->size; i++)
        pool->slots[i].pool = pool;
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->cond, NULL);
    int rc = db_connect(&pool->slots[0], err);
    if (rc != 0) {
        loom_db_pool_free(pool);
        return rc;
    }
    *out = pool;
    return 0;
}

void loom_db_pool_free(loom_db_pool_t *pool)
{
    if (!pool)
        return;
    for (int i = 0; i < pool->size; i++) {
        db_disconnect(&pool->slots[i]);
        deferred_clear(&pool->slots[i]);
        free(pool->slots[i].deferred);
        free(pool->slots[i].prepared);
    }
    pthread_mutex_destroy(&pool->mu);
    pthread_cond_destroy(&pool->cond);
    free(pool->slots);
    free(pool->conninfo);
    free(pool);
}

bool loom_db_pool_read_only(const loom_db_pool_t *pool)
{
    return pool->opts.read_only;
}

const char *loom_db_pool_conninfo(const loom_db_pool_t *pool)
{
    return pool->conninfo;
}

const char *loom_db_pool_application_name(const loom_db_pool_t *pool)
{
    return pool->opts.application_name;
}

int loom_db_acquire(loom_db_pool_t *pool, loom_db_t **out, loom_error_t *err)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += pool->opts.acquire_timeout_ms / 1000;
    until.tv_nsec += (pool->opts.acquire_timeout_ms % 1000) * 1000000;
    if (until.tv_nsec >= 1000000000) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000;
    }
    loom_db_t *db = NULL;
    pthread_mutex_lock(&pool->mu);
    for (;;) {
        /* Prefer a slot that is already connected. */
        for (int i = 0; i < pool->size && !db; i++)
            if (!pool->slots[i].in_use && pool->slots[i].pg)
                db = &pool->slots[i];
        for (int i = 0; i < pool->size && !db; i++)
            if (!pool->slots[i].in_use)
                db = &pool->slots[i];
        if (db)
            break;
        if (pthread_cond_timedwait(&pool->cond, &pool->mu, &until) == ETIMEDOUT) {
            pthread_mutex_unlock(&pool->mu);
            return loom_error_set(err, LOOM_CODE_DB_UNAVAILABLE,
                                  "no free database connection after %lld ms (pool of %d)",
                                  (long long)pool->opts.acquire_timeout_ms, pool->size);
        }
    }
    db->in_use = true;
    pthread_mutex_unlock(&pool->mu);

    if (db->pg)
        commit_finish(db);
    if (db->pg && PQstatus(db->pg) != CONNECTION_OK)
        db_disconnect(db);
    if (!db->pg) {
        int rc = db_connect(db, err);
        if (rc != 0) {
            loom_db_release(db);
            return rc;
        }
    }
    *out = db;
    return 0;
}

void loom_db_release(loom_db_t *db)
{
    if (!db)
        return;
    loom_db_pool_t *pool = db->pool;
    pending_clear(db);
    if (db->pg && !db->commit_in_flight) {
        if (PQstatus(db->pg) != CONNECTION_OK) {
            db_disconnect(db);
        } else if (PQtransactionStatus(db->pg) != PQTRANS_IDLE) {
            PGresult *r = PQexec(db->pg, "ROLLBACK");
            PQclear(r);
            plan_forget(db);
            if (PQtransactionStatus(db->pg) != PQTRANS_IDLE)
                db_disconnect(db);
        }
    }
    pthread_mutex_lock(&pool->mu);
    db->in_use = false;
    pthread_cond_signal(&pool->cond);
    pthread_mutex_unlock(&pool->mu);
}

static int flush_pending(loom_db_t *db, loom_error_t *err);

PGconn *loom_db_pg(loom_db_t *db)
{
    /* Raw use must find the transaction open and the queue sent; an error
     * here leaves the transaction aborted, which the caller's next statement
     * reports. */
    loom_error_t e;
    if (db->pg && flush_pending(db, &e) != 0)
        LOOM_WARN("could not send pending statements", "error=%s", e.message);
    plan_forget(db); /* what the caller runs may undo a SET of the plan mode */
    return db->pg;
}

bool loom_db_single(const loom_db_t *db)
{
    return db->single;
}

int loom_db_statement_timeout(loom_db_t *db, int64_t ms, loom_error_t *err)
{
    if (ms < 1)
        ms = 1;
    if (db->single) {
        /* Session-level, sent with the statement; nothing when it is set. */
        if (ms == db->session_timeout_ms) {
            db->begin_extra[0] = '\0';
        } else {
            snprintf(db->begin_extra, sizeof(db->begin_extra), "SET statement_timeout = %lld",
                     (long long)ms);
            db->session_timeout_ms = ms; /* forgotten again if the attempt fails */
        }
        return 0;
    }
    char sql[64];
    snprintf(sql, sizeof(sql), "SET LOCAL statement_timeout = %lld", (long long)ms);
    if (db->begin[0]) { /* goes with the BEGIN */
        snprintf(db->begin_extra, sizeof(db->begin_extra), "%s", sql);
        return 0;
    }
    return loom_db_exec_script(db, sql, err);
}

bool loom_db_in_tx(loom_db_t *db)
{
    return db->begin[0] || (db->pg && PQtransactionStatus(db->pg) == PQTRANS_INTRANS);
}

int loom_db_backend_pid(loom_db_t *db)
{
    return db->pg ? PQbackendPID(db->pg) : 0;
}

/* ---- statements ------------------------------------------------------------- */

static int check_result(loom_db_t *db, PGresult *r, PGresult **res, loom_error_t *err)
{
    ExecStatusType st = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) {
        if (res)
            *res = r;
        else
            PQclear(r);
        return 0;
    }
    int rc = loom_db_error(db->pg, r, err);
    PQclear(r);
    if (res)
        *res = NULL;
    return rc;
}

static bool is_prepared(loom_db_t *db, const loom_db_stmt_t *stmt)
{
    for (size_t i = 0; i < db->n_prepared; i++)
        if (db->prepared[i] == stmt)
            return true;
    return false;
}

static void mark_prepared(loom_db_t *db, const loom_db_stmt_t *stmt)
{
    if (db->n_prepared == db->cap_prepared) {
        db->cap_prepared = db->cap_prepared ? db->cap_prepared * 2 : 16;
        db->prepared = loom_xrealloc(db->prepared, db->cap_prepared * sizeof(*db->prepared));
    }
    db->prepared[db->n_prepared++] = stmt;
}

/* One result a pipeline waits for. */
typedef struct expect {
    const loom_db_stmt_t *prepare; /* a Parse for this statement */
    bool final;                    /* the caller's statement */
} expect_t;

/* Queues the SET a statement's plan mode needs, if any. */
static bool send_plan_set(loom_db_t *db, bool once, expect_t *ex, size_t *n)
{
    const char *set = plan_set(db, once);
    if (!set)
        return true;
    if (!PQsendQueryParams(db->pg, set, 0, NULL, NULL, NULL, NULL, 0))
        return false;
    ex[(*n)++] = (expect_t){0};
    db->plan_mode = once ? PLAN_ONCE : PLAN_POOL;
    return true;
}

static bool send_stmt(loom_db_t *db, const loom_db_stmt_t *stmt, const char *const *params,
                      expect_t *ex, size_t *n)
{
    if (!send_plan_set(db, stmt->plan_once, ex, n))
        return false;
    bool queued = false;
    for (size_t i = 0; i < *n; i++)
        queued |= ex[i].prepare == stmt;
    if (!is_prepared(db, stmt) && !queued) {
        if (!PQsendPrepare(db->pg, stmt->name, stmt->sql, stmt->nparams, NULL))
            return false;
        ex[(*n)++] = (expect_t){.prepare = stmt};
    }
    if (!PQsendQueryPrepared(db->pg, stmt->name, stmt->nparams, params, NULL, NULL, 0))
        return false;
    ex[(*n)++] = (expect_t){0};
    return true;
}

/*
 * Sends the pending BEGIN, the deferred statements and then the caller's
 * statement (stmt, or the one-off sql; neither: just the pending ones) in one
 * pipeline and one round trip. The first error wins; the server skips the
 * rest up to the sync, and an open transaction is left aborted.
 */
static int pipeline(loom_db_t *db, const loom_db_stmt_t *stmt, const char *sql, int nparams,
                    const char *const *params, PGresult **res, loom_error_t *err)
{
    PGconn *pg = db->pg;
    /* Each statement may take a SET of the plan mode, a Parse and a Bind. */
    size_t cap = 3 * db->n_deferred + 6, n = 0;
    expect_t *ex = loom_xcalloc(cap, sizeof(*ex));
    bool sent = PQenterPipelineMode(pg);
    if (sent && db->begin[0]) {
        sent = PQsendQueryParams(pg, db->begin, 0, NULL, NULL, NULL, NULL, 0);
        ex[n++] = (expect_t){0};
    }
    if (sent && db->begin_extra[0]) {
        sent = PQsendQueryParams(pg, db->begin_extra, 0, NULL, NULL, NULL, NULL, 0);
        ex[n++] = (expect_t){0};
    }
    for (size_t i = 0; sent && i < db->n_deferred; i++)
        sent = send_stmt(db, db->deferred[i].stmt, (const char *const *)db->deferred[i].params, ex,
                         &n);
    if (sent && stmt) {
        sent = send_stmt(db, stmt, params, ex, &n);
        ex[n - 1].final = true;
    } else if (sent && sql) {
        /* An unnamed statement with parameters is planned as the session's
         * mode says too (one without is planned the same either way). */
        sent = (nparams == 0 || send_plan_set(db, false, ex, &n)) &&
               PQsendQueryParams(pg, sql, nparams, NULL, params, NULL, NULL, 0);
        ex[n++] = (expect_t){.final = true};
    }
    pending_clear(db);
    if (sent)
        sent = PQpipelineSync(pg);
    int rc = 0;
    if (res)
        *res = NULL;
    if (!sent) {
        rc = loom_db_error(pg, NULL, err);
        db_disconnect(db); /* the protocol state is unknown */
        free(ex);
        return rc;
    }
    for (size_t i = 0; i < n; i++) {
        PGresult *r = PQgetResult(pg);
        if (!r) { /* the connection went away */
            if (rc == 0)
                rc = loom_db_error(pg, NULL, err);
            break;
        }
        ExecStatusType st = PQresultStatus(r);
        bool ok = st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK;
        if (ok && ex[i].prepare)
            mark_prepared(db, ex[i].prepare);
        if (!ok && st != PGRES_PIPELINE_ABORTED && rc == 0)
            rc = loom_db_error(pg, r, err);
        if (ok && ex[i].final && res)
            *res = r;
        else
            PQclear(r);
        /* Each query's results end with a NULL. */
        while ((r = PQgetResult(pg)) != NULL) {
            if (PQresultStatus(r) == PGRES_PIPELINE_SYNC) {
                PQclear(r);
                goto synced; /* fewer results than queries: the server gave up */
            }
            PQclear(r);
        }
    }
    for (;;) {
        PGresult *r = PQgetResult(pg);
        if (!r)
            break;
        bool sync = PQresultStatus(r) == PGRES_PIPELINE_SYNC;
        PQclear(r);
        if (sync)
            break;
    }
synced:
    free(ex);
    if (!PQexitPipelineMode(pg)) {
        if (rc == 0)
            rc = loom_db_error(pg, NULL, err);
        db_disconnect(db);
    }
    if (rc != 0)
        plan_forget(db); /* a SET in it, or before it in the transaction, may be undone */
    if (rc != 0 && res && *res) {
        PQclear(*res);
        *res = NULL;
    }
    return rc;
}

static bool has_pending(const loom_db_t *db)
{
    return db->begin[0] || db->begin_extra[0] || db->n_deferred > 0;
}

/* A single-statement attempt runs one statement; the second is refused
 * (it would see another snapshot than the first). */
static int single_take(loom_db_t *db, loom_error_t *err)
{
    if (!db->single)
        return 0;
    if (db->single_used)
        return loom_error_set(err, LOOM_CODE_INTERNAL,
                              "a second statement in a body declared single-statement (it "
                              "would not see the first one's snapshot): declare it a "
                              "transaction");
    db->single_used = true;
    return 0;
}

static int flush_pending(loom_db_t *db, loom_error_t *err)
{
    return has_pending(db) ? pipeline(db, NULL, NULL, 0, NULL, NULL, err) : 0;
}

int loom_db_exec(loom_db_t *db, const loom_db_stmt_t *stmt, const char *const *params,
                 PGresult **res, loom_error_t *err)
{
    if (!db->pg)
        return loom_error_set(err, LOOM_CODE_DB_UNAVAILABLE, "database connection lost");
    int taken = single_take(db, err);
    if (taken != 0)
        return taken;
    if (has_pending(db) || plan_set(db, stmt->plan_once))
        return pipeline(db, stmt, NULL, 0, params, res, err);
    if (!is_prepared(db, stmt)) {
        PGresult *r = PQprepare(db->pg, stmt->name, stmt->sql, stmt->nparams, NULL);
        int rc = check_result(db, r, NULL, err);
        if (rc != 0)
            return rc;
        mark_prepared(db, stmt);
    }
    PGresult *r = PQexecPrepared(db->pg, stmt->name, stmt->nparams, params, NULL, NULL, 0);
    int rc = check_result(db, r, res, err);
    if (rc != 0)
        plan_forget(db);
    return rc;
}

int loom_db_exec_deferred(loom_db_t *db, const loom_db_stmt_t *stmt, const char *const *params,
                          loom_error_t *err)
{
    if (!db->pg)
        return loom_error_set(err, LOOM_CODE_DB_UNAVAILABLE, "database connection lost");
    int taken = single_take(db, err);
    if (taken != 0)
        return taken;
    if (db->n_deferred == db->cap_deferred) {
        db->cap_deferred = db->cap_deferred ? db->cap_deferred * 2 : 8;
        db->deferred = loom_xrealloc(db->deferred, db->cap_deferred * sizeof(*db->deferred));
    }
    deferred_t *d = &db->deferred[db->n_deferred++];
    d->stmt = stmt;
    d->params = loom_xcalloc((size_t)stmt->nparams + 1, sizeof(char *));
    for (int k = 0; k < stmt->nparams; k++)
        d->params[k] = params[k] ? loom_xstrdup(params[k]) : NULL;
    return 0;
}

int loom_db_query(loom_db_t *db, const char *sql, int nparams, const char *const *params,
                  PGresult **res, loom_error_t *err)
{
    if (!db->pg)
        return loom_error_set(err, LOOM_CODE_DB_UNAVAILABLE, "database connection lost");
    int taken = single_take(db, err);
    if (taken != 0)
        return taken;
    if (has_pending(db) || (nparams > 0 && plan_set(db, false)))
        return pipeline(db, NULL, sql, nparams, params, res, err);
    PGresult *r = PQexecParams(db->pg, sql, nparams, NULL, params, NULL, NULL, 0);
    int rc = check_result(db, r, res, err);
    if (rc != 0)
        plan_forget(db);
    return rc;
}

int loom_db_exec_script(loom_db_t *db, const char *sql, loom_error_t *err)
{
    if (!db->pg)
        return loom_error_set(err, LOOM_CODE_DB_UNAVAILABLE, "database connection lost");
    int taken = single_take(db, err);
    if (taken != 0)
        return taken;
    int rc = flush_pending(db, err);
    if (rc != 0)
        return rc;
    /* PQexec returns the last statement's result; an error stops the script.
     * A script may SET the plan mode, or ROLLBACK. */
    PGresult *r = PQexec(db->pg, sql);
    plan_forget(db);
    return check_result(db, r, NULL, err);
}

char *loom_db_quote_ident(PGconn *pg, const char *ident)
{
    char *q = PQescapeIdentifier(pg, ident, strlen(ident));
    if (!q)
        return NULL;
    char *copy = loom_xstrdup(q);
    PQfreemem(q);
    return copy;
}

/* ---- array literals ---------------------------------------------------------- */

static void array_reserve(loom_db_array_t *a, size_t more)
{
    if (a->len + more + 3 > a->cap) {
        a->cap = (a->len + more + 3) * 2;
        a->p = loom_xrealloc(a->p, a->cap);
    }
    if (a->len == 0)
        a->p[a->len++] = '{';
}

void loom_db_array_reset(loom_db_array_t *a)
{
    a->len = 0;
    a->count = 0;
}

void loom_db_array_add_n(loom_db_array_t *a, const char *v, size_t n)
{
    array_reserve(a, 2 * n + 8);
    if (a->count++ > 0)
        a->p[a->len++] = ',';
    if (!v) {
        memcpy(a->p + a->len, "NULL", 4);
        a->len += 4;
        return;
    }
    a->p[a->len++] = '"';
    for (size_t i = 0; i < n; i++) {
        if (v[i] == '"' || v[i] == '\\')
            a->p[a->len++] = '\\';
        a->p[a->len++] = v[i];
    }
    a->p[a->len++] = '"';
}

void loom_db_array_add(loom_db_array_t *a, const char *v)
{
    loom_db_array_add_n(a, v, v ? strlen(v) : 0);
}

void loom_db_array_add_int(loom_db_array_t *a, int64_t v)
{
    char num[32];
    snprintf(num, sizeof(num), "%lld", (long long)v);
    loom_db_array_add(a, num);
}

const char *loom_db_array_str(loom_db_array_t *a)
{
    array_reserve(a, 0);
    a->p[a->len] = '}';
    a->p[a->len + 1] = '\0';
    return a->p;
}

void loom_db_array_free(loom_db_array_t *a)
{
    free(a->p);
    memset(a, 0, sizeof(*a));
}

/* ---- transactions ------------------------------------------------------------ */

/* Whether this session refuses writes by itself: a read-only pool, and the
 * server still says so (PostgreSQL 14+ reports the setting with every
 * change, so a SET by a body is seen here at no cost). */
static bool session_read_only(loom_db_t *db)
{
    if (!db->pool->opts.read_only)
        return false;
    const char *v = PQparameterStatus(db->pg, "default_transaction_read_only");
    return !v || strcmp(v, "on") == 0;
}

/* One statement without a transaction: see loom_tx_opts_t.single_statement. */
static int single_attempt(loom_db_t *db, loom_tx_fn fn, void *arg, loom_error_t *err)
{
    db->single = true;
    db->single_used = false;
    db->begin[0] = '\0';
    db->begin_extra[0] = '\0';
    int rc = fn(db, arg, err);
    if (has_pending(db)) {
        /* A SET that never went (the body ran nothing, or failed first). */
        pending_clear(db);
        db->session_timeout_ms = -1;
    }
    if (rc != 0) {
        db->session_timeout_ms = -1; /* a SET sent with a failed statement was undone */
        plan_forget(db);
    }
    db->single = false;
    if (rc == 0 && !db->pg)
        return loom_error_set(err, LOOM_CODE_DB_UNAVAILABLE, "database connection lost");
    return rc;
}

static int tx_attempt(loom_db_t *db, const loom_tx_opts_t *o, loom_tx_fn fn, void *arg,
                      loom_error_t *err)
{
    if (o->single_statement && o->read_only && !o->isolation && session_read_only(db))
        return single_attempt(db, fn, arg, err);
    /* BEGIN goes out with the body's first statement. */
    snprintf(db->begin, sizeof(db->begin), "BEGIN%s%s%s", o->isolation ? " ISOLATION LEVEL " : "",
             o->isolation ? o->isolation : "", o->read_only ? " READ ONLY" : "");
    snprintf(db->begin_extra, sizeof(db->begin_extra), "%s", o->begin_extra ? o->begin_extra : "");
    int rc = fn(db, arg, err);
    if (rc != 0) {
        pending_clear(db);
        if (db->pg && PQstatus(db->pg) == CONNECTION_OK &&
            PQtransactionStatus(db->pg) != PQTRANS_IDLE) {
            PGresult *r = PQexec(db->pg, "ROLLBACK");
            PQclear(r);
        }
        plan_forget(db);
        return rc;
    }
    if (!db->pg)
        return loom_error_set(err, LOOM_CODE_DB_UNAVAILABLE, "database connection lost");
    if (db->begin[0] && db->n_deferred == 0) {
        pending_clear(db); /* the body ran nothing: no transaction to end */
        return 0;
    }
    /* COMMIT can fail with 40001 on CockroachDB and on SERIALIZABLE Postgres. */
    if (has_pending(db))
        return pipeline(db, NULL, "COMMIT", 0, NULL, NULL, err);
    /* A read-only transaction at the default isolation has nothing left to
     * lose once its statements answered: send COMMIT and do not wait. */
    if (o->read_only && !o->isolation && PQtransactionStatus(db->pg) == PQTRANS_INTRANS &&
        PQenterPipelineMode(db->pg)) {
        if (PQsendQueryParams(db->pg, "COMMIT", 0, NULL, NULL, NULL, NULL, 0) &&
            PQpipelineSync(db->pg)) {
            db->commit_in_flight = true;
            return 0;
        }
        db_disconnect(db); /* the connection broke; the next user reconnects */
        return 0;
    }
    PGresult *r = PQexec(db->pg, "COMMIT");
    rc = check_result(db, r, NULL, err);
    if (rc != 0)
        plan_forget(db);
    return rc;
}

int loom_tx_run(loom_db_pool_t *pool, loom_tx_opts_t *opts, loom_tx_fn fn, void *arg,
                loom_error_t *err)
{
    loom_tx_opts_t defaults = {0};
    loom_tx_opts_t *o = opts ? opts : &defaults;
    int max_attempts = o->max_attempts == 0 ? 10 : o->max_attempts;
    int64_t base = o->base_backoff_ms > 0 ? o->base_backoff_ms : 5;
    int64_t cap = o->max_backoff_ms > 0 ? o->max_backoff_ms : 2000;
    if (pool->opts.read_only)
        o->read_only = true;
    o->attempts = 0;

    for (;;) {
        loom_error_t e;
        loom_error_clear(&e);
        loom_db_t *db = NULL;
        int rc = loom_db_acquire(pool, &db, &e);
        o->attempts++;
        if (rc == 0) {
            rc = tx_attempt(db, o, fn, arg, &e);
            loom_db_release(db);
        }
        if (rc == 0) {
            loom_error_clear(err);
            return 0;
        }
        bool again = loom_db_error_is_transient(&e) &&
                     (max_attempts < 0 || o->attempts < max_attempts) && !(o->stop && *o->stop);
        int64_t delay = loom_backoff_ms(o->attempts - 1, base, cap);
        if (again && o->deadline_mono_ms > 0 && loom_mono_ms() + delay >= o->deadline_mono_ms)
            again = false;
        if (!again) {
            if (err)
                *err = e;
            return rc;
        }
        LOOM_DEBUG("retrying transaction", "attempt=%d delay_ms=%lld code=%s error=%s", o->attempts,
                   (long long)delay, e.code, e.message);
        loom_sleep_ms(delay);
    }
}
