/*
 * test_worker_watch.c: a standalone `loom worker` process is watchable.
 *
 *   - it serves /healthz, /readyz and /metrics on LOOM_WORKER_LISTEN; the
 *     metrics parse with the strict parser (tests/support/prom.c) and with
 *     Python's prometheus_client;
 *   - a backlog held behind a retrying command shows as lag in the
 *     loom_consumer_lag gauge and in `loom consumers` (owner node, committed
 *     and end offsets, state), and goes back to 0 once it is applied;
 *   - /readyz answers 503 while its database is down and 200 once it is back;
 *   - one HTTP request's trace id (traceparent) is followed to the worker's
 *     log line and to the loom_commands row.
 *
 * Real processes on the real Kafka broker of the harness and real Postgres.
 */
#include "http_client.h"
#include "prom.h"
#include "support.h"
#include "loom/bus.h"
#include "loom/clock.h"
#include "loom/envelope.h"
#include "loom/mem.h"
#include "loom/pglocal.h"

#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char *file_text(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return loom_xstrdup("");
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = loom_xcalloc(1, (size_t)n + 1);
    size_t got = fread(buf, 1, (size_t)n, f);
    buf[got] = '\0';
    fclose(f);
    return buf;
}

/* The worker's /metrics, parsed strictly; aborts on a grammar error. */
static void metrics(int port, prom_doc_t *doc, char **text)
{
    char *body = NULL;
    cr_assert_eq(loom_test_http_get_status(port, "/metrics", 30000, &body), 200);
    char why[256];
    cr_assert_eq(prom_parse(body, doc, why, sizeof(why)), 0, "/metrics: %s\n%s", why, body);
    if (text)
        *text = body;
    else
        free(body);
}

/* Polls /metrics until the sample `key` has value want; returns the last value
 * (-1 when absent). */
static double wait_metric(int port, const char *key, double want, int timeout_ms)
{
    int64_t end = loom_mono_ms() + timeout_ms;
    double v = -1;
    for (;;) {
        prom_doc_t doc;
        metrics(port, &doc, NULL);
        bool found = false;
        v = prom_get(&doc, key, &found);
        prom_free(&doc);
        if (!found)
            v = -1;
        if (v == want || loom_mono_ms() >= end)
            return v;
        loom_sleep_ms(250);
    }
}

typedef struct env {
    char url[768], node[40], dir[128], log[256];
    loom_test_ledger_t led; /* names of the test consumer the worker runs */
    char e_db[800], e_k[300], e_s[128], e_l[64], e_n[64];
    int port;
    pid_t pid;
} env_t;

static void env_start(env_t *e, const char *url, int partitions)
{
    const char *brokers = loom_test_kafka_brokers();
    memset(e, 0, sizeof(*e));
    if (url)
        snprintf(e->url, sizeof(e->url), "%s", url);
    else
        loom_test_db_create_ledger(e->url, sizeof(e->url));
    loom_test_ledger_init(&e->led, "w");
    loom_test_kafka_topic(brokers, e->led.topic, partitions);
    snprintf(e->dir, sizeof(e->dir), "/tmp/loom-watch-XXXXXX");
    cr_assert_not_null(mkdtemp(e->dir));
    chmod(e->dir, 0755);
    snprintf(e->log, sizeof(e->log), "%s/worker.log", e->dir);
    /* A node id we know, to find it as the partitions' owner. */
    snprintf(e->node, sizeof(e->node), "0000%04x-0000-4000-8000-%012x", (unsigned)getpid() & 0xffff,
             (unsigned)rand());
    e->port = loom_free_port();
    snprintf(e->e_db, sizeof(e->e_db), "LOOM_DATABASE_URL=%s", e->url);
    snprintf(e->e_k, sizeof(e->e_k), "LOOM_KAFKA_BROKERS=%s", brokers);
    snprintf(e->e_s, sizeof(e->e_s), "LOOM_TEST_LEDGER_SUFFIX=%s", e->led.suffix);
    snprintf(e->e_l, sizeof(e->e_l), "LOOM_WORKER_LISTEN=127.0.0.1:%d", e->port);
    snprintf(e->e_n, sizeof(e->e_n), "LOOM_NODE_ID=%s", e->node);
    const char *env[] = {e->e_db, e->e_k, e->e_s, e->e_l, e->e_n, NULL};
    const char *argv[] = {loom_test_app_bin(), "worker", NULL};
    e->pid = loom_test_spawn_logged(argv, env, e->log);
    cr_assert_eq(loom_test_http_wait_status(e->port, "/healthz", 200, 60000), 200,
                 "the worker did not serve /healthz (log %s)", e->log);
}

static void env_stop(env_t *e)
{
    kill(e->pid, SIGTERM);
    int st = loom_test_wait(e->pid, 60000);
    cr_assert_eq(st, 0, "the worker exited with %d (log %s)", st, e->log);
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", e->dir);
    if (system(cmd) != 0)
        cr_log_warn("could not remove %s", e->dir);
}

/* `loom consumers` (the test app: its consumer is test.ledger.<suffix>). */
static int consumers(env_t *e, const char *args, char **out)
{
    char cmd[600];
    snprintf(cmd, sizeof(cmd), "exec %s consumers %s", loom_test_app_bin(), args);
    const char *argv[] = {"/bin/sh", "-c", cmd, NULL};
    const char *env[] = {e->e_db, e->e_k, e->e_s, NULL};
    char *err = NULL;
    int rc = loom_test_run(argv, env, out, &err);
    cr_assert_eq(rc, 0, "loom consumers %s: %s", args, err);
    free(err);
    return rc;
}

/* The JSON row of partition `part` from `loom consumers --json`; new ref. */
static json_t *consumer_row(env_t *e, int part)
{
    char *out = NULL, args[200];
    snprintf(args, sizeof(args), "--json --consumer %s", e->led.name);
    consumers(e, args, &out);
    json_error_t jerr;
    json_t *a = json_loads(out, 0, &jerr);
    cr_assert_not_null(a, "loom consumers --json printed no JSON: %s\n%s", jerr.text, out);
    free(out);
    json_t *found = NULL;
    size_t i;
    json_t *row;
    json_array_foreach(a, i, row)
    {
        if (json_integer_value(json_object_get(row, "partition")) == part &&
            strcmp(json_string_value(json_object_get(row, "topic")), e->led.topic) == 0)
            found = json_incref(row);
    }
    json_decref(a);
    cr_assert_not_null(found, "no row for partition %d", part);
    return found;
}

Test(worker_watch, probes_metrics_and_a_backlog_seen_in_the_lag_gauge_and_loom_consumers,
     .timeout = 600)
{
    env_t e;
    env_start(&e, NULL, 3);
    cr_assert_eq(loom_test_http_wait_status(e.port, "/readyz", 200, 60000), 200,
                 "never ready (log %s)", e.log);
    char *body = NULL;
    cr_assert_eq(loom_test_http_get_status(e.port, "/nope", 30000, &body), 404);
    free(body);

    /* Some commands flow; then a backlog forms behind a blocked account. */
    loom_producer_t *p = loom_test_producer(loom_test_kafka_brokers());
    for (int i = 0; i < 5; i++)
        loom_test_credit_sync(p, e.led.topic, NULL, "free", i + 1, NULL);
    cr_assert_eq(loom_test_wait_for(e.url, "SELECT count(*) FROM test_ledger", 5, 60000), 5);
    loom_test_sql(e.url, "INSERT INTO test_blocks VALUES ('held')");
    enum { BACKLOG = 40 };
    int32_t part = -1;
    for (int i = 0; i < BACKLOG; i++)
        part = loom_test_credit_sync(p, e.led.topic, NULL, "held", 1, "\"fail\":\"blocked\"");
    loom_producer_free(p);

    char key[512];
    snprintf(key, sizeof(key), "loom_consumer_lag{consumer=\"%s\",topic=\"%s\",partition=\"%d\"}",
             e.led.name, e.led.topic, (int)part);
    double lag = wait_metric(e.port, key, BACKLOG, 90000);
    cr_assert_eq(lag, BACKLOG, "%s is %g, not %d (log %s)", key, lag, BACKLOG, e.log);
    snprintf(key, sizeof(key), "loom_consumer_retrying_partitions{consumer=\"%s\"}", e.led.name);
    cr_assert_eq(wait_metric(e.port, key, 1, 60000), 1, "%s", key);

    /* The whole text, for both parsers. */
    prom_doc_t doc;
    char *text = NULL;
    metrics(e.port, &doc, &text);
    bool found = false;
    cr_assert_eq(prom_get(&doc, "loom_ready{check=\"database\"}", &found), 1);
    cr_assert(found);
    cr_assert_eq(prom_get(&doc, "loom_ready{check=\"kafka\"}", &found), 1);
    snprintf(key, sizeof(key),
             "loom_consumer_messages_total{consumer=\"%s\",topic=\"%s\",outcome=\"applied\"}",
             e.led.name, e.led.topic);
    cr_assert_eq(prom_get(&doc, key, &found), 5, "%s", text);
    prom_free(&doc);
    char py[256];
    cr_assert(prom_python_parse(text, py, sizeof(py)), "prometheus_client: %s", py);
    cr_assert(strstr(py, "families="), "%s", py);
    free(text);

    /* loom consumers: the same lag, the owner, the retrying command. */
    int64_t end = loom_mono_ms() + 60000;
    json_t *row = NULL;
    for (;;) {
        row = consumer_row(&e, part);
        const char *st = json_string_value(json_object_get(row, "state"));
        bool held = st && (strcmp(st, "retrying") == 0 || strcmp(st, "stuck") == 0);
        const char *owner = json_string_value(json_object_get(row, "owner"));
        if ((held && owner && json_integer_value(json_object_get(row, "lag")) == BACKLOG) ||
            loom_mono_ms() >= end)
            break;
        json_decref(row);
        loom_sleep_ms(500);
    }
    char *dump = json_dumps(row, JSON_COMPACT);
    cr_assert_eq(json_integer_value(json_object_get(row, "lag")), BACKLOG, "%s", dump);
    cr_assert_str_eq(json_string_value(json_object_get(row, "owner")), e.node, "%s", dump);
    cr_assert_eq(json_integer_value(json_object_get(row, "end")) -
                     json_integer_value(json_object_get(row, "committed")),
                 BACKLOG, "%s", dump);
    cr_assert_geq(json_integer_value(json_object_get(row, "attempts")), 1, "%s", dump);
    cr_assert(strstr(json_string_value(json_object_get(row, "last_error")), "blocked"), "%s", dump);
    free(dump);
    json_decref(row);
    char *out = NULL, args[200];
    snprintf(args, sizeof(args), "--consumer %s", e.led.name);
    consumers(&e, args, &out);
    cr_assert(strstr(out, "OWNER") && strstr(out, e.node) && strstr(out, "attempts"), "%s", out);
    cr_assert(strstr(out, "1 partition retrying a command"), "%s", out);
    free(out);
    cr_assert_eq(consumers(&e, "--help", &out), 0);
    cr_assert(strstr(out, "usage: loom consumers"), "%s", out);
    free(out);

    /* Unblocked: the backlog drains and both views say 0. */
    loom_test_sql(e.url, "DELETE FROM test_blocks");
    cr_assert_eq(loom_test_wait_for(e.url, "SELECT count(*) FROM test_ledger", 5 + BACKLOG, 120000),
                 5 + BACKLOG);
    snprintf(key, sizeof(key), "loom_consumer_lag{consumer=\"%s\",topic=\"%s\",partition=\"%d\"}",
             e.led.name, e.led.topic, (int)part);
    cr_assert_eq(wait_metric(e.port, key, 0, 60000), 0, "%s", key);
    end = loom_mono_ms() + 60000;
    for (;;) {
        row = consumer_row(&e, part);
        if ((json_integer_value(json_object_get(row, "lag")) == 0 &&
             strcmp(json_string_value(json_object_get(row, "state")), "ok") == 0) ||
            loom_mono_ms() >= end)
            break;
        json_decref(row);
        loom_sleep_ms(500);
    }
    dump = json_dumps(row, JSON_COMPACT);
    cr_assert_eq(json_integer_value(json_object_get(row, "lag")), 0, "%s", dump);
    cr_assert_str_eq(json_string_value(json_object_get(row, "state")), "ok", "%s", dump);
    free(dump);
    json_decref(row);
    env_stop(&e);
}

Test(worker_watch, readyz_is_503_while_the_database_is_down_and_200_when_it_is_back, .timeout = 600)
{
    char dir[128], pgdir[200];
    snprintf(dir, sizeof(dir), "/tmp/loom-watch-pg-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    chmod(dir, 0755);
    snprintf(pgdir, sizeof(pgdir), "%s/pg", dir);
    loom_pglocal_t pg;
    loom_error_t err;
    loom_pglocal_opts_t po = {.fast = true};
    cr_assert_eq(loom_pglocal_start(&pg, pgdir, &po, &err), 0, "%s", err.message);
    po.port = pg.port;
    loom_test_migrate_ledger(pg.url);
    env_t e;
    env_start(&e, pg.url, 2);
    cr_assert_eq(loom_test_http_wait_status(e.port, "/readyz", 200, 60000), 200,
                 "never ready (log %s)", e.log);

    cr_assert_eq(loom_pglocal_stop(&pg), 0);
    cr_assert_eq(loom_test_http_wait_status(e.port, "/readyz", 503, 60000), 503,
                 "still ready with the database down (log %s)", e.log);
    char *body = NULL;
    int st = loom_test_http_get_status(e.port, "/readyz", 30000, &body);
    cr_assert_eq(st, 503);
    cr_assert(strstr(body, "\"not_ready\"") && strstr(body, "database"), "%s", body);
    free(body);
    cr_assert_eq(loom_test_http_get_status(e.port, "/healthz", 30000, NULL), 200,
                 "alive all the same");
    cr_assert_eq(wait_metric(e.port, "loom_ready{check=\"database\"}", 0, 30000), 0);

    cr_assert_eq(loom_pglocal_start(&pg, pgdir, &po, &err), 0, "%s", err.message);
    cr_assert_eq(loom_test_http_wait_status(e.port, "/readyz", 200, 120000), 200,
                 "not ready again after the database came back (log %s)", e.log);
    char *log = file_text(e.log);
    cr_assert(strstr(log, "not ready") && strstr(log, "ready again"), "%s", log);
    free(log);
    env_stop(&e);
    loom_pglocal_stop(&pg);
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        cr_log_warn("could not remove %s", dir);
}

Test(worker_watch, one_requests_trace_id_is_in_the_worker_log_and_the_commands_row, .timeout = 600)
{
    const char *brokers = loom_test_kafka_brokers();
    char url[768], dir[128], tokens[300], wlog[300], alog[300];
    loom_test_db_create(url, sizeof(url));
    snprintf(dir, sizeof(dir), "/tmp/loom-watch-tr-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    chmod(dir, 0755);
    static const char *token = "watch-token-0123456789";
    snprintf(tokens, sizeof(tokens), "%s/tokens", dir);
    loom_test_token_t t[] = {{token, "watch *"}};
    loom_test_tokens_file(tokens, t, 1);

    char prefix[64], e_db[800], e_k[300], e_p[128], e_l[64], e_t[400], e_w[64];
    loom_test_topic_prefix("tr", prefix, sizeof(prefix));
    int port = loom_free_port(), wport = loom_free_port();
    snprintf(e_db, sizeof(e_db), "LOOM_DATABASE_URL=%s", url);
    snprintf(e_k, sizeof(e_k), "LOOM_KAFKA_BROKERS=%s", brokers);
    snprintf(e_p, sizeof(e_p), "LOOM_TOPIC_PREFIX=%s", prefix);
    snprintf(e_l, sizeof(e_l), "LOOM_API_LISTEN=127.0.0.1:%d", port);
    snprintf(e_t, sizeof(e_t), "LOOM_API_TOKENS_FILE=%s", tokens);
    snprintf(e_w, sizeof(e_w), "LOOM_WORKER_LISTEN=127.0.0.1:%d", wport);
    const char *env[] = {
        e_db, e_k, e_p, e_l, e_t, e_w, "LOOM_KAFKA_PARTITIONS=2", "LOOM_LOG_LEVEL=debug", NULL};
    const char *mig[] = {loom_test_bin(), "migrate", "up", NULL};
    char *out = NULL, *errs = NULL;
    cr_assert_eq(loom_test_run(mig, env, &out, &errs), 0, "loom migrate up: %s", errs);
    free(out);
    free(errs);
    snprintf(wlog, sizeof(wlog), "%s/worker.log", dir);
    snprintf(alog, sizeof(alog), "%s/api.log", dir);
    const char *wargv[] = {loom_test_bin(), "worker", NULL};
    const char *aargv[] = {loom_test_bin(), "api", NULL};
    pid_t worker = loom_test_spawn_logged(wargv, env, wlog);
    pid_t api = loom_test_spawn_logged(aargv, env, alog);
    cr_assert_eq(loom_test_http_wait_status(port, "/readyz", 200, 60000), 200,
                 "loom api not ready (%s)", alog);
    cr_assert_eq(loom_test_http_wait_status(wport, "/readyz", 200, 60000), 200,
                 "worker not ready (%s)", wlog);

    /* A trace id of our own, as a tracing client would send it. */
    char trace[33], tp[64];
    for (int i = 0; i < 32; i++)
        trace[i] = "0123456789abcdef"[(rand() + i) & 15];
    trace[0] = 'a';
    trace[32] = '\0';
    snprintf(tp, sizeof(tp), "00-%s-00f067aa0ba902b7-01", trace);
    char hdrs[200];
    snprintf(hdrs, sizeof(hdrs), "traceparent: %s\r\n", tp);
    loom_test_http_res_t res = {0};
    loom_test_http(port, "POST", "/v1/messages:batchPut?wait=20s", token, hdrs,
                   "{\"msgs\":[{\"id\":\"traced-1\",\"source\":\"urn:t\",\"specversion\":\"1.0\","
                   "\"type\":\"t.t\",\"data\":{\"x\":1}}]}",
                   &res);
    cr_assert_eq(res.status, 200, "%s (api log %s, worker log %s)", res.body, alog, wlog);
    const char *cmd_id = json_string_value(json_object_get(res.json, "command_id"));
    cr_assert_not_null(cmd_id, "%s", res.body);
    char ray[80];
    cr_assert_not_null(loom_test_http_header(&res, "X-Ray-Id", ray, sizeof(ray)));

    /* The row keeps the traceparent (and the ray id). */
    char sql[400];
    snprintf(sql, sizeof(sql),
             "SELECT traceparent || ' ' || ray_id FROM loom_commands WHERE message_id = '%s'",
             cmd_id);
    char *row = loom_test_sql_value(url, sql);
    char want[200];
    snprintf(want, sizeof(want), "%s %s", tp, ray);
    cr_assert_str_eq(row, want);
    free(row);

    /* The worker's log line about the command carries both. */
    char *log = NULL;
    char *line = NULL;
    int64_t end = loom_mono_ms() + 30000;
    do {
        free(log);
        log = file_text(wlog);
        line = strstr(log, tp);
    } while (!line && loom_mono_ms() < end && (loom_sleep_ms(200), true));
    cr_assert_not_null(line, "no line with the trace id in the worker log:\n%s", log);
    char *bol = line;
    while (bol > log && bol[-1] != '\n')
        bol--;
    char *eol = strchr(line, '\n');
    if (eol)
        *eol = '\0';
    cr_assert(strstr(bol, "command applied") && strstr(bol, ray) && strstr(bol, cmd_id), "%s", bol);
    free(log);
    loom_test_http_res_free(&res);

    kill(api, SIGTERM);
    kill(worker, SIGTERM);
    cr_assert_eq(loom_test_wait(api, 60000), 0, "api log %s", alog);
    cr_assert_eq(loom_test_wait(worker, 60000), 0, "worker log %s", wlog);
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        cr_log_warn("could not remove %s", dir);
}
