/*
 * testenv.c: starts and stops the shared Postgres of a test run.
 *
 *   loom_testenv pg-start STATE_DIR   initdb + start in a new /tmp dir, write STATE_DIR/pg.env
 *   loom_testenv pg-stop STATE_DIR    stop it and remove its directory
 *
 * CTest runs these as the setup and cleanup of the "pg" fixture, so the
 * server starts once per run and every test creates its own database on it.
 * It uses the same code as `loom dev` (engine/src/pglocal.c).
 */
#include "loom/pglocal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int read_setting(const char *state, const char *name, char *out, size_t size)
{
    char path[1024], line[1024];
    snprintf(path, sizeof(path), "%s/pg.env", state);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t nl = strlen(name);
    int rc = -1;
    while (fgets(line, sizeof(line), f)) {
        line[strcspn(line, "\n")] = '\0';
        if (strncmp(line, name, nl) == 0 && line[nl] == '=') {
            snprintf(out, size, "%s", line + nl + 1);
            rc = 0;
        }
    }
    fclose(f);
    return rc;
}

static int pg_stop(const char *state)
{
    char dir[512];
    if (read_setting(state, "LOOM_TEST_PG_DIR", dir, sizeof(dir)) != 0)
        return 0; /* nothing started */
    loom_pglocal_t pg = {.started = true, .lock_fd = -1};
    snprintf(pg.dir, sizeof(pg.dir), "%s", dir);
    if (loom_pglocal_find_bindir(pg.bindir, sizeof(pg.bindir)) != 0) {
        fprintf(stderr, "loom_testenv: could not find pg_ctl\n");
        return 1;
    }
    int rc = loom_pglocal_stop(&pg);
    char cmd[600];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    if (strncmp(dir, "/tmp/loom-test-pg-", 18) == 0 && system(cmd) != 0)
        fprintf(stderr, "loom_testenv: could not remove %s\n", dir);
    char path[1024];
    snprintf(path, sizeof(path), "%s/pg.env", state);
    unlink(path);
    printf("test postgres stopped\n");
    return rc == 0 ? 0 : 1;
}

static int pg_start(const char *state)
{
    pg_stop(state); /* a server left by an interrupted run */
    if (mkdir(state, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "loom_testenv: could not create %s: %s\n", state, strerror(errno));
        return 1;
    }
    char dir[] = "/tmp/loom-test-pg-XXXXXX";
    if (!mkdtemp(dir)) {
        fprintf(stderr, "loom_testenv: could not create a temporary directory: %s\n",
                strerror(errno));
        return 1;
    }
    chmod(dir, 0755);
    loom_pglocal_t pg;
    loom_error_t err;
    loom_pglocal_opts_t opts = {.fast = true, .dbname = "loom"};
    char pgdir[600];
    snprintf(pgdir, sizeof(pgdir), "%s/pg", dir);
    if (loom_pglocal_start(&pg, pgdir, &opts, &err) != 0) {
        fprintf(stderr, "loom_testenv: %s\n", err.message);
        return 1;
    }
    /* The server keeps running after we exit; pg-stop stops it. */
    close(pg.lock_fd);
    char path[1024];
    snprintf(path, sizeof(path), "%s/pg.env", state);
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "loom_testenv: could not write %s\n", path);
        loom_pglocal_stop(&pg);
        return 1;
    }
    fprintf(f, "LOOM_TEST_DATABASE_URL=%s\nLOOM_TEST_PG_DIR=%s\n", pg.url, pgdir);
    fclose(f);
    printf("test postgres at %s\n", pg.url);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 3 || (strcmp(argv[1], "pg-start") != 0 && strcmp(argv[1], "pg-stop") != 0)) {
        fprintf(stderr, "usage: loom_testenv pg-start|pg-stop STATE_DIR\n");
        return 2;
    }
    return strcmp(argv[1], "pg-start") == 0 ? pg_start(argv[2]) : pg_stop(argv[2]);
}
