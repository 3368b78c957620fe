/*
 * docs/writing-a-service.md, followed: the notes service of docs/tutorial/
 * built into a loom binary (loom_tutorial), run as `loom dev`, and used over
 * HTTP as the document says; and the document shows each of those files as
 * it is, so the tutorial cannot drift from code that works.
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
    static const char *const files[] = {"notes_migration.sql", "notes.h",        "notes_consumer.c",
                                        "notes_op.c",          "notes_routes.c", "notes_service.c",
                                        "notes_main.c"};
    char *doc = slurp(LOOM_TEST_TUTORIAL_DOC);
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
        char path[512];
        snprintf(path, sizeof(path), "%s/%s", LOOM_TEST_TUTORIAL_DIR, files[i]);
        char *code = slurp(path);
        cr_expect(strstr(doc, code),
                  "docs/writing-a-service.md does not show docs/tutorial/%s "
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
    cr_expect(strstr(out, "notes.get"), "%s", out);
    cr_expect_null(strstr(out, "messages.get"), "%s", out);
    free(out);
    free(err);
}

Test(tutorial, the_notes_service_works_under_loom_dev, .timeout = 240)
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
    cr_assert(strstr(log, "/v1/notes/n1"), "%s", log);
    cr_assert(strstr(log, "{\"id\":\"n1\",\"text\":\"hi\"}"), "%s", log);
    cr_assert_null(strstr(log, "/v1/messages"), "%s", log);
    /* notes.store, and the engine's own engine.commands (park, replay). */
    cr_assert(strstr(log, "worker      2 consumers,"), "%s", log);

    loom_test_http_res_t r;
    loom_test_http(port, "POST", "/v1/notes?wait=10s", token, NULL,
                   "{\"id\":\"n1\",\"text\":\"remember the milk\"}", &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_assert_str_eq(json_string_value(json_object_get(json_object_get(r.json, "result"), "id")),
                     "n1");
    loom_test_http_res_free(&r);
    loom_test_http(port, "GET", "/v1/notes/n1", token, NULL, NULL, &r);
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_assert_str_eq(json_string_value(json_object_get(r.json, "text")), "remember the milk");
    loom_test_http_res_free(&r);
    loom_test_http(port, "GET", "/v1/notes/nope", token, NULL, NULL, &r);
    cr_assert_eq(r.status, 404, "%s", r.body);
    loom_test_http_res_free(&r);
    loom_test_http(port, "POST", "/v1/notes", token, NULL, "{\"id\":1}", &r);
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
