/*
 * cli_dev.c: `loom dev`, Loom on its embedded defaults in one process.
 *
 * Without LOOM_DATABASE_URL it starts a private PostgreSQL under
 * LOOM_DEV_DIR/pg (kept between runs), applies the migrations, prints what it
 * runs and where, and stays up until SIGINT/SIGTERM, then stops Postgres
 * cleanly so nothing is left behind.
 */
#include "cli.h"
#include "loom/log.h"
#include "loom/pglocal.h"

#include <errno.h>
#include <pthread.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static int apply_migrations(const char *url, const loom_app_t *app, int *applied)
{
    loom_db_pool_t *pool = NULL;
    loom_db_t *db = NULL;
    loom_error_t err;
    loom_db_pool_opts_t opts = {.size = 1};
    int rc = loom_db_pool_new(url, &opts, &pool, &err);
    if (rc == 0)
        rc = loom_db_acquire(pool, &db, &err);
    if (rc == 0)
        rc = loom_migrate_up(db, &app->migrations, applied, &err);
    loom_db_release(db);
    loom_db_pool_free(pool);
    if (rc != 0)
        return cli_fail("dev", "%s", err.message);
    return 0;
}

static int cmd_dev(cli_ctx_t *ctx, int argc, char **argv)
{
    if (argc > 1)
        return cli_usage_error("dev", "%s '%s'",
                               argv[1][0] == '-' ? "unknown option" : "unexpected argument",
                               argv[1]);
    /* Signals are taken with sigwait() below; block them before anything
     * starts a thread or a child so none of them sees one first. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);

    loom_pglocal_t pg = {.lock_fd = -1};
    const char *url = ctx->cfg.database_url;
    char pgdir[PATH_MAX];
    if (!url) {
        if (mkdir(ctx->cfg.dev_dir, 0755) != 0 && errno != EEXIST)
            return cli_fail("dev", "could not create directory \"%s\": %s", ctx->cfg.dev_dir,
                            strerror(errno));
        char *abs = realpath(ctx->cfg.dev_dir, NULL);
        snprintf(pgdir, sizeof(pgdir), "%s/pg", abs ? abs : ctx->cfg.dev_dir);
        free(abs);
        loom_error_t err;
        LOOM_INFO("starting private postgres", "dir=%s", pgdir);
        if (loom_pglocal_start(&pg, pgdir, NULL, &err) != 0)
            return cli_fail("dev", "%s", err.message);
        url = pg.url;
    }
    int applied = 0;
    int rc = apply_migrations(url, ctx->app, &applied);
    if (rc == 0) {
        printf("loom dev is up (node %s)\n", ctx->cfg.node_id);
        if (pg.started)
            printf("  postgres    %s  (private, data in %s)\n", url, pgdir);
        else
            printf("  postgres    LOOM_DATABASE_URL\n");
        printf("  migrations  %zu known, %d applied now\n", ctx->app->migrations.count, applied);
        printf("Press Ctrl-C to stop.\n");
        fflush(stdout);
        LOOM_INFO("loom dev ready", "postgres_port=%d", pg.port);
        int sig = 0;
        sigwait(&sigs, &sig);
        LOOM_INFO("shutting down", "signal=%s", strsignal(sig));
    }
    if (pg.started || pg.lock_fd >= 0) {
        if (loom_pglocal_stop(&pg) != 0)
            rc = cli_fail("dev", "could not stop the private postgres cleanly (see %s)", pgdir);
        else
            LOOM_INFO("private postgres stopped", "dir=%s", pgdir);
    }
    return rc;
}

const cli_command_t cli_dev_command = {
    "dev", "run Loom on its embedded defaults (private Postgres) until Ctrl-C",
    "usage: loom dev\n"
    "\n"
    "Runs Loom on one machine with nothing to set up. Without LOOM_DATABASE_URL it\n"
    "starts a private PostgreSQL in LOOM_DEV_DIR/pg (default ./.loom/pg; data kept\n"
    "between runs) on a free loopback port, applies the migrations, prints what it\n"
    "runs and where, and stays up until Ctrl-C (or SIGTERM), when it stops Postgres\n"
    "cleanly. As root, Postgres runs as the postgres user.\n",
    true, cmd_dev};
