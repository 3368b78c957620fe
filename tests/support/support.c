/*
 * support.c: fixtures and helpers shared by the test executables.
 */
#include "support.h"
#include "loom/bus.h"
#include "loom/clock.h"
#include "loom/mem.h"
#include "loom/sha256.h"
#include "loom/migrate.h"
#include "loom/uuid.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;
extern const loom_migration_set_t loom_app_migrations;

/* Fixtures write NAME=value lines to STATE_DIR/<fixture>.env. */
static char *state_lookup(const char *name)
{
    static const char *const files[] = {"pg.env", "kafka.env"};
    size_t nl = strlen(name);
    char *found = NULL;
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]) && !found; i++) {
        char path[1024], line[2048];
        snprintf(path, sizeof(path), "%s/%s", LOOM_TEST_STATE_DIR, files[i]);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        while (fgets(line, sizeof(line), f)) {
            line[strcspn(line, "\n")] = '\0';
            if (strncmp(line, name, nl) == 0 && line[nl] == '=') {
                free(found);
                found = loom_xstrdup(line + nl + 1);
            }
        }
        fclose(f);
    }
    return found;
}

const char *loom_test_env(const char *name)
{
    const char *v = getenv(name);
    if (v && *v)
        return v;
    /* Cached per name; few names are used. */
    static struct {
        char name[64];
        char *value;
    } cache[8];
    for (size_t i = 0; i < sizeof(cache) / sizeof(cache[0]); i++) {
        if (cache[i].name[0] && strcmp(cache[i].name, name) == 0)
            return cache[i].value;
        if (!cache[i].name[0]) {
            snprintf(cache[i].name, sizeof(cache[i].name), "%s", name);
            cache[i].value = state_lookup(name);
            return cache[i].value;
        }
    }
    return state_lookup(name);
}

const char *loom_test_pg_url(void)
{
    const char *url = loom_test_env("LOOM_TEST_DATABASE_URL");
    if (!url)
        cr_assert_fail("no test Postgres: run the suite with ctest (its fixture starts one) or set "
                       "LOOM_TEST_DATABASE_URL");
    return url;
}

const char *loom_test_kafka_brokers(void)
{
    const char *b = loom_test_env("LOOM_TEST_KAFKA_BROKERS");
    if (!b)
        cr_assert_fail("no test Kafka broker: run the suite with ctest (its fixture starts Apache "
                       "Kafka) or set LOOM_TEST_KAFKA_BROKERS");
    return b;
}

void loom_test_unique_name(const char *prefix, char *out, size_t size)
{
    static int counter;
    unsigned r = 0;
    loom_random_bytes(&r, sizeof(r));
    snprintf(out, size, "%s_%d_%d_%u", prefix, (int)getpid(), ++counter, r % 100000);
}

void loom_test_topic_prefix(const char *prefix, char *out, size_t size)
{
    loom_test_unique_name(prefix, out, size);
    for (char *c = out; *c; c++)
        if (*c == '_')
            *c = '-';
}

static PGconn *connect_or_die(const char *url)
{
    PGconn *c = PQconnectdb(url);
    if (PQstatus(c) != CONNECTION_OK)
        cr_assert_fail("could not connect to %s: %s", url, PQerrorMessage(c));
    return c;
}

void loom_test_sql(const char *url, const char *sql)
{
    PGconn *c = connect_or_die(url);
    PGresult *r = PQexec(c, sql);
    ExecStatusType st = PQresultStatus(r);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK)
        cr_assert_fail("%s: %s", sql, PQerrorMessage(c));
    PQclear(r);
    PQfinish(c);
}

char *loom_test_sql_value(const char *url, const char *sql)
{
    PGconn *c = connect_or_die(url);
    PGresult *r = PQexec(c, sql);
    if (PQresultStatus(r) != PGRES_TUPLES_OK)
        cr_assert_fail("%s: %s", sql, PQerrorMessage(c));
    char *v = loom_xstrdup(PQntuples(r) > 0 ? PQgetvalue(r, 0, 0) : "");
    PQclear(r);
    PQfinish(c);
    return v;
}

long long loom_test_sql_ll(const char *url, const char *sql)
{
    char *v = loom_test_sql_value(url, sql);
    long long n = atoll(v);
    free(v);
    return n;
}

long long loom_test_wait_for(const char *url, const char *sql, long long want, int timeout_ms)
{
    int64_t end = loom_mono_ms() + timeout_ms;
    long long v;
    while ((v = loom_test_sql_ll(url, sql)) != want && loom_mono_ms() < end)
        loom_sleep_ms(100);
    return v;
}

void loom_test_tokens_file(const char *path, const loom_test_token_t *tokens, size_t n)
{
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f, "cannot write %s", path);
    fprintf(f, "# test tokens\n\n");
    for (size_t i = 0; i < n; i++) {
        char h[65];
        loom_sha256_hex(tokens[i].token, strlen(tokens[i].token), h);
        fprintf(f, "%s %s\n", h, tokens[i].slug_scopes);
    }
    fclose(f);
}

void loom_test_db_create(char *url, size_t size)
{
    const char *admin = loom_test_pg_url();
    char name[64], sql[128];
    loom_test_unique_name("t", name, sizeof(name));
    snprintf(sql, sizeof(sql), "CREATE DATABASE %s", name);
    loom_test_sql(admin, sql);
    /* Same server, other database: replace the path of the admin URL. */
    const char *slash = strrchr(admin, '/');
    snprintf(url, size, "%.*s/%s", (int)(slash - admin), admin, name);
}

void loom_test_db_create_migrated(char *url, size_t size)
{
    loom_test_db_create(url, size);
    loom_db_pool_t *pool = loom_test_pool(url, 1);
    loom_db_t *db = NULL;
    loom_error_t err;
    cr_assert_eq(loom_db_acquire(pool, &db, &err), 0, "%s", err.message);
    cr_assert_eq(loom_migrate_up(db, &loom_app_migrations, NULL, &err), 0, "%s", err.message);
    loom_db_release(db);
    loom_db_pool_free(pool);
}

loom_db_pool_t *loom_test_pool(const char *url, int size)
{
    loom_db_pool_t *pool = NULL;
    loom_error_t err;
    loom_db_pool_opts_t opts = {.size = size};
    if (loom_db_pool_new(url, &opts, &pool, &err) != 0)
        cr_assert_fail("could not open a pool on %s: %s", url, err.message);
    return pool;
}

loom_db_pool_t *loom_test_read_pool(const char *url, int size)
{
    loom_db_pool_t *pool = NULL;
    loom_error_t err;
    loom_db_pool_opts_t opts = {.size = size, .read_only = true};
    if (loom_db_pool_new(url, &opts, &pool, &err) != 0)
        cr_assert_fail("could not open a read-only pool on %s: %s", url, err.message);
    return pool;
}

rd_kafka_t *loom_test_mock_cluster(int brokers, rd_kafka_mock_cluster_t **mc,
                                   const char **bootstraps)
{
    char errstr[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "log_level", "3", NULL, 0);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    if (!rk)
        cr_assert_fail("could not create the mock cluster's handle: %s", errstr);
    *mc = rd_kafka_mock_cluster_new(rk, brokers);
    if (!*mc)
        cr_assert_fail("could not create a librdkafka mock cluster");
    *bootstraps = rd_kafka_mock_cluster_bootstraps(*mc);
    return rk;
}

const char *loom_test_bin(void)
{
    return LOOM_TEST_BIN;
}

const char *loom_test_app_bin(void)
{
    return LOOM_TEST_APP_BIN;
}

static char **build_env(const char *const extra[])
{
    size_t n = 0, k = 0;
    while (environ[n])
        n++;
    size_t m = 0;
    while (extra && extra[m])
        m++;
    char **env = loom_xcalloc(n + m + 1, sizeof(char *));
    for (size_t i = 0; i < n; i++) {
        /* An extra entry overrides the inherited one of the same name. */
        const char *eq = strchr(environ[i], '=');
        size_t nl = eq ? (size_t)(eq - environ[i]) : strlen(environ[i]);
        bool overridden = false;
        for (size_t j = 0; j < m && !overridden; j++)
            overridden = strncmp(extra[j], environ[i], nl) == 0 && extra[j][nl] == '=';
        if (!overridden)
            env[k++] = environ[i];
    }
    for (size_t j = 0; j < m; j++)
        env[k++] = (char *)extra[j];
    env[k] = NULL;
    return env;
}

/* Starts argv with the file actions fa (consumed) and env added. */
static pid_t spawn_with(const char *const argv[], const char *const env[],
                        posix_spawn_file_actions_t *fa)
{
    posix_spawn_file_actions_addopen(fa, 0, "/dev/null", O_RDONLY, 0);
    char **envp = build_env(env);
    pid_t pid;
    int rc = posix_spawn(&pid, argv[0], fa, NULL, (char *const *)argv, envp);
    free(envp);
    posix_spawn_file_actions_destroy(fa);
    cr_assert_eq(rc, 0, "could not run %s: %s", argv[0], strerror(rc));
    return pid;
}

pid_t loom_test_spawn(const char *const argv[], const char *const env[], int *fd)
{
    int p[2];
    cr_assert_eq(pipe2(p, O_CLOEXEC), 0);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, p[1], 1);
    posix_spawn_file_actions_adddup2(&fa, p[1], 2);
    pid_t pid = spawn_with(argv, env, &fa);
    close(p[1]);
    *fd = p[0];
    return pid;
}

static void append(char **buf, size_t *len, const char *data, size_t n)
{
    *buf = loom_xrealloc(*buf, *len + n + 1);
    memcpy(*buf + *len, data, n);
    *len += n;
    (*buf)[*len] = '\0';
}

bool loom_test_read_until(int fd, const char *needle, int timeout_ms, char **buf)
{
    size_t len = *buf ? strlen(*buf) : 0;
    if (!*buf)
        append(buf, &len, "", 0);
    int64_t end = loom_mono_ms() + timeout_ms;
    while (!strstr(*buf, needle)) {
        int64_t left = end - loom_mono_ms();
        if (left <= 0)
            return false;
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        if (poll(&pfd, 1, (int)left) <= 0)
            continue;
        char chunk[4096];
        ssize_t n = read(fd, chunk, sizeof(chunk));
        if (n <= 0)
            return strstr(*buf, needle) != NULL;
        append(buf, &len, chunk, (size_t)n);
    }
    return true;
}

/* Every thread's stack of a process that does not exit, to stderr, where
 * the test's output keeps it: a hang then says where it hangs. Needs gdb
 * (scripts/setup installs it); without it, nothing. */
static void print_stacks(pid_t pid)
{
    if (system("command -v gdb >/dev/null 2>&1") != 0)
        return;
    char cmd[160];
    snprintf(cmd, sizeof(cmd),
             "gdb -q -batch -p %d -ex 'thread apply all bt 30' </dev/null 2>&1 | "
             "grep -E '^(Thread|#)' >&2",
             (int)pid);
    fprintf(stderr, "--- process %d did not exit in time; its threads:\n", (int)pid);
    if (system(cmd) != 0)
        fprintf(stderr, "--- (gdb could not read process %d)\n", (int)pid);
}

int loom_test_wait(pid_t pid, int timeout_ms)
{
    int64_t end = loom_mono_ms() + timeout_ms;
    int status = 0;
    for (;;) {
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid)
            break;
        if (loom_mono_ms() > end) {
            print_stacks(pid);
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            return -1;
        }
        loom_sleep_ms(20);
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* Reads both pipes until both close, so neither can fill up and block. */
static void drain_both(int fo, int fe, char **out, char **err)
{
    size_t lo = 0, le = 0;
    *out = NULL;
    *err = NULL;
    append(out, &lo, "", 0);
    append(err, &le, "", 0);
    struct pollfd pfd[2] = {{.fd = fo, .events = POLLIN}, {.fd = fe, .events = POLLIN}};
    int open_fds = 2;
    while (open_fds > 0) {
        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        for (int i = 0; i < 2; i++) {
            if (pfd[i].fd < 0 || !(pfd[i].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            char chunk[4096];
            ssize_t n = read(pfd[i].fd, chunk, sizeof(chunk));
            if (n > 0) {
                append(i == 0 ? out : err, i == 0 ? &lo : &le, chunk, (size_t)n);
            } else if (n == 0 || errno != EINTR) {
                pfd[i].fd = -1;
                open_fds--;
            }
        }
    }
}

int loom_test_run(const char *const argv[], const char *const env[], char **out, char **err)
{
    int po[2], pe[2];
    cr_assert_eq(pipe2(po, O_CLOEXEC), 0);
    cr_assert_eq(pipe2(pe, O_CLOEXEC), 0);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, po[1], 1);
    posix_spawn_file_actions_adddup2(&fa, pe[1], 2);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    char **envp = build_env(env);
    pid_t pid;
    int rc = posix_spawn(&pid, argv[0], &fa, NULL, (char *const *)argv, envp);
    free(envp);
    posix_spawn_file_actions_destroy(&fa);
    close(po[1]);
    close(pe[1]);
    cr_assert_eq(rc, 0, "could not run %s: %s", argv[0], strerror(rc));
    char *o, *e;
    drain_both(po[0], pe[0], &o, &e);
    close(po[0]);
    close(pe[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    if (out)
        *out = o;
    else
        free(o);
    if (err)
        *err = e;
    else
        free(e);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* ---- chaos suite helpers ---------------------------------------------------------- */

void loom_test_migrate_ledger(const char *url)
{
    loom_db_pool_t *pool = loom_test_pool(url, 1);
    loom_db_t *db = NULL;
    loom_error_t err;
    loom_migration_set_t set = loom_test_migrations();
    cr_assert_eq(loom_db_acquire(pool, &db, &err), 0, "%s", err.message);
    cr_assert_eq(loom_migrate_up(db, &set, NULL, &err), 0, "%s", err.message);
    loom_db_release(db);
    loom_db_pool_free(pool);
}

void loom_test_db_create_ledger(char *url, size_t size)
{
    loom_test_db_create(url, size);
    loom_test_migrate_ledger(url);
}

void loom_test_kafka_topic(const char *brokers, const char *topic, int partitions)
{
    int created = 0;
    loom_error_t err;
    const char *t[] = {topic};
    if (loom_kafka_create_topics(brokers, NULL, t, 1, partitions, &created, &err) != 0)
        cr_assert_fail("could not create topic %s on %s: %s", topic, brokers, err.message);
}

void loom_test_ledger_init(loom_test_ledger_t *l, const char *prefix)
{
    memset(l, 0, sizeof(*l));
    loom_test_unique_name(prefix, l->suffix, sizeof(l->suffix));
    snprintf(l->topic, sizeof(l->topic), "loom.cmd.test.credit.%s", l->suffix);
    snprintf(l->name, sizeof(l->name), "test.ledger.%s", l->suffix);
    l->topics[0] = l->topic;
    l->def = loom_test_consumers[0];
    l->def.name = l->name;
    l->def.topics = l->topics;
}

loom_producer_t *loom_test_producer(const char *brokers)
{
    loom_producer_t *p;
    loom_error_t err;
    loom_producer_opts_t o = {.brokers = brokers};
    cr_assert_eq(loom_producer_new(&o, &p, &err), 0, "%s", err.message);
    return p;
}

/* The CloudEvent of a test.credit command, in arena a. */
static void credit_event(loom_ce_t *ce, loom_arena_t *a, const char *id, const char *account,
                         long amount, const char *extra)
{
    loom_ce_init(ce, a, "test", "producer", "test.credit");
    if (id)
        ce->id = id;
    char *data = loom_arena_sprintf(a, "{\"account\":\"%s\",\"amount\":%ld%s%s}", account, amount,
                                    extra ? "," : "", extra ? extra : "");
    ce->data = data;
    ce->data_len = strlen(data);
}

void loom_test_credit(loom_producer_t *p, const char *topic, const char *id, const char *account,
                      long amount, const char *extra)
{
    loom_arena_t a;
    loom_arena_init(&a, 0);
    loom_ce_t ce;
    credit_event(&ce, &a, id, account, amount, extra);
    loom_error_t err;
    int rc;
    while ((rc = loom_producer_send(p, topic, account, strlen(account), &ce, NULL, NULL, &err)) !=
               0 &&
           strcmp(err.code, "QUEUE_FULL") == 0)
        loom_sleep_ms(5);
    cr_assert_eq(rc, 0, "%s", err.message);
    loom_arena_release(&a);
}

int32_t loom_test_credit_sync(loom_producer_t *p, const char *topic, const char *id,
                              const char *account, long amount, const char *extra)
{
    loom_arena_t a;
    loom_arena_init(&a, 0);
    loom_ce_t ce;
    credit_event(&ce, &a, id, account, amount, extra);
    loom_error_t err;
    loom_delivery_t d;
    loom_delivery_init(&d);
    cr_assert_eq(loom_producer_send(p, topic, account, strlen(account), &ce,
                                    loom_delivery_future_cb, &d, &err),
                 0, "%s", err.message);
    cr_assert_eq(loom_delivery_wait(&d, 60000, &err), 0, "%s", err.message);
    int32_t part = d.partition;
    loom_delivery_release(&d);
    loom_arena_release(&a);
    return part;
}

loom_worker_opts_t loom_test_worker_opts(const char *brokers, const loom_consumer_def_t *def)
{
    return (loom_worker_opts_t){.brokers = brokers,
                                .consumers = def,
                                .n_consumers = 1,
                                .retry_base_ms = 50,
                                .retry_max_ms = 500};
}

void loom_test_worker_start(loom_test_worker_t *tw, const char *url, int pool_size, bool relay,
                            loom_worker_opts_t o)
{
    *tw = (loom_test_worker_t){0};
    tw->pool = loom_test_pool(url, pool_size);
    if (relay) {
        tw->relay = loom_test_producer(o.brokers);
        o.producer = tw->relay;
    }
    o.pool = tw->pool;
    loom_error_t err;
    cr_assert_eq(loom_worker_start(&o, &tw->w, &err), 0, "%s", err.message);
}

void loom_test_worker_stop(loom_test_worker_t *tw)
{
    loom_worker_free(tw->w); /* stops it first */
    loom_producer_free(tw->relay);
    loom_db_pool_free(tw->pool);
    *tw = (loom_test_worker_t){0};
}

pid_t loom_test_spawn_logged(const char *const argv[], const char *const env[],
                             const char *log_path)
{
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, log_path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    return spawn_with(argv, env, &fa);
}
