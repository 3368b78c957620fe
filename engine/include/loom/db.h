/*
 * PostgreSQL/CockroachDB access: a connection pool, prepared statements, and
 * loom_tx_run(), which runs a whole transaction again when the database says
 * it may succeed on a retry (SQLSTATE 40001/40P01, CockroachDB restarts) or
 * the connection was lost.
 *
 * Queries are parameterized only. A loom_db_stmt_t is a static description of
 * a statement; it is prepared on each connection the first time it runs there.
 *
 * Thread-safety: the pool is thread-safe; a loom_db_t belongs to the thread
 * that acquired it until it is released.
 */
#ifndef LOOM_DB_H
#define LOOM_DB_H

#include "loom/error.h"

#include <libpq-fe.h>
#include <stdbool.h>
#include <stdint.h>

typedef struct loom_db_pool loom_db_pool_t;
typedef struct loom_db loom_db_t;

/* A statement prepared lazily per connection. Define them static const. */
typedef struct loom_db_stmt {
    const char *name; /* unique across the process, e.g. "loom_commands_insert" */
    const char *sql;
    int nparams;
    /*
     * Planned once per connection (PostgreSQL's generic plan) instead of at
     * each execution. Only for a statement whose best plan is the same
     * whatever its parameters and the table's size and statistics, such as
     * an INSERT ... SELECT FROM unnest($1) without subqueries, or a lookup
     * written so that only an index probe is possible (see
     * docs/architecture.md, "Plans"). Others are planned at each execution
     * on write pools (plan_cache_mode force_custom_plan) and as the server
     * decides on read-only pools. The connection switches its
     * plan_cache_mode with a SET sent in the same round trip, only when the
     * statement needs the other mode than the last one.
     */
    bool plan_once;
} loom_db_stmt_t;

typedef struct loom_db_pool_opts {
    int size;                     /* connections; default 4 */
    int64_t acquire_timeout_ms;   /* wait for a free connection; default 30000 */
    bool read_only;               /* every transaction is READ ONLY (replica pools) */
    const char *application_name; /* default "loom" */
} loom_db_pool_opts_t;

/*
 * Creates a pool for conninfo (copied). Connects one connection at once so a
 * wrong URL or an unreachable server is reported here; the others connect on
 * demand. Returns 0, or LOOM_EDBCONN/LOOM_EINVAL with err filled.
 */
int loom_db_pool_new(const char *conninfo, const loom_db_pool_opts_t *opts, loom_db_pool_t **out,
                     loom_error_t *err);
/* Closes every connection. All connections must have been released. */
void loom_db_pool_free(loom_db_pool_t *pool);
bool loom_db_pool_read_only(const loom_db_pool_t *pool);
/* A libpq notice processor that writes server notices ("relation already
 * exists, skipping") to the debug log; every connection Loom opens uses it. */
void loom_db_notice_log(void *arg, const char *message);
/* The pool's connection string and application name, for code that opens
 * connections of its own with the same settings (the gateway's event loops). */
const char *loom_db_pool_conninfo(const loom_db_pool_t *pool);
const char *loom_db_pool_application_name(const loom_db_pool_t *pool);

/* Takes a connection (reconnecting it if it was lost). */
int loom_db_acquire(loom_db_pool_t *pool, loom_db_t **out, loom_error_t *err);
/* Gives it back; a connection left inside a transaction is rolled back and
 * a broken one is closed, to reconnect on next use. */
void loom_db_release(loom_db_t *db);

/* The libpq handle (borrowed). Statements still waiting to be sent (the
 * BEGIN of loom_tx_run(), deferred ones) are sent first. */
PGconn *loom_db_pg(loom_db_t *db);
/* True inside a transaction, including one whose BEGIN waits to be sent. */
bool loom_db_in_tx(loom_db_t *db);
/* Server-side process id of this connection (for tests and cancels). */
int loom_db_backend_pid(loom_db_t *db);

/*
 * Runs a prepared statement with text parameters (NULL entries are SQL NULL).
 * On success returns 0 and, when res is not NULL, the result (caller PQclear);
 * on failure returns a negative code with err mapped from the SQLSTATE.
 */
int loom_db_exec(loom_db_t *db, const loom_db_stmt_t *stmt, const char *const *params,
                 PGresult **res, loom_error_t *err);
/*
 * Queues a prepared statement whose result is not needed (params copied). It
 * goes to the server with the next statement that needs an answer, or with
 * the COMMIT of loom_tx_run(), in one pipeline: one round trip for all. An
 * error it raises is returned by that later call, and aborts the transaction.
 */
int loom_db_exec_deferred(loom_db_t *db, const loom_db_stmt_t *stmt, const char *const *params,
                          loom_error_t *err);
/* Same for a one-off parameterized statement (not prepared). */
int loom_db_query(loom_db_t *db, const char *sql, int nparams, const char *const *params,
                  PGresult **res, loom_error_t *err);
/* Runs SQL without parameters (may hold several statements: migrations). */
int loom_db_exec_script(loom_db_t *db, const char *sql, loom_error_t *err);

/* Fills err from a failed result (or from the connection when res is NULL),
 * by its SQLSTATE through the one table in db.c (loom_db_sqlstate_code):
 * transient: 40xxx -> SERIALIZATION_FAILURE, 08xxx, 57Pxx and lost
 * connections -> DB_UNAVAILABLE, 53xxx, 55P03, 55006 -> DB_BUSY;
 * permanent: 22xxx, 23xxx, 54xxx -> DB_REJECTED (23505 -> ALREADY_EXISTS);
 * 57014 -> DEADLINE_EXCEEDED, 25006 -> READ_ONLY_VIOLATION, else DB_ERROR.
 * Returns the matching LOOM_E* code. */
int loom_db_error(PGconn *pg, const PGresult *res, loom_error_t *err);

/* The engine code of a SQLSTATE (NULL: DB_ERROR). */
loom_code_t loom_db_sqlstate_code(const char *state);

/* True when err is one loom_tx_run() retries. */
bool loom_db_error_is_transient(const loom_error_t *err);

/* A transaction body: run statements on db; return 0 to commit, or a negative
 * code with err filled to roll back. It may run several times. */
typedef int (*loom_tx_fn)(loom_db_t *db, void *arg, loom_error_t *err);

typedef struct loom_tx_opts {
    const char *isolation;    /* NULL (server default), "SERIALIZABLE", "REPEATABLE READ" */
    bool read_only;           /* BEGIN ... READ ONLY */
    int max_attempts;         /* 0: 10; negative: no limit */
    int64_t base_backoff_ms;  /* 0: 5 */
    int64_t max_backoff_ms;   /* 0: 2000 */
    int64_t deadline_mono_ms; /* loom_mono_ms() value to give up at; 0: none */
    const volatile int *stop; /* when set and non-zero, stop retrying */
    const char *begin_extra;  /* one statement sent with BEGIN ("SET LOCAL ..."); NULL */
    /* The body runs one statement and only reads: on a session that is
     * read-only by itself (a read_only pool, and the server still reports
     * default_transaction_read_only on), that statement runs alone, without
     * BEGIN and COMMIT (one statement is its own snapshot), in one round
     * trip. A second statement then fails (INTERNAL) rather than see another
     * snapshot. Elsewhere the body runs in BEGIN READ ONLY ... COMMIT. */
    bool single_statement;
    int attempts; /* out: attempts made */
} loom_tx_opts_t;

/*
 * Runs fn inside BEGIN ... COMMIT on a pooled connection. The BEGIN is sent
 * with the body's first statement (one round trip), and deferred statements
 * with the COMMIT; a body that runs nothing costs nothing. When the body, the
 * BEGIN or the COMMIT fails with a transient error, everything is rolled
 * back, the connection is replaced if it was lost, and after a capped
 * exponential backoff with jitter the whole transaction runs again.
 * A lost connection during COMMIT is ambiguous (the commit may have landed):
 * bodies must be safe to re-run, which dedup rows make them in Loom.
 * opts may be NULL. Returns 0 or the last error.
 */
int loom_tx_run(loom_db_pool_t *pool, loom_tx_opts_t *opts, loom_tx_fn fn, void *arg,
                loom_error_t *err);

/* True inside a single-statement attempt (loom_tx_opts_t.single_statement). */
bool loom_db_single(const loom_db_t *db);

/*
 * Sets statement_timeout (milliseconds, at least 1) for what the body runs
 * next. In a transaction: SET LOCAL, sent with the BEGIN when that is still
 * to go. In a single-statement attempt: the session's setting, sent with the
 * statement, and only when the session does not have that value already.
 */
int loom_db_statement_timeout(loom_db_t *db, int64_t ms, loom_error_t *err);

/*
 * A text[] literal ('{"a","b",NULL}') built value by value, for multi-row
 * statements (INSERT ... SELECT FROM unnest($1::text[], ...)) and = ANY($1).
 * Zero-initialise it; loom_db_array_str() is valid until the next add or reset.
 */
typedef struct loom_db_array {
    char *p;
    size_t len, cap;
    size_t count; /* values added */
} loom_db_array_t;

void loom_db_array_reset(loom_db_array_t *a);
/* Adds a value (NULL: SQL NULL); the _n form takes n bytes of v. */
void loom_db_array_add(loom_db_array_t *a, const char *v);
void loom_db_array_add_n(loom_db_array_t *a, const char *v, size_t n);
void loom_db_array_add_int(loom_db_array_t *a, int64_t v);
const char *loom_db_array_str(loom_db_array_t *a);
void loom_db_array_free(loom_db_array_t *a);

/* Escapes a literal for the rare places that cannot take parameters (DDL),
 * into a new heap string. */
char *loom_db_quote_ident(PGconn *pg, const char *ident);

#endif
