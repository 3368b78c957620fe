/*
 * The messages service end to end, driving the real binaries over HTTP:
 *   A. `loom api` and `loom worker` as separate processes on the real Apache
 *      Kafka broker and the harness's Postgres;
 *   B. `loom dev` alone (private Postgres, embedded Kafka);
 *   C. `loom broker` shared by separate `loom api` and `loom worker`.
 * Each puts 5,000 messages in batches, reads them back in request order with
 * missing ids left out, deletes some, checks ack counts, cleans with a 1 s
 * retention and checks the counts at each step.
 */
#include "http_client.h"
#include "support.h"
#include "loom/clock.h"
#include "loom/pglocal.h"
#include "loom/sha256.h"

#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- a small blocking HTTP/1.1 client ---------------------------------------- */

typedef struct http_res {
    int status;
    char *body;
    json_t *json;
} http_res_t;

static void http_res_free(http_res_t *r)
{
    free(r->body);
    json_decref(r->json);
    memset(r, 0, sizeof(*r));
}

static int http(int port, const char *method, const char *path, const char *token, const char *body,
                http_res_t *out)
{
    memset(out, 0, sizeof(*out));
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
        close(fd);
        return -1;
    }
    size_t blen = body ? strlen(body) : 0;
    char *req = malloc(blen + 1024);
    int n = snprintf(req, blen + 1024,
                     "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     "Content-Type: application/json\r\nContent-Length: %zu\r\n%s%s%s\r\n",
                     method, path, blen, token ? "Authorization: Bearer " : "", token ? token : "",
                     token ? "\r\n" : "");
    memcpy(req + n, body ? body : "", blen);
    size_t total = (size_t)n + blen, sent = 0;
    while (sent < total) {
        ssize_t w = write(fd, req + sent, total - sent);
        if (w <= 0)
            break;
        sent += (size_t)w;
    }
    free(req);
    size_t cap = 65536, len = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (len + 4096 > cap)
            buf = realloc(buf, cap *= 2);
        ssize_t r = read(fd, buf + len, cap - len - 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        len += (size_t)r;
    }
    close(fd);
    buf[len] = '\0';
    if (sscanf(buf, "HTTP/1.1 %d", &out->status) != 1) {
        free(buf);
        return -1;
    }
    char *b = strstr(buf, "\r\n\r\n");
    out->body = strdup(b ? b + 4 : "");
    out->json = json_loads(out->body, JSON_DECODE_ANY, NULL);
    free(buf);
    return 0;
}

/* ---- the scenario ---------------------------------------------------------------- */

static char *batch_of(int from, int n)
{
    size_t cap = (size_t)n * 200 + 32, len = 0;
    char *s = malloc(cap);
    len += (size_t)snprintf(s + len, cap - len, "{\"msgs\":[");
    for (int i = from; i < from + n; i++)
        len += (size_t)snprintf(s + len, cap - len,
                                "%s{\"id\":\"msg-%05d\",\"source\":\"urn:e2e\",\"specversion\":"
                                "\"1.0\",\"type\":\"e2e.put\",\"seq\":%d,\"data\":{\"i\":%d}}",
                                i == from ? "" : ",", i, i, i);
    snprintf(s + len, cap - len, "]}");
    return s;
}

static long long int_at(json_t *j, const char *a, const char *b)
{
    json_t *v = json_object_get(j, a);
    if (b)
        v = json_object_get(v, b);
    return json_integer_value(v);
}

static void scenario(int port, const char *token)
{
    http_res_t r;
    /* Put 5,000 messages in batches of 500, waiting for each to be applied. */
    for (int b = 0; b < 10; b++) {
        char *body = batch_of(b * 500, 500);
        cr_assert_eq(http(port, "POST", "/v1/messages:batchPut?wait=30s", token, body, &r), 0);
        free(body);
        cr_assert_eq(r.status, 200, "batch %d: %d %s", b, r.status, r.body);
        cr_assert_eq(int_at(r.json, "result", "ack_count"), 500, "%s", r.body);
        http_res_free(&r);
    }
    /* The same batch again stores nothing new and acknowledges it all. */
    char *again = batch_of(0, 500);
    cr_assert_eq(http(port, "POST", "/v1/messages:batchPut?wait=30s", token, again, &r), 0);
    free(again);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_assert_eq(int_at(r.json, "result", "ack_count"), 500);
    http_res_free(&r);

    /* Read back in request order; missing ids are left out. */
    size_t cap = 64 * 1024, len = 0;
    char *ids = malloc(cap);
    len += (size_t)snprintf(ids, cap, "{\"ids\":[");
    int want[1000], nwant = 0;
    for (int k = 0; k < 1000; k++) {
        int i = (k * 7919) % 5000; /* a shuffled walk over the ids */
        bool missing = k % 10 == 3;
        len += (size_t)snprintf(ids + len, cap - len, "%s\"%s-%05d\"", k ? "," : "",
                                missing ? "nope" : "msg", i);
        if (!missing)
            want[nwant++] = i;
    }
    snprintf(ids + len, cap - len, "]}");
    cr_assert_eq(http(port, "POST", "/v1/messages:batchGet", token, ids, &r), 0);
    free(ids);
    cr_assert_eq(r.status, 200, "%s", r.body);
    json_t *msgs = json_object_get(r.json, "msgs");
    cr_assert_eq((int)json_array_size(msgs), nwant);
    for (int k = 0; k < nwant; k++) {
        char id[32];
        snprintf(id, sizeof(id), "msg-%05d", want[k]);
        json_t *m = json_array_get(msgs, (size_t)k);
        cr_assert_str_eq(json_string_value(json_object_get(m, "id")), id);
        cr_assert_eq(json_integer_value(json_object_get(m, "seq")), want[k]);
        cr_assert_eq(int_at(m, "data", "i"), want[k]);
    }
    http_res_free(&r);

    cr_assert_eq(http(port, "GET", "/v1/messages/msg-04242", token, NULL, &r), 0);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_assert_str_eq(json_string_value(json_object_get(r.json, "type")), "e2e.put");
    http_res_free(&r);
    cr_assert_eq(http(port, "GET", "/v1/messages/no-such-id", token, NULL, &r), 0);
    cr_assert_eq(r.status, 404, "%s", r.body);
    cr_assert(strstr(r.body, "MESSAGE_NOT_FOUND"), "%s", r.body);
    http_res_free(&r);

    /* Bad input is refused before anything is published. */
    cr_assert_eq(http(port, "POST", "/v1/messages:batchPut", token,
                      "{\"msgs\":[{\"id\":\"ok\",\"source\":\"s\",\"specversion\":\"1.0\","
                      "\"type\":\"t\"},{\"id\":\"\",\"source\":\"s\",\"specversion\":\"1.0\","
                      "\"type\":\"t\"}]}",
                      &r),
                 0);
    cr_assert_eq(r.status, 400, "%s", r.body);
    cr_assert(strstr(r.body, "msgs[1].\\\"id\\\""), "%s", r.body);
    http_res_free(&r);
    char *big = batch_of(90000, 1001);
    cr_assert_eq(http(port, "POST", "/v1/messages:batchPut", token, big, &r), 0);
    free(big);
    cr_assert_eq(r.status, 413, "%s", r.body);
    http_res_free(&r);

    /* Delete 1,000 ids of which 200 do not exist: 800 acknowledged. */
    cap = 64 * 1024;
    len = 0;
    char *del = malloc(cap);
    len += (size_t)snprintf(del, cap, "{\"ids\":[");
    for (int k = 0; k < 1000; k++)
        len += (size_t)snprintf(del + len, cap - len, "%s\"%s-%05d\"", k ? "," : "",
                                k % 5 == 0 ? "gone" : "msg", k);
    snprintf(del + len, cap - len, "]}");
    cr_assert_eq(http(port, "POST", "/v1/messages:batchDelete?wait=30s", token, del, &r), 0);
    free(del);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_assert_eq(int_at(r.json, "result", "ack_count"), 800, "%s", r.body);
    http_res_free(&r);
    cr_assert_eq(http(port, "GET", "/v1/messages/msg-00001", token, NULL, &r), 0);
    cr_assert_eq(r.status, 404);
    http_res_free(&r);

    /* Clean with a 1 s retention: everything stored before is removed. */
    loom_sleep_ms(1200);
    cr_assert_eq(http(port, "POST", "/v1/messages:clean?wait=30s", token, NULL, &r), 0);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_assert_eq(int_at(r.json, "result", "deleted"), 4200, "%s", r.body);
    http_res_free(&r);
    cr_assert_eq(http(port, "POST", "/v1/messages:batchGet", token,
                      "{\"ids\":[\"msg-04242\",\"msg-00999\"]}", &r),
                 0);
    cr_assert_eq(json_array_size(json_object_get(r.json, "msgs")), 0, "%s", r.body);
    http_res_free(&r);
}

/* ---- processes --------------------------------------------------------------------- */

static char tokens_file[128];
static const char *token = "e2e-token-0123456789";

static void write_tokens(void)
{
    snprintf(tokens_file, sizeof(tokens_file), "/tmp/loom-e2e-tokens-%d", (int)getpid());
    loom_test_token_t t[] = {{token, "e2e messages:read,messages:write"}};
    loom_test_tokens_file(tokens_file, t, 1);
}

typedef struct proc {
    pid_t pid;
    int fd;
    char *log;
} proc_t;

static void start(proc_t *p, const char *cmd, const char *const *env)
{
    const char *argv[] = {loom_test_bin(), cmd, NULL};
    p->pid = loom_test_spawn(argv, env, &p->fd);
    p->log = NULL;
}

static void stop(proc_t *p, const char *what)
{
    kill(p->pid, SIGTERM);
    int st = loom_test_wait(p->pid, 60000);
    loom_test_read_until(p->fd, "\x01", 200, &p->log);
    cr_assert_eq(st, 0, "%s exited %d:\n%s", what, st,
                 p->log ? p->log + (strlen(p->log) > 3000 ? strlen(p->log) - 3000 : 0) : "");
    close(p->fd);
    free(p->log);
}

static int run_cli(const char *const *env, const char *a1, const char *a2, char **out)
{
    const char *argv[] = {loom_test_bin(), a1, a2, NULL};
    char *err = NULL;
    int rc = loom_test_run(argv, env, out, &err);
    if (rc != 0)
        cr_log_error("loom %s %s: %s", a1, a2 ? a2 : "", err);
    free(err);
    return rc;
}

static void api_and_worker(const char *brokers, const char *db_url)
{
    write_tokens();
    char prefix[64], e_db[600], e_k[256], e_p[128], e_l[64], e_t[200];
    loom_test_topic_prefix("e2e", prefix, sizeof(prefix));
    int port = loom_free_port();
    snprintf(e_db, sizeof(e_db), "LOOM_DATABASE_URL=%s", db_url);
    snprintf(e_k, sizeof(e_k), "LOOM_KAFKA_BROKERS=%s", brokers);
    snprintf(e_p, sizeof(e_p), "LOOM_TOPIC_PREFIX=%s", prefix);
    snprintf(e_l, sizeof(e_l), "LOOM_API_LISTEN=127.0.0.1:%d", port);
    snprintf(e_t, sizeof(e_t), "LOOM_API_TOKENS_FILE=%s", tokens_file);
    const char *env[] = {
        e_db, e_k, e_p, e_l, e_t, "LOOM_MESSAGES_RETENTION=1s", "LOOM_KAFKA_PARTITIONS=4", NULL};
    char *out = NULL;
    cr_assert_eq(run_cli(env, "migrate", "up", &out), 0, "%s", out);
    free(out);
    proc_t api, worker;
    start(&worker, "worker", env);
    start(&api, "api", env);
    cr_assert_eq(loom_test_http_wait_status(port, "/readyz", 200, 60000), 200,
                 "loom api did not become ready");
    scenario(port, token);
    stop(&api, "loom api");
    stop(&worker, "loom worker");
    unlink(tokens_file);
}

Test(e2e, api_and_worker_processes_on_real_kafka, .timeout = 600)
{
    char url[512];
    loom_test_db_create(url, sizeof(url));
    api_and_worker(loom_test_kafka_brokers(), url);
}

Test(e2e, loom_broker_shared_by_api_and_worker, .timeout = 600)
{
    char url[512];
    loom_test_db_create(url, sizeof(url));
    const char *env[] = {"LOOM_KAFKA_PARTITIONS=4", NULL};
    proc_t broker;
    start(&broker, "broker", env);
    cr_assert(loom_test_read_until(broker.fd, "Press Ctrl-C", 30000, &broker.log), "%s",
              broker.log);
    const char *at = strstr(broker.log, "mock cluster) at ");
    cr_assert_not_null(at, "%s", broker.log);
    char bootstrap[128];
    snprintf(bootstrap, sizeof(bootstrap), "%.*s", (int)strcspn(at + 17, " \n"), at + 17);
    free(broker.log);
    broker.log = NULL;
    api_and_worker(bootstrap, url);
    stop(&broker, "loom broker");
}

/* Runs `loom api` with extra (NULL: none), sends GET /readyz, stops it, and
 * says whether its log has the request's access line. */
static bool access_logged(const char *url, const char *extra)
{
    int port = loom_free_port();
    char e_db[600], e_k[256], e_l[64];
    snprintf(e_db, sizeof(e_db), "LOOM_DATABASE_URL=%s", url);
    snprintf(e_k, sizeof(e_k), "LOOM_KAFKA_BROKERS=%s", loom_test_kafka_brokers());
    snprintf(e_l, sizeof(e_l), "LOOM_API_LISTEN=127.0.0.1:%d", port);
    const char *env[] = {e_db, e_k, e_l, extra, NULL};
    proc_t api;
    start(&api, "api", env);
    cr_assert_eq(loom_test_http_wait_status(port, "/readyz", 200, 60000), 200,
                 "loom api did not become ready");
    kill(api.pid, SIGTERM);
    cr_assert_eq(loom_test_wait(api.pid, 60000), 0);
    loom_test_read_until(api.fd, "\x01", 200, &api.log);
    close(api.fd);
    bool logged =
        api.log && strstr(api.log, "msg=\"http request\"") && strstr(api.log, "path=/readyz");
    free(api.log);
    return logged;
}

Test(e2e, the_access_log_can_be_turned_off, .timeout = 300)
{
    char url[512];
    loom_test_db_create_migrated(url, sizeof(url));
    cr_expect(access_logged(url, NULL), "no access line by default");
    cr_expect_not(access_logged(url, "LOOM_API_ACCESS_LOG=off"),
                  "an access line with LOOM_API_ACCESS_LOG=off");
}

Test(e2e, loom_dev_alone, .timeout = 600)
{
    char dir[] = "/tmp/loom-e2e-dev-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    chmod(dir, 0755);
    int port = loom_free_port();
    char e_d[128], e_l[64];
    snprintf(e_d, sizeof(e_d), "LOOM_DEV_DIR=%s", dir);
    snprintf(e_l, sizeof(e_l), "LOOM_API_LISTEN=127.0.0.1:%d", port);
    unsetenv("LOOM_DATABASE_URL");
    unsetenv("LOOM_KAFKA_BROKERS");
    const char *env[] = {e_d, e_l, "LOOM_MESSAGES_RETENTION=1s", NULL};
    proc_t dev;
    start(&dev, "dev", env);
    cr_assert(loom_test_read_until(dev.fd, "Press Ctrl-C", 120000, &dev.log), "%s", dev.log);
    const char *t = strstr(dev.log, "token       ");
    cr_assert_not_null(t, "loom dev printed no token:\n%s", dev.log);
    char devtoken[128];
    snprintf(devtoken, sizeof(devtoken), "%.*s", (int)strcspn(t + 12, " \n"), t + 12);
    cr_assert(strstr(dev.log, "curl "), "loom dev printed no curl example:\n%s", dev.log);
    free(dev.log);
    dev.log = NULL;
    cr_assert_eq(loom_test_http_wait_status(port, "/readyz", 200, 60000), 200);
    scenario(port, devtoken);
    stop(&dev, "loom dev");
    char cmd[200];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    cr_assert_eq(system(cmd), 0);
}
