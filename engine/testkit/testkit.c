/*
 * testkit.c: a private PostgreSQL and Kafka with a service's consumers
 * running in the process, for the service's own tests (loom/testkit.h).
 */
#include "loom/testkit.h"
#include "loom/app.h"
#include "loom/bus.h"
#include "loom/clock.h"
#include "loom/config.h"
#include "loom/consumer.h"
#include "loom/envelope.h"
#include "loom/log.h"
#include "loom/migrate.h"
#include "loom/op.h"
#include "loom/pglocal.h"
#include "loom/topic.h"
#include "loom/uuid.h"
#include "loom/version.h"
#include "loom/worker.h"

#include <errno.h>
#include <fcntl.h>
#include <librdkafka/rdkafka_mock.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

struct loom_testkit {
    loom_app_t app;
    loom_config_t cfg;
    bool cfg_loaded;
    char dir[256]; /* mkdtemp: pg/ lives here */
    loom_pglocal_t pg;
    pid_t watcher; /* stops the server and removes dir if we die */
    int watcher_fd;
    char brokers[512];
    rd_kafka_t *mock_owner;
    rd_kafka_mock_cluster_t *mock;
    char prefix[64]; /* topics: <prefix>.cmd.<service> */
    char group_prefix[80];
    loom_db_pool_t *pool;
    loom_producer_t *producer;
    loom_worker_t *worker;
    loom_op_table_t *ops;
    loom_op_runtime_t rt;
    int64_t timeout_ms;
};

/* A name no other kit (process, run) uses: the pid, the time and a counter. */
static void unique(char *out, size_t size, const char *prefix)
{
    static atomic_int n;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    snprintf(out, size, "%s%d-%lx-%d", prefix, (int)getpid(), (unsigned long)ts.tv_nsec,
             atomic_fetch_add(&n, 1));
}

/*
 * The watcher: a shell that waits for EOF on a pipe whose write end only this
 * process holds, then stops the server and removes the directory. EOF comes
 * when loom_testkit_stop() closes it or when the process ends in any way.
 * fork+exec only: safe in a process with threads.
 */
static int watcher_start(loom_testkit_t *kit, loom_error_t *err)
{
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0)
        return loom_error_set(err, LOOM_CODE_INTERNAL, "pipe: %s", strerror(errno));
    char pgctl[300], data[600];
    snprintf(pgctl, sizeof(pgctl), "%s/pg_ctl", kit->pg.bindir);
    snprintf(data, sizeof(data), "%s/data", kit->pg.dir);
    const char *as_postgres = geteuid() == 0 ? "runuser -u postgres --" : "";
    static const char script[] =
        "read _ignored\n"
        "if [ -f \"$3/postmaster.pid\" ]; then $1 \"$2\" -D \"$3\" -m immediate -w stop; fi\n"
        "rm -rf \"$4\"\n";
    pid_t pid = fork();
    if (pid < 0) {
        close(fds[0]);
        close(fds[1]);
        return loom_error_set(err, LOOM_CODE_INTERNAL, "fork: %s", strerror(errno));
    }
    if (pid == 0) {
        setsid(); /* a terminal's Ctrl-C reaches the test, not the watcher */
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        dup2(fds[0], 0);
        int devnull = open("/dev/null", O_WRONLY);
        if (devnull >= 0) {
            dup2(devnull, 1);
            dup2(devnull, 2);
        }
        execl("/bin/sh", "sh", "-c", script, "loom-testkit-watcher", as_postgres, pgctl, data,
              kit->dir, (char *)NULL);
        _exit(127);
    }
    close(fds[0]);
    kit->watcher = pid;
    kit->watcher_fd = fds[1];
    return 0;
}

static void watcher_finish(loom_testkit_t *kit)
{
    if (kit->watcher_fd >= 0)
        close(kit->watcher_fd);
    kit->watcher_fd = -1;
    if (kit->watcher > 0) {
        int status;
        while (waitpid(kit->watcher, &status, 0) < 0 && errno == EINTR)
            ;
    }
    kit->watcher = 0;
}

/* Every topic of the app's consumers, as Kafka names. */
static size_t app_topics(const loom_app_t *app, char (*out)[LOOM_TOPIC_MAX], size_t max)
{
    size_t n = 0;
    for (size_t i = 0; i < app->n_consumers; i++) {
        char t[64][LOOM_TOPIC_MAX];
        size_t nt = loom_consumer_topics(&app->consumers[i], t, 64);
        for (size_t k = 0; k < nt && k < 64; k++) {
            bool seen = false;
            for (size_t j = 0; j < n && !seen; j++)
                seen = strcmp(out[j], t[k]) == 0;
            if (!seen && n < max)
                snprintf(out[n++], LOOM_TOPIC_MAX, "%s", t[k]);
        }
    }
    return n;
}

static int start_kafka(loom_testkit_t *kit, const loom_testkit_opts_t *opts, loom_error_t *err)
{
    int partitions = opts && opts->partitions > 0 ? opts->partitions : 3;
    char topics[128][LOOM_TOPIC_MAX];
    size_t n = app_topics(&kit->app, topics, 128);
    const char *real =
        opts && opts->kafka_brokers ? opts->kafka_brokers : getenv("LOOM_TEST_KAFKA_BROKERS");
    if (real && *real) {
        snprintf(kit->brokers, sizeof(kit->brokers), "%s", real);
        const char *names[128];
        for (size_t i = 0; i < n; i++)
            names[i] = topics[i];
        int created = 0;
        return n == 0 ? 0
                      : loom_kafka_create_topics(kit->brokers, NULL, names, n, partitions, &created,
                                                 err);
    }
    char errstr[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "log_level", "3", NULL, 0);
    kit->mock_owner = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    if (!kit->mock_owner) {
        rd_kafka_conf_destroy(conf);
        return loom_error_set(err, LOOM_CODE_BROKER_UNAVAILABLE,
                              "could not create the mock cluster's handle: %s", errstr);
    }
    kit->mock = rd_kafka_mock_cluster_new(kit->mock_owner, 1);
    if (!kit->mock)
        return loom_error_set(err, LOOM_CODE_BROKER_UNAVAILABLE,
                              "librdkafka refused to start a mock cluster");
    snprintf(kit->brokers, sizeof(kit->brokers), "%s", rd_kafka_mock_cluster_bootstraps(kit->mock));
    /* The mock cluster has no CreateTopics: create them on it directly. */
    for (size_t i = 0; i < n; i++)
        if (rd_kafka_mock_topic_create(kit->mock, topics[i], partitions, 1) != 0)
            return loom_error_set(err, LOOM_CODE_BROKER_UNAVAILABLE,
                                  "the mock cluster refused topic %s", topics[i]);
    return 0;
}

static int migrate(loom_testkit_t *kit, loom_error_t *err)
{
    loom_db_t *db = NULL;
    int rc = loom_db_acquire(kit->pool, &db, err);
    if (rc != 0)
        return rc;
    rc = loom_migrate_up(db, &kit->app.migrations, NULL, err);
    loom_db_release(db);
    return rc;
}

static int start(loom_testkit_t *kit, const loom_testkit_opts_t *opts, loom_error_t *err)
{
    int rc = loom_app_build(&kit->app, err);
    if (rc != 0)
        return rc;
    char errbuf[512];
    if (loom_config_load(&kit->cfg, environ, kit->app.config_vars, kit->app.n_config_vars, errbuf,
                         sizeof(errbuf)) != 0)
        return loom_error_set(err, LOOM_CODE_CONFIG_INVALID, "%s", errbuf);
    kit->cfg_loaded = true;
    /* Topics and consumer groups of this kit alone, so kits can share a
     * real broker. */
    unique(kit->prefix, sizeof(kit->prefix), "loomkit");
    loom_topic_prefix_set(kit->prefix);
    snprintf(kit->group_prefix, sizeof(kit->group_prefix), "%s.", kit->prefix);

    snprintf(kit->dir, sizeof(kit->dir), "%s/loom-testkit-XXXXXX",
             getenv("TMPDIR") && *getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(kit->dir)) {
        kit->dir[0] = '\0';
        return loom_error_set(err, LOOM_CODE_INTERNAL, "mkdtemp: %s", strerror(errno));
    }
    chmod(kit->dir, 0755); /* the postgres user reaches pg/ when we are root */
    char pgdir[300];
    snprintf(pgdir, sizeof(pgdir), "%s/pg", kit->dir);
    loom_pglocal_opts_t po = {.fast = true, .dbname = "loom"};
    rc = loom_pglocal_start(&kit->pg, pgdir, &po, err);
    if (rc != 0)
        return rc;
    rc = watcher_start(kit, err);
    if (rc != 0)
        return rc;

    int consumers = (int)kit->app.n_consumers;
    loom_db_pool_opts_t dbo = {.size = consumers * 2 + 4, .application_name = "loom-testkit"};
    rc = loom_db_pool_new(kit->pg.url, &dbo, &kit->pool, err);
    if (rc == 0)
        rc = migrate(kit, err);
    if (rc == 0)
        rc = start_kafka(kit, opts, err);
    if (rc != 0)
        return rc;

    loom_producer_opts_t pro = {.brokers = kit->brokers, .cfg = &kit->cfg, .linger_ms = 1};
    rc = loom_producer_new(&pro, &kit->producer, err);
    if (rc != 0)
        return rc;
    loom_worker_opts_t wo = {.brokers = kit->brokers,
                             .cfg = &kit->cfg,
                             .pool = kit->pool,
                             .consumers = kit->app.consumers,
                             .n_consumers = kit->app.n_consumers,
                             .producer = kit->producer,
                             .retry_base_ms = 50,
                             .retry_max_ms = 1000,
                             .group_prefix = kit->group_prefix,
                             .apply_threads = 2};
    rc = loom_worker_start(&wo, &kit->worker, err);
    if (rc != 0)
        return rc;

    kit->ops = loom_op_table_new();
    rc = loom_op_table_add(kit->ops, kit->app.ops, kit->app.n_ops, err);
    if (rc != 0)
        return rc;
    loom_op_runtime_init(&kit->rt, kit->ops, kit->pool, NULL);
    return 0;
}

int loom_testkit_start(const loom_service_t *const *services, size_t n_services,
                       const loom_testkit_opts_t *opts, loom_testkit_t **out, loom_error_t *err)
{
    *out = NULL;
    loom_testkit_t *kit = calloc(1, sizeof(*kit));
    if (!kit)
        return loom_error_set(err, LOOM_CODE_INTERNAL, "out of memory");
    kit->app = (loom_app_t){.name = "loom-testkit",
                            .version = loom_version(),
                            .services = services,
                            .n_services = n_services};
    kit->pg.lock_fd = -1;
    kit->watcher_fd = -1;
    kit->timeout_ms = opts && opts->timeout_ms > 0 ? opts->timeout_ms : 60000;
    loom_error_t e;
    loom_error_clear(&e);
    int rc = start(kit, opts, &e);
    if (rc != 0) {
        loom_testkit_stop(kit);
        if (err) {
            *err = e;
            snprintf(err->message, sizeof(err->message), "loom test kit: %s", e.message);
        }
        return rc;
    }
    *out = kit;
    return 0;
}

void loom_testkit_stop(loom_testkit_t *kit)
{
    if (!kit)
        return;
    if (kit->worker) {
        loom_worker_stop(kit->worker);
        loom_worker_free(kit->worker);
    }
    loom_op_table_free(kit->ops);
    if (kit->producer)
        loom_producer_free(kit->producer);
    if (kit->pool)
        loom_db_pool_free(kit->pool);
    if (kit->mock)
        rd_kafka_mock_cluster_destroy(kit->mock);
    if (kit->mock_owner)
        rd_kafka_destroy(kit->mock_owner);
    loom_pglocal_stop(&kit->pg);
    if (kit->watcher > 0) {
        watcher_finish(kit); /* it removes the directory */
    } else if (kit->dir[0]) {
        char cmd[400];
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", kit->dir);
        if (system(cmd) != 0)
            LOOM_WARN("could not remove the test kit's directory", "dir=%s", kit->dir);
    }
    if (kit->cfg_loaded)
        loom_config_release(&kit->cfg);
    loom_app_release(&kit->app);
    free(kit);
}

const char *loom_testkit_database_url(const loom_testkit_t *kit)
{
    return kit->pg.url;
}

const char *loom_testkit_brokers(const loom_testkit_t *kit)
{
    return kit->brokers;
}

loom_db_pool_t *loom_testkit_pool(loom_testkit_t *kit)
{
    return kit->pool;
}

void loom_testkit_outcome_release(loom_testkit_outcome_t *o)
{
    if (!o)
        return;
    json_decref(o->result);
    o->result = NULL;
}

int loom_testkit_publish(loom_testkit_t *kit, const char *type, const char *key, json_t *data,
                         char *id, loom_error_t *err)
{
    if (!type || !*type) {
        json_decref(data);
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "a command needs a type");
    }
    loom_arena_t a;
    loom_arena_init(&a, 0);
    loom_ce_t ce;
    loom_ce_init(&ce, &a, kit->cfg.site_name, kit->cfg.node_id, type);
    char *text = json_dumps(data ? data : json_object(), JSON_COMPACT | JSON_ENCODE_ANY);
    json_decref(data);
    ce.data = text;
    ce.data_len = text ? strlen(text) : 0;
    char topic[LOOM_TOPIC_MAX];
    loom_topic_for_command(type, topic, sizeof(topic));
    const char *k = key ? key : ce.id;
    loom_delivery_t d;
    loom_delivery_init(&d);
    int rc = loom_producer_send(kit->producer, topic, k, strlen(k), &ce, loom_delivery_future_cb,
                                &d, err);
    if (rc == 0)
        rc = loom_delivery_wait(&d, kit->timeout_ms, err);
    loom_delivery_release(&d);
    if (rc == 0 && id)
        snprintf(id, 40, "%s", ce.id);
    free(text);
    loom_arena_release(&a);
    return rc;
}

static const loom_db_stmt_t stmt_settled = {
    "loom_testkit_settled",
    "SELECT status, result::text, coalesce(last_error, '') FROM loom_commands "
    "WHERE message_id = $1 ORDER BY (status = 'retrying'), consumer LIMIT 1",
    1};

/* One look at the command's row: 1 settled (o filled), 0 not yet. */
static int look(loom_testkit_t *kit, const char *id, loom_testkit_outcome_t *o, char *seen,
                size_t seen_size, loom_error_t *err)
{
    loom_db_t *db = NULL;
    int rc = loom_db_acquire(kit->pool, &db, err);
    if (rc != 0)
        return rc;
    const char *p[] = {id};
    PGresult *res = NULL;
    rc = loom_db_exec(db, &stmt_settled, p, &res, err);
    loom_db_release(db);
    if (rc != 0)
        return rc;
    int settled = 0;
    if (PQntuples(res) == 1) {
        const char *status = PQgetvalue(res, 0, 0);
        snprintf(seen, seen_size, "%s (%s)", status, PQgetvalue(res, 0, 2));
        if (strcmp(status, "retrying") != 0) {
            settled = 1;
            snprintf(o->status, sizeof(o->status), "%s", status);
            snprintf(o->error, sizeof(o->error), "%s", PQgetvalue(res, 0, 2));
            if (!PQgetisnull(res, 0, 1))
                o->result = json_loads(PQgetvalue(res, 0, 1), JSON_DECODE_ANY, NULL);
        }
    }
    PQclear(res);
    return settled;
}

int loom_testkit_wait(loom_testkit_t *kit, const char *id, int64_t timeout_ms,
                      loom_testkit_outcome_t *o, loom_error_t *err)
{
    memset(o, 0, sizeof(*o));
    snprintf(o->command_id, sizeof(o->command_id), "%s", id);
    int64_t until = loom_mono_ms() + (timeout_ms > 0 ? timeout_ms : kit->timeout_ms);
    char seen[LOOM_ERROR_MESSAGE_MAX] = "no row yet";
    for (;;) {
        loom_error_t e;
        int rc = look(kit, id, o, seen, sizeof(seen), &e);
        if (rc == 1)
            return 0;
        if (rc < 0 && !loom_db_error_is_transient(&e)) {
            snprintf(o->error, sizeof(o->error), "%s", e.message);
            if (err)
                *err = e;
            return rc;
        }
        if (loom_mono_ms() >= until)
            break;
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    snprintf(o->error, sizeof(o->error), "command %s not applied or rejected in time: %s", id,
             seen);
    return loom_error_set(err, LOOM_CODE_DEADLINE_EXCEEDED, "%s", o->error);
}

int loom_testkit_command(loom_testkit_t *kit, const char *type, const char *key, json_t *data,
                         loom_testkit_outcome_t *o, loom_error_t *err)
{
    memset(o, 0, sizeof(*o));
    loom_error_t e;
    char id[40];
    int rc = loom_testkit_publish(kit, type, key, data, id, &e);
    if (rc != 0) {
        snprintf(o->error, sizeof(o->error), "could not publish %s: %s", type, e.message);
        if (err)
            *err = e;
        return rc;
    }
    return loom_testkit_wait(kit, id, 0, o, err);
}

json_t *loom_testkit_op(loom_testkit_t *kit, const char *name, const json_t *req, loom_error_t *err)
{
    loom_op_ctx_t ctx = {.rt = &kit->rt, .caller = "testkit"};
    json_t *res = NULL;
    if (loom_op_call(&ctx, name, req, &res, err) != 0)
        return NULL;
    return res;
}

static const loom_db_stmt_t stmt_events = {
    "loom_testkit_events",
    "SELECT coalesce(json_agg(json_build_object('version', version, 'type', type, 'data', data, "
    "'causation_id', causation_id) ORDER BY version), '[]')::text "
    "FROM loom_events WHERE stream_id = $1",
    1};

json_t *loom_testkit_events(loom_testkit_t *kit, const char *stream_id, loom_error_t *err)
{
    loom_db_t *db = NULL;
    if (loom_db_acquire(kit->pool, &db, err) != 0)
        return NULL;
    const char *p[] = {stream_id};
    PGresult *res = NULL;
    int rc = loom_db_exec(db, &stmt_events, p, &res, err);
    loom_db_release(db);
    if (rc != 0)
        return NULL;
    json_error_t jerr;
    json_t *events = json_loads(PQgetvalue(res, 0, 0), 0, &jerr);
    PQclear(res);
    if (!events)
        loom_error_set(err, LOOM_CODE_INTERNAL, "events of %s: %s", stream_id, jerr.text);
    return events;
}

json_t *loom_testkit_wait_events(loom_testkit_t *kit, const char *stream_id, size_t n,
                                 int64_t timeout_ms, loom_error_t *err)
{
    int64_t until = loom_mono_ms() + (timeout_ms > 0 ? timeout_ms : kit->timeout_ms);
    size_t have = 0;
    for (;;) {
        json_t *events = loom_testkit_events(kit, stream_id, err);
        if (!events)
            return NULL;
        have = json_array_size(events);
        if (have >= n)
            return events;
        json_decref(events);
        if (loom_mono_ms() >= until)
            break;
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    loom_error_set(err, LOOM_CODE_DEADLINE_EXCEEDED,
                   "stream %s has %zu events, not %zu, after %lld ms", stream_id, have, n,
                   (long long)(timeout_ms > 0 ? timeout_ms : kit->timeout_ms));
    return NULL;
}
