/*
 * Migrations against a real PostgreSQL: up, down, status, a changed file
 * refused, concurrent runners, and the engine's own migrations.
 */
#include "support.h"
#include "loom/migrate.h"

#include <criterion/criterion.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

extern const loom_migration_set_t loom_app_migrations;

static const loom_migration_t three[] = {
    {1, "create_a", "CREATE TABLE a (id INT PRIMARY KEY);", "DROP TABLE a;"},
    {2, "create_b", "CREATE TABLE b (id INT PRIMARY KEY); INSERT INTO b VALUES (1), (2);",
     "DROP TABLE b;"},
    {3, "add_col", "ALTER TABLE a ADD COLUMN note TEXT;", "ALTER TABLE a DROP COLUMN note;"},
};
static const loom_migration_set_t set3 = {three, 3};

static char url[512];

static void setup(void)
{
    loom_test_db_create(url, sizeof(url));
}

TestSuite(migrate, .init = setup, .timeout = 120);

static loom_db_t *conn(loom_db_pool_t **pool)
{
    *pool = loom_test_pool(url, 1);
    loom_db_t *db;
    loom_error_t err;
    cr_assert_eq(loom_db_acquire(*pool, &db, &err), 0, "%s", err.message);
    return db;
}

static void done(loom_db_pool_t *pool, loom_db_t *db)
{
    loom_db_release(db);
    loom_db_pool_free(pool);
}

static char *q(const char *sql)
{
    return loom_test_sql_value(url, sql);
}

Test(migrate, up_applies_in_order_and_records_version_name_checksum)
{
    loom_db_pool_t *pool;
    loom_db_t *db = conn(&pool);
    loom_error_t err;
    int applied = -1;
    cr_assert_eq(loom_migrate_up(db, &set3, &applied, &err), 0, "%s", err.message);
    cr_assert_eq(applied, 3);
    char *rows = q("SELECT string_agg(version || ':' || name, ',' ORDER BY version) "
                   "FROM loom_schema_migrations");
    cr_assert_str_eq(rows, "1:create_a,2:create_b,3:add_col");
    free(rows);
    char sum[65];
    loom_migration_checksum(&three[1], sum);
    char *rec = q("SELECT checksum FROM loom_schema_migrations WHERE version = 2");
    cr_assert_str_eq(rec, sum);
    free(rec);
    char *col = q("SELECT count(*) FROM information_schema.columns "
                  "WHERE table_name = 'a' AND column_name = 'note'");
    cr_assert_str_eq(col, "1");
    free(col);

    /* Running again applies nothing. */
    cr_assert_eq(loom_migrate_up(db, &set3, &applied, &err), 0, "%s", err.message);
    cr_assert_eq(applied, 0);
    done(pool, db);
}

Test(migrate, down_reverts_newest_first_and_status_tells)
{
    loom_db_pool_t *pool;
    loom_db_t *db = conn(&pool);
    loom_error_t err;
    cr_assert_eq(loom_migrate_up(db, &set3, NULL, &err), 0, "%s", err.message);
    int reverted = 0;
    cr_assert_eq(loom_migrate_down(db, &set3, 2, &reverted, &err), 0, "%s", err.message);
    cr_assert_eq(reverted, 2);
    char *b = q("SELECT count(*) FROM information_schema.tables WHERE table_name = 'b'");
    cr_assert_str_eq(b, "0");
    free(b);

    loom_migration_status_t *st;
    size_t n;
    cr_assert_eq(loom_migrate_status(db, &set3, &st, &n, &err), 0, "%s", err.message);
    cr_assert_eq(n, 3);
    cr_assert_eq(st[0].state, LOOM_MIGRATION_APPLIED);
    cr_assert_neq(st[0].applied_at[0], '\0');
    cr_assert_eq(st[1].state, LOOM_MIGRATION_PENDING);
    cr_assert_eq(st[2].state, LOOM_MIGRATION_PENDING);
    free(st);

    /* Down past the first stops at zero. */
    cr_assert_eq(loom_migrate_down(db, &set3, 10, &reverted, &err), 0, "%s", err.message);
    cr_assert_eq(reverted, 1);
    cr_assert_eq(loom_migrate_up(db, &set3, &reverted, &err), 0, "%s", err.message);
    cr_assert_eq(reverted, 3);
    done(pool, db);
}

Test(migrate, a_changed_applied_file_is_refused)
{
    loom_db_pool_t *pool;
    loom_db_t *db = conn(&pool);
    loom_error_t err;
    const loom_migration_set_t first2 = {three, 2};
    cr_assert_eq(loom_migrate_up(db, &first2, NULL, &err), 0, "%s", err.message);

    loom_migration_t edited[3];
    memcpy(edited, three, sizeof(edited));
    edited[1].up_sql = "CREATE TABLE b (id BIGINT PRIMARY KEY);";
    const loom_migration_set_t changed = {edited, 3};
    int applied = -1;
    cr_assert_neq(loom_migrate_up(db, &changed, &applied, &err), 0);
    cr_assert_eq(applied, 0, "nothing runs once a change is found");
    cr_assert_str_eq(err.code, "MIGRATION_CHECKSUM_MISMATCH");
    cr_assert(strstr(err.message, "0002_create_b was changed after it was applied"), "%s",
              err.message);
    char *n = q("SELECT count(*) FROM loom_schema_migrations");
    cr_assert_str_eq(n, "2", "migration 3 must not have been applied");
    free(n);

    int reverted = -1;
    cr_assert_neq(loom_migrate_down(db, &changed, 1, &reverted, &err), 0);
    cr_assert_str_eq(err.code, "MIGRATION_CHECKSUM_MISMATCH");

    loom_migration_status_t *st;
    size_t ns;
    cr_assert_eq(loom_migrate_status(db, &changed, &st, &ns, &err), 0);
    cr_assert_eq(st[1].state, LOOM_MIGRATION_CHANGED);
    cr_assert_eq(st[2].state, LOOM_MIGRATION_PENDING);
    free(st);
    done(pool, db);
}

Test(migrate, a_failing_migration_rolls_back_and_names_itself)
{
    static const loom_migration_t bad[] = {
        {1, "create_a", "CREATE TABLE a (id INT PRIMARY KEY);", "DROP TABLE a;"},
        {2, "broken", "CREATE TABLE c (id INT); CREATE TABLE c (id INT);", "DROP TABLE c;"},
    };
    const loom_migration_set_t set = {bad, 2};
    loom_db_pool_t *pool;
    loom_db_t *db = conn(&pool);
    loom_error_t err;
    int applied = -1;
    cr_assert_neq(loom_migrate_up(db, &set, &applied, &err), 0);
    cr_assert_eq(applied, 1);
    cr_assert(strstr(err.message, "could not apply migration 0002_broken"), "%s", err.message);
    char *c = q("SELECT count(*) FROM information_schema.tables WHERE table_name = 'c'");
    cr_assert_str_eq(c, "0", "the failed migration left nothing behind");
    free(c);
    done(pool, db);
}

typedef struct {
    int rc;
    int applied;
    loom_error_t err;
} runner_t;

static const loom_migration_t many[] = {
    {1, "m1", "CREATE TABLE hits (n INT); INSERT INTO hits VALUES (1);", "DROP TABLE hits;"},
    {2, "m2", "INSERT INTO hits VALUES (2); SELECT pg_sleep(0.05);", "DELETE FROM hits;"},
    {3, "m3", "INSERT INTO hits VALUES (3);", "DELETE FROM hits;"},
    {4, "m4", "INSERT INTO hits VALUES (4); SELECT pg_sleep(0.05);", "DELETE FROM hits;"},
    {5, "m5", "INSERT INTO hits VALUES (5);", "DELETE FROM hits;"},
};

static void *runner(void *p)
{
    runner_t *r = p;
    const loom_migration_set_t set = {many, 5};
    loom_db_pool_t *pool = NULL;
    loom_db_pool_opts_t opts = {.size = 1};
    r->rc = loom_db_pool_new(url, &opts, &pool, &r->err);
    if (r->rc != 0)
        return NULL;
    loom_db_t *db;
    r->rc = loom_db_acquire(pool, &db, &r->err);
    if (r->rc == 0) {
        r->rc = loom_migrate_up(db, &set, &r->applied, &r->err);
        loom_db_release(db);
    }
    loom_db_pool_free(pool);
    return NULL;
}

Test(migrate, concurrent_runners_take_turns_and_apply_each_file_once)
{
    enum { N = 6 };
    pthread_t t[N];
    runner_t r[N];
    memset(r, 0, sizeof(r));
    for (int i = 0; i < N; i++)
        pthread_create(&t[i], NULL, runner, &r[i]);
    int total = 0;
    for (int i = 0; i < N; i++) {
        pthread_join(t[i], NULL);
        cr_assert_eq(r[i].rc, 0, "runner %d: %s", i, r[i].err.message);
        total += r[i].applied;
    }
    cr_assert_eq(total, 5, "every migration applied by exactly one runner");
    char *hits = q("SELECT string_agg(n::text, ',' ORDER BY n) FROM hits");
    cr_assert_str_eq(hits, "1,2,3,4,5");
    free(hits);
}

Test(migrate, engine_migrations_go_up_down_and_up_again)
{
    loom_db_pool_t *pool;
    loom_db_t *db = conn(&pool);
    loom_error_t err;
    int n = 0;
    cr_assert_gt(loom_app_migrations.count, 0);
    cr_assert_eq(loom_migrate_up(db, &loom_app_migrations, &n, &err), 0, "%s", err.message);
    cr_assert_eq(n, (int)loom_app_migrations.count);
    const char *tables[] = {"loom_commands", "loom_events", "loom_outbox", "loom_leases",
                            "loom_nodes"};
    for (size_t i = 0; i < 5; i++) {
        char sql[200];
        snprintf(sql, sizeof(sql), "SELECT to_regclass('%s') IS NOT NULL", tables[i]);
        char *v = q(sql);
        cr_assert_str_eq(v, "t", "%s missing", tables[i]);
        free(v);
    }
    cr_assert_eq(loom_migrate_down(db, &loom_app_migrations, 1000, &n, &err), 0, "%s", err.message);
    cr_assert_eq(n, (int)loom_app_migrations.count);
    char *left = q("SELECT count(*) FROM information_schema.tables WHERE table_name LIKE "
                   "'loom\\_%' AND table_name NOT LIKE 'loom\\_schema\\_%'");
    cr_assert_str_eq(left, "0", "down leaves no engine table");
    free(left);
    cr_assert_eq(loom_migrate_up(db, &loom_app_migrations, &n, &err), 0, "%s", err.message);
    done(pool, db);
}
