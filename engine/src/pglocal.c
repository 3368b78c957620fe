/*
 * pglocal.c: a private PostgreSQL for `loom dev` and the tests.
 *
 * The server programs run in their own session (setsid) so a Ctrl-C in the
 * terminal reaches only Loom, which then stops Postgres cleanly. When Loom
 * runs as root they run as the `postgres` user, since PostgreSQL refuses root.
 */
#include "loom/pglocal.h"
#include "loom/db.h"
#include "loom/log.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

int loom_free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(sa);
    int port = -1;
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 &&
        getsockname(fd, (struct sockaddr *)&sa, &len) == 0)
        port = ntohs(sa.sin_port);
    close(fd);
    return port;
}

static bool is_exec(const char *dir, const char *prog)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", dir, prog);
    return access(path, X_OK) == 0;
}

int loom_pglocal_find_bindir(char *out, size_t size)
{
    const char *env = getenv("LOOM_PG_BINDIR");
    if (env && is_exec(env, "pg_ctl")) {
        snprintf(out, size, "%s", env);
        return 0;
    }
    int best = -1;
    DIR *d = opendir("/usr/lib/postgresql");
    if (d) {
        struct dirent *e;
        while ((e = readdir(d))) {
            int v = atoi(e->d_name);
            char bin[300];
            snprintf(bin, sizeof(bin), "/usr/lib/postgresql/%s/bin", e->d_name);
            if (v > best && is_exec(bin, "initdb") && is_exec(bin, "pg_ctl")) {
                best = v;
                snprintf(out, size, "%s", bin);
            }
        }
        closedir(d);
    }
    if (best >= 0)
        return 0;
    FILE *p = popen("pg_config --bindir 2>/dev/null", "r");
    if (p) {
        char line[256] = "";
        if (fgets(line, sizeof(line), p))
            line[strcspn(line, "\n")] = '\0';
        pclose(p);
        if (line[0] && is_exec(line, "pg_ctl")) {
            snprintf(out, size, "%s", line);
            return 0;
        }
    }
    return LOOM_ENOENT;
}

/* The user the server programs run as: postgres when we are root. */
static int server_user(uid_t *uid, gid_t *gid, bool *drop)
{
    *drop = geteuid() == 0;
    if (!*drop)
        return 0;
    struct passwd *pw = getpwnam("postgres");
    if (!pw)
        return LOOM_ENOENT;
    *uid = pw->pw_uid;
    *gid = pw->pw_gid;
    return 0;
}

/* Runs argv (optionally as the server user) with output appended to log_path.
 * Returns the exit status, or -1 when it could not run. */
static int run(const char *const argv[], const char *log_path)
{
    uid_t uid = 0;
    gid_t gid = 0;
    bool drop = false;
    if (server_user(&uid, &gid, &drop) != 0)
        return -1;
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        setsid(); /* keep terminal signals away from the server */
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL); /* exec keeps the mask: unblock */
        int in = open("/dev/null", O_RDONLY);
        int out = open(log_path, O_WRONLY | O_APPEND | O_CREAT, 0640);
        if (in < 0 || out < 0)
            _exit(126);
        if (drop) {
            if (fchown(out, uid, gid) != 0 || setgroups(0, NULL) != 0 || setgid(gid) != 0 ||
                setuid(uid) != 0) {
                dprintf(out, "loom: could not switch to the postgres user: %s\n", strerror(errno));
                _exit(126);
            }
        }
        dup2(in, 0);
        dup2(out, 1);
        dup2(out, 2);
        for (int fd = 3; fd < 1024; fd++)
            close(fd);
        execv(argv[0], (char *const *)argv);
        dprintf(2, "loom: could not run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* Last few lines of a log file, for error messages. */
static void log_tail(const char *path, char *out, size_t size)
{
    out[0] = '\0';
    FILE *f = fopen(path, "r");
    if (!f)
        return;
    char buf[4096];
    fseek(f, 0, SEEK_END);
    long end = ftell(f);
    long start = end > (long)sizeof(buf) - 1 ? end - (long)sizeof(buf) + 1 : 0;
    fseek(f, start, SEEK_SET);
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    /* keep the last three lines, joined */
    int lines = 0;
    char *p = buf + n;
    while (p > buf) {
        p--;
        if (*p == '\n' && p[1] != '\0' && ++lines == 3) {
            p++;
            break;
        }
    }
    for (char *q = p; *q; q++)
        if (*q == '\n')
            *q = ' ';
    snprintf(out, size, "%s", p);
}

static int ensure_dir(const char *path, bool hand_over)
{
    if (mkdir(path, 0700) != 0 && errno != EEXIST)
        return -1;
    uid_t uid = 0;
    gid_t gid = 0;
    bool drop = false;
    if (hand_over && server_user(&uid, &gid, &drop) == 0 && drop)
        if (chown(path, uid, gid) != 0)
            return -1;
    return 0;
}

static int create_database(loom_pglocal_t *pg, const char *dbname, loom_error_t *err)
{
    char url[600];
    snprintf(url, sizeof(url), "postgresql://loom@127.0.0.1:%d/postgres?connect_timeout=10",
             pg->port);
    PGconn *c = PQconnectdb(url);
    if (PQstatus(c) != CONNECTION_OK) {
        int rc = loom_error_set(err, LOOM_CODE_DB_UNAVAILABLE,
                                "could not connect to the private postgres on port %d: %s",
                                pg->port, PQerrorMessage(c));
        PQfinish(c);
        return rc;
    }
    const char *params[] = {dbname};
    PGresult *r = PQexecParams(c, "SELECT 1 FROM pg_database WHERE datname = $1", 1, NULL, params,
                               NULL, NULL, 0);
    bool exists = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) > 0;
    PQclear(r);
    int rc = 0;
    if (!exists) {
        char *q = loom_db_quote_ident(c, dbname);
        char sql[300];
        snprintf(sql, sizeof(sql), "CREATE DATABASE %s", q ? q : "loom");
        free(q);
        r = PQexec(c, sql);
        if (PQresultStatus(r) != PGRES_COMMAND_OK)
            rc = loom_db_error(c, r, err);
        PQclear(r);
    }
    PQfinish(c);
    return rc;
}

int loom_pglocal_start(loom_pglocal_t *pg, const char *dir, const loom_pglocal_opts_t *opts,
                       loom_error_t *err)
{
    loom_pglocal_opts_t o = opts ? *opts : (loom_pglocal_opts_t){0};
    const char *dbname = o.dbname ? o.dbname : "loom";
    memset(pg, 0, sizeof(*pg));
    pg->lock_fd = -1;
    snprintf(pg->dir, sizeof(pg->dir), "%s", dir);

    if (loom_pglocal_find_bindir(pg->bindir, sizeof(pg->bindir)) != 0)
        return loom_error_set(err, LOOM_CODE_INTERNAL,
                              "could not find PostgreSQL's initdb and pg_ctl: install the "
                              "postgresql package (or set LOOM_PG_BINDIR)");
    uid_t uid = 0;
    gid_t gid = 0;
    bool drop = false;
    if (server_user(&uid, &gid, &drop) != 0)
        return loom_error_set(err, LOOM_CODE_INTERNAL,
                              "running as root but there is no postgres user to run "
                              "PostgreSQL as: install the postgresql package");

    char data[600], logp[600], lockp[600], initdb[300], pgctl[300];
    snprintf(data, sizeof(data), "%s/data", dir);
    snprintf(logp, sizeof(logp), "%s/postgres.log", dir);
    snprintf(lockp, sizeof(lockp), "%s/loom.lock", dir);
    snprintf(initdb, sizeof(initdb), "%s/initdb", pg->bindir);
    snprintf(pgctl, sizeof(pgctl), "%s/pg_ctl", pg->bindir);

    if (ensure_dir(dir, true) != 0)
        return loom_error_set(err, LOOM_CODE_INTERNAL, "could not create directory \"%s\": %s", dir,
                              strerror(errno));
    pg->lock_fd = open(lockp, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (pg->lock_fd < 0)
        return loom_error_set(err, LOOM_CODE_INTERNAL, "could not open \"%s\": %s", lockp,
                              strerror(errno));
    if (flock(pg->lock_fd, LOCK_EX | LOCK_NB) != 0) {
        char holder[32] = "";
        ssize_t n = pread(pg->lock_fd, holder, sizeof(holder) - 1, 0);
        holder[n > 0 ? n : 0] = '\0';
        holder[strcspn(holder, "\n")] = '\0';
        close(pg->lock_fd);
        pg->lock_fd = -1;
        return loom_error_set(err, LOOM_CODE_INTERNAL,
                              "the private postgres in \"%s\" is in use by another loom process "
                              "(pid %s)",
                              dir, holder[0] ? holder : "unknown");
    }
    char pidline[32];
    int pl = snprintf(pidline, sizeof(pidline), "%d\n", (int)getpid());
    if (ftruncate(pg->lock_fd, 0) != 0 || pwrite(pg->lock_fd, pidline, (size_t)pl, 0) != pl)
        LOOM_WARN("could not record owner in lock file", "path=%s", lockp);
    if (drop && chown(logp, uid, gid) != 0 && errno != ENOENT)
        LOOM_WARN("could not hand the log file to postgres", "path=%s", logp);

    char pgversion[700];
    snprintf(pgversion, sizeof(pgversion), "%s/PG_VERSION", data);
    if (access(pgversion, F_OK) != 0) {
        LOOM_INFO("initialising private postgres", "dir=%s", data);
        const char *argv[] = {initdb,
                              "-D",
                              data,
                              "-U",
                              "loom",
                              "-A",
                              "trust",
                              "-E",
                              "UTF8",
                              "--no-locale",
                              o.fast ? "--no-sync" : NULL,
                              NULL};
        if (run(argv, logp) != 0) {
            char tail[1024];
            log_tail(logp, tail, sizeof(tail));
            loom_pglocal_stop(pg);
            return loom_error_set(err, LOOM_CODE_INTERNAL,
                                  "could not initialise postgres in \"%s\": %s", data, tail);
        }
    } else {
        /* We hold the lock, so a running server here was left by a crashed owner. */
        const char *argv[] = {pgctl, "-D", data, "status", NULL};
        if (run(argv, "/dev/null") == 0) {
            LOOM_WARN("stopping a postgres left running by an earlier loom", "dir=%s", data);
            const char *stop[] = {pgctl, "-D", data, "-m", "fast", "-w", "-t", "60", "stop", NULL};
            run(stop, logp);
        }
    }

    for (int attempt = 0; attempt < 3; attempt++) {
        pg->port = o.port > 0 ? o.port : loom_free_port();
        char pgopts[512];
        snprintf(pgopts, sizeof(pgopts),
                 "-p %d -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
                 "-c max_connections=200%s",
                 pg->port,
                 o.fast ? " -c fsync=off -c synchronous_commit=off -c full_page_writes=off" : "");
        const char *argv[] = {pgctl,  "-D", data, "-l",  logp,    "-o",
                              pgopts, "-w", "-t", "120", "start", NULL};
        if (run(argv, logp) == 0) {
            pg->started = true;
            break;
        }
    }
    if (!pg->started) {
        char tail[1024];
        log_tail(logp, tail, sizeof(tail));
        loom_pglocal_stop(pg);
        return loom_error_set(err, LOOM_CODE_INTERNAL, "could not start postgres in \"%s\": %s",
                              data, tail);
    }
    int rc = create_database(pg, dbname, err);
    if (rc != 0) {
        loom_pglocal_stop(pg);
        return rc;
    }
    snprintf(pg->url, sizeof(pg->url), "postgresql://loom@127.0.0.1:%d/%s", pg->port, dbname);
    return 0;
}

int loom_pglocal_stop(loom_pglocal_t *pg)
{
    int rc = 0;
    if (pg->started) {
        char data[600], logp[600], pgctl[300];
        snprintf(data, sizeof(data), "%s/data", pg->dir);
        snprintf(logp, sizeof(logp), "%s/postgres.log", pg->dir);
        snprintf(pgctl, sizeof(pgctl), "%s/pg_ctl", pg->bindir);
        const char *argv[] = {pgctl, "-D", data, "-m", "fast", "-w", "-t", "60", "stop", NULL};
        if (run(argv, logp) != 0) {
            const char *imm[] = {pgctl, "-D", data, "-m", "immediate", "-w", "stop", NULL};
            rc = run(imm, logp) == 0 ? 0 : LOOM_EIO;
        }
        pg->started = false;
    }
    if (pg->lock_fd >= 0) {
        if (ftruncate(pg->lock_fd, 0) != 0)
            rc = rc ? rc : LOOM_EIO;
        close(pg->lock_fd); /* releases the flock */
        pg->lock_fd = -1;
    }
    return rc;
}
