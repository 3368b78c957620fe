/*
 * Persistence against a real PostgreSQL: prepared statements, SQLSTATE
 * mapping, and loom_tx_run() retrying real serialization failures and lost
 * connections.
 */
#include "support.h"
#include "loom/clock.h"
#include "loom/db.h"
#include "loom/pglocal.h"

#include <criterion/criterion.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

static char url[512];

static void setup(void)
{
    loom_test_db_create(url, sizeof(url));
    loom_test_sql(url, "CREATE TABLE items (id INT PRIMARY KEY, v INT NOT NULL)");
}

TestSuite(db, .init = setup, .timeout = 120);

static const loom_db_stmt_t insert_item = {"test_insert_item",
                                           "INSERT INTO items (id, v) VALUES ($1, $2)", 2};
static const loom_db_stmt_t get_item = {"test_get_item", "SELECT v FROM items WHERE id = $1", 1};

Test(db, prepared_statements_run_and_return_rows)
{
    loom_db_pool_t *pool = loom_test_pool(url, 2);
    loom_db_t *db;
    loom_error_t err;
    cr_assert_eq(loom_db_acquire(pool, &db, &err), 0, "%s", err.message);
    for (int i = 1; i <= 3; i++) {
        char id[8], v[8];
        snprintf(id, sizeof(id), "%d", i);
        snprintf(v, sizeof(v), "%d", i * 10);
        const char *p[] = {id, v};
        cr_assert_eq(loom_db_exec(db, &insert_item, p, NULL, &err), 0, "%s", err.message);
    }
    PGresult *res;
    const char *p[] = {"2"};
    cr_assert_eq(loom_db_exec(db, &get_item, p, &res, &err), 0, "%s", err.message);
    cr_assert_eq(PQntuples(res), 1);
    cr_assert_str_eq(PQgetvalue(res, 0, 0), "20");
    PQclear(res);
    loom_db_release(db);
    loom_db_pool_free(pool);
}

Test(db, sqlstates_map_to_error_codes)
{
    loom_db_pool_t *pool = loom_test_pool(url, 1);
    loom_db_t *db;
    loom_error_t err;
    cr_assert_eq(loom_db_acquire(pool, &db, &err), 0);
    const char *p[] = {"1", "1"};
    cr_assert_eq(loom_db_exec(db, &insert_item, p, NULL, &err), 0);

    cr_assert_neq(loom_db_exec(db, &insert_item, p, NULL, &err), 0);
    cr_assert_str_eq(err.code, "ALREADY_EXISTS");
    cr_assert_eq(err.cls, LOOM_ERR_CONFLICT);
    cr_assert(strstr(err.message, "duplicate key"), "%s", err.message);

    cr_assert_neq(loom_db_exec_script(db, "SELEC 1", &err), 0);
    cr_assert_str_eq(err.code, "DB_ERROR");
    cr_assert(strstr(err.message, "42601"), "%s", err.message);
    cr_assert_not(err.retriable);

    cr_assert_eq(loom_db_exec_script(db, "SET statement_timeout = '50ms'", &err), 0);
    cr_assert_neq(loom_db_exec_script(db, "SELECT pg_sleep(2)", &err), 0);
    cr_assert_str_eq(err.code, "DEADLINE_EXCEEDED");
    cr_assert_eq(loom_db_exec_script(db, "SET statement_timeout = 0", &err), 0);

    cr_assert_eq(loom_db_exec_script(db, "BEGIN READ ONLY", &err), 0);
    cr_assert_neq(loom_db_exec_script(db, "INSERT INTO items VALUES (9, 9)", &err), 0);
    cr_assert_str_eq(err.code, "READ_ONLY_VIOLATION");
    loom_db_release(db); /* rolls the failed transaction back */

    cr_assert_eq(loom_db_acquire(pool, &db, &err), 0);
    cr_assert_eq(PQtransactionStatus(loom_db_pg(db)), PQTRANS_IDLE);
    loom_db_release(db);
    loom_db_pool_free(pool);
}

Test(db, bad_url_or_unreachable_server_is_reported_at_pool_creation)
{
    loom_db_pool_t *pool = NULL;
    loom_error_t err;
    int port = loom_free_port();
    char bad[128];
    snprintf(bad, sizeof(bad), "postgresql://loom@127.0.0.1:%d/loom?connect_timeout=2", port);
    cr_assert_neq(loom_db_pool_new(bad, NULL, &pool, &err), 0);
    cr_assert_null(pool);
    cr_assert_str_eq(err.code, "DB_UNAVAILABLE");
    cr_assert(err.retriable);
    cr_assert(strstr(err.message, "could not connect"), "%s", err.message);
}

Test(db, pool_exhaustion_times_out_with_a_clear_error)
{
    loom_db_pool_t *pool = NULL;
    loom_error_t err;
    loom_db_pool_opts_t opts = {.size = 1, .acquire_timeout_ms = 200};
    cr_assert_eq(loom_db_pool_new(url, &opts, &pool, &err), 0);
    loom_db_t *a, *b;
    cr_assert_eq(loom_db_acquire(pool, &a, &err), 0);
    int64_t t0 = loom_mono_ms();
    cr_assert_neq(loom_db_acquire(pool, &b, &err), 0);
    cr_assert_geq(loom_mono_ms() - t0, 150);
    cr_assert(strstr(err.message, "no free database connection"), "%s", err.message);
    loom_db_release(a);
    cr_assert_eq(loom_db_acquire(pool, &b, &err), 0);
    loom_db_release(b);
    loom_db_pool_free(pool);
}

/* ---- a real 40001 from two concurrent SERIALIZABLE transactions ---------- */

typedef struct {
    pthread_barrier_t *barrier;
    atomic_int calls;
    int id;
} skew_arg_t;

/* Classic write skew: both read the sum, then both insert. One must fail. */
static int skew_body(loom_db_t *db, void *arg, loom_error_t *err)
{
    skew_arg_t *a = arg;
    int call = atomic_fetch_add(&a->calls, 1);
    PGresult *res;
    int rc = loom_db_query(db, "SELECT coalesce(sum(v), 0) FROM items", 0, NULL, &res, err);
    if (rc != 0)
        return rc;
    int sum = atoi(PQgetvalue(res, 0, 0));
    PQclear(res);
    if (call == 0)
        pthread_barrier_wait(a->barrier); /* both have read before either writes */
    char id[16], v[16];
    snprintf(id, sizeof(id), "%d", 100 + a->id);
    snprintf(v, sizeof(v), "%d", sum + 1);
    const char *p[] = {id, v};
    rc = loom_db_exec(db, &insert_item, p, NULL, err);
    if (call == 0)
        pthread_barrier_wait(a->barrier); /* both have written before either commits */
    return rc;
}

typedef struct {
    loom_db_pool_t *pool;
    skew_arg_t *arg;
    int rc;
    int attempts;
    loom_error_t err;
} skew_run_t;

static void *skew_thread(void *p)
{
    skew_run_t *r = p;
    loom_tx_opts_t opts = {.isolation = "SERIALIZABLE"};
    r->rc = loom_tx_run(r->pool, &opts, skew_body, r->arg, &r->err);
    r->attempts = opts.attempts;
    return NULL;
}

Test(db, tx_run_retries_a_real_serialization_failure)
{
    loom_db_pool_t *pool = loom_test_pool(url, 2);
    pthread_barrier_t barrier;
    pthread_barrier_init(&barrier, NULL, 2);
    skew_arg_t args[2] = {{.barrier = &barrier, .id = 1}, {.barrier = &barrier, .id = 2}};
    skew_run_t runs[2] = {{pool, &args[0]}, {pool, &args[1]}};
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&t[i], NULL, skew_thread, &runs[i]);
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    cr_assert_eq(runs[0].rc, 0, "%s", runs[0].err.message);
    cr_assert_eq(runs[1].rc, 0, "%s", runs[1].err.message);
    /* Exactly one of them hit 40001 and ran again. */
    cr_assert_eq(runs[0].attempts + runs[1].attempts, 3, "attempts %d and %d", runs[0].attempts,
                 runs[1].attempts);
    /* The retry saw the other's row: values 1 and 2, not 1 and 1. */
    char *vals = loom_test_sql_value(url, "SELECT string_agg(v::text, ',' ORDER BY v) FROM items");
    cr_assert_str_eq(vals, "1,2");
    free(vals);
    pthread_barrier_destroy(&barrier);
    loom_db_pool_free(pool);
}

/* ---- a connection killed in the middle of a transaction ------------------- */

static int killed_body(loom_db_t *db, void *arg, loom_error_t *err)
{
    int *calls = arg;
    if ((*calls)++ == 0) {
        /* Another session terminates ours, as a failover or restart would. */
        char sql[128];
        snprintf(sql, sizeof(sql), "SELECT pg_terminate_backend(%d)", loom_db_backend_pid(db));
        loom_test_sql(url, sql);
    }
    const char *p[] = {"7", "70"};
    return loom_db_exec(db, &insert_item, p, NULL, err);
}

Test(db, tx_run_retries_on_a_lost_connection)
{
    loom_db_pool_t *pool = loom_test_pool(url, 1);
    int calls = 0;
    loom_tx_opts_t opts = {0};
    loom_error_t err;
    cr_assert_eq(loom_tx_run(pool, &opts, killed_body, &calls, &err), 0, "%s", err.message);
    cr_assert_eq(opts.attempts, 2);
    char *n = loom_test_sql_value(url, "SELECT count(*) FROM items WHERE id = 7");
    cr_assert_str_eq(n, "1");
    free(n);
    loom_db_pool_free(pool);
}

static int failing_body(loom_db_t *db, void *arg, loom_error_t *err)
{
    (*(int *)arg)++;
    return loom_db_exec_script(db, "INSERT INTO items VALUES (1, 1); SELECT 1/0", err);
}

Test(db, tx_run_does_not_retry_a_permanent_error_and_rolls_back)
{
    loom_db_pool_t *pool = loom_test_pool(url, 1);
    int calls = 0;
    loom_tx_opts_t opts = {0};
    loom_error_t err;
    cr_assert_neq(loom_tx_run(pool, &opts, failing_body, &calls, &err), 0);
    cr_assert_eq(calls, 1);
    cr_assert_str_eq(err.code, "DB_REJECTED"); /* 22012: class 22, permanent */
    cr_assert(strstr(err.message, "division by zero"), "%s", err.message);
    char *n = loom_test_sql_value(url, "SELECT count(*) FROM items");
    cr_assert_str_eq(n, "0");
    free(n);
    loom_db_pool_free(pool);
}

static int always_conflict(loom_db_t *db, void *arg, loom_error_t *err)
{
    (void)db;
    (*(int *)arg)++;
    return loom_error_set(err, LOOM_CODE_SERIALIZATION_FAILURE, "forced");
}

Test(db, tx_run_gives_up_after_max_attempts)
{
    loom_db_pool_t *pool = loom_test_pool(url, 1);
    int calls = 0;
    loom_tx_opts_t opts = {.max_attempts = 4, .base_backoff_ms = 1, .max_backoff_ms = 4};
    loom_error_t err;
    cr_assert_neq(loom_tx_run(pool, &opts, always_conflict, &calls, &err), 0);
    cr_assert_eq(calls, 4);
    cr_assert_str_eq(err.code, "SERIALIZATION_FAILURE");
    loom_db_pool_free(pool);
}

/* ---- pipelines: BEGIN with the first statement, deferred statements ------------ */

typedef struct deferred_arg {
    const char *ids[3]; /* inserted deferred, v = 1 */
    bool read_back;     /* then a statement that needs an answer */
    long long seen;     /* count(*) that statement saw */
} deferred_arg_t;

static const loom_db_stmt_t count_items = {"test_count_items", "SELECT count(*) FROM items", 0};

static int deferred_body(loom_db_t *db, void *arg, loom_error_t *err)
{
    deferred_arg_t *a = arg;
    for (int i = 0; i < 3 && a->ids[i]; i++) {
        const char *p[] = {a->ids[i], "1"};
        int rc = loom_db_exec_deferred(db, &insert_item, p, err);
        if (rc != 0)
            return rc;
    }
    if (!a->read_back)
        return 0;
    PGresult *res = NULL;
    int rc = loom_db_exec(db, &count_items, NULL, &res, err);
    if (rc == 0) {
        a->seen = atoll(PQgetvalue(res, 0, 0));
        PQclear(res);
    }
    return rc;
}

Test(db, deferred_statements_go_with_the_next_statement_and_commit_together)
{
    loom_db_pool_t *pool = loom_test_pool(url, 1);
    loom_error_t err;
    /* Sent with the COMMIT. */
    deferred_arg_t a = {.ids = {"1", "2"}};
    cr_assert_eq(loom_tx_run(pool, NULL, deferred_body, &a, &err), 0, "%s", err.message);
    cr_assert_eq(loom_test_sql_ll(url, "SELECT count(*) FROM items"), 2);
    /* Sent with a statement that needs an answer, which sees them. */
    deferred_arg_t b = {.ids = {"3", "4", "5"}, .read_back = true};
    cr_assert_eq(loom_tx_run(pool, NULL, deferred_body, &b, &err), 0, "%s", err.message);
    cr_assert_eq(b.seen, 5);
    cr_assert_eq(loom_test_sql_ll(url, "SELECT count(*) FROM items"), 5);
    loom_db_pool_free(pool);
}

Test(db, a_deferred_statement_that_fails_aborts_the_whole_transaction)
{
    loom_db_pool_t *pool = loom_test_pool(url, 1);
    loom_error_t err;
    loom_test_sql(url, "INSERT INTO items VALUES (7, 0)");
    /* 8 and 9 are fine, 7 exists: the error comes back from the COMMIT's
     * pipeline, and nothing of the transaction stays. */
    deferred_arg_t a = {.ids = {"8", "7", "9"}};
    cr_assert_neq(loom_tx_run(pool, NULL, deferred_body, &a, &err), 0);
    cr_assert_str_eq(err.code, "ALREADY_EXISTS", "%s: %s", err.code, err.message);
    cr_assert_eq(loom_test_sql_ll(url, "SELECT count(*) FROM items"), 1);
    /* Same when a later statement carries them. */
    deferred_arg_t b = {.ids = {"8", "7"}, .read_back = true};
    cr_assert_neq(loom_tx_run(pool, NULL, deferred_body, &b, &err), 0);
    cr_assert_str_eq(err.code, "ALREADY_EXISTS", "%s: %s", err.code, err.message);
    cr_assert_eq(loom_test_sql_ll(url, "SELECT count(*) FROM items"), 1);
    /* The connection is clean for the next transaction. */
    deferred_arg_t c = {.ids = {"10"}, .read_back = true};
    cr_assert_eq(loom_tx_run(pool, NULL, deferred_body, &c, &err), 0, "%s", err.message);
    cr_assert_eq(c.seen, 2);
    loom_db_pool_free(pool);
}

static int two_writes_then_fail(loom_db_t *db, void *arg, loom_error_t *err)
{
    (void)arg;
    const char *p1[] = {"20", "1"}, *p2[] = {"21", "1"};
    int rc = loom_db_exec(db, &insert_item, p1, NULL, err);
    if (rc == 0)
        rc = loom_db_exec(db, &insert_item, p2, NULL, err);
    if (rc != 0)
        return rc;
    return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "changed my mind");
}

Test(db, the_begin_sent_with_the_first_statement_still_makes_the_body_atomic)
{
    loom_db_pool_t *pool = loom_test_pool(url, 1);
    loom_error_t err;
    cr_assert_neq(loom_tx_run(pool, NULL, two_writes_then_fail, NULL, &err), 0);
    cr_assert_eq(loom_test_sql_ll(url, "SELECT count(*) FROM items"), 0);
    /* A read-only transaction refuses a write sent in the BEGIN's pipeline. */
    loom_tx_opts_t ro = {.read_only = true, .begin_extra = "SET LOCAL statement_timeout = 5000"};
    cr_assert_neq(loom_tx_run(pool, &ro, two_writes_then_fail, NULL, &err), 0);
    cr_assert_str_eq(err.code, "READ_ONLY_VIOLATION", "%s: %s", err.code, err.message);
    cr_assert_eq(loom_test_sql_ll(url, "SELECT count(*) FROM items"), 0);
    loom_db_pool_free(pool);
}

Test(db, read_only_transactions_leave_the_connection_ready_for_the_next_user)
{
    loom_db_pool_t *pool = loom_test_pool(url, 1);
    loom_error_t err;
    loom_test_sql(url, "INSERT INTO items VALUES (1, 1)");
    for (int i = 0; i < 50; i++) {
        /* Its COMMIT is read when the connection is taken again. */
        deferred_arg_t a = {.read_back = true};
        loom_tx_opts_t ro = {.read_only = true};
        cr_assert_eq(loom_tx_run(pool, &ro, deferred_body, &a, &err), 0, "%s", err.message);
        cr_assert_eq(a.seen, 1 + i / 10);
        if (i % 10 == 9) { /* a writer in between sees an idle connection */
            loom_db_t *db;
            cr_assert_eq(loom_db_acquire(pool, &db, &err), 0, "%s", err.message);
            cr_assert_eq(PQtransactionStatus(loom_db_pg(db)), PQTRANS_IDLE);
            char id[16];
            snprintf(id, sizeof(id), "%d", 100 + i);
            const char *p[] = {id, "1"};
            cr_assert_eq(loom_db_exec(db, &insert_item, p, NULL, &err), 0, "%s", err.message);
            loom_db_release(db);
        }
    }
    /* The server may go away between the COMMIT and the next use. */
    deferred_arg_t a = {.read_back = true};
    loom_tx_opts_t ro = {.read_only = true};
    cr_assert_eq(loom_tx_run(pool, &ro, deferred_body, &a, &err), 0, "%s", err.message);
    char kill[700];
    snprintf(kill, sizeof(kill),
             "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '%s'",
             strrchr(url, '/') + 1);
    cr_assert_eq(loom_test_sql_ll(loom_test_pg_url(), kill), 1);
    cr_assert_eq(loom_tx_run(pool, &ro, deferred_body, &a, &err), 0, "%s", err.message);
    cr_assert_eq(a.seen, 6);
    loom_db_pool_free(pool);
}

/* ---- plan modes: loom_db_stmt_t.plan_once ------------------------------------------- */

/* The same text twice: one planned once per connection, one at each run. */
static const loom_db_stmt_t sum_once = {
    "test_sum_once", "SELECT coalesce(sum(v), 0) FROM items WHERE id = ANY($1::int[])", 1,
    .plan_once = true};
static const loom_db_stmt_t sum_each = {
    "test_sum_each", "SELECT coalesce(sum(v), 0) FROM items WHERE id = ANY($1::int[])", 1};

static void run_sum(loom_db_t *db, const loom_db_stmt_t *stmt)
{
    const char *p[] = {"{1,2,3}"};
    loom_error_t err;
    PGresult *res = NULL;
    cr_assert_eq(loom_db_exec(db, stmt, p, &res, &err), 0, "%s: %s", stmt->name, err.message);
    cr_assert_str_eq(PQgetvalue(res, 0, 0), "0");
    PQclear(res);
}

/* How the server planned a statement's runs on this session so far, as the
 * server counts them (pg_prepared_statements): "generic/custom". */
static char *plans_of(loom_db_t *db, const loom_db_stmt_t *stmt)
{
    const char *p[] = {stmt->name};
    PGresult *res = NULL;
    loom_error_t err;
    cr_assert_eq(loom_db_query(db,
                               "SELECT generic_plans || '/' || custom_plans "
                               "FROM pg_prepared_statements WHERE name = $1",
                               1, p, &res, &err),
                 0, "%s", err.message);
    cr_assert_eq(PQntuples(res), 1, "%s is not prepared on this session", stmt->name);
    char *s = strdup(PQgetvalue(res, 0, 0));
    PQclear(res);
    return s;
}

static void assert_plans(loom_db_t *db, const loom_db_stmt_t *stmt, const char *want)
{
    char *got = plans_of(db, stmt);
    cr_assert_str_eq(got, want, "%s: generic/custom plans %s, want %s", stmt->name, got, want);
    free(got);
}

/* Three runs of each, one after the other starting with `first`, on a new
 * session: each kind gets the plans its mode says, whatever ran before. */
static void runs_of_both(loom_db_t *db, const loom_db_stmt_t *first, const loom_db_stmt_t *second)
{
    for (int i = 0; i < 3; i++) {
        run_sum(db, first);
        run_sum(db, second);
    }
    assert_plans(db, &sum_once, "3/0");
    assert_plans(db, &sum_each, "0/3");
}

/* Runs sum_each inside the transaction (its SET of the mode with it), then
 * fails as a handler does: the rollback undoes that SET. */
static int sum_then_fail(loom_db_t *db, void *arg, loom_error_t *err)
{
    (void)arg;
    run_sum(db, &sum_each);
    return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "refused");
}

Test(db, plan_once_statements_get_one_generic_plan_and_others_a_plan_per_run)
{
    loom_db_pool_t *pool = loom_test_pool(url, 1);
    loom_db_t *db;
    loom_error_t err;
    cr_assert_eq(loom_db_acquire(pool, &db, &err), 0, "%s", err.message);
    runs_of_both(db, &sum_once, &sum_each);
    /* The session is left in the generic mode, then a transaction switches
     * it back and rolls back: the SET is undone with it, and the next run
     * must not take the session's mode for granted. */
    run_sum(db, &sum_once);
    loom_db_release(db);
    loom_tx_opts_t once = {.max_attempts = 1};
    cr_assert_neq(loom_tx_run(pool, &once, sum_then_fail, NULL, &err), 0);
    cr_assert_eq(loom_db_acquire(pool, &db, &err), 0, "%s", err.message);
    run_sum(db, &sum_each);
    assert_plans(db, &sum_each, "0/5");
    run_sum(db, &sum_once);
    assert_plans(db, &sum_once, "5/0");
    loom_db_release(db);
    loom_db_pool_free(pool);

    /* A read-only pool keeps the server's own mode for the others (auto:
     * the first five runs get plans of their own). */
    loom_db_pool_opts_t ro = {.size = 1, .read_only = true};
    cr_assert_eq(loom_db_pool_new(url, &ro, &pool, &err), 0, "%s", err.message);
    cr_assert_eq(loom_db_acquire(pool, &db, &err), 0, "%s", err.message);
    runs_of_both(db, &sum_each, &sum_once);
    loom_db_release(db);
    loom_db_pool_free(pool);
}
