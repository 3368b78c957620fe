/*
 * The SQLSTATE table of db.c (loom_db_sqlstate_code), class by class,
 * against a real PostgreSQL: each state is raised by the server, either by
 * the real cause (bad UTF-8, a timestamp out of range, an index row too
 * large, a lock timeout, a terminated backend) or, for states a test cannot
 * cause safely, by RAISE with that ERRCODE; then the code Loom gives it,
 * whether it is transient, and whether loom_tx_run() runs it again.
 */
#include "support.h"
#include "loom/db.h"

#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

static char url[512];

static void setup(void)
{
    loom_test_db_create(url, sizeof(url));
    loom_test_sql(url, "CREATE TABLE t (k TEXT PRIMARY KEY, n INT NOT NULL CHECK (n >= 0))");
}

TestSuite(sqlstate, .init = setup, .timeout = 120);

typedef struct sql_case {
    const char *sql;
    const char *state; /* what the server must report */
    const char *code;  /* what Loom makes of it */
    bool transient;
} sql_case_t;

static int run_sql(loom_db_t *db, void *arg, loom_error_t *err)
{
    (*(int *)((void **)arg)[1])++;
    return loom_db_exec_script(db, ((void **)arg)[0], err);
}

static void check(loom_db_pool_t *pool, const sql_case_t *c)
{
    loom_db_t *db;
    loom_error_t err;
    cr_assert_eq(loom_db_acquire(pool, &db, &err), 0, "%s", err.message);
    int rc = loom_db_exec_script(db, c->sql, &err);
    loom_db_release(db);
    cr_assert_neq(rc, 0, "%s: no error", c->sql);
    cr_assert_str_eq(err.code, c->code, "%s: %s", c->sql, err.message);
    cr_assert_eq(loom_db_error_is_transient(&err), c->transient, "%s: %s", c->sql, err.message);
    /* The state itself travels with the error, for callers that must tell
     * refusals apart without reading the message. */
    if (strcmp(c->code, "DB_UNAVAILABLE") != 0)
        cr_assert_str_eq(err.sqlstate, c->state, "%s: %s", c->sql, err.message);
    /* Transient ones are run again by the transaction runner, the others not. */
    int calls = 0;
    void *arg[] = {(void *)c->sql, &calls};
    loom_tx_opts_t o = {.max_attempts = 3, .base_backoff_ms = 1, .max_backoff_ms = 2};
    cr_assert_neq(loom_tx_run(pool, &o, run_sql, arg, &err), 0);
    cr_assert_eq(calls, c->transient ? 3 : 1, "%s: run %d times", c->sql, calls);
}

/* The server's own SQLSTATE of a statement (to prove the cases raise what
 * they claim). */
static void expect_state(loom_db_pool_t *pool, const char *sql, const char *state)
{
    loom_db_t *db;
    loom_error_t err;
    cr_assert_eq(loom_db_acquire(pool, &db, &err), 0, "%s", err.message);
    PGresult *r = PQexec(loom_db_pg(db), sql);
    const char *got = PQresultErrorField(r, PG_DIAG_SQLSTATE);
    cr_assert(got && strcmp(got, state) == 0, "%s: SQLSTATE %s, expected %s", sql,
              got ? got : "none", state);
    PQclear(r);
    loom_db_release(db);
}

Test(sqlstate, class_22_data_exceptions_are_permanent)
{
    loom_db_pool_t *pool = loom_test_pool(url, 2);
    const sql_case_t cases[] = {
        {"SELECT convert_from('\\xff'::bytea, 'UTF8')", "22021", "DB_REJECTED", false},
        {"SELECT '\"\\u0000\"'::jsonb", "22P05", "DB_REJECTED", false},
        {"SELECT now() - 300000000000000 * interval '1 millisecond'", "22008", "DB_REJECTED",
         false},
        {"SELECT 1/0", "22012", "DB_REJECTED", false},
        {"SELECT 'x'::int", "22P02", "DB_REJECTED", false},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        expect_state(pool, cases[i].sql, cases[i].state);
        check(pool, &cases[i]);
    }
    loom_db_pool_free(pool);
}

Test(sqlstate, class_23_integrity_violations_are_permanent)
{
    loom_test_sql(url, "INSERT INTO t VALUES ('a', 1)");
    loom_db_pool_t *pool = loom_test_pool(url, 2);
    const sql_case_t cases[] = {
        {"INSERT INTO t VALUES ('a', 2)", "23505", "ALREADY_EXISTS", false},
        {"INSERT INTO t VALUES ('b', NULL)", "23502", "DB_REJECTED", false},
        {"INSERT INTO t VALUES ('c', -1)", "23514", "DB_REJECTED", false},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        expect_state(pool, cases[i].sql, cases[i].state);
        check(pool, &cases[i]);
    }
    loom_db_pool_free(pool);
}

Test(sqlstate, class_54_program_limits_are_permanent)
{
    loom_db_pool_t *pool = loom_test_pool(url, 2);
    /* An index row larger than a btree page allows (hex that compresses to
     * more than 2704 bytes). */
    const sql_case_t c = {
        "INSERT INTO t SELECT string_agg(md5(i::text), '') , 1 FROM generate_series(1, 400) i",
        "54000", "DB_REJECTED", false};
    expect_state(pool, c.sql, c.state);
    check(pool, &c);
    loom_db_pool_free(pool);
}

/* States a test cannot cause without harm, raised by the server itself. */
Test(sqlstate, transient_classes_are_retried)
{
    loom_db_pool_t *pool = loom_test_pool(url, 2);
    static const struct {
        const char *state, *code;
    } raised[] = {
        {"40001", "SERIALIZATION_FAILURE"},
        {"40P01", "SERIALIZATION_FAILURE"},
        {"53100", "DB_BUSY"},
        {"53200", "DB_BUSY"},
        {"53300", "DB_BUSY"},
        {"55P03", "DB_BUSY"},
        {"08006", "DB_UNAVAILABLE"},
        {"57P03", "DB_UNAVAILABLE"},
    };
    for (size_t i = 0; i < sizeof(raised) / sizeof(raised[0]); i++) {
        char sql[200];
        snprintf(sql, sizeof(sql),
                 "DO $$ BEGIN RAISE EXCEPTION 'raised' USING ERRCODE = '%s'; END $$",
                 raised[i].state);
        sql_case_t c = {sql, raised[i].state, raised[i].code, true};
        expect_state(pool, sql, raised[i].state);
        check(pool, &c);
    }
    loom_db_pool_free(pool);
}

Test(sqlstate, other_states_hold_rather_than_reject)
{
    /* Not listed: a schema that does not match, or a bug. A worker holds
     * the partition (DB_ERROR is not permanent for it) rather than reject
     * every command until an operator fixes it. */
    loom_db_pool_t *pool = loom_test_pool(url, 2);
    const sql_case_t cases[] = {
        {"SELECT * FROM no_such_table", "42P01", "DB_ERROR", false},
        {"SELEC 1", "42601", "DB_ERROR", false},
        {"DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = 'XX000'; END $$", "XX000", "DB_ERROR",
         false},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        expect_state(pool, cases[i].sql, cases[i].state);
        check(pool, &cases[i]);
    }
    loom_db_pool_free(pool);
}

Test(sqlstate, a_real_lock_timeout_and_a_terminated_backend_are_transient)
{
    loom_db_pool_t *pool = loom_test_pool(url, 3);
    loom_db_t *holder;
    loom_error_t err;
    cr_assert_eq(loom_db_acquire(pool, &holder, &err), 0, "%s", err.message);
    cr_assert_eq(loom_db_exec_script(holder, "BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE", &err),
                 0, "%s", err.message);
    const sql_case_t lock = {"SET lock_timeout = '50ms'; LOCK TABLE t", "55P03", "DB_BUSY", true};
    check(pool, &lock);
    cr_assert_eq(loom_db_exec_script(holder, "ROLLBACK", &err), 0, "%s", err.message);
    loom_db_release(holder);

    loom_db_t *db;
    cr_assert_eq(loom_db_acquire(pool, &db, &err), 0, "%s", err.message);
    cr_assert_neq(loom_db_exec_script(db, "SELECT pg_terminate_backend(pg_backend_pid())", &err),
                  0);
    cr_assert_str_eq(err.code, "DB_UNAVAILABLE", "%s", err.message);
    cr_assert(loom_db_error_is_transient(&err));
    loom_db_release(db);
    loom_db_pool_free(pool);
}

Test(sqlstate, the_table_by_prefix)
{
    cr_assert_eq(loom_db_sqlstate_code("22021"), LOOM_CODE_DB_REJECTED);
    cr_assert_eq(loom_db_sqlstate_code("23503"), LOOM_CODE_DB_REJECTED);
    cr_assert_eq(loom_db_sqlstate_code("23505"), LOOM_CODE_ALREADY_EXISTS);
    cr_assert_eq(loom_db_sqlstate_code("54000"), LOOM_CODE_DB_REJECTED);
    cr_assert_eq(loom_db_sqlstate_code("40002"), LOOM_CODE_DB_REJECTED);
    cr_assert_eq(loom_db_sqlstate_code("40001"), LOOM_CODE_SERIALIZATION_FAILURE);
    cr_assert_eq(loom_db_sqlstate_code("57P01"), LOOM_CODE_DB_UNAVAILABLE);
    cr_assert_eq(loom_db_sqlstate_code("57014"), LOOM_CODE_DEADLINE_EXCEEDED);
    cr_assert_eq(loom_db_sqlstate_code("55P03"), LOOM_CODE_DB_BUSY);
    cr_assert_eq(loom_db_sqlstate_code("55000"), LOOM_CODE_DB_ERROR);
    cr_assert_eq(loom_db_sqlstate_code(NULL), LOOM_CODE_DB_ERROR);
}

Test(sqlstate, the_constraint_a_refusal_names_travels_with_the_error)
{
    loom_db_pool_t *pool = loom_test_pool(url, 1);
    loom_db_t *db;
    loom_error_t err;
    cr_assert_eq(loom_db_acquire(pool, &db, &err), 0, "%s", err.message);
    cr_assert_neq(loom_db_exec_script(db, "INSERT INTO t VALUES ('a', -1)", &err), 0);
    cr_expect_str_eq(err.sqlstate, "23514");
    cr_expect_str_eq(err.constraint, "t_n_check");
    cr_assert_eq(loom_db_exec_script(db, "INSERT INTO t VALUES ('b', 1)", &err), 0, "%s",
                 err.message);
    cr_assert_neq(loom_db_exec_script(db, "INSERT INTO t VALUES ('b', 2)", &err), 0);
    cr_expect_str_eq(err.code, "ALREADY_EXISTS");
    cr_expect_str_eq(err.sqlstate, "23505");
    cr_expect_str_eq(err.constraint, "t_pkey");
    loom_error_set(&err, LOOM_CODE_INTERNAL, "not from the database");
    cr_expect_str_eq(err.sqlstate, "");
    cr_expect_str_eq(err.constraint, "");
    loom_db_release(db);
    loom_db_pool_free(pool);
}
