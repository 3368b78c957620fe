/*
 * cli_run.c: `loom run NAME`, a service's oneshot job, once per deployment,
 * and `loom run --list`; and the worker's part that runs the headless tasks
 * (loom/task.h).
 */
#include "cli.h"
#include "loom/log.h"
#include "loom/task_runner.h"

#include <signal.h>
#include <stdio.h>
#include <string.h>

int cli_worker_tasks_start(cli_ctx_t *ctx, loom_db_pool_t *pool, loom_producer_t *producer,
                           cli_worker_parts_t *parts, loom_error_t *err)
{
    if (ctx->app->n_tasks == 0)
        return 0;
    loom_tasks_opts_t o = {.tasks = ctx->app->tasks,
                           .n_tasks = ctx->app->n_tasks,
                           .pool = pool,
                           .producer = producer,
                           .cfg = &ctx->cfg};
    int rc = loom_tasks_start(&o, &parts->tasks, err);
    for (size_t i = 0; rc == 0 && i < ctx->app->n_tasks; i++)
        LOOM_INFO("running headless task", "task=%s singleton=%s", ctx->app->tasks[i].name,
                  ctx->app->tasks[i].singleton ? "yes" : "no");
    return rc;
}

static volatile int run_stop;

static void on_signal(int sig)
{
    (void)sig;
    run_stop = 1;
}

static const loom_db_stmt_t stmt_runs = {
    "loom_oneshot_list",
    "SELECT name, status, attempts, coalesce(finished_at, started_at)::text, coalesce(error, '') "
    "FROM loom_oneshot_runs",
    0};

static int list_jobs(cli_ctx_t *ctx, loom_db_pool_t *pool)
{
    loom_db_t *db = NULL;
    loom_error_t err;
    PGresult *res = NULL;
    int rc = loom_db_acquire(pool, &db, &err);
    if (rc == 0) {
        rc = loom_db_exec(db, &stmt_runs, NULL, &res, &err);
        loom_db_release(db);
    }
    if (rc != 0)
        return cli_fail("run", "%s", err.message);
    if (ctx->app->n_oneshots == 0)
        printf("no oneshot jobs\n");
    else
        printf("%-32s %-8s %-8s %-32s %s\n", "JOB", "STATE", "ATTEMPTS", "WHEN", "DESCRIPTION");
    for (size_t i = 0; i < ctx->app->n_oneshots; i++) {
        const loom_oneshot_def_t *d = &ctx->app->oneshots[i];
        int row = -1;
        for (int r = 0; r < PQntuples(res); r++)
            if (strcmp(PQgetvalue(res, r, 0), d->name) == 0)
                row = r;
        printf("%-32s %-8s %-8s %-32s %s\n", d->name, row < 0 ? "pending" : PQgetvalue(res, row, 1),
               row < 0 ? "0" : PQgetvalue(res, row, 2), row < 0 ? "-" : PQgetvalue(res, row, 3),
               d->description ? d->description : "");
        if (row >= 0 && *PQgetvalue(res, row, 4))
            printf("%-32s   last error: %s\n", "", PQgetvalue(res, row, 4));
    }
    PQclear(res);
    return LOOM_EXIT_OK;
}

static int cmd_run(cli_ctx_t *ctx, int argc, char **argv)
{
    const char *name = NULL;
    bool list = false, again = false;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--list") == 0)
            list = true;
        else if (strcmp(argv[i], "--again") == 0)
            again = true;
        else if (argv[i][0] == '-')
            return cli_usage_error("run", "unknown option '%s'", argv[i]);
        else if (name)
            return cli_usage_error("run", "unexpected argument '%s'", argv[i]);
        else
            name = argv[i];
    }
    if (list == (name != NULL))
        return cli_usage_error("run", "give a job's NAME or --list");
    const loom_oneshot_def_t *def = NULL;
    for (size_t i = 0; name && i < ctx->app->n_oneshots; i++)
        if (strcmp(ctx->app->oneshots[i].name, name) == 0)
            def = &ctx->app->oneshots[i];
    if (name && !def)
        return cli_usage_error("run", "no oneshot job '%s' ('%s run --list' lists them)", name,
                               ctx->app->name);

    loom_db_pool_t *pool = NULL;
    int rc = cli_open_db(ctx, "run", 4, &pool);
    if (rc != 0)
        return rc;
    if (list) {
        rc = list_jobs(ctx, pool);
        loom_db_pool_free(pool);
        return rc;
    }
    loom_error_t err;
    loom_producer_t *producer = NULL;
    if (ctx->cfg.kafka_brokers) {
        loom_producer_opts_t po = {.brokers = ctx->cfg.kafka_brokers,
                                   .cfg = &ctx->cfg,
                                   .flush_timeout_ms = ctx->cfg.shutdown_timeout_ms};
        if (loom_producer_new(&po, &producer, &err) != 0) {
            loom_db_pool_free(pool);
            return cli_fail("run", "%s", err.message);
        }
    }
    /* SIGINT/SIGTERM ask the job to return (loom_task_stopping()). */
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    loom_oneshot_opts_t o = {.pool = pool,
                             .producer = producer,
                             .cfg = &ctx->cfg,
                             .version = ctx->app->version,
                             .again = again,
                             .stop = &run_stop};
    loom_oneshot_result_t result;
    char when[40] = "";
    rc = loom_oneshot_run(def, &o, &result, when, &err);
    if (producer)
        loom_producer_free(producer);
    loom_db_pool_free(pool);
    if (rc != 0)
        return cli_fail("run", "%s", err.message);
    switch (result) {
    case LOOM_ONESHOT_RAN:
        printf("%s: done\n", name);
        return LOOM_EXIT_OK;
    case LOOM_ONESHOT_DONE:
        printf("%s: done already (%s); '--again' runs it again\n", name, when);
        return LOOM_EXIT_OK;
    case LOOM_ONESHOT_RUNNING:
        return cli_fail("run",
                        "%s: a run is under way since %s; '--again' takes over one whose "
                        "process died",
                        name, when);
    case LOOM_ONESHOT_FAILED:
        return cli_fail("run", "%s failed: %s", name, err.message);
    }
    return LOOM_EXIT_FAILURE;
}

const cli_command_t cli_run_command = {
    "run", "run a oneshot job once per deployment, or list them",
    "usage: loom run NAME [--again]\n"
    "       loom run --list\n"
    "\n"
    "Runs the oneshot job NAME that a service registers (loom/task.h): named work\n"
    "done once per deployment, like a migration. Each run is recorded in\n"
    "loom_oneshot_runs. A job that succeeded is not run again: it prints 'done\n"
    "already' and exits 0. A job that failed is run again. While a run is under\n"
    "way another is refused (exit 1).\n"
    "\n"
    "  --again   run it even when it succeeded before, or take over a run left\n"
    "            'running' by a process that died (make sure none is under way)\n"
    "  --list    list the jobs with their state: pending, running, done, failed\n"
    "\n"
    "SIGINT or SIGTERM asks the job to stop; it is recorded as failed unless it\n"
    "finished. Needs LOOM_DATABASE_URL; LOOM_KAFKA_BROKERS when the job publishes\n"
    "commands. Exits 0 when the job is done, 1 when it failed or is running.\n",
    true, cmd_run};
