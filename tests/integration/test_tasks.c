/*
 * Headless tasks and oneshot jobs (loom/task.h) against the real Postgres:
 * a task restarted when it returns and stopped when the runner stops; a
 * singleton run by one of two nodes at a time, taken over when its node
 * stops, and stopped when its lease is taken away; oneshot jobs run once per
 * deployment (done, failed then run again, --again, never two at once);
 * `loom run` and `loom worker` with a service that registers both kinds.
 */
#include "support.h"
#include "loom/pglocal.h"
#include "loom/task_runner.h"

#include <criterion/criterion.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- headless tasks in-process ---------------------------------------------- */

static atomic_int active;     /* singletons running right now, over both runners */
static atomic_int max_active; /* the most seen at once */
static atomic_int rounds;

static int counting(loom_task_ctx_t *ctx, loom_error_t *err)
{
    (void)err;
    int now = atomic_fetch_add(&active, 1) + 1;
    int seen = atomic_load(&max_active);
    while (now > seen && !atomic_compare_exchange_weak(&max_active, &seen, now))
        ;
    while (!loom_task_sleep(ctx, 20))
        atomic_fetch_add(&rounds, 1);
    atomic_fetch_sub(&active, 1);
    return 0;
}

static int quitter(loom_task_ctx_t *ctx, loom_error_t *err)
{
    (void)ctx;
    return loom_error_set(err, LOOM_CODE_DB_UNAVAILABLE, "gave up");
}

static bool wait_until(bool (*cond)(void *), void *arg, int timeout_ms)
{
    for (int waited = 0; waited < timeout_ms; waited += 20) {
        if (cond(arg))
            return true;
        usleep(20 * 1000);
    }
    return cond(arg);
}

typedef struct pair {
    loom_tasks_t *t;
    const char *name;
    int64_t at_least;
} pair_t;

static bool runs_reach(void *arg)
{
    pair_t *p = arg;
    return loom_tasks_runs(p->t, p->name) >= p->at_least;
}

static bool is_running(void *arg)
{
    pair_t *p = arg;
    return loom_tasks_running(p->t, p->name);
}

Test(tasks, a_task_runs_until_stopped_and_restarts_when_it_returns, .timeout = 120)
{
    static const loom_task_def_t defs[] = {
        {.name = "t.count", .run = counting},
        {.name = "t.quit", .run = quitter},
    };
    atomic_store(&rounds, 0);
    loom_tasks_opts_t o = {.tasks = defs, .n_tasks = 2, .restart_ms = 50};
    loom_tasks_t *t = NULL;
    loom_error_t err;
    cr_assert_eq(loom_tasks_start(&o, &t, &err), 0, "%s", err.message);
    pair_t quit = {t, "t.quit", 3};
    cr_assert(wait_until(runs_reach, &quit, 30000), "t.quit ran %lld times",
              (long long)loom_tasks_runs(t, "t.quit"));
    pair_t count = {t, "t.count", 1};
    cr_assert(wait_until(is_running, &count, 30000));
    while (atomic_load(&rounds) < 3)
        usleep(10 * 1000);
    loom_tasks_stop(t); /* returns once every task returned */
    cr_assert_eq(atomic_load(&active), 0);
}

static loom_tasks_t *start_node(loom_db_pool_t *pool, const char *holder,
                                const loom_task_def_t *def)
{
    loom_tasks_opts_t o = {.tasks = def,
                           .n_tasks = 1,
                           .pool = pool,
                           .holder = holder,
                           .lease_ms = 1500,
                           .restart_ms = 50};
    loom_tasks_t *t = NULL;
    loom_error_t err;
    cr_assert_eq(loom_tasks_start(&o, &t, &err), 0, "%s", err.message);
    return t;
}

typedef struct two {
    loom_tasks_t *a, *b;
} two_t;

static bool one_runs(void *arg)
{
    two_t *p = arg;
    return loom_tasks_running(p->a, "t.single") || loom_tasks_running(p->b, "t.single");
}

Test(tasks, a_singleton_runs_on_one_node_at_a_time, .timeout = 180)
{
    static const loom_task_def_t def[] = {{.name = "t.single", .run = counting, .singleton = true}};
    atomic_store(&active, 0);
    atomic_store(&max_active, 0);
    char url[512];
    loom_test_db_create_migrated(url, sizeof(url));
    loom_db_pool_t *pool = loom_test_pool(url, 8);
    two_t n = {start_node(pool, "node-a", def), start_node(pool, "node-b", def)};
    cr_assert(wait_until(one_runs, &n, 60000), "no node took the task");
    /* For several lease periods, one runner only. */
    for (int i = 0; i < 40; i++) {
        cr_assert_eq(loom_tasks_running(n.a, "t.single") + loom_tasks_running(n.b, "t.single"), 1);
        usleep(100 * 1000);
    }
    loom_tasks_t *holder = loom_tasks_running(n.a, "t.single") ? n.a : n.b;
    loom_tasks_t *other = holder == n.a ? n.b : n.a;
    const char *holder_name = holder == n.a ? "node-a" : "node-b";
    char sql[200];
    snprintf(sql, sizeof(sql),
             "SELECT count(*) FROM loom_leases WHERE name = 'task:t.single' "
             "AND holder = '%s' AND expires_at > now()",
             holder_name);
    cr_assert_eq(loom_test_sql_ll(url, sql), 1);
    /* Its node stops: the other takes over. */
    loom_tasks_stop(holder);
    pair_t p = {other, "t.single", 0};
    cr_assert(wait_until(is_running, &p, 60000), "the other node did not take over");
    cr_assert_eq(atomic_load(&max_active), 1, "two runners at once");
    /* Its lease taken away (another holder), the task is stopped. */
    loom_test_sql(url, "UPDATE loom_leases SET holder = 'thief', expires_at = now() + "
                       "interval '1 hour' WHERE name = 'task:t.single'");
    for (int i = 0; i < 600 && loom_tasks_running(other, "t.single"); i++)
        usleep(100 * 1000);
    cr_assert_not(loom_tasks_running(other, "t.single"), "still running without its lease");
    loom_tasks_stop(other);
    cr_assert_eq(atomic_load(&active), 0);
    loom_db_pool_free(pool);
}

/* ---- oneshot jobs ---------------------------------------------------------------- */

static atomic_int job_calls;
static atomic_int job_fail;

static int job(loom_task_ctx_t *ctx, loom_error_t *err)
{
    (void)ctx;
    atomic_fetch_add(&job_calls, 1);
    if (atomic_load(&job_fail))
        return loom_error_set(err, LOOM_CODE_DB_UNAVAILABLE, "backfill source is down");
    return 0;
}

static loom_oneshot_result_t run_job(loom_db_pool_t *pool, bool again)
{
    static const loom_oneshot_def_t def = {.name = "t.backfill", .run = job};
    loom_oneshot_opts_t o = {.pool = pool, .version = "9.9.9", .again = again};
    loom_oneshot_result_t r;
    loom_error_t err;
    cr_assert_eq(loom_oneshot_run(&def, &o, &r, NULL, &err), 0, "%s", err.message);
    return r;
}

Test(tasks, a_oneshot_job_runs_once_per_deployment, .timeout = 120)
{
    char url[512];
    loom_test_db_create_migrated(url, sizeof(url));
    loom_db_pool_t *pool = loom_test_pool(url, 2);
    atomic_store(&job_calls, 0);
    atomic_store(&job_fail, 1);
    cr_assert_eq(run_job(pool, false), LOOM_ONESHOT_FAILED);
    cr_assert_eq(loom_test_sql_ll(url, "SELECT count(*) FROM loom_oneshot_runs WHERE name = "
                                       "'t.backfill' AND status = 'failed' AND error = "
                                       "'backfill source is down'"),
                 1);
    atomic_store(&job_fail, 0);
    cr_assert_eq(run_job(pool, false), LOOM_ONESHOT_RAN); /* failed: run again */
    cr_assert_eq(run_job(pool, false), LOOM_ONESHOT_DONE);
    cr_assert_eq(run_job(pool, false), LOOM_ONESHOT_DONE);
    cr_assert_eq(atomic_load(&job_calls), 2);
    cr_assert_eq(run_job(pool, true), LOOM_ONESHOT_RAN);
    cr_assert_eq(atomic_load(&job_calls), 3);
    cr_assert_eq(loom_test_sql_ll(url, "SELECT attempts FROM loom_oneshot_runs WHERE name = "
                                       "'t.backfill' AND status = 'done' AND version = '9.9.9'"),
                 3);
    /* A run under way keeps a second one out. */
    loom_test_sql(url, "UPDATE loom_oneshot_runs SET status = 'running'");
    cr_assert_eq(run_job(pool, false), LOOM_ONESHOT_RUNNING);
    cr_assert_eq(atomic_load(&job_calls), 3);
    loom_db_pool_free(pool);
}

/* ---- through the command line ----------------------------------------------------- */

static int run_app(const char *url, const char *const *args, const char *extra_env, char **out,
                   char **err)
{
    char e_url[600];
    snprintf(e_url, sizeof(e_url), "LOOM_DATABASE_URL=%s", url);
    const char *env[] = {e_url, "LOOM_TEST_TASKS=1", extra_env, NULL};
    const char *argv[8] = {loom_test_app_bin()};
    for (int i = 0; args[i] && i < 6; i++)
        argv[i + 1] = args[i];
    return loom_test_run(argv, env, out, err);
}

Test(tasks, loom_run_runs_a_job_once, .timeout = 180)
{
    char url[512];
    loom_test_db_create(url, sizeof(url));
    char *out = NULL, *err = NULL;
    const char *migrate[] = {"migrate", "up", NULL};
    cr_assert_eq(run_app(url, migrate, NULL, &out, &err), 0, "%s", err);
    free(out);
    free(err);

    const char *list[] = {"run", "--list", NULL};
    cr_assert_eq(run_app(url, list, NULL, &out, &err), 0, "%s", err);
    cr_assert(strstr(out, "test.seed") && strstr(out, "pending"), "%s", out);
    free(out);
    free(err);

    loom_test_sql(url, "INSERT INTO test_blocks VALUES ('seed')");
    const char *seed[] = {"run", "test.seed", NULL};
    cr_assert_eq(run_app(url, seed, NULL, &out, &err), 1, "%s", out);
    cr_assert(strstr(err, "test.seed failed: seeding is blocked"), "%s", err);
    free(out);
    free(err);
    loom_test_sql(url, "DELETE FROM test_blocks");
    cr_assert_eq(run_app(url, seed, NULL, &out, &err), 0, "%s", err);
    cr_assert(strstr(out, "test.seed: done"), "%s", out);
    free(out);
    free(err);
    cr_assert_eq(run_app(url, seed, NULL, &out, &err), 0, "%s", err);
    cr_assert(strstr(out, "done already"), "%s", out);
    free(out);
    free(err);
    cr_assert_eq(loom_test_sql_ll(url, "SELECT message_id::int FROM test_claims WHERE name = "
                                       "'seeded'"),
                 1, "the job ran more than once");
    cr_assert_eq(run_app(url, list, NULL, &out, &err), 0, "%s", err);
    cr_assert(strstr(out, "done"), "%s", out);
    free(out);
    free(err);

    const char *bad[] = {"run", "test.nope", NULL};
    cr_assert_eq(run_app(url, bad, NULL, &out, &err), 2, "%s", err);
    cr_assert(strstr(err, "no oneshot job 'test.nope'"), "%s", err);
    free(out);
    free(err);
}

Test(tasks, loom_worker_runs_headless_tasks_and_stops_them, .timeout = 240)
{
    char url[512];
    loom_test_db_create(url, sizeof(url));
    char *out = NULL, *err = NULL;
    const char *migrate[] = {"migrate", "up", NULL};
    cr_assert_eq(run_app(url, migrate, NULL, &out, &err), 0, "%s", err);
    free(out);
    free(err);
    char e_url[600], e_b[300];
    snprintf(e_url, sizeof(e_url), "LOOM_DATABASE_URL=%s", url);
    snprintf(e_b, sizeof(e_b), "LOOM_KAFKA_BROKERS=%s", loom_test_kafka_brokers());
    const char *env[] = {e_url, e_b, "LOOM_TEST_TASKS=1",
                         "LOOM_NODE_ID=11111111-2222-4333-8444-555555555555", NULL};
    const char *argv[] = {loom_test_app_bin(), "worker", NULL};
    int fd;
    pid_t pid = loom_test_spawn(argv, env, &fd);
    char *log = NULL;
    cr_assert(loom_test_read_until(fd, "headless task started", 90000, &log), "%s", log);
    cr_assert(strstr(log, "task=test.ticker"), "%s", log);
    /* It works: its rounds are counted. */
    cr_assert_geq(
        loom_test_wait_for(url,
                           "SELECT (coalesce(max(message_id::int), 0) >= 3)::int FROM test_claims "
                           "WHERE name = 'ticks-11111111-2222-4333-8444-555555555555'",
                           1, 60000),
        1);
    kill(pid, SIGTERM);
    char *rest = NULL;
    cr_assert(loom_test_read_until(fd, "headless task stopped", 60000, &rest), "%s", rest);
    cr_assert_eq(loom_test_wait(pid, 60000), 0);
    /* It gave its lease up on the way out. */
    cr_assert_eq(loom_test_sql_ll(url, "SELECT count(*) FROM loom_leases WHERE name = "
                                       "'task:test.ticker'"),
                 0);
    close(fd);
    free(log);
    free(rest);
}

Test(tasks, loom_dev_runs_them_too, .timeout = 240)
{
    char dir[] = "/tmp/loom-tasks-dev-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    chmod(dir, 0755);
    char e_d[128], e_l[64];
    snprintf(e_d, sizeof(e_d), "LOOM_DEV_DIR=%s", dir);
    snprintf(e_l, sizeof(e_l), "LOOM_API_LISTEN=127.0.0.1:%d", loom_free_port());
    unsetenv("LOOM_DATABASE_URL");
    unsetenv("LOOM_KAFKA_BROKERS");
    const char *env[] = {e_d, e_l, "LOOM_TEST_TASKS=1", NULL};
    const char *argv[] = {loom_test_app_bin(), "dev", NULL};
    int fd;
    pid_t pid = loom_test_spawn(argv, env, &fd);
    char *log = NULL;
    cr_assert(loom_test_read_until(fd, "Press Ctrl-C", 120000, &log), "%s", log);
    cr_assert(strstr(log, "tasks       1 headless task, 1 oneshot job ('loom run --list')"), "%s",
              log);
    char *more = NULL;
    if (!strstr(log, "headless task started"))
        cr_assert(loom_test_read_until(fd, "headless task started", 60000, &more), "%s", more);
    kill(pid, SIGTERM);
    char *rest = NULL;
    cr_assert(loom_test_read_until(fd, "headless task stopped", 60000, &rest), "%s", rest);
    cr_assert_eq(loom_test_wait(pid, 60000), 0);
    close(fd);
    free(log);
    free(more);
    free(rest);
    char cmd[200];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    cr_assert_eq(system(cmd), 0);
}
