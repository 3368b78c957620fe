/*
 * docs/writing-a-service.md, followed: the ledger of examples/ledger built
 * into its binary (loom_tutorial), run as `ledger dev`, and used over HTTP as
 * the document says; and the document shows each of its files as it is, so
 * the tutorial cannot drift from code that works. (test_install builds the
 * same files against the installed package and runs their own tests.)
 */
#include "http_client.h"
#include "loom/pglocal.h"
#include "support.h"

#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f, "cannot read %s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = malloc((size_t)n + 1);
    size_t got = fread(s, 1, (size_t)n, f);
    s[got] = '\0';
    fclose(f);
    return s;
}

Test(tutorial, the_document_shows_every_file_as_it_is)
{
    static const char *const files[] = {"migrations/1001_ledger.up.sql",
                                        "ledger.h",
                                        "commands.c",
                                        "ops.c",
                                        "routes.c",
                                        "service.c",
                                        "main.c",
                                        "CMakeLists.txt",
                                        "test_ledger.c"};
    char *doc = slurp(LOOM_TEST_TUTORIAL_DOC);
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
        char path[512];
        snprintf(path, sizeof(path), "%s/%s", LOOM_TEST_TUTORIAL_DIR, files[i]);
        char *code = slurp(path);
        cr_expect(strstr(doc, code),
                  "docs/writing-a-service.md does not show examples/ledger/%s "
                  "as it is",
                  files[i]);
        free(code);
    }
    free(doc);
}

Test(tutorial, the_op_list_comes_from_the_descriptors)
{
    const char *argv[] = {LOOM_TEST_TUTORIAL_BIN, "op", "--list", NULL};
    char *out = NULL, *err = NULL;
    cr_assert_eq(loom_test_run(argv, NULL, &out, &err), 0, "%s", err);
    /* The engine's ops come with every binary; the service adds its own. */
    cr_expect(strstr(out, "engine.commands.get"), "%s", out);
    cr_expect(strstr(out, "engine.nodes.list"), "%s", out);
    cr_expect(strstr(out, "ledger.accounts.get"), "%s", out);
    cr_expect_null(strstr(out, "messages.get"), "%s", out);
    free(out);
    free(err);
}

/* POSTs body to path with ?wait=10s and returns the response. */
static void post(int port, const char *token, const char *path, const char *body,
                 loom_test_http_res_t *r)
{
    char target[256];
    snprintf(target, sizeof(target), "%s?wait=10s", path);
    loom_test_http(port, "POST", target, token, NULL, body, r);
}

static long long balance(int port, const char *token, const char *id)
{
    char path[128];
    snprintf(path, sizeof(path), "/v1/ledger/accounts/%s", id);
    loom_test_http_res_t r;
    loom_test_http(port, "GET", path, token, NULL, NULL, &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    long long b = json_integer_value(json_object_get(r.json, "balance"));
    loom_test_http_res_free(&r);
    return b;
}

Test(tutorial, the_ledger_works_under_loom_dev, .timeout = 240)
{
    char dir[] = "/tmp/loom-tutorial-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    chmod(dir, 0755);
    int port = loom_free_port();
    char e_d[128], e_l[64];
    snprintf(e_d, sizeof(e_d), "LOOM_DEV_DIR=%s", dir);
    snprintf(e_l, sizeof(e_l), "LOOM_API_LISTEN=127.0.0.1:%d", port);
    unsetenv("LOOM_DATABASE_URL");
    unsetenv("LOOM_KAFKA_BROKERS");
    const char *env[] = {e_d, e_l, NULL};
    const char *argv[] = {LOOM_TEST_TUTORIAL_BIN, "dev", NULL};
    int fd;
    pid_t pid = loom_test_spawn(argv, env, &fd);
    char *log = NULL;
    cr_assert(loom_test_read_until(fd, "Press Ctrl-C", 120000, &log), "%s", log);
    const char *t = strstr(log, "token       ");
    cr_assert_not_null(t, "%s", log);
    char token[128];
    snprintf(token, sizeof(token), "%.*s", (int)strcspn(t + 12, " \n"), t + 12);
    /* The banner shows calls of this binary's routes, not another's. */
    cr_assert(strstr(log, "/v1/ledger/accounts/alice"), "%s", log);
    cr_assert_null(strstr(log, "/v1/messages"), "%s", log);
    /* notes.store, and the engine's own engine.commands (park, replay). */
    cr_assert(strstr(log, "worker      2 consumers,"), "%s", log);

    loom_test_http_res_t r;
    post(port, token, "/v1/ledger/accounts", "{\"id\":\"alice\"}", &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_assert_str_eq(json_string_value(json_object_get(json_object_get(r.json, "result"), "id")),
                     "alice");
    loom_test_http_res_free(&r);
    post(port, token, "/v1/ledger/accounts", "{\"id\":\"bob\"}", &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    loom_test_http_res_free(&r);
    post(port, token, "/v1/ledger/accounts/alice/deposits", "{\"amount\":100}", &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    loom_test_http_res_free(&r);
    post(port, token, "/v1/ledger/transfers",
         "{\"id\":\"t1\",\"from\":\"alice\",\"to\":\"bob\",\"amount\":30}", &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_assert_eq(json_integer_value(json_object_get(json_object_get(r.json, "result"), "balance")),
                 70);
    loom_test_http_res_free(&r);
    /* The credit is a follow-up command: it lands a moment later. */
    long long bob = 0;
    for (int i = 0; i < 600 && bob != 30; i++) {
        bob = balance(port, token, "bob");
        if (bob != 30)
            usleep(100 * 1000);
    }
    cr_assert_eq(bob, 30);
    cr_assert_eq(balance(port, token, "alice"), 70);

    /* A transfer over the balance is rejected with the consumer's reason. */
    post(port, token, "/v1/ledger/transfers",
         "{\"id\":\"t2\",\"from\":\"alice\",\"to\":\"bob\",\"amount\":1000}", &r);
    cr_assert_eq(r.status, 400, "%s", r.body);
    cr_assert(strstr(r.body, "holds 70, not 1000"), "%s", r.body);
    loom_test_http_res_free(&r);
    loom_test_http(port, "GET", "/v1/ledger/accounts/nope", token, NULL, NULL, &r);
    cr_assert_eq(r.status, 404, "%s", r.body);
    loom_test_http_res_free(&r);
    loom_test_http(port, "POST", "/v1/ledger/accounts", token, NULL, "{\"id\":1}", &r);
    cr_assert_eq(r.status, 400, "%s", r.body);
    loom_test_http_res_free(&r);

    kill(pid, SIGTERM);
    cr_assert_eq(loom_test_wait(pid, 60000), 0);
    close(fd);
    free(log);
    char cmd[200];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    cr_assert_eq(system(cmd), 0);
}
