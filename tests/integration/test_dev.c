/*
 * `loom dev` and `loom worker` as processes, where deployments differ:
 *  - loom dev starts its gateway as `loom api` does: every LOOM_API_*
 *    setting applies (threads, body limit, connection limit, header and idle
 *    timeouts);
 *  - loom dev against a real broker (LOOM_KAFKA_BROKERS) creates its topics
 *    as `loom migrate up` does, so the first put and the first delete are
 *    both applied within their ?wait;
 *  - a deployment upgraded from per-type topics (<prefix>.cmd.<type>):
 *    `loom migrate up` names the old topics and a worker applies what is
 *    left on them.
 */
#include "http_client.h"
#include "support.h"
#include "loom/bus.h"
#include "loom/clock.h"
#include "loom/envelope.h"
#include "loom/pglocal.h"

#include <criterion/criterion.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct dev {
    char dir[64];
    pid_t pid;
    int fd, port;
    char *log;
    char token[128];
} devproc_t;

/* Starts `loom dev` with env (NULL-terminated, LOOM_DEV_DIR and
 * LOOM_API_LISTEN added) and waits for its banner. */
static void dev_start(devproc_t *d, const char *const *extra)
{
    memset(d, 0, sizeof(*d));
    snprintf(d->dir, sizeof(d->dir), "/tmp/loom-test-dev-XXXXXX");
    cr_assert_not_null(mkdtemp(d->dir));
    chmod(d->dir, 0755);
    d->port = loom_free_port();
    static char e_d[128], e_l[64];
    snprintf(e_d, sizeof(e_d), "LOOM_DEV_DIR=%s", d->dir);
    snprintf(e_l, sizeof(e_l), "LOOM_API_LISTEN=127.0.0.1:%d", d->port);
    const char *env[16] = {e_d, e_l};
    size_t n = 2;
    for (size_t i = 0; extra && extra[i] && n < 15; i++)
        env[n++] = extra[i];
    env[n] = NULL;
    unsetenv("LOOM_DATABASE_URL");
    unsetenv("LOOM_KAFKA_BROKERS");
    const char *argv[] = {loom_test_bin(), "dev", NULL};
    d->pid = loom_test_spawn(argv, env, &d->fd);
    cr_assert(loom_test_read_until(d->fd, "Press Ctrl-C", 180000, &d->log), "%s", d->log);
    const char *t = strstr(d->log, "token       ");
    cr_assert_not_null(t, "%s", d->log);
    snprintf(d->token, sizeof(d->token), "%.*s", (int)strcspn(t + 12, " \n"), t + 12);
}

static void dev_stop(devproc_t *d)
{
    kill(d->pid, SIGTERM);
    cr_expect_eq(loom_test_wait(d->pid, 60000), 0, "loom dev did not stop cleanly");
    close(d->fd);
    free(d->log);
    char cmd[200];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", d->dir);
    cr_expect_eq(system(cmd), 0);
}

Test(dev, every_api_setting_applies_under_loom_dev, .timeout = 300)
{
    const char *env[] = {"LOOM_API_THREADS=3",           "LOOM_API_MAX_BODY=2048",
                         "LOOM_API_MAX_CONNECTIONS=4",   "LOOM_API_HEADER_TIMEOUT=1s",
                         "LOOM_API_IDLE_TIMEOUT=1500ms", NULL};
    devproc_t d;
    dev_start(&d, env);
    /* LOOM_API_THREADS: the gateway says how many loops it runs. */
    cr_expect(strstr(d.log, "threads=3"), "%s", d.log);

    /* LOOM_API_MAX_BODY: a body over 2048 bytes gets 413. */
    char *big = malloc(3001);
    memset(big, ' ', 3000);
    big[0] = '{';
    big[2999] = '}';
    big[3000] = '\0';
    loom_test_http_res_t r;
    loom_test_http(d.port, "POST", "/v1/messages:batchGet", d.token, NULL, big, &r);
    cr_expect_eq(r.status, 413, "%s", r.body);
    loom_test_http_res_free(&r);
    free(big);
    loom_test_http(d.port, "POST", "/v1/messages:batchGet", d.token, NULL, "{\"ids\":[\"x\"]}", &r);
    cr_expect_eq(r.status, 200, "%s", r.body);
    loom_test_http_res_free(&r);

    /* LOOM_API_MAX_CONNECTIONS: a fifth connection gets 503. */
    loom_test_http_conn_t *held[4];
    for (int i = 0; i < 4; i++) {
        held[i] = loom_test_http_open(d.port);
        loom_test_http_sends(held[i], "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        cr_assert(loom_test_http_read(held[i], 5000, &r));
        cr_expect_eq(r.status, 200);
        loom_test_http_res_free(&r);
    }
    loom_test_http_conn_t *extra = loom_test_http_open(d.port);
    loom_test_http_sends(extra, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    cr_assert(loom_test_http_read(extra, 5000, &r));
    cr_expect_eq(r.status, 503, "%s", r.body);
    cr_expect_str_eq(loom_test_http_error_code(&r), "TOO_MANY_CONNECTIONS");
    loom_test_http_res_free(&r);
    loom_test_http_close(extra);

    /* LOOM_API_IDLE_TIMEOUT: the held connections, idle since, are closed
     * (the default is 60 s; the test waits at most 10). */
    for (int i = 0; i < 4; i++) {
        cr_expect(loom_test_http_closed(held[i], 10000), "an idle connection was kept");
        loom_test_http_close(held[i]);
    }

    /* LOOM_API_HEADER_TIMEOUT: headers that never end get 408 (default 10 s). */
    loom_test_http_conn_t *slow = loom_test_http_open(d.port);
    loom_test_http_sends(slow, "GET /healthz HTTP/1.1\r\nHost: x\r\n");
    cr_assert(loom_test_http_read(slow, 8000, &r), "no 408 within 8 s");
    cr_expect_eq(r.status, 408, "%s", r.body);
    loom_test_http_res_free(&r);
    loom_test_http_close(slow);
    dev_stop(&d);
}

Test(dev, on_a_real_broker_creates_its_topics_first, .timeout = 300)
{
    char prefix[64], e_b[256], e_p[96];
    loom_test_topic_prefix("dev", prefix, sizeof(prefix));
    snprintf(e_b, sizeof(e_b), "LOOM_KAFKA_BROKERS=%s", loom_test_kafka_brokers());
    snprintf(e_p, sizeof(e_p), "LOOM_TOPIC_PREFIX=%s", prefix);
    const char *env[] = {e_b, e_p, "LOOM_KAFKA_PARTITIONS=3", NULL};
    devproc_t d;
    dev_start(&d, env);
    /* One topic per service with consumers (messages, registry and the
     * engine's own), made before anything subscribes. */
    cr_expect(strstr(d.log, "topics      3 topics created"), "%s", d.log);
    loom_test_http_res_t r;
    loom_test_http(d.port, "POST", "/v1/messages:batchPut?wait=30s", d.token, NULL,
                   "{\"msgs\":[{\"id\":\"m1\",\"source\":\"urn:t\",\"specversion\":\"1.0\","
                   "\"type\":\"t\"}]}",
                   &r);
    cr_expect_eq(r.status, 200, "%s", r.body);
    loom_test_http_res_free(&r);
    /* The first delete travels on the same topic: no minutes-long wait for
     * an auto-created one. */
    loom_test_http(d.port, "POST", "/v1/messages:batchDelete?wait=30s", d.token, NULL,
                   "{\"ids\":[\"m1\"]}", &r);
    cr_expect_eq(r.status, 200, "%s", r.body);
    cr_expect_eq(
        json_integer_value(json_object_get(json_object_get(r.json, "result"), "ack_count")), 1,
        "%s", r.body);
    loom_test_http_res_free(&r);
    dev_stop(&d);
}

static atomic_int acked;

static void on_ack(void *opaque, const loom_error_t *err, int32_t partition, int64_t offset)
{
    (void)opaque;
    (void)partition;
    (void)offset;
    if (!err || !err->code)
        atomic_fetch_add(&acked, 1);
}

/* Publishes a command of type on topic (no routing: the old layout). */
static void publish_on(loom_producer_t *p, const char *topic, const char *type, const char *key,
                       const char *data)
{
    loom_arena_t a;
    loom_arena_init(&a, 0);
    loom_ce_t ce;
    loom_ce_init(&ce, &a, "test", "upgrade", type);
    ce.data = data;
    ce.data_len = strlen(data);
    loom_error_t err;
    cr_assert_eq(loom_producer_send(p, topic, key, strlen(key), &ce, on_ack, NULL, &err), 0, "%s",
                 err.message);
    loom_arena_release(&a);
}

Test(dev, a_worker_drains_the_per_type_topics_of_an_earlier_loom, .timeout = 300)
{
    const char *brokers = loom_test_kafka_brokers();
    char url[512], prefix[64];
    loom_test_db_create(url, sizeof(url));
    loom_test_topic_prefix("upg", prefix, sizeof(prefix));
    /* What an earlier Loom left: commands on its per-type topics. */
    char old_put[128], old_del[128];
    snprintf(old_put, sizeof(old_put), "%s.cmd.messages.put_batch", prefix);
    snprintf(old_del, sizeof(old_del), "%s.cmd.messages.delete_batch", prefix);
    loom_test_kafka_topic(brokers, old_put, 3);
    loom_test_kafka_topic(brokers, old_del, 3);
    loom_producer_t *p;
    loom_error_t err;
    loom_producer_opts_t po = {.brokers = brokers};
    cr_assert_eq(loom_producer_new(&po, &p, &err), 0, "%s", err.message);
    for (int i = 0; i < 20; i++) {
        char id[32], data[256];
        snprintf(id, sizeof(id), "old-%d", i);
        snprintf(data, sizeof(data),
                 "{\"msgs\":[{\"id\":\"%s\",\"source\":\"urn:old\",\"specversion\":\"1.0\","
                 "\"type\":\"t\"}]}",
                 id);
        publish_on(p, old_put, "messages.put_batch", id, data);
    }
    int64_t until = loom_mono_ms() + 30000;
    while (atomic_load(&acked) < 20 && loom_mono_ms() < until)
        loom_sleep_ms(20);
    cr_assert_eq(atomic_load(&acked), 20);

    char e_u[600], e_b[256], e_p[96];
    snprintf(e_u, sizeof(e_u), "LOOM_DATABASE_URL=%s", url);
    snprintf(e_b, sizeof(e_b), "LOOM_KAFKA_BROKERS=%s", brokers);
    snprintf(e_p, sizeof(e_p), "LOOM_TOPIC_PREFIX=%s", prefix);
    const char *env[] = {e_u, e_b, e_p, "LOOM_KAFKA_PARTITIONS=3", NULL};
    /* migrate up makes the new topics and names the old ones. */
    const char *mig[] = {loom_test_bin(), "migrate", "up", NULL};
    char *out = NULL, *errout = NULL;
    cr_assert_eq(loom_test_run(mig, env, &out, &errout), 0, "%s", errout);
    cr_expect(strstr(out, old_put) && strstr(out, "earlier Loom"), "%s", out);
    free(out);
    free(errout);

    /* A worker of this version applies what is left on them. */
    const char *wargv[] = {loom_test_bin(), "worker", NULL};
    int fd;
    pid_t pid = loom_test_spawn(wargv, env, &fd);
    cr_expect_eq(
        loom_test_wait_for(url, "SELECT count(*) FROM messages WHERE id LIKE 'old-%'", 20, 120000),
        20, "the commands left on the per-type topic were not applied");
    /* New commands travel on the service's topic. */
    char topic[LOOM_TOPIC_MAX];
    loom_topic_prefix_set(prefix);
    loom_topic_for_command("messages.put_batch", topic, sizeof(topic));
    cr_assert_str_neq(topic, old_put);
    publish_on(p, topic, "messages.put_batch", "new-1",
               "{\"msgs\":[{\"id\":\"new-1\",\"source\":\"urn:new\",\"specversion\":\"1.0\","
               "\"type\":\"t\"}]}");
    cr_expect_eq(
        loom_test_wait_for(url, "SELECT count(*) FROM messages WHERE id = 'new-1'", 1, 120000), 1);
    kill(pid, SIGTERM);
    cr_expect_eq(loom_test_wait(pid, 60000), 0);
    char *log = NULL;
    loom_test_read_until(fd, "\x01", 200, &log);
    cr_expect(log && strstr(log, "draining a per-type topic"), "%s", log ? log : "");
    free(log);
    close(fd);
    loom_producer_free(p);
}
