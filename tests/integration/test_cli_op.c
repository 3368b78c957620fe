/*
 * `loom op` as a user runs it: help and listings, calls against a real
 * Postgres (result on stdout, one-line JSON error on stderr, the exit status
 * of the error's class), the request from an argument or stdin, the read URL,
 * and --url against a small HTTP server in this test (what is sent, what is
 * printed, refused connections, bad answers, timeouts).
 */
#include "support.h"
#include "loom/error.h"

#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <jansson.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
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

/* Checks stderr is one JSON line {"error":{"code":code,...}}. */
static void expect_error_line(const char *err, const char *code)
{
    cr_assert_eq(count_lines(err), 1, "stderr:\n%s", err);
    json_error_t jerr;
    json_t *doc = json_loads(err, 0, &jerr);
    cr_assert_not_null(doc, "stderr is not JSON (%s): %s", jerr.text, err);
    json_t *e = json_object_get(doc, "error");
    cr_assert_str_eq(json_string_value(json_object_get(e, "code")), code, "%s", err);
    cr_assert(json_is_string(json_object_get(e, "message")), "%s", err);
    json_decref(doc);
}

Test(cli_op, help_and_the_exit_statuses_it_promises)
{
    char *out, *err;
    cr_assert_eq(run((const char *[]){"op", "--help", NULL}, NULL, &out, &err), 0);
    cr_assert(strncmp(out, "usage: loom op NAME [JSON | -]\n", 31) == 0, "%s", out);
    cr_assert(strstr(out, "--url URL"), "%s", out);
    cr_assert(strstr(out, "LOOM_API_TOKEN"), "%s", out);
    for (int c = LOOM_ERR_BAD_REQUEST; c < LOOM_ERR__CLASS_COUNT; c++) {
        char want[64];
        snprintf(want, sizeof(want), " %d %s ", loom_error_class_exit_status((loom_error_class_t)c),
                 loom_error_class_name((loom_error_class_t)c));
        char line[64];
        snprintf(line, sizeof(line), " %d %s\n",
                 loom_error_class_exit_status((loom_error_class_t)c),
                 loom_error_class_name((loom_error_class_t)c));
        cr_expect(strstr(out, want) || strstr(out, line), "help lacks \"%s\":\n%s", want, out);
    }
    free(out);
    free(err);
    cr_assert_eq(run((const char *[]){"--help", NULL}, NULL, &out, &err), 0);
    cr_assert(strstr(out, "  op "), "%s", out);
    free(out);
    free(err);
}

Test(cli_op, list_shows_the_table_without_a_database)
{
    char *out, *err;
    const char *env[] = {"LOOM_DATABASE_URL", NULL};
    env[0] = NULL;
    unsetenv("LOOM_DATABASE_URL");
    cr_assert_eq(run((const char *[]){"op", "--list", NULL}, env, &out, &err), 0, "%s", err);
    cr_assert(strncmp(out, "NAME ", 5) == 0, "%s", out);
    /* One row per op: name, timeout, description (columns as wide as needed). */
    const char *rows[][3] = {{"engine.commands.get ", " 5s ", "a command's status by message id"},
                             {"engine.nodes.list ", " 5s ", "Loom processes"},
                             {"messages.get ", " 5s ", "one stored message by id"}};
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        const char *line = strstr(out, rows[i][0]);
        cr_assert_not_null(line, "no row for %s:\n%s", rows[i][0], out);
        size_t len = strcspn(line, "\n");
        char row[512];
        snprintf(row, sizeof(row), "%.*s", (int)len, line);
        cr_assert(strstr(row, rows[i][1]) && strstr(row, rows[i][2]), "row: %s", row);
    }
    free(out);
    free(err);
}

Test(cli_op, usage_errors_exit_2)
{
    const char *cases[][4] = {
        {"op", NULL},
        {"op", "--bogus", NULL},
        {"op", "a.b", "{}", "extra"},
        {"op", "--timeout", "soon", "a.b"},
        {"op", "--list", "a.b", NULL},
        {"op", "--url", NULL},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char *out, *err;
        int rc = run(cases[i], NULL, &out, &err);
        cr_expect_eq(rc, 2, "case %zu: exit %d: %s", i, rc, err);
        cr_expect_eq(count_lines(err), 1, "%s", err);
        cr_expect_str_eq(out, "");
        free(out);
        free(err);
    }
}

Test(cli_op, unknown_op_and_bad_json_exit_with_their_class)
{
    char *out, *err;
    /* No database needed to find out the op does not exist. */
    unsetenv("LOOM_DATABASE_URL");
    cr_assert_eq(run((const char *[]){"op", "engine.nodes.lst", NULL}, NULL, &out, &err), 6);
    expect_error_line(err, "OP_NOT_FOUND");
    cr_assert(strstr(err, "unknown op \\\"engine.nodes.lst\\\""), "%s", err);
    cr_assert(strstr(err, "\"ray_id\":\""), "%s", err);
    cr_assert_str_eq(out, "");
    free(out);
    free(err);

    cr_assert_eq(
        run((const char *[]){"op", "engine.nodes.list", "{\"role\":", NULL}, NULL, &out, &err), 3);
    expect_error_line(err, "INVALID_JSON");
    free(out);
    free(err);
}

static char url[512], env_url[600];

static void db_setup(void)
{
    loom_test_db_create_migrated(url, sizeof(url));
    snprintf(env_url, sizeof(env_url), "LOOM_DATABASE_URL=%s", url);
    loom_test_sql(url, "INSERT INTO loom_nodes (id, role, site, version, started_at, "
                       "last_heartbeat) VALUES ('0191b2c4-7e1f-7a3b-9c1d-2e3f4a5b6c7d', 'worker', "
                       "'local', '0.1.0', now(), now())");
    loom_test_sql(url, "INSERT INTO loom_commands (consumer, message_id, type, topic, "
                       "kafka_partition, kafka_offset, status) VALUES ('billing', 'm-1', "
                       "'orders.place', 'loom.cmd.orders.place', 0, 7, 'applied')");
}

Test(cli_op, calls_an_op_in_process_and_prints_json, .init = db_setup, .timeout = 120)
{
    const char *env[] = {env_url, NULL};
    char *out, *err;
    cr_assert_eq(run((const char *[]){"op", "engine.nodes.list", NULL}, env, &out, &err), 0, "%s",
                 err);
    cr_assert_eq(count_lines(out), 1, "compact when stdout is not a terminal:\n%s", out);
    json_t *res = json_loads(out, 0, NULL);
    cr_assert_not_null(res, "%s", out);
    json_t *node = json_array_get(json_object_get(res, "nodes"), 0);
    cr_assert_str_eq(json_string_value(json_object_get(node, "role")), "worker");
    cr_assert(json_is_false(json_object_get(node, "stale")));
    json_decref(res);
    free(out);
    free(err);

    cr_assert_eq(
        run((const char *[]){"op", "--pretty", "engine.commands.get", "{\"id\":\"m-1\"}", NULL},
            env, &out, &err),
        0, "%s", err);
    cr_assert_gt(count_lines(out), 5, "%s", out);
    cr_assert(strstr(out, "\n  \"commands\": ["), "%s", out);
    cr_assert(strstr(out, "\"status\": \"applied\""), "%s", out);
    free(out);
    free(err);

    cr_assert_eq(run((const char *[]){"op", "engine.commands.get", "{\"id\":\"m-2\"}", NULL}, env,
                     &out, &err),
                 6);
    expect_error_line(err, "COMMAND_NOT_FOUND");
    cr_assert_str_eq(out, "");
    free(out);
    free(err);

    cr_assert_eq(run((const char *[]){"op", "engine.commands.get", "[1]", NULL}, env, &out, &err),
                 3);
    expect_error_line(err, "INVALID_JSON");
    free(out);
    free(err);

    cr_assert_eq(
        run((const char *[]){"op", "engine.commands.get", "{\"id\":1}", NULL}, env, &out, &err), 3);
    expect_error_line(err, "INVALID_ARGUMENT");
    free(out);
    free(err);
}

Test(cli_op, reads_the_request_from_stdin, .init = db_setup, .timeout = 120)
{
    char cmd[1024];
    snprintf(cmd, sizeof(cmd), "echo '{\"id\": \"m-1\", \"consumer\": \"billing\"}' | %s op %s -",
             loom_test_bin(), "engine.commands.get");
    const char *argv[] = {"/bin/sh", "-c", cmd, NULL};
    const char *env[] = {env_url, NULL};
    char *out, *err;
    cr_assert_eq(loom_test_run(argv, env, &out, &err), 0, "%s", err);
    cr_assert(strstr(out, "\"consumer\":\"billing\""), "%s", out);
    free(out);
    free(err);
}

Test(cli_op, uses_the_read_url_when_set_and_reports_database_trouble, .init = db_setup,
     .timeout = 120)
{
    char read_url[600];
    snprintf(read_url, sizeof(read_url), "LOOM_DATABASE_READ_URL=%s", url);
    /* The primary is unreachable: only the read URL can answer. */
    const char *env[] = {"LOOM_DATABASE_URL=postgresql://loom@127.0.0.1:1/none", read_url, NULL};
    char *out, *err;
    cr_assert_eq(run((const char *[]){"op", "engine.nodes.list", NULL}, env, &out, &err), 0, "%s",
                 err);
    cr_assert(strstr(out, "\"role\":\"worker\""), "%s", out);
    free(out);
    free(err);

    const char *down[] = {"LOOM_DATABASE_URL=postgresql://loom@127.0.0.1:1/none", NULL};
    unsetenv("LOOM_DATABASE_READ_URL");
    cr_assert_eq(run((const char *[]){"op", "engine.nodes.list", NULL}, down, &out, &err), 10);
    expect_error_line(err, "DB_UNAVAILABLE");
    free(out);
    free(err);

    unsetenv("LOOM_DATABASE_URL");
    cr_assert_eq(run((const char *[]){"op", "engine.nodes.list", NULL}, NULL, &out, &err), 78);
    cr_assert(strstr(err, "LOOM_DATABASE_URL is not set"), "%s", err);
    free(out);
    free(err);

    /* A deadline that passes while connecting is a timeout (exit 11). */
    const char *env2[] = {env_url, NULL};
    cr_assert_eq(run((const char *[]){"op", "--timeout", "1ms", "engine.nodes.list", NULL}, env2,
                     &out, &err),
                 11, "%s", err);
    expect_error_line(err, "DEADLINE_EXCEEDED");
    free(out);
    free(err);
}

/* ---- --url against a canned HTTP server ---------------------------------------------- */

typedef struct server {
    int fd;
    int port;
    const char *response; /* NULL: accept, read, never answer */
    char request[8192];
    pthread_t thread;
} server_t;

static void *serve_one(void *arg)
{
    server_t *s = arg;
    int c = accept(s->fd, NULL, NULL);
    if (c < 0)
        return NULL;
    size_t len = 0;
    for (;;) {
        ssize_t n = read(c, s->request + len, sizeof(s->request) - 1 - len);
        if (n <= 0)
            break;
        len += (size_t)n;
        s->request[len] = '\0';
        char *end = strstr(s->request, "\r\n\r\n");
        const char *cl = strcasestr(s->request, "Content-Length:");
        if (end && cl && len >= (size_t)(end + 4 - s->request) + (size_t)atoi(cl + 15))
            break;
    }
    if (s->response) {
        ssize_t w = write(c, s->response, strlen(s->response));
        (void)w;
    } else {
        char buf[64];
        while (read(c, buf, sizeof(buf)) > 0) /* until the client gives up */
            ;
    }
    close(c);
    return NULL;
}

static void server_start(server_t *s, const char *response)
{
    memset(s, 0, sizeof(*s));
    s->response = response;
    s->fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    cr_assert_eq(bind(s->fd, (struct sockaddr *)&a, sizeof(a)), 0);
    cr_assert_eq(listen(s->fd, 4), 0);
    socklen_t al = sizeof(a);
    getsockname(s->fd, (struct sockaddr *)&a, &al);
    s->port = ntohs(a.sin_port);
    pthread_create(&s->thread, NULL, serve_one, s);
}

static void server_stop(server_t *s)
{
    pthread_join(s->thread, NULL);
    close(s->fd);
}

static int call_url(server_t *s, const char *prefix, const char *const extra_args[], char **out,
                    char **err)
{
    char u[128];
    snprintf(u, sizeof(u), "http://127.0.0.1:%d%s", s->port, prefix);
    const char *args[12] = {"op", "--url", u};
    int n = 3;
    for (int i = 0; extra_args[i]; i++)
        args[n++] = extra_args[i];
    args[n] = NULL;
    const char *env[] = {"LOOM_API_TOKEN=tok-123", NULL};
    return run(args, env, out, err);
}

Test(cli_op, url_posts_to_the_gateway_and_prints_its_answer)
{
    server_t s;
    server_start(&s, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     "Content-Length: 27\r\n\r\n{\"nodes\":[],\"from\":\"gate\"}\n");
    char *out, *err;
    int rc =
        call_url(&s, "/base/", (const char *[]){"engine.nodes.list", "{\"role\":\"api\"}", NULL},
                 &out, &err);
    server_stop(&s);
    cr_assert_eq(rc, 0, "%s", err);
    cr_assert_str_eq(out, "{\"nodes\":[],\"from\":\"gate\"}\n");
    cr_assert(strncmp(s.request, "POST /base/v1/ops/engine.nodes.list HTTP/1.1\r\n", 46) == 0, "%s",
              s.request);
    cr_assert(strstr(s.request, "\r\nAuthorization: Bearer tok-123\r\n"), "%s", s.request);
    cr_assert(strstr(s.request, "\r\nContent-Type: application/json\r\n"), "%s", s.request);
    cr_assert(strstr(s.request, "\r\nX-Ray-Id: "), "%s", s.request);
    char host[64];
    snprintf(host, sizeof(host), "\r\nHost: 127.0.0.1:%d\r\n", s.port);
    cr_assert(strstr(s.request, host), "%s", s.request);
    cr_assert(strstr(s.request, "\r\n\r\n{\"role\":\"api\"}"), "%s", s.request);
    free(out);
    free(err);
}

Test(cli_op, url_chunked_answers_are_decoded)
{
    server_t s;
    server_start(&s, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     "5\r\n{\"a\":\r\n3;ext=1\r\n[1]\r\n1\r\n}\r\n0\r\n\r\n");
    char *out, *err;
    int rc = call_url(&s, "", (const char *[]){"engine.nodes.list", NULL}, &out, &err);
    server_stop(&s);
    cr_assert_eq(rc, 0, "%s", err);
    cr_assert_str_eq(out, "{\"a\":[1]}\n");
    cr_assert(strstr(s.request, "\r\n\r\n{}"), "an absent request is {}: %s", s.request);
    free(out);
    free(err);
}

Test(cli_op, url_errors_exit_with_the_class_of_the_http_status)
{
    server_t s;
    server_start(
        &s, "HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\n"
            "{\"error\":{\"code\":\"OP_NOT_FOUND\",\"message\":\"unknown op\",\"ray_id\":\"r\"}}");
    char *out, *err;
    int rc = call_url(&s, "", (const char *[]){"no.such", NULL}, &out, &err);
    server_stop(&s);
    cr_assert_eq(rc, 6, "%s", err);
    expect_error_line(err, "OP_NOT_FOUND");
    cr_assert_str_eq(out, "");
    free(out);
    free(err);

    server_start(&s, "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nnull");
    rc = call_url(&s, "", (const char *[]){"a.b", NULL}, &out, &err);
    server_stop(&s);
    cr_assert_eq(rc, 10, "%s", err);
    expect_error_line(err, "GATEWAY_UNAVAILABLE");
    cr_assert(strstr(err, "HTTP 503 without an error body"), "%s", err);
    free(out);
    free(err);

    server_start(&s, "HTTP/1.1 504 Gateway Timeout\r\nContent-Type: text/html\r\n"
                     "Content-Length: 13\r\n\r\n<html></html>");
    rc = call_url(&s, "", (const char *[]){"a.b", NULL}, &out, &err);
    server_stop(&s);
    cr_assert_eq(rc, 11, "%s", err);
    expect_error_line(err, "DEADLINE_EXCEEDED");
    free(out);
    free(err);

    server_start(&s, "SMTP ready\r\n\r\n");
    rc = call_url(&s, "", (const char *[]){"a.b", NULL}, &out, &err);
    server_stop(&s);
    cr_assert_eq(rc, 1, "%s", err);
    expect_error_line(err, "GATEWAY_BAD_RESPONSE");
    free(out);
    free(err);
}

Test(cli_op, url_refused_is_unavailable_and_silence_is_a_timeout)
{
    /* A port nobody listens on: bind, note it, close. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    cr_assert_eq(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    socklen_t al = sizeof(a);
    getsockname(fd, (struct sockaddr *)&a, &al);
    close(fd);
    char u[64];
    snprintf(u, sizeof(u), "http://127.0.0.1:%d", ntohs(a.sin_port));
    char *out, *err;
    cr_assert_eq(run((const char *[]){"op", "--url", u, "a.b", NULL}, NULL, &out, &err), 10);
    expect_error_line(err, "GATEWAY_UNAVAILABLE");
    cr_assert(strstr(err, "Connection refused"), "%s", err);
    free(out);
    free(err);

    server_t s;
    server_start(&s, NULL);
    int rc = call_url(&s, "", (const char *[]){"--timeout", "300ms", "a.b", NULL}, &out, &err);
    server_stop(&s);
    cr_assert_eq(rc, 11, "%s", err);
    expect_error_line(err, "DEADLINE_EXCEEDED");
    free(out);
    free(err);

    cr_assert_eq(
        run((const char *[]){"op", "--url", "https://example.com", "a.b", NULL}, NULL, &out, &err),
        3);
    expect_error_line(err, "INVALID_ARGUMENT");
    free(out);
    free(err);
}
