/*
 * The loom command as a user runs it: help, usage errors (exit 2), invalid
 * configuration (exit 78, one line), migrate up/status/down against a real
 * Postgres, and `loom dev` coming up and leaving nothing behind on Ctrl-C.
 */
#include "support.h"
#include "loom/clock.h"

#include <criterion/criterion.h>
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

static int run(const char *const args[], const char *const env[], char **out, char **err)
{
    const char *argv[16] = {loom_test_bin()};
    int i = 0;
    for (; args[i]; i++)
        argv[i + 1] = args[i];
    argv[i + 1] = NULL;
    return loom_test_run(argv, env, out, err);
}

static int count_lines(const char *s)
{
    int n = 0;
    for (; *s; s++)
        n += *s == '\n';
    return n;
}

Test(cli, help_lists_every_command)
{
    char *out, *err;
    cr_assert_eq(run((const char *[]){"--help", NULL}, NULL, &out, &err), 0);
    cr_assert(strstr(out, "usage: loom <command>"), "%s", out);
    const char *cmds[] = {"dev", "migrate", "config", "version"};
    for (size_t i = 0; i < 4; i++) {
        char want[32];
        snprintf(want, sizeof(want), "  %s ", cmds[i]);
        cr_assert(strstr(out, want), "help lacks %s:\n%s", cmds[i], out);
        char *o2, *e2;
        cr_assert_eq(run((const char *[]){cmds[i], "--help", NULL}, NULL, &o2, &e2), 0);
        char usage[64];
        snprintf(usage, sizeof(usage), "usage: loom %s", cmds[i]);
        cr_assert(strncmp(o2, usage, strlen(usage)) == 0, "%s --help:\n%s", cmds[i], o2);
        free(o2);
        free(e2);
    }
    free(out);
    free(err);
}

Test(cli, unknown_commands_and_bad_flags_exit_2_with_one_line)
{
    const char *cases[][4] = {
        {"frobnicate", NULL},           {"--frobnicate", NULL},
        {"migrate", "sideways", NULL},  {"migrate", "up", "--force", NULL},
        {"migrate", "down", "0", NULL}, {"migrate", NULL},
        {"config", "extra", NULL},      {"dev", "--port=1", NULL},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char *out, *err;
        int rc = run(cases[i], NULL, &out, &err);
        cr_expect_eq(rc, 2, "loom %s %s: exit %d", cases[i][0], cases[i][1] ? cases[i][1] : "", rc);
        cr_expect_eq(count_lines(err), 1, "stderr:\n%s", err);
        cr_expect(strncmp(err, "loom", 4) == 0, "%s", err);
        cr_expect_str_eq(out, "");
        free(out);
        free(err);
    }
}

Test(cli, invalid_configuration_exits_78_naming_the_variable)
{
    char *out, *err;
    const char *env[] = {"LOOM_API_LISTEN=nowhere", NULL};
    cr_assert_eq(run((const char *[]){"config", NULL}, env, &out, &err), 78);
    cr_assert_str_eq(err, "loom config: invalid LOOM_API_LISTEN=\"nowhere\": expected "
                          "host:port[,host:port...] with ports 0-65535\n");
    free(out);
    free(err);
}

Test(cli, config_prints_effective_values_with_secrets_redacted)
{
    char *out, *err;
    const char *env[] = {"LOOM_SITE_KEY=topsecret",
                         "LOOM_DATABASE_URL=postgresql://u:pw123@db:5432/loom", NULL};
    cr_assert_eq(run((const char *[]){"config", NULL}, env, &out, &err), 0, "%s", err);
    cr_assert(strstr(out, "LOOM_SITE_KEY=[redacted]\t# environment"), "%s", out);
    cr_assert(strstr(out, "LOOM_DATABASE_URL=postgresql://u:[redacted]@db:5432/loom"), "%s", out);
    cr_assert(strstr(out, "LOOM_API_LISTEN=127.0.0.1:8080\t# default"), "%s", out);
    cr_assert_null(strstr(out, "topsecret"));
    cr_assert_null(strstr(out, "pw123"));
    free(out);
    free(err);
}

Test(cli, migrate_up_status_down, .timeout = 120)
{
    char url[512], envurl[600];
    loom_test_db_create(url, sizeof(url));
    snprintf(envurl, sizeof(envurl), "LOOM_DATABASE_URL=%s", url);
    const char *env[] = {envurl, NULL};
    char *out, *err;

    cr_assert_eq(run((const char *[]){"migrate", "status", NULL}, env, &out, &err), 0, "%s", err);
    cr_assert(strstr(out, "0001     engine_tables"), "%s", out);
    cr_assert(strstr(out, "0002     messages"), "%s", out);
    cr_assert(strstr(out, "pending"), "%s", out);
    free(out);
    free(err);

    cr_assert_eq(run((const char *[]){"migrate", "up", NULL}, env, &out, &err), 0, "%s", err);
    cr_assert(strstr(out, "migration"), "%s", out);
    cr_assert(strstr(out, "schema is up to date"), "%s", out);
    free(out);
    free(err);

    cr_assert_eq(run((const char *[]){"migrate", "status", NULL}, env, &out, &err), 0, "%s", err);
    cr_assert(strstr(out, "applied"), "%s", out);
    cr_assert(strstr(out, "0 pending, 0 changed"), "%s", out);
    free(out);
    free(err);

    cr_assert_eq(run((const char *[]){"migrate", "down", "1", NULL}, env, &out, &err), 0, "%s",
                 err);
    cr_assert(strstr(out, "1 migration reverted"), "%s", out);
    free(out);
    free(err);
    /* The newest migration (the registry's owners, 0006) went; the others stay. */
    char *t =
        loom_test_sql_value(url, "SELECT NOT EXISTS (SELECT 1 FROM information_schema.columns "
                                 "WHERE table_name = 'registry_definitions' AND "
                                 "column_name = 'slug') AND "
                                 "to_regclass('registry_instances') IS NOT NULL AND "
                                 "to_regclass('messages') IS NOT NULL AND "
                                 "to_regclass('loom_commands') IS NOT NULL");
    cr_assert_str_eq(t, "t");
    free(t);
}

Test(cli, migrate_without_a_database_says_so)
{
    char *out, *err;
    const char *env[] = {"LOOM_DATABASE_URL=", NULL};
    /* An empty value is invalid; an unset one is explained. */
    cr_assert_eq(run((const char *[]){"migrate", "up", NULL}, env, &out, &err), 78);
    cr_assert(strstr(err, "invalid LOOM_DATABASE_URL=\"\""), "%s", err);
    free(out);
    free(err);
    unsetenv("LOOM_DATABASE_URL");
    cr_assert_eq(run((const char *[]){"migrate", "up", NULL}, NULL, &out, &err), 78);
    cr_assert(strstr(err, "LOOM_DATABASE_URL is not set"), "%s", err);
    free(out);
    free(err);
}

/* True when some process's command line mentions `needle`. */
static bool process_mentions(const char *needle)
{
    DIR *d = opendir("/proc");
    struct dirent *e;
    bool found = false;
    while (d && (e = readdir(d)) && !found) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9')
            continue;
        char path[300], buf[4096];
        snprintf(path, sizeof(path), "/proc/%s/cmdline", e->d_name);
        int fd = open(path, O_RDONLY);
        if (fd < 0)
            continue;
        ssize_t n = read(fd, buf, sizeof(buf) - 1);
        close(fd);
        if (n <= 0)
            continue;
        for (ssize_t i = 0; i < n; i++)
            if (buf[i] == '\0')
                buf[i] = ' ';
        buf[n] = '\0';
        found = strstr(buf, needle) != NULL;
    }
    if (d)
        closedir(d);
    return found;
}

Test(cli, dev_comes_up_and_ctrl_c_leaves_nothing_behind, .timeout = 300)
{
    char dir[] = "/tmp/loom-dev-test-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    chmod(dir, 0755);
    char envdir[128];
    snprintf(envdir, sizeof(envdir), "LOOM_DEV_DIR=%s", dir);
    const char *env[] = {envdir, "LOOM_DATABASE_URL", NULL};
    /* "LOOM_DATABASE_URL" without '=' drops any inherited value. */
    env[1] = NULL;
    unsetenv("LOOM_DATABASE_URL");
    const char *argv[] = {loom_test_bin(), "dev", NULL};
    int fd;
    pid_t pid = loom_test_spawn(argv, env, &fd);
    char *buf = NULL;
    bool up = loom_test_read_until(fd, "Press Ctrl-C", 120000, &buf);
    cr_assert(up, "loom dev did not come up:\n%s", buf);
    cr_assert(strstr(buf, "postgres    postgresql://loom@127.0.0.1:"), "%s", buf);
    cr_assert(strstr(buf, "migrations  "), "%s", buf);

    /* The printed database answers, with the engine tables in place. */
    const char *u = strstr(buf, "postgresql://");
    char url[256];
    snprintf(url, sizeof(url), "%.*s", (int)strcspn(u, " \n"), u);
    char *t = loom_test_sql_value(url, "SELECT to_regclass('loom_commands') IS NOT NULL");
    cr_assert_str_eq(t, "t");
    free(t);

    /* A second loom dev on the same directory is refused, not corrupting. */
    char *o2, *e2;
    const char *argv2[] = {loom_test_bin(), "dev", NULL};
    int rc2 = loom_test_run(argv2, env, &o2, &e2);
    cr_assert_eq(rc2, 1, "second loom dev: %d\n%s", rc2, e2);
    cr_assert(strstr(e2, "in use by another loom process"), "%s", e2);
    free(o2);
    free(e2);

    kill(pid, SIGINT);
    int status = loom_test_wait(pid, 60000);
    loom_test_read_until(fd, "\x01", 100, &buf); /* collect the rest */
    cr_assert_eq(status, 0, "loom dev exited %d:\n%s", status, buf);
    cr_assert(strstr(buf, "private postgres stopped"), "%s", buf);
    close(fd);

    char path[256];
    snprintf(path, sizeof(path), "%s/pg/data/postmaster.pid", dir);
    cr_assert_neq(access(path, F_OK), 0, "postmaster.pid left behind");
    snprintf(path, sizeof(path), "%s/pg/data", dir);
    cr_assert_not(process_mentions(path), "a postgres process is still running");
    snprintf(path, sizeof(path), "%s/pg/loom.lock", dir);
    int lfd = open(path, O_RDWR);
    cr_assert_geq(lfd, 0);
    cr_assert_eq(flock(lfd, LOCK_EX | LOCK_NB), 0, "the lock is still held");
    close(lfd);
    free(buf);

    /* Data is kept: a second run finds the cluster and applies nothing new. */
    pid = loom_test_spawn(argv, env, &fd);
    buf = NULL;
    cr_assert(loom_test_read_until(fd, "Press Ctrl-C", 120000, &buf), "%s", buf);
    cr_assert(strstr(buf, "0 applied now"), "%s", buf);
    kill(pid, SIGTERM);
    cr_assert_eq(loom_test_wait(pid, 60000), 0);
    close(fd);
    free(buf);
    char cmd[200];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    cr_assert_eq(system(cmd), 0);
}
