/*
 * libloom-client (engine/client/, docs/client.md) against the real Kafka
 * broker and Postgres of the harness: the example program and the library
 * publish commands the test consumer's worker applies; a broker that cannot
 * be reached gives an error within the message timeout; ops go through an
 * in-process gateway; and `cmake --install` gives a header, a shared library
 * and a pkg-config file a program builds and runs against.
 */
#include "support.h"
#include "loom/bus.h"
#include "loom/client.h"
#include "loom/clock.h"
#include "loom/gateway.h"
#include "loom/op.h"
#include "loom/worker.h"

#include <criterion/criterion.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

typedef struct env {
    char url[512];
    char suffix[64];
    char type[160];  /* "<suffix>.credit" */
    char topic[200]; /* "loom.cmd.<suffix>" */
    char name[128];
    const char *topics[2];
    loom_consumer_def_t def;
    loom_test_worker_t worker;
} env_t;

static void env_init(env_t *e, const char *brokers)
{
    memset(e, 0, sizeof(*e));
    loom_test_db_create_ledger(e->url, sizeof(e->url));
    loom_test_unique_name("c", e->suffix, sizeof(e->suffix));
    /* A service of its own per test: the client routes "S.credit" to
     * loom.cmd.S, so tests running at once keep to their own topic. */
    snprintf(e->type, sizeof(e->type), "%s.credit", e->suffix);
    snprintf(e->topic, sizeof(e->topic), "loom.cmd.%s", e->suffix);
    snprintf(e->name, sizeof(e->name), "test.ledger.%s", e->suffix);
    e->topics[0] = e->topic;
    e->def = loom_test_consumers[0];
    e->def.name = e->name;
    e->def.topics = e->topics;
    int created = 0;
    loom_error_t err;
    const char *t[] = {e->topic};
    cr_assert_eq(loom_kafka_create_topics(brokers, NULL, t, 1, 3, &created, &err), 0, "%s",
                 err.message);
}

/* Asserts the worker applied command id (a ledger row and an 'applied' command). */
static void assert_applied(env_t *e, const char *id, const char *account, long amount)
{
    char sql[768];
    snprintf(sql, sizeof(sql),
             "SELECT count(*) FROM test_ledger WHERE message_id = '%s' AND account = '%s' AND "
             "amount = %ld",
             id, account, amount);
    cr_assert_eq(loom_test_wait_for(e->url, sql, 1, 60000), 1, "command %s was not applied", id);
    snprintf(sql, sizeof(sql),
             "SELECT count(*) FROM loom_commands WHERE consumer = '%s' AND message_id = '%s' "
             "AND status = 'applied'",
             e->name, id);
    cr_assert_eq(loom_test_wait_for(e->url, sql, 1, 30000), 1,
                 "command %s is not recorded as applied", id);
}

/* ---- the example program ----------------------------------------------------------- */

Test(client, example_program_publishes_a_command_the_worker_applies, .timeout = 240)
{
    const char *brokers = loom_test_kafka_brokers();
    env_t e;
    env_init(&e, brokers);
    loom_test_worker_start(&e.worker, e.url, 4, true, loom_test_worker_opts(brokers, &e.def));

    const char *argv[] = {LOOM_TEST_CLIENT_EXAMPLE,
                          brokers,
                          e.type,
                          "cl-ex",
                          "{\"account\":\"cl-ex\",\"amount\":17}",
                          NULL};
    char *out = NULL, *errout = NULL;
    int rc = loom_test_run(argv, NULL, &out, &errout);
    cr_assert_eq(rc, 0, "example failed (%d): %s %s", rc, out, errout);
    /* id=<uuid> topic=<topic> partition=<p> offset=<o> */
    char id[64] = "", topic[256] = "";
    int part = -1;
    long long off = -1;
    cr_assert_eq(
        sscanf(out, "id=%63s topic=%255s partition=%d offset=%lld", id, topic, &part, &off), 4,
        "unexpected output: %s", out);
    cr_assert_eq(strlen(id), LOOM_CLIENT_ID_LEN, "%s", id);
    cr_assert_str_eq(topic, e.topic);
    cr_assert(part >= 0 && part < 3, "partition %d", part);
    cr_assert_geq(off, 0);
    free(out);
    free(errout);
    assert_applied(&e, id, "cl-ex", 17);

    /* The command carries the client's CloudEvents attributes. */
    char sql[512];
    snprintf(sql, sizeof(sql),
             "SELECT count(*) FROM loom_events WHERE stream_id = 'account-cl-ex' AND "
             "causation_id = '%s'",
             id);
    cr_assert_eq(loom_test_wait_for(e.url, sql, 1, 30000), 1);

    /* Bad arguments: a usage message and a non-zero exit, and invalid JSON is refused. */
    const char *usage[] = {LOOM_TEST_CLIENT_EXAMPLE, brokers, NULL};
    cr_assert_neq(loom_test_run(usage, NULL, &out, &errout), 0);
    cr_assert(strstr(errout, "usage:"), "%s", errout);
    free(out);
    free(errout);
    const char *badjson[] = {LOOM_TEST_CLIENT_EXAMPLE, brokers, e.type, "k", "{nope", NULL};
    cr_assert_neq(loom_test_run(badjson, NULL, &out, &errout), 0);
    cr_assert(strstr(errout, "INVALID_JSON"), "%s", errout);
    free(out);
    free(errout);
    loom_test_worker_stop(&e.worker);
}

/* ---- the library ------------------------------------------------------------------- */

typedef struct seen {
    atomic_int calls;
    atomic_int ok;
    char id[LOOM_CLIENT_ID_LEN + 1];
    int32_t partition;
    int64_t offset;
} seen_t;

static void on_delivery(void *opaque, const loom_client_result_t *res)
{
    seen_t *s = opaque;
    if (res->error.rc == 0) {
        snprintf(s->id, sizeof(s->id), "%s", res->id);
        s->partition = res->partition;
        s->offset = res->offset;
        atomic_fetch_add(&s->ok, 1);
    }
    atomic_fetch_add(&s->calls, 1);
}

Test(client, publish_wait_and_publish_with_a_callback_are_applied, .timeout = 240)
{
    const char *brokers = loom_test_kafka_brokers();
    env_t e;
    env_init(&e, brokers);
    loom_test_worker_start(&e.worker, e.url, 4, true, loom_test_worker_opts(brokers, &e.def));

    loom_client_prop_t props[] = {{"client.id", "test-client"}, {"linger.ms", "1"}};
    loom_client_opts_t o = {.brokers = brokers,
                            .props = props,
                            .n_props = 2,
                            .topic_prefix = "loom",
                            .site = "test",
                            .node = "client"};
    loom_client_t *c;
    char errbuf[512];
    cr_assert_eq(loom_client_new(&o, &c, errbuf, sizeof(errbuf)), 0, "%s", errbuf);

    /* Blocking: id, topic, partition and offset. */
    loom_client_result_t r;
    int rc = loom_client_publish_wait(c, e.type, "cl-w", "{\"account\":\"cl-w\",\"amount\":3}",
                                      30000, &r);
    cr_assert_eq(rc, 0, "%s: %s", r.error.code, r.error.message);
    cr_assert_eq(r.error.rc, 0);
    cr_assert_eq(strlen(r.id), LOOM_CLIENT_ID_LEN);
    cr_assert_str_eq(r.topic, e.topic);
    cr_assert(r.partition >= 0 && r.partition < 3);
    cr_assert_geq(r.offset, 0);
    assert_applied(&e, r.id, "cl-w", 3);

    /* The same key lands on the same partition. */
    loom_client_result_t r2;
    json_t *data = json_pack("{s:s, s:i}", "account", "cl-w", "amount", 4);
    cr_assert_eq(loom_client_publish_json_wait(c, e.type, "cl-w", data, 30000, &r2), 0, "%s",
                 r2.error.message);
    json_decref(data);
    cr_assert_eq(r2.partition, r.partition);
    cr_assert_gt(r2.offset, r.offset);
    cr_assert_str_neq(r2.id, r.id);
    assert_applied(&e, r2.id, "cl-w", 4);

    /* Asynchronous: the id at once, the callback exactly once after flush. */
    seen_t s;
    memset(&s, 0, sizeof(s));
    char id[LOOM_CLIENT_ID_LEN + 1] = "";
    loom_client_error_t err;
    rc = loom_client_publish(c, e.type, "cl-a", "{\"account\":\"cl-a\",\"amount\":9}", on_delivery,
                             &s, id, &err);
    cr_assert_eq(rc, 0, "%s", err.message);
    cr_assert_eq(strlen(id), LOOM_CLIENT_ID_LEN);
    cr_assert_eq(loom_client_flush(c, 30000), 0);
    cr_assert_eq(loom_client_in_flight(c), 0);
    cr_assert_eq(atomic_load(&s.calls), 1);
    cr_assert_eq(atomic_load(&s.ok), 1);
    cr_assert_str_eq(s.id, id);
    cr_assert_geq(s.offset, 0);
    assert_applied(&e, id, "cl-a", 9);

    /* Refused locally: bad JSON, a bad type, no callback run. */
    rc = loom_client_publish(c, e.type, "k", "{\"account\":", on_delivery, &s, id, &err);
    cr_assert_eq(rc, LOOM_CLIENT_EINVAL);
    cr_assert_str_eq(err.code, "INVALID_JSON");
    rc = loom_client_publish(c, "bad type!", "k", "{}", on_delivery, &s, NULL, &err);
    cr_assert_eq(rc, LOOM_CLIENT_EINVAL);
    cr_assert_str_eq(err.code, "INVALID_ARGUMENT");
    cr_assert(strstr(err.message, "bad type!"), "%s", err.message);
    cr_assert_eq(loom_client_flush(c, 1000), 0);
    cr_assert_eq(atomic_load(&s.calls), 1);

    /* A command the consumer rejects (no amount) is still delivered, then rejected. */
    cr_assert_eq(loom_client_publish_wait(c, e.type, "cl-r", "{\"account\":\"cl-r\"}", 30000, &r),
                 0);
    char sql[512];
    snprintf(sql, sizeof(sql),
             "SELECT count(*) FROM loom_commands WHERE message_id = '%s' AND status <> 'applied'",
             r.id);
    cr_assert_eq(loom_test_wait_for(e.url, sql, 1, 60000), 1);
    loom_client_free(c);
    loom_test_worker_stop(&e.worker);
}

Test(client, options_are_checked)
{
    loom_client_t *c = (loom_client_t *)1;
    char errbuf[256];
    loom_client_opts_t none = {0};
    cr_assert_eq(loom_client_new(&none, &c, errbuf, sizeof(errbuf)), LOOM_CLIENT_EINVAL);
    cr_assert_null(c);
    cr_assert(strstr(errbuf, "brokers"), "%s", errbuf);
    loom_client_prop_t bad[] = {{"no.such.property", "1"}};
    loom_client_opts_t o = {.brokers = "127.0.0.1:1", .props = bad, .n_props = 1};
    cr_assert_eq(loom_client_new(&o, &c, errbuf, sizeof(errbuf)), LOOM_CLIENT_EINVAL);
    cr_assert(strstr(errbuf, "no.such.property"), "%s", errbuf);
    loom_client_opts_t p = {.brokers = "127.0.0.1:1", .topic_prefix = ""};
    cr_assert_eq(loom_client_new(&p, &c, errbuf, sizeof(errbuf)), LOOM_CLIENT_EINVAL);
    cr_assert_str_eq(loom_client_version(), LOOM_TEST_CLIENT_VERSION);

    /* Ops only: publishing is refused, with a reason. */
    loom_client_opts_t g = {.gateway_url = "http://127.0.0.1:1"};
    cr_assert_eq(loom_client_new(&g, &c, errbuf, sizeof(errbuf)), 0, "%s", errbuf);
    loom_client_result_t r;
    cr_assert_eq(loom_client_publish_wait(c, "a.b", NULL, "{}", 1000, &r), LOOM_CLIENT_EINVAL);
    cr_assert(strstr(r.error.message, "no brokers"), "%s", r.error.message);
    loom_client_free(c);
}

/* ---- a broker that cannot be reached ----------------------------------------------- */

Test(client, an_unreachable_broker_fails_within_the_message_timeout, .timeout = 120)
{
    /* Nothing listens on port 1. */
    loom_client_opts_t o = {.brokers = "127.0.0.1:1", .message_timeout_ms = 1500};
    loom_client_t *c;
    char errbuf[256];
    cr_assert_eq(loom_client_new(&o, &c, errbuf, sizeof(errbuf)), 0, "%s", errbuf);

    int64_t t0 = loom_mono_ms();
    loom_client_result_t r;
    int rc = loom_client_publish_wait(c, "test.credit", "k", "{\"a\":1}", 20000, &r);
    int64_t took = loom_mono_ms() - t0;
    cr_assert_eq(rc, LOOM_CLIENT_EUNAVAILABLE, "rc %d %s: %s", rc, r.error.code, r.error.message);
    cr_assert_eq(r.error.rc, rc);
    cr_assert_str_eq(r.error.code, "BROKER_UNAVAILABLE");
    cr_assert(r.error.retriable);
    cr_assert_eq(strlen(r.id), LOOM_CLIENT_ID_LEN, "the failed command still has its id");
    cr_assert_eq(r.partition, -1);
    cr_assert(took >= 1000 && took < 15000, "took %lld ms", (long long)took);

    /* The callback reports the failure once. */
    seen_t s;
    memset(&s, 0, sizeof(s));
    loom_client_error_t err;
    cr_assert_eq(loom_client_publish(c, "test.credit", "k", "{}", on_delivery, &s, NULL, &err), 0);
    cr_assert_eq(loom_client_flush(c, 20000), 0);
    cr_assert_eq(atomic_load(&s.calls), 1);
    cr_assert_eq(atomic_load(&s.ok), 0);

    /* Waiting less than the message timeout: ETIMEDOUT; the late report is harmless. */
    rc = loom_client_publish_wait(c, "test.credit", "k", "{}", 200, &r);
    cr_assert_eq(rc, LOOM_CLIENT_ETIMEDOUT, "rc %d %s", rc, r.error.message);
    cr_assert_eq(strlen(r.id), LOOM_CLIENT_ID_LEN);
    loom_client_free(c); /* flushes: the pending delivery fails and is freed */

    /* The example program exits non-zero with the error. */
    const char *argv[] = {LOOM_TEST_CLIENT_EXAMPLE, "127.0.0.1:1", "test.credit", "k", "{}", NULL};
    const char *env[] = {"LOOM_CLIENT_TIMEOUT_MS=1500", NULL};
    char *out = NULL, *errout = NULL;
    cr_assert_eq(loom_test_run(argv, env, &out, &errout), 1);
    cr_assert(strstr(errout, "BROKER_UNAVAILABLE"), "%s", errout);
    free(out);
    free(errout);
}

/* ---- ops through a gateway --------------------------------------------------------- */

static int op_echo(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                   loom_error_t *err)
{
    (void)ctx;
    (void)db;
    (void)err;
    *res = json_pack("{s:O}", "echo", (json_t *)req);
    return 0;
}

static const loom_op_t echo_op = {
    .name = "test.client.echo", .fn = op_echo, .flags = LOOM_OP_NO_DB};

/* The gateway's op route, as api/engine_routes.c has it. */
static int route_op(loom_http_req_t *req, loom_http_res_t *res)
{
    json_t *body;
    loom_error_t err;
    if (loom_gateway_body_json(req, true, &body, &err) != 0)
        return loom_gateway_fail(req, res, &err);
    return loom_gateway_op_answer(req, res, loom_gateway_param(req, "name"), json_incref(body));
}

static const loom_route_t op_routes[] = {{"POST", "/v1/ops/{name}", route_op, "ops:call"}};

Test(client, ops_go_through_the_gateway, .timeout = 120)
{
    loom_op_table_t *table = loom_op_table_new();
    loom_error_t e;
    const loom_op_t *ops[] = {&echo_op};
    cr_assert_eq(loom_op_table_add(table, ops, 1, &e), 0, "%s", e.message);
    loom_op_runtime_t rt;
    loom_op_runtime_init(&rt, table, NULL, NULL);
    loom_gateway_opts_t go = {.listen = "127.0.0.1:0",
                              .threads = 1,
                              .routes = op_routes,
                              .n_routes = 1,
                              .ops = &rt,
                              .workers = 2};
    loom_gateway_t *gw;
    cr_assert_eq(loom_gateway_start(&go, &gw, &e), 0, "%s", e.message);
    cr_assert_eq(loom_gateway_add_token(gw, "tok-client", "client", "*", &e), 0, "%s", e.message);
    char url[64];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d", loom_gateway_port(gw, 0));

    loom_client_opts_t o = {.gateway_url = url, .gateway_token = "tok-client"};
    loom_client_t *c;
    char errbuf[256];
    cr_assert_eq(loom_client_new(&o, &c, errbuf, sizeof(errbuf)), 0, "%s", errbuf);
    json_t *req = json_pack("{s:i}", "n", 7), *res = NULL;
    loom_client_error_t err;
    cr_assert_eq(loom_client_op(c, "test.client.echo", req, &res, &err), 0, "%s: %s", err.code,
                 err.message);
    cr_assert(json_equal(json_object_get(res, "echo"), req));
    json_decref(res);

    /* The gateway's error: code, message and status. */
    cr_assert_eq(loom_client_op(c, "test.client.nope", req, &res, &err), LOOM_CLIENT_EOP);
    cr_assert_null(res);
    cr_assert_str_eq(err.code, "OP_NOT_FOUND");
    cr_assert_eq(err.http_status, 404);
    cr_assert(strstr(err.message, "test.client.nope"), "%s", err.message);
    loom_client_free(c);

    loom_client_opts_t bad = {.gateway_url = url, .gateway_token = "wrong"};
    cr_assert_eq(loom_client_new(&bad, &c, errbuf, sizeof(errbuf)), 0);
    cr_assert_eq(loom_client_op(c, "test.client.echo", req, &res, &err), LOOM_CLIENT_EOP);
    cr_assert_str_eq(err.code, "UNAUTHENTICATED");
    cr_assert_eq(err.http_status, 401);
    loom_client_free(c);

    loom_gateway_free(gw);
    loom_op_table_free(table);

    /* Nobody listening any more. */
    cr_assert_eq(loom_client_new(&o, &c, errbuf, sizeof(errbuf)), 0);
    cr_assert_eq(loom_client_op(c, "test.client.echo", req, &res, &err), LOOM_CLIENT_EUNAVAILABLE,
                 "%s: %s", err.code, err.message);
    cr_assert_str_eq(err.code, "GATEWAY_UNAVAILABLE");
    cr_assert(err.retriable);
    loom_client_free(c);
    json_decref(req);
}

/* ---- installing -------------------------------------------------------------------- */

static int sh(const char *cmd)
{
    int rc = system(cmd);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128;
}

Test(client, cmake_install_gives_a_header_a_library_and_pkg_config, .timeout = 300)
{
    char dir[] = "/tmp/loom-client-install-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    char cmd[4096];
    snprintf(cmd, sizeof(cmd),
             "'%s' --install '%s' --prefix '%s/p' --component loom_client "
             "> '%s/install.log' 2>&1",
             LOOM_TEST_CMAKE, LOOM_TEST_BUILD_DIR, dir, dir);
    cr_assert_eq(sh(cmd), 0, "%s failed", cmd);
    snprintf(cmd, sizeof(cmd), "test -f '%s/p/include/loom/client.h'", dir);
    cr_assert_eq(sh(cmd), 0, "no installed header");
    /* Only the client's header: the engine's are not part of the package. */
    snprintf(cmd, sizeof(cmd), "test ! -e '%s/p/include/loom/bus.h'", dir);
    cr_assert_eq(sh(cmd), 0);

    const char *prog =
        "#include <loom/client.h>\n"
        "#include <stdio.h>\n"
        "#include <string.h>\n"
        "int main(void)\n"
        "{\n"
        "    loom_client_opts_t o = {.brokers = \"127.0.0.1:1\", .topic_prefix = \"x\"};\n"
        "    loom_client_t *c;\n"
        "    char errbuf[256];\n"
        "    if (loom_client_new(&o, &c, errbuf, sizeof(errbuf)) != 0)\n"
        "        return 2;\n"
        "    loom_client_error_t err;\n"
        "    int rc = loom_client_publish(c, \"a.b\", NULL, \"[1\", NULL, NULL, NULL, &err);\n"
        "    loom_client_free(c);\n"
        "    printf(\"version=%s rc=%d code=%s\\n\", loom_client_version(), rc, err.code);\n"
        "    return rc == LOOM_CLIENT_EINVAL && strcmp(err.code, \"INVALID_JSON\") == 0 ? 0 : 3;\n"
        "}\n";
    char src[512];
    snprintf(src, sizeof(src), "%s/prog.c", dir);
    FILE *f = fopen(src, "w");
    cr_assert_not_null(f);
    fputs(prog, f);
    fclose(f);
    /* The .pc file is under lib/pkgconfig (or lib/<multiarch>/pkgconfig). */
    snprintf(cmd, sizeof(cmd),
             "cd '%s' && pc=$(dirname \"$(find p -name loom-client.pc | head -n1)\") && "
             "test -n \"$pc\" && export PKG_CONFIG_PATH=\"$PWD/$pc\" && "
             "pkg-config --modversion loom-client > version.txt && "
             "cc -std=c11 -Wall -Werror " LOOM_TEST_CLIENT_CFLAGS
             " -o prog prog.c $(pkg-config --cflags --libs loom-client) "
             "> cc.log 2>&1 && "
             "LD_LIBRARY_PATH=\"$PWD/$pc/..\" ./prog > prog.out 2>&1",
             dir);
    int rc = sh(cmd);
    char log[4096] = "";
    snprintf(cmd, sizeof(cmd), "cat '%s/install.log' '%s/cc.log' '%s/prog.out' 2>/dev/null", dir,
             dir, dir);
    FILE *p = popen(cmd, "r");
    if (p) {
        size_t n = fread(log, 1, sizeof(log) - 1, p);
        log[n] = '\0';
        pclose(p);
    }
    cr_assert_eq(rc, 0, "build or run against the installed package failed (%d): %s", rc, log);
    cr_assert(strstr(log, "version=" LOOM_TEST_CLIENT_VERSION " rc=-1 code=INVALID_JSON"), "%s",
              log);
    snprintf(cmd, sizeof(cmd), "grep -qx '%s' '%s/version.txt'", LOOM_TEST_CLIENT_VERSION, dir);
    cr_assert_eq(sh(cmd), 0, "pkg-config --modversion");
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    sh(cmd);
}
