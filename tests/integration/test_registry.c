/*
 * The registry service below the gateway (README.md, "HTTP API"): its
 * consumer against the real Kafka broker and Postgres (definitions created,
 * replaced, deleted; instances registered, re-registered, owned by their
 * first caller unless an admin acts; statuses and heartbeats), its ops
 * (listing filters, pagination while instances are added, per-slug
 * visibility, nodes with the stale flag), the checks the gateway and the
 * consumer share, the TCP health probe against real sockets (a listener, a
 * closed port, a listener whose backlog is full, a blackholed address in a
 * network namespace of its own) and the periodic probe job end to end.
 *
 * Each test runs with a topic prefix of its own (LOOM_TOPIC_PREFIX), so the
 * app's consumer and job run unchanged on topics no other test uses.
 */
#include "support.h"
#include "services.h"
#include "loom/bus.h"
#include "loom/clock.h"
#include "loom/node.h"
#include "loom/op.h"
#include "loom/periodic.h"
#include "loom/worker.h"
#include "ops.h"
#include "registry/model.h"
#include "registry/registry.h"

#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <uv.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

typedef struct svc {
    char url[512];
    loom_test_app_sub_t sub;   /* registry.store on topics of its own */
    loom_test_worker_t worker; /* its pool serves the ops, its relay the test */
    loom_op_table_t *ops;
    loom_op_runtime_t rt;
} svc_t;

/* Compares the JSON text of v (dumped with flags) with want. */
static void expect_text(const json_t *v, size_t flags, const char *want)
{
    char *got = json_dumps(v, flags);
    cr_assert_str_eq(got, want);
    free(got);
}

/* The registry consumer on topics of this test's own prefix. */
static void svc_start(svc_t *s)
{
    memset(s, 0, sizeof(*s));
    const char *brokers = loom_test_kafka_brokers();
    loom_test_db_create_migrated(s->url, sizeof(s->url));
    loom_test_app_sub_init(&s->sub, "registry.store", "reg", brokers, 3);
    loom_error_t err;
    loom_worker_opts_t o = {.brokers = brokers,
                            .consumers = &s->sub.def,
                            .n_consumers = 1,
                            .group_prefix = s->sub.group};
    loom_test_worker_start(&s->worker, s->url, 4, true, o);
    s->ops = loom_op_table_new();
    cr_assert_eq(
        loom_op_table_add(s->ops, loom_test_full_app()->ops, loom_test_full_app()->n_ops, &err), 0,
        "%s", err.message);
    loom_op_runtime_init(&s->rt, s->ops, s->worker.pool, NULL);
}

static void svc_stop(svc_t *s)
{
    loom_test_worker_stop(&s->worker);
    loom_op_table_free(s->ops);
}

/* Publishes a command (without waiting); writes its id to id_out (37 bytes). */
static void publish(svc_t *s, const char *type, const char *key, const char *data, char *id_out)
{
    loom_arena_t a;
    loom_arena_init(&a, 0);
    loom_ce_t ce;
    loom_ce_init(&ce, &a, "test", "t", type);
    ce.data = data;
    ce.data_len = strlen(data);
    char topic[256];
    loom_topic_for_command(type, topic, sizeof(topic));
    loom_error_t err;
    loom_delivery_t d;
    loom_delivery_init(&d);
    const char *k = key ? key : ce.id;
    cr_assert_eq(loom_producer_send(s->worker.relay, topic, k, strlen(k), &ce,
                                    loom_delivery_future_cb, &d, &err),
                 0, "%s", err.message);
    cr_assert_eq(loom_delivery_wait(&d, 30000, &err), 0, "%s", err.message);
    loom_delivery_release(&d);
    snprintf(id_out, 37, "%s", ce.id);
    loom_arena_release(&a);
}

/* Waits until command id is applied or rejected: {"status", "result", "error"}. */
static json_t *outcome(svc_t *s, const char *id)
{
    char sql[400];
    snprintf(sql, sizeof(sql),
             "SELECT count(*) FROM loom_commands WHERE message_id = '%s' "
             "AND status IN ('applied', 'rejected')",
             id);
    cr_assert_eq(loom_test_wait_for(s->url, sql, 1, 60000), 1, "command %s not handled", id);
    snprintf(sql, sizeof(sql),
             "SELECT json_build_object('status', status, 'result', result, 'error', last_error)"
             "::text FROM loom_commands WHERE message_id = '%s'",
             id);
    char *r = loom_test_sql_value(s->url, sql);
    json_t *res = json_loads(r, 0, NULL);
    cr_assert_not_null(res, "%s", r);
    free(r);
    return res;
}

/* Publishes and waits: the outcome. */
static json_t *command(svc_t *s, const char *type, const char *key, const char *data)
{
    char id[37];
    publish(s, type, key, data, id);
    return outcome(s, id);
}

/* The result of an applied command (a new reference); fails when rejected. */
static json_t *applied(svc_t *s, const char *type, const char *key, const char *data)
{
    json_t *o = command(s, type, key, data);
    cr_assert_str_eq(json_string_value(json_object_get(o, "status")), "applied", "%s: %s", type,
                     json_dumps(o, 0));
    json_t *r = json_incref(json_object_get(o, "result"));
    json_decref(o);
    return r;
}

/* The reason of a rejected command (new string); fails when applied. */
static char *rejected(svc_t *s, const char *type, const char *key, const char *data)
{
    json_t *o = command(s, type, key, data);
    cr_assert_str_eq(json_string_value(json_object_get(o, "status")), "rejected", "%s: %s", type,
                     json_dumps(o, 0));
    char *why = strdup(json_string_value(json_object_get(o, "error")));
    json_decref(o);
    return why;
}

/* Calls an op as caller with scopes (NULL: an in-process caller). Errors come
 * back as {"error": CODE, "message"}. */
static json_t *op_as(svc_t *s, const char *caller, const char *const *scopes, const char *name,
                     const char *req_text)
{
    loom_op_ctx_t ctx = {.rt = &s->rt, .caller = caller, .scopes = scopes};
    json_t *req = json_loads(req_text, 0, NULL);
    cr_assert_not_null(req, "%s", req_text);
    json_t *res = NULL;
    loom_error_t err;
    int rc = loom_op_call(&ctx, name, req, &res, &err);
    json_decref(req);
    if (rc != 0)
        return json_pack("{s:s, s:s}", "error", err.code, "message", err.message);
    return res;
}

static json_t *op(svc_t *s, const char *name, const char *req_text)
{
    return op_as(s, NULL, NULL, name, req_text);
}

static void expect_error(json_t *res, const char *code, const char *needle)
{
    cr_assert_str_eq(json_string_value(json_object_get(res, "error")), code, "%s",
                     json_dumps(res, 0));
    if (needle)
        cr_assert(strstr(json_string_value(json_object_get(res, "message")), needle), "%s",
                  json_dumps(res, 0));
    json_decref(res);
}

/* ---- the shared checks (what the route and the consumer both run) ------------------- */

static char *def_error(const char *text)
{
    json_t *def = json_loads(text, 0, NULL);
    cr_assert_not_null(def, "%s", text);
    loom_error_t err;
    loom_error_clear(&err);
    int rc = registry_definition_check(def, "definition", &err);
    json_decref(def);
    return rc == 0 ? NULL : strdup(err.message);
}

Test(registry_model, definitions_are_checked_field_by_field)
{
    const char *good[] = {
        "{\"id\":\"test-a\",\"image\":{\"name\":\"hashicorp/"
        "http-echo\",\"internal_ports\":[8080]}}",
        "{\"id\":\"b\",\"repository\":{\"url\":\"https://github.com/1backend/1backend.git\","
        "\"version\":\"v1\",\"build_context\":\"server\",\"container_file\":"
        "\"server/docker/Dockerfile\",\"internal_ports\":[9998]},"
        "\"api_specs\":[{\"url\":\"http://x/openapi.json\",\"protocol_type\":\"openapi\","
        "\"version\":\"3.0\",\"metadata\":{\"k\":\"v\"}}],"
        "\"clients\":[{\"language\":\"js\",\"url\":\"https://npm/x\"}],"
        "\"envars\":[{\"key\":\"A_1\",\"value\":\"\"}],\"ports\":[{\"internal\":80,\"host\":8887}]"
        "}",
        "{\"id\":\"c\",\"image\":{\"name\":\"x\"},\"repository\":null,\"clients\":null}",
    };
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        char *e = def_error(good[i]);
        cr_expect_null(e, "%s: %s", good[i], e);
        free(e);
    }
    const char *bad[][2] = {
        {"{\"image\":{\"name\":\"x\"}}", "definition.id: is required"},
        {"{\"id\":\"Bad_Id\",\"image\":{\"name\":\"x\"}}", "definition.id: must be 1 to 64 of"},
        {"{\"id\":\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\","
         "\"image\":{\"name\":\"x\"}}",
         "definition.id: must be a string of 1 to 64 bytes"},
        {"{\"id\":\"a\"}", "definition: needs exactly one of \"image\" and \"repository\""},
        {"{\"id\":\"a\",\"image\":{\"name\":\"x\"},\"repository\":{\"url\":\"u\"}}",
         "definition: needs exactly one of"},
        {"{\"id\":\"a\",\"image\":{\"name\":\"x\",\"internal_ports\":[0]}}",
         "definition.image.internal_ports[0]: must be 1-65535"},
        {"{\"id\":\"a\",\"image\":{\"name\":\"x\",\"internal_ports\":[80,65536]}}",
         "definition.image.internal_ports[1]: must be 1-65535"},
        {"{\"id\":\"a\",\"image\":{\"internal_ports\":[80]}}",
         "definition.image.name: is required"},
        {"{\"id\":\"a\",\"image\":\"x\"}", "definition.image: must be an object"},
        {"{\"id\":\"a\",\"repository\":{\"url\":\"has space\"}}",
         "definition.repository.url: must be a string"},
        {"{\"id\":\"a\",\"image\":{\"name\":\"x\"},\"ports\":[{\"internal\":80,\"host\":\"80\"}]}",
         "definition.ports[0].host: must be 1-65535"},
        {"{\"id\":\"a\",\"image\":{\"name\":\"x\"},\"envars\":[{\"key\":\"1A\",\"value\":\"\"}]}",
         "definition.envars[0].key: must match"},
        {"{\"id\":\"a\",\"image\":{\"name\":\"x\"},\"envars\":[{\"key\":\"A\",\"value\":\"1\"},"
         "{\"key\":\"A\",\"value\":\"2\"}]}",
         "definition.envars[1].key: is set twice"},
        {"{\"id\":\"a\",\"image\":{\"name\":\"x\"},\"envars\":[{\"key\":\"A\"}]}",
         "definition.envars[0].value: is required"},
        {"{\"id\":\"a\",\"image\":{\"name\":\"x\"},\"envars\":[{\"key\":\"A\",\"value\":1}]}",
         "definition.envars[0].value: must be a string of at most 32768 bytes"},
        {"{\"id\":\"a\",\"image\":{\"name\":\"x\"},\"clients\":[null]}",
         "definition.clients[0]: must not be null"},
        {"{\"id\":\"a\",\"image\":{\"name\":\"x\"},\"clients\":[{\"language\":\"go\"}]}",
         "definition.clients[0].url: is required"},
        {"{\"id\":\"a\",\"image\":{\"name\":\"x\"},\"api_specs\":[{\"url\":\"u\",\"metadata\":"
         "{\"k\":1}}]}",
         "definition.api_specs[0].metadata.k: must be a string"},
        {"{\"id\":\"a\",\"image\":{\"name\":\"x\"},\"colour\":\"red\"}",
         "definition.colour: unknown field"},
        {"{\"id\":\"a\",\"image\":{\"name\":\"x\",\"port\":80}}",
         "definition.image.port: unknown field"},
        {"[1]", "definition: must be an object"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char *e = def_error(bad[i][0]);
        cr_expect(e && strstr(e, bad[i][1]), "%s: got \"%s\", want \"%s\"", bad[i][0],
                  e ? e : "(accepted)", bad[i][1]);
        free(e);
    }
}

/* The field tables every check above is made of: one walker, each kind. */
static int even_rule(const json_t *v, const char *path, loom_error_t *err)
{
    return json_integer_value(v) % 2 == 0
               ? 0
               : loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "%s: must be even", path);
}

Test(registry_model, field_tables_check_each_kind)
{
    static const registry_field_t port = {"p", REGISTRY_PORT, 0, 0, .check = even_rule};
    static const registry_field_t word = {"w", REGISTRY_TEXT, REGISTRY_NO_SPACE, 4};
    static const registry_field_t inner[] = {{"b", REGISTRY_BOOL, REGISTRY_REQUIRED}, {NULL}};
    static const registry_field_t fields[] = {{"name", REGISTRY_TEXT, REGISTRY_REQUIRED, 5},
                                              {"note", REGISTRY_TEXT, REGISTRY_EMPTY_OK, 5},
                                              {"blob", REGISTRY_BYTES, 0, 3},
                                              {"ports", REGISTRY_LIST, 0, 2, .items = &port},
                                              {"words", REGISTRY_MAP, 0, 1, .items = &word},
                                              {"inner", REGISTRY_OBJECT, 0, 0, inner},
                                              {NULL}};
    static const char *const extra[] = {"other", NULL};
    static const char *const cases[][2] = {
        {"{\"name\":\"a b\",\"note\":\"\",\"blob\":\"\\u0001\",\"ports\":[2,4],\"words\":{\"k\":"
         "\"w\"},\"inner\":{\"b\":true},\"other\":1}",
         NULL},
        {"{\"name\":null}", "x.name: is required"},
        {"{\"name\":\"abcdef\"}", "x.name: must be a string of 1 to 5 bytes without control "
                                  "characters"},
        {"{\"name\":\"a\",\"note\":\"\\n\"}",
         "x.note: must be a string of 0 to 5 bytes without control characters"},
        {"{\"name\":\"a\",\"blob\":\"abcd\"}", "x.blob: must be a string of at most 3 bytes"},
        {"{\"name\":\"a\",\"ports\":[2,3]}", "x.ports[1]: must be even"},
        {"{\"name\":\"a\",\"ports\":[2,4,6]}", "x.ports: at most 2 entries"},
        {"{\"name\":\"a\",\"ports\":[0]}", "x.ports[0]: must be 1-65535"},
        {"{\"name\":\"a\",\"words\":{\"k\":\"a b\"}}",
         "x.words.k: must be a string of 1 to 4 bytes "
         "without control characters or spaces"},
        {"{\"name\":\"a\",\"words\":{\"k\":\"a\",\"l\":\"b\"}}", "x.words: at most 1 entries"},
        {"{\"name\":\"a\",\"inner\":{}}", "x.inner.b: is required"},
        {"{\"name\":\"a\",\"inner\":{\"b\":1}}", "x.inner.b: must be true or false"},
        {"{\"name\":\"a\",\"inner\":{\"b\":true,\"c\":1}}", "x.inner.c: unknown field"},
        {"{\"name\":\"a\",\"nope\":1}", "x.nope: unknown field"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        json_t *v = json_loads(cases[i][0], 0, NULL);
        cr_assert_not_null(v, "%s", cases[i][0]);
        loom_error_t err;
        loom_error_clear(&err);
        int rc = registry_fields_check(v, "x", fields, extra, &err);
        json_decref(v);
        if (!cases[i][1])
            cr_expect_eq(rc, 0, "%s: %s", cases[i][0], err.message);
        else
            cr_expect(rc != 0 && strcmp(err.message, cases[i][1]) == 0, "%s: got \"%s\"",
                      cases[i][0], rc ? err.message : "(accepted)");
    }
    /* Commands carry the caller. */
    json_t *d = json_loads("{\"caller\":\"alice\",\"admin\":true}", 0, NULL);
    const char *caller;
    bool admin;
    loom_error_t err;
    cr_assert_eq(registry_caller_of(d, &caller, &admin, &err), 0, "%s", err.message);
    cr_expect_str_eq(caller, "alice");
    cr_expect(admin);
    json_decref(d);
    d = json_loads("{\"admin\":\"yes\",\"caller\":\"a\"}", 0, NULL);
    cr_expect_neq(registry_caller_of(d, &caller, &admin, &err), 0);
    cr_expect_str_eq(err.message, "command.admin: must be true or false");
    json_decref(d);
}

Test(registry_model, instance_urls_keep_host_port_and_path)
{
    struct {
        const char *url, *host;
        int port;
    } good[] = {
        {"http://Example.COM:8080/api/v1?x=1", "example.com", 8080},
        {"grpc://10.0.0.7:50051", "10.0.0.7", 50051},
        {"http://[::1]:9000/p", "::1", 9000},
        {"https://svc-a.internal_zone:1", "svc-a.internal_zone", 1},
    };
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        registry_url_t u;
        loom_error_t err;
        cr_assert_eq(registry_url_parse(good[i].url, "instance.url", &u, &err), 0, "%s: %s",
                     good[i].url, err.message);
        cr_expect_str_eq(u.host, good[i].host);
        cr_expect_eq(u.port, good[i].port);
    }
    const char *bad[][2] = {
        {"http://example.com/api", "needs a port"},
        {"example.com:80", "must be an absolute url"},
        {"http://:80/", "needs a host"},
        {"http://h:0/", "port that is not 1-65535"},
        {"http://h:65536/", "port that is not 1-65535"},
        {"http://h:8x/", "port that is not 1-65535"},
        {"http://user:pw@h:80/", "must not carry user info"},
        {"http://[::1/", "IPv6 host without"},
        {"http://[zz::1]:80/", "invalid IPv6 host"},
        {"http://h h:80/", "without spaces"},
        {"http://h!:80/", "has a host with characters"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        loom_error_t err;
        cr_expect_neq(registry_url_parse(bad[i][0], "instance.url", NULL, &err), 0, "%s",
                      bad[i][0]);
        cr_expect(strstr(err.message, bad[i][1]), "%s: %s", bad[i][0], err.message);
        cr_expect(strncmp(err.message, "instance.url: ", 14) == 0, "%s", err.message);
    }
    /* Ids: deterministic per url, distinct across urls. */
    char a[REGISTRY_INSTANCE_ID_LEN + 1], b[REGISTRY_INSTANCE_ID_LEN + 1],
        c[REGISTRY_INSTANCE_ID_LEN + 1];
    registry_instance_id("http://h:80/a", a);
    registry_instance_id("http://h:80/a", b);
    registry_instance_id("http://h:80/b", c);
    cr_assert_str_eq(a, b);
    cr_assert_str_neq(a, c);
    cr_assert(registry_instance_id_valid(a), "%s", a);
    cr_assert_eq(strlen(a), REGISTRY_INSTANCE_ID_LEN);

    json_t *body = json_loads("{\"url\":\"http://h:80/\",\"tags\":[\"ok\",\"\"]}", 0, NULL);
    registry_instance_in_t in;
    loom_error_t err;
    cr_assert_neq(registry_instance_check(body, NULL, &in, &err), 0);
    cr_assert(strstr(err.message, "instance.tags[1]: must be a string of 1 to 128 bytes"), "%s",
              err.message);
    json_decref(body);
    body = json_loads("{\"url\":\"http://h:80/\",\"slug\":\"me\"}", 0, NULL);
    cr_assert_neq(registry_instance_check(body, NULL, &in, &err), 0);
    cr_assert(strstr(err.message, "instance.slug: unknown field"), "%s", err.message);
    json_decref(body);
}

/* ---- definitions ------------------------------------------------------------------ */

Test(registry, definitions_are_created_replaced_listed_and_deleted, .timeout = 240)
{
    svc_t s;
    svc_start(&s);
    json_t *got = op(&s, "registry.definitions.list", "{}");
    expect_text(got, JSON_COMPACT, "{\"definitions\":[]}");
    json_decref(got);

    const char *a =
        "{\"definition\":{\"id\":\"test-a\",\"image\":{\"name\":\"hashicorp/http-echo\","
        "\"internal_ports\":[8080]},\"ports\":[{\"internal\":8080,\"host\":8887}],"
        "\"envars\":[{\"key\":\"MODE\",\"value\":\"echo\"}]},\"caller\":\"alice\"}";
    json_t *r = applied(&s, "registry.put_definition", "test-a", a);
    cr_assert_str_eq(json_string_value(json_object_get(r, "id")), "test-a");
    json_decref(r);
    r = applied(&s, "registry.put_definition", "test-b",
                "{\"definition\":{\"id\":\"test-b\",\"repository\":{\"url\":"
                "\"https://github.com/1backend/1backend.git\",\"container_file\":"
                "\"server/docker/Dockerfile\",\"internal_ports\":[9998]}},\"caller\":\"alice\"}");
    json_decref(r);

    got = op(&s, "registry.definitions.list", "{}");
    json_t *defs = json_object_get(got, "definitions");
    cr_assert_eq(json_array_size(defs), 2, "%s", json_dumps(got, 0));
    json_t *put_a = json_loads(a, 0, NULL);
    json_t *want_a = json_object_get(put_a, "definition");
    cr_assert(json_equal(json_array_get(defs, 0), want_a), "%s",
              json_dumps(json_array_get(defs, 0), 0));
    cr_assert_str_eq(json_string_value(json_object_get(json_array_get(defs, 1), "id")), "test-b");
    json_decref(got);

    /* A put replaces the whole definition: what it leaves out is gone. */
    json_decref(applied(&s, "registry.put_definition", "test-a",
                        "{\"definition\":{\"id\":\"test-a\",\"repository\":{\"url\":"
                        "\"https://example.com/a.git\"}},\"caller\":\"alice\"}"));
    got = op(&s, "registry.definitions.get", "{\"id\":\"test-a\"}");
    expect_text(got, JSON_COMPACT | JSON_SORT_KEYS,
                "{\"id\":\"test-a\",\"repository\":{\"url\":\"https://example.com/a.git\"}}");
    json_decref(got);
    cr_assert_eq(loom_test_sql_ll(s.url, "SELECT count(*) FROM registry_definitions"), 2);

    /* An invalid definition is rejected by the consumer too, naming the field. */
    char *why = rejected(&s, "registry.put_definition", "bad",
                         "{\"definition\":{\"id\":\"bad\",\"image\":{\"name\":\"x\","
                         "\"internal_ports\":[0]}},\"caller\":\"alice\"}");
    cr_assert_str_eq(why, "definition.image.internal_ports[0]: must be 1-65535");
    free(why);
    cr_assert_eq(
        loom_test_sql_ll(s.url, "SELECT count(*) FROM registry_definitions WHERE id = 'bad'"), 0);

    /* Delete: gone from the list; deleting what does not exist is rejected. */
    /* Only the owner (or an admin) may replace or delete a definition. */
    why = rejected(&s, "registry.put_definition", "test-b",
                   "{\"definition\":{\"id\":\"test-b\",\"image\":{\"name\":\"x\"}},"
                   "\"caller\":\"mallory\"}");
    cr_assert_str_eq(why, "definition \"test-b\" belongs to \"alice\", not to \"mallory\"");
    free(why);
    why = rejected(&s, "registry.delete_definition", "test-b",
                   "{\"id\":\"test-b\",\"caller\":\"mallory\"}");
    cr_assert_str_eq(why, "definition \"test-b\" belongs to \"alice\", not to \"mallory\"");
    free(why);
    why = rejected(&s, "registry.delete_definition", "test-b", "{\"id\":\"test-b\"}");
    cr_assert_str_eq(why, "command.caller: is required");
    free(why);
    json_decref(applied(&s, "registry.put_definition", "test-a",
                        "{\"definition\":{\"id\":\"test-a\",\"repository\":{\"url\":"
                        "\"https://example.com/a.git\"}},\"caller\":\"root\",\"admin\":true}"));
    cr_assert_eq(loom_test_sql_ll(s.url, "SELECT count(*) FROM registry_definitions WHERE id = "
                                         "'test-a' AND slug = 'alice'"),
                 1, "an admin's put keeps the owner");
    r = applied(&s, "registry.delete_definition", "test-b",
                "{\"id\":\"test-b\",\"caller\":\"alice\"}");
    cr_assert(json_is_true(json_object_get(r, "deleted")));
    json_decref(r);
    why = rejected(&s, "registry.delete_definition", "test-b",
                   "{\"id\":\"test-b\",\"caller\":\"alice\"}");
    cr_assert_str_eq(why, "no definition \"test-b\"");
    free(why);
    expect_error(op(&s, "registry.definitions.get", "{\"id\":\"test-b\"}"), "DEFINITION_NOT_FOUND",
                 "test-b");
    got = op(&s, "registry.definitions.list", "{}");
    cr_assert_eq(json_array_size(json_object_get(got, "definitions")), 1);
    json_decref(got);
    cr_assert_eq(loom_test_sql_ll(s.url, "SELECT count(*) FROM loom_events WHERE type LIKE "
                                         "'registry.definition_%'"),
                 5);
    json_decref(put_a);
    svc_stop(&s);
}

/* ---- instances -------------------------------------------------------------------- */

static char *put_instance_data(const char *url, const char *caller, bool admin, const char *extra)
{
    char *out;
    cr_assert(asprintf(&out, "{\"url\":\"%s\",\"caller\":\"%s\",\"admin\":%s%s%s}", url, caller,
                       admin ? "true" : "false", extra ? "," : "", extra ? extra : "") > 0);
    return out;
}

static json_t *register_as(svc_t *s, const char *url, const char *caller, bool admin,
                           const char *extra)
{
    char id[REGISTRY_INSTANCE_ID_LEN + 1];
    registry_instance_id(url, id);
    char *data = put_instance_data(url, caller, admin, extra);
    json_t *r = applied(s, "registry.put_instance", id, data);
    free(data);
    return r;
}

Test(registry, instances_are_owned_by_their_first_caller, .timeout = 240)
{
    svc_t s;
    svc_start(&s);
    const char *url = "http://Svc-A.example:8443/api/v2?x=1";
    char id[REGISTRY_INSTANCE_ID_LEN + 1];
    registry_instance_id(url, id);

    /* First registration: the caller's slug, status unknown, url kept whole. */
    json_t *r = register_as(&s, url, "alice", false,
                            "\"deployment_id\":\"dep-1\",\"tags\":[\"blue\",\"v2\"]");
    cr_assert_str_eq(json_string_value(json_object_get(r, "id")), id);
    cr_assert_str_eq(json_string_value(json_object_get(r, "url")), url);
    cr_assert_str_eq(json_string_value(json_object_get(r, "host")), "svc-a.example");
    cr_assert_eq(json_integer_value(json_object_get(r, "port")), 8443);
    cr_assert_str_eq(json_string_value(json_object_get(r, "slug")), "alice");
    cr_assert_str_eq(json_string_value(json_object_get(r, "status")), "unknown");
    cr_assert_str_eq(json_string_value(json_object_get(r, "deployment_id")), "dep-1");
    cr_assert_null(json_object_get(r, "last_heartbeat"));
    expect_text(json_object_get(r, "tags"), JSON_COMPACT, "[\"blue\",\"v2\"]");
    json_decref(r);

    /* Re-registration by the owner: the same instance, fields replaced. */
    r = register_as(&s, url, "alice", false, "\"tags\":[\"green\"]");
    cr_assert_str_eq(json_string_value(json_object_get(r, "id")), id);
    cr_assert_null(json_object_get(r, "deployment_id"));
    expect_text(json_object_get(r, "tags"), JSON_COMPACT, "[\"green\"]");
    json_decref(r);
    r = register_as(&s, url, "alice", false, "\"tags\":[\"green\"]");
    json_decref(r);
    cr_assert_eq(loom_test_sql_ll(s.url, "SELECT count(*) FROM registry_instances"), 1);

    /* Another caller may not take it over, nor delete it... */
    char *data = put_instance_data(url, "bob", false, "\"tags\":[\"mine\"]");
    char *why = rejected(&s, "registry.put_instance", id, data);
    free(data);
    cr_assert(strstr(why, "belongs to \"alice\", not to \"bob\""), "%s", why);
    free(why);
    char del[200];
    snprintf(del, sizeof(del), "{\"id\":\"%s\",\"caller\":\"bob\"}", id);
    why = rejected(&s, "registry.delete_instance", id, del);
    cr_assert(strstr(why, "belongs to \"alice\""), "%s", why);
    free(why);

    /* ...but an admin may; the slug stays the owner's. */
    r = register_as(&s, url, "bob", true, "\"tags\":[\"by-admin\"],\"node_url\":\"http://n1:1\"");
    cr_assert_str_eq(json_string_value(json_object_get(r, "slug")), "alice");
    cr_assert_str_eq(json_string_value(json_object_get(r, "node_url")), "http://n1:1");
    json_decref(r);

    /* The same checks as the route: a bad url, an id that is not the url's. */
    why = rejected(&s, "registry.put_instance", "x",
                   "{\"url\":\"http://nohost/\",\"caller\":\"alice\"}");
    cr_assert_str_eq(why, "instance.url: needs a port (scheme://host:port/...)");
    free(why);
    why = rejected(&s, "registry.put_instance", "x",
                   "{\"url\":\"http://h:1/\",\"caller\":\"alice\",\"id\":\"inst-0\"}");
    cr_assert(strstr(why, "command.id: the id of url"), "%s", why);
    free(why);
    why = rejected(&s, "registry.put_instance", "x", "{\"url\":\"http://h:1/\"}");
    cr_assert_str_eq(why, "command.caller: is required");
    free(why);

    /* The op the route asks first: the owner and admins see it all, others
     * only who owns it. */
    char req[300];
    snprintf(req, sizeof(req), "{\"url\":\"%s\"}", url);
    json_t *got = op(&s, "registry.instances.get", req);
    cr_assert_str_eq(json_string_value(json_object_get(got, "id")), id);
    expect_text(json_object_get(got, "tags"), JSON_COMPACT, "[\"by-admin\"]");
    json_decref(got);
    const char *const reader[] = {"registry:read", "registry:write", NULL};
    snprintf(req, sizeof(req), "{\"id\":\"%s\"}", id);
    got = op_as(&s, "bob", reader, "registry.instances.get", req);
    cr_assert_eq(json_object_size(got), 3, "%s", json_dumps(got, 0));
    cr_assert_str_eq(json_string_value(json_object_get(got, "slug")), "alice");
    json_decref(got);
    got = op_as(&s, "alice", reader, "registry.instances.get", req);
    cr_assert_not_null(json_object_get(got, "tags"));
    json_decref(got);
    expect_error(op(&s, "registry.instances.get", "{\"url\":\"http://other:1/\"}"),
                 "INSTANCE_NOT_FOUND", "http://other:1/");
    expect_error(op(&s, "registry.instances.get", "{}"), "INVALID_ARGUMENT", "exactly one");

    /* Delete by the owner; then it is gone, and deleting again is rejected. */
    snprintf(del, sizeof(del), "{\"id\":\"%s\",\"caller\":\"alice\"}", id);
    r = applied(&s, "registry.delete_instance", id, del);
    cr_assert(json_is_true(json_object_get(r, "deleted")));
    json_decref(r);
    why = rejected(&s, "registry.delete_instance", id, del);
    cr_assert(strstr(why, "no instance"), "%s", why);
    free(why);
    cr_assert_eq(loom_test_sql_ll(s.url, "SELECT count(*) FROM registry_instances"), 0);

    /* After a delete the url can be registered afresh, by anyone. */
    r = register_as(&s, url, "bob", false, NULL);
    cr_assert_str_eq(json_string_value(json_object_get(r, "slug")), "bob");
    cr_assert_str_eq(json_string_value(json_object_get(r, "id")), id);
    json_decref(r);
    svc_stop(&s);
}

Test(registry, statuses_apply_in_probe_order_and_heartbeats_advance, .timeout = 240)
{
    svc_t s;
    svc_start(&s);
    const char *url = "http://127.0.0.1:9/";
    char id[REGISTRY_INSTANCE_ID_LEN + 1];
    registry_instance_id(url, id);
    json_decref(register_as(&s, url, "alice", false, NULL));

    char data[400];
    snprintf(data, sizeof(data),
             "{\"id\":\"%s\",\"status\":\"healthy\",\"checked_at\":\"2030-01-01T00:00:10Z\","
             "\"connect_ms\":2}",
             id);
    json_t *r = applied(&s, "registry.instance_status", id, data);
    cr_assert(json_is_true(json_object_get(r, "applied")));
    json_decref(r);
    /* An older probe result arriving late changes nothing. */
    snprintf(data, sizeof(data),
             "{\"id\":\"%s\",\"status\":\"unreachable\",\"checked_at\":\"2030-01-01T00:00:05Z\","
             "\"details\":\"connection refused\"}",
             id);
    r = applied(&s, "registry.instance_status", id, data);
    cr_assert(json_is_false(json_object_get(r, "applied")));
    json_decref(r);
    char req[100];
    snprintf(req, sizeof(req), "{\"id\":\"%s\"}", id);
    json_t *got = op(&s, "registry.instances.get", req);
    cr_assert_str_eq(json_string_value(json_object_get(got, "status")), "healthy");
    cr_assert_str_eq(json_string_value(json_object_get(got, "last_heartbeat")),
                     "2030-01-01T00:00:10.000000Z");
    cr_assert_null(json_object_get(got, "details"));
    json_decref(got);

    /* A heartbeat batch moves last_heartbeat forward, never back. */
    snprintf(data, sizeof(data),
             "{\"ids\":[\"%s\",\"inst-000000000000000000000000\"],\"at\":\"2030-01-01T00:00:25Z\"}",
             id);
    r = applied(&s, "registry.instance_heartbeats", NULL, data);
    cr_assert_eq(json_integer_value(json_object_get(r, "updated")), 1);
    json_decref(r);
    snprintf(data, sizeof(data), "{\"ids\":[\"%s\"],\"at\":\"2030-01-01T00:00:20Z\"}", id);
    json_decref(applied(&s, "registry.instance_heartbeats", NULL, data));
    got = op(&s, "registry.instances.get", req);
    cr_assert_str_eq(json_string_value(json_object_get(got, "last_heartbeat")),
                     "2030-01-01T00:00:25.000000Z");
    json_decref(got);

    /* Unreachable keeps the last heartbeat and says why. */
    snprintf(data, sizeof(data),
             "{\"id\":\"%s\",\"status\":\"unreachable\",\"checked_at\":\"2030-01-01T00:00:40Z\","
             "\"details\":\"connection refused\"}",
             id);
    json_decref(applied(&s, "registry.instance_status", id, data));
    got = op(&s, "registry.instances.get", req);
    cr_assert_str_eq(json_string_value(json_object_get(got, "status")), "unreachable");
    cr_assert_str_eq(json_string_value(json_object_get(got, "details")), "connection refused");
    cr_assert_str_eq(json_string_value(json_object_get(got, "last_heartbeat")),
                     "2030-01-01T00:00:25.000000Z");
    json_decref(got);

    /* Bad statuses are rejected; a status for a deleted instance is a no-op. */
    snprintf(data, sizeof(data),
             "{\"id\":\"%s\",\"status\":\"sleepy\",\"checked_at\":\"2030-01-01T00:00:50Z\"}", id);
    char *why = rejected(&s, "registry.instance_status", id, data);
    cr_assert(strstr(why, "command.status: must be unknown, healthy"), "%s", why);
    free(why);
    snprintf(data, sizeof(data), "{\"id\":\"%s\",\"status\":\"healthy\",\"checked_at\":\"soon\"}",
             id);
    why = rejected(&s, "registry.instance_status", id, data);
    cr_assert_str_eq(why, "command.checked_at: must be an RFC 3339 time");
    free(why);
    r = applied(&s, "registry.instance_status", "x",
                "{\"id\":\"inst-ffffffffffffffffffffffff\",\"status\":\"healthy\","
                "\"checked_at\":\"2030-01-01T00:00:50Z\"}");
    cr_assert(json_is_false(json_object_get(r, "applied")));
    json_decref(r);
    cr_assert_eq(loom_test_sql_ll(s.url, "SELECT count(*) FROM loom_events WHERE type = "
                                         "'registry.instance_status_changed'"),
                 2);
    svc_stop(&s);
}

/* ---- listing ------------------------------------------------------------------------ */

/* Registers n instances at once (publishes all, then waits for all). */
static void register_many(svc_t *s, int from, int n)
{
    char(*ids)[37] = calloc((size_t)n, 37);
    for (int i = from; i < from + n; i++) {
        char url[200], key[REGISTRY_INSTANCE_ID_LEN + 1], extra[200];
        snprintf(url, sizeof(url), "http://h%d.example:%d/svc/%d", i % 3, 8000 + i, i);
        registry_instance_id(url, key);
        snprintf(extra, sizeof(extra), "\"deployment_id\":\"d%d\",\"tags\":[\"n%d\"]", i % 2, i);
        char *data = put_instance_data(url, i % 2 == 0 ? "alice" : "bob", false, extra);
        publish(s, "registry.put_instance", key, data, ids[i - from]);
        free(data);
    }
    for (int i = 0; i < n; i++) {
        json_t *o = outcome(s, ids[i]);
        cr_assert_str_eq(json_string_value(json_object_get(o, "status")), "applied");
        json_decref(o);
    }
    free(ids);
}

static int count_list(svc_t *s, const char *caller, const char *const *scopes, const char *req)
{
    json_t *got = op_as(s, caller, scopes, "registry.instances.list", req);
    cr_assert_not_null(json_object_get(got, "instances"), "%s: %s", req, json_dumps(got, 0));
    int n = (int)json_array_size(json_object_get(got, "instances"));
    json_decref(got);
    return n;
}

Test(registry, listing_filters_and_pages_stay_stable_while_instances_are_added, .timeout = 300)
{
    svc_t s;
    svc_start(&s);
    register_many(&s, 0, 30);

    /* Exact-match filters, ANDed. */
    cr_assert_eq(count_list(&s, NULL, NULL, "{}"), 30);
    cr_assert_eq(count_list(&s, NULL, NULL, "{\"slug\":\"alice\"}"), 15);
    cr_assert_eq(count_list(&s, NULL, NULL, "{\"slug\":\"alice\",\"deployment_id\":\"d0\"}"), 15);
    cr_assert_eq(count_list(&s, NULL, NULL, "{\"slug\":\"alice\",\"deployment_id\":\"d1\"}"), 0);
    cr_assert_eq(count_list(&s, NULL, NULL, "{\"host\":\"h1.example\"}"), 10);
    cr_assert_eq(count_list(&s, NULL, NULL, "{\"host\":\"H1.Example\",\"slug\":\"bob\"}"), 5);
    cr_assert_eq(count_list(&s, NULL, NULL, "{\"status\":\"unknown\"}"), 30);
    cr_assert_eq(count_list(&s, NULL, NULL, "{\"status\":\"healthy\"}"), 0);
    cr_assert_eq(count_list(&s, NULL, NULL, "{\"host\":\"h1\"}"), 0, "exact, not prefix");
    expect_error(op(&s, "registry.instances.list", "{\"status\":\"sleepy\"}"), "INVALID_ARGUMENT",
                 "status:");
    expect_error(op(&s, "registry.instances.list", "{\"limit\":501}"), "INVALID_ARGUMENT",
                 "limit: at most 500");
    expect_error(op(&s, "registry.instances.list", "{\"limit\":0}"), "INVALID_ARGUMENT", "limit:");
    expect_error(op(&s, "registry.instances.list", "{\"limit\":\"5\"}"), "INVALID_ARGUMENT",
                 "limit:");
    expect_error(op(&s, "registry.instances.list", "{\"cursor\":\"bm9wZQ\"}"), "INVALID_ARGUMENT",
                 "cursor:");
    expect_error(op(&s, "registry.instances.list", "{\"cursor\":\"!!\"}"), "INVALID_ARGUMENT",
                 "cursor:");
    expect_error(op(&s, "registry.instances.list", "{\"colour\":\"red\"}"), "INVALID_ARGUMENT",
                 "colour");
    cr_assert_eq(count_list(&s, NULL, NULL, "{\"limit\":500}"), 30);

    /* Callers through the gateway: their own slug only, unless admin. */
    const char *const reader[] = {"registry:read", NULL};
    const char *const admin[] = {"registry:read", "registry:admin", NULL};
    const char *const all[] = {"*", NULL};
    cr_assert_eq(count_list(&s, "alice", reader, "{}"), 15);
    cr_assert_eq(count_list(&s, "alice", reader, "{\"slug\":\"bob\"}"), 0);
    cr_assert_eq(count_list(&s, "alice", reader, "{\"slug\":\"alice\"}"), 15);
    cr_assert_eq(count_list(&s, "carol", reader, "{}"), 0);
    cr_assert_eq(count_list(&s, "carol", admin, "{}"), 30);
    cr_assert_eq(count_list(&s, "carol", admin, "{\"slug\":\"bob\"}"), 15);
    cr_assert_eq(count_list(&s, "dev", all, "{}"), 30);

    /* Page through 7 at a time while instances are added between pages:
     * every instance that existed at the start shows up exactly once. */
    char *seen[200];
    int n_seen = 0, pages = 0, added = 0;
    char cursor[200] = "";
    for (;;) {
        char req[300];
        if (cursor[0])
            snprintf(req, sizeof(req), "{\"limit\":7,\"cursor\":\"%s\"}", cursor);
        else
            snprintf(req, sizeof(req), "{\"limit\":7}");
        json_t *got = op(&s, "registry.instances.list", req);
        json_t *list = json_object_get(got, "instances");
        cr_assert_not_null(list, "%s", json_dumps(got, 0));
        cr_assert_leq(json_array_size(list), 7);
        size_t i;
        json_t *inst;
        json_array_foreach(list, i, inst)
        {
            const char *id = json_string_value(json_object_get(inst, "id"));
            for (int j = 0; j < n_seen; j++)
                cr_assert_str_neq(seen[j], id, "instance %s listed twice", id);
            seen[n_seen++] = strdup(id);
        }
        pages++;
        json_t *next = json_object_get(got, "next_cursor");
        if (json_is_null(next)) {
            json_decref(got);
            break;
        }
        snprintf(cursor, sizeof(cursor), "%s", json_string_value(next));
        json_decref(got);
        if (pages <= 3) { /* more instances arrive while the client pages */
            register_many(&s, 100 + added, 4);
            added += 4;
        }
        cr_assert_lt(pages, 40);
    }
    cr_assert_eq(added, 12);
    for (int i = 0; i < 30; i++) {
        char url[200], id[REGISTRY_INSTANCE_ID_LEN + 1];
        snprintf(url, sizeof(url), "http://h%d.example:%d/svc/%d", i % 3, 8000 + i, i);
        registry_instance_id(url, id);
        bool found = false;
        for (int j = 0; j < n_seen && !found; j++)
            found = strcmp(seen[j], id) == 0;
        cr_assert(found, "instance %d (%s) was skipped", i, id);
    }
    /* Instances added later come after the ones that were there. */
    cr_assert_eq(n_seen, 42, "seen %d", n_seen);
    cr_assert_eq(pages, 6);
    for (int j = 0; j < n_seen; j++)
        free(seen[j]);

    /* Pages of a filtered listing keep the filter. */
    json_t *got = op(&s, "registry.instances.list", "{\"slug\":\"bob\",\"limit\":10}");
    const char *cur = json_string_value(json_object_get(got, "next_cursor"));
    cr_assert_not_null(cur);
    char req[300];
    snprintf(req, sizeof(req), "{\"slug\":\"bob\",\"limit\":100,\"cursor\":\"%s\"}", cur);
    json_decref(got);
    cr_assert_eq(count_list(&s, NULL, NULL, req), 21 - 10);
    svc_stop(&s);
}

/* ---- nodes -------------------------------------------------------------------------- */

Test(registry, nodes_have_a_stale_flag, .timeout = 60)
{
    char url[512];
    loom_test_db_create_migrated(url, sizeof(url));
    loom_db_pool_t *pool = loom_test_pool(url, 2);
    loom_node_t *n;
    loom_error_t err;
    loom_node_opts_t o = {.pool = pool,
                          .id = "00000000-0000-4000-8000-0000000000a1",
                          .role = "api",
                          .url = "http://10.0.0.1:8080",
                          .site = "eu",
                          .version = "1.2",
                          .interval_ms = 200};
    cr_assert_eq(loom_node_start(&o, &n, &err), 0, "%s", err.message);
    loom_test_sql(url, "INSERT INTO loom_nodes VALUES ('00000000-0000-4000-8000-0000000000a2', "
                       "'worker', NULL, 'eu', '1.1', now() - interval '1 hour', "
                       "now() - interval '21 seconds')");
    loom_op_table_t *t = loom_op_table_new();
    cr_assert_eq(loom_op_table_add(t, loom_test_full_app()->ops, loom_test_full_app()->n_ops, &err),
                 0, "%s", err.message);
    svc_t s = {.worker = {.pool = pool}, .ops = t};
    loom_op_runtime_init(&s.rt, t, pool, NULL);

    json_t *got = op(&s, "registry.nodes.get", "{\"id\":\"00000000-0000-4000-8000-0000000000a1\"}");
    cr_assert_str_eq(json_string_value(json_object_get(got, "role")), "api");
    cr_assert_str_eq(json_string_value(json_object_get(got, "url")), "http://10.0.0.1:8080");
    cr_assert_str_eq(json_string_value(json_object_get(got, "site")), "eu");
    cr_assert_str_eq(json_string_value(json_object_get(got, "version")), "1.2");
    cr_assert(json_is_string(json_object_get(got, "started_at")));
    cr_assert(json_is_string(json_object_get(got, "last_heartbeat")));
    cr_assert(json_is_false(json_object_get(got, "stale")), "%s", json_dumps(got, 0));
    json_decref(got);
    got = op(&s, "registry.nodes.get", "{\"id\":\"00000000-0000-4000-8000-0000000000a2\"}");
    cr_assert(json_is_true(json_object_get(got, "stale")), "%s", json_dumps(got, 0));
    cr_assert_geq(json_integer_value(json_object_get(got, "heartbeat_age_ms")), 21000);
    json_decref(got);
    expect_error(op(&s, "registry.nodes.get", "{\"id\":\"00000000-0000-4000-8000-0000000000a3\"}"),
                 "NODE_NOT_FOUND", NULL);
    expect_error(op(&s, "registry.nodes.get", "{\"id\":\"self\"}"), "INVALID_ARGUMENT", "UUID");

    /* The listing GET /v1/registry/nodes answers with. */
    got = op(&s, "engine.nodes.list", "{}");
    json_t *nodes = json_object_get(got, "nodes");
    cr_assert_eq(json_array_size(nodes), 2);
    int stale = 0;
    size_t i;
    json_t *nd;
    json_array_foreach(nodes, i, nd) stale += json_is_true(json_object_get(nd, "stale"));
    cr_assert_eq(stale, 1);
    json_decref(got);
    loom_node_stop(n);
    loom_op_table_free(t);
    loom_db_pool_free(pool);
}

/* ---- the health probe --------------------------------------------------------------- */

static int listener(int backlog, int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    cr_assert_geq(fd, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    cr_assert_eq(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    cr_assert_eq(listen(fd, backlog), 0);
    socklen_t len = sizeof(a);
    getsockname(fd, (struct sockaddr *)&a, &len);
    *port = ntohs(a.sin_port);
    return fd;
}

/* A port nothing listens on (bound, then closed). */
static int closed_port(void)
{
    int port;
    int fd = listener(1, &port);
    close(fd);
    return port;
}

/* A listener whose accept queue is full and stays full: with backlog 0 one
 * connection fills it, and the kernel then drops further SYNs. */
static int full_listener(int *port, int *filler)
{
    int fd = listener(0, port);
    *filler = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)*port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    cr_assert_eq(connect(*filler, (struct sockaddr *)&a, sizeof(a)), 0);
    loom_sleep_ms(50);
    return fd;
}

typedef struct acceptor {
    int fd;
    int64_t delay_ms;
    atomic_int stop;
    pthread_t thread;
} acceptor_t;

/* Accepts (and closes) everything after delay_ms, until stopped. */
static void *accept_loop(void *arg)
{
    acceptor_t *a = arg;
    loom_sleep_ms(a->delay_ms);
    fcntl(a->fd, F_SETFL, O_NONBLOCK);
    while (!atomic_load(&a->stop)) {
        int c = accept(a->fd, NULL, NULL);
        if (c >= 0)
            close(c);
        else
            loom_sleep_ms(2);
    }
    return NULL;
}

static void acceptor_start(acceptor_t *a, int fd, int64_t delay_ms)
{
    a->fd = fd;
    a->delay_ms = delay_ms;
    atomic_store(&a->stop, 0);
    pthread_create(&a->thread, NULL, accept_loop, a);
}

static void acceptor_stop(acceptor_t *a)
{
    atomic_store(&a->stop, 1);
    pthread_join(a->thread, NULL);
}

Test(registry_probe, a_listener_is_healthy_and_a_closed_port_unreachable, .timeout = 60)
{
    int up_port;
    int up = listener(128, &up_port);
    int down_port = closed_port();
    registry_probe_t p[4] = {
        {.host = "127.0.0.1", .port = up_port},
        {.host = "127.0.0.1", .port = down_port},
        {.host = "localhost", .port = up_port},
        {.host = "no-such-host.invalid", .port = 80},
    };
    /* localhost may resolve to ::1 first, where nothing listens. */
    registry_probe_opts_t o = {.timeout_ms = 2000};
    loom_error_t err;
    int64_t t0 = loom_mono_ms();
    cr_assert_eq(registry_probe_run(p, 4, &o, &err), 0, "%s", err.message);
    cr_assert_str_eq(p[0].status, "healthy");
    cr_assert_str_eq(p[0].details, "");
    cr_assert_geq(p[0].connect_ms, 0);
    cr_assert_lt(p[0].connect_ms, 1000);
    cr_assert_str_eq(p[1].status, "unreachable");
    cr_assert_str_eq(p[1].details, "connection refused");
    cr_assert_eq(p[1].connect_ms, -1);
    cr_assert(strcmp(p[2].status, "healthy") == 0 ||
                  strcmp(p[2].details, "connection refused") == 0,
              "%s %s", p[2].status, p[2].details);
    cr_assert_str_eq(p[3].status, "unreachable");
    cr_assert(strstr(p[3].details, "could not resolve the host") ||
                  strstr(p[3].details, "no connection within"),
              "%s", p[3].details);
    cr_assert_lt(loom_mono_ms() - t0, 12000);
    cr_assert_eq(o.peak_in_flight, 4);
    close(up);
}

/* LOOM_REGISTRY_PROBE_ALLOW: blocks and suffixes, checked on the address
 * after resolution; metadata and link-local addresses never. */
Test(registry_probe, the_allow_list_is_checked_after_resolution)
{
    registry_probe_allow_t *a = NULL;
    loom_error_t err;
    cr_assert_eq(registry_probe_allow_parse(" 127.0.0.1/32, ::1 ,.svc.local,localhost", &a, &err),
                 0, "%s", err.message);
    struct sockaddr_in v4;
    struct sockaddr_in6 v6;
#define V4(ip) (uv_ip4_addr(ip, 80, &v4), (const struct sockaddr *)&v4)
#define V6(ip) (uv_ip6_addr(ip, 80, &v6), (const struct sockaddr *)&v6)
    cr_assert_null(registry_probe_allow_check(a, "127.0.0.1", V4("127.0.0.1")));
    cr_assert_null(registry_probe_allow_check(a, "::1", V6("::1")));
    cr_assert_str_eq(registry_probe_allow_check(a, "127.0.0.2", V4("127.0.0.2")),
                     "outside LOOM_REGISTRY_PROBE_ALLOW");
    /* A name matching a suffix may be probed wherever it resolves... */
    cr_assert_null(registry_probe_allow_check(a, "api.svc.local", V4("127.0.0.3")));
    cr_assert_null(registry_probe_allow_check(a, "localhost", V4("127.0.0.4")));
    cr_assert_not_null(registry_probe_allow_check(a, "evilsvc.local", V4("127.0.0.3")));
    cr_assert_not_null(registry_probe_allow_check(a, "notlocalhost", V4("127.0.0.3")));
    /* ...but never to the metadata service or link-local addresses. */
    cr_assert_not_null(registry_probe_allow_check(a, "api.svc.local", V4("169.254.169.254")));
    cr_assert_not_null(registry_probe_allow_check(a, "api.svc.local", V6("fd00:ec2::254")));
    cr_assert_not_null(registry_probe_allow_check(a, "api.svc.local", V6("::ffff:169.254.1.1")));
    cr_assert_not_null(registry_probe_allow_check(a, "api.svc.local", V6("fe80::1")));
    registry_probe_allow_free(a);
    cr_assert_eq(registry_probe_allow_parse("*", &a, &err), 0);
    cr_assert_null(registry_probe_allow_check(a, "10.1.2.3", V4("10.1.2.3")));
    cr_assert_not_null(registry_probe_allow_check(a, "169.254.169.254", V4("169.254.169.254")));
    registry_probe_allow_free(a);
    cr_assert_eq(registry_probe_allow_parse(REGISTRY_PROBE_ALLOW_DEFAULT, &a, &err), 0);
    cr_assert_null(registry_probe_allow_check(a, "172.31.0.1", V4("172.31.0.1")));
    cr_assert_not_null(registry_probe_allow_check(a, "172.32.0.1", V4("172.32.0.1")));
    cr_assert_not_null(registry_probe_allow_check(a, "8.8.8.8", V4("8.8.8.8")));
    registry_probe_allow_free(a);
#undef V4
#undef V6
    static const char *const bad[] = {
        "",          "10.0.0.0/33", "::/129", "a..b",        "x/8",
        "10.0.0.0/", "a b",         ",",      "10.0.0.0/8,", "h\xc3\xa9.local"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        a = NULL;
        cr_assert_neq(registry_probe_allow_parse(bad[i], &a, &err), 0, "\"%s\" accepted", bad[i]);
        cr_assert_null(a);
    }
    /* A bad value stops the process at start, naming the variable. */
    char *env[] = {"LOOM_REGISTRY_PROBE_ALLOW=10.0.0.0/99", NULL};
    loom_config_t cfg;
    char eb[512];
    cr_assert_neq(loom_config_load(&cfg, env, loom_test_full_app()->config_vars,
                                   loom_test_full_app()->n_config_vars, eb, sizeof(eb)),
                  0);
    cr_assert(strstr(eb, "LOOM_REGISTRY_PROBE_ALLOW"), "%s", eb);
}

Test(registry_probe, outside_the_allow_list_nothing_is_connected, .timeout = 60)
{
    int up_port;
    int up = listener(128, &up_port);
    registry_probe_allow_t *allow = NULL;
    loom_error_t err;
    cr_assert_eq(registry_probe_allow_parse("127.0.0.2/32", &allow, &err), 0);
    registry_probe_t p[2] = {{.host = "127.0.0.1", .port = up_port},
                             {.host = "169.254.169.254", .port = 80}};
    registry_probe_opts_t o = {.timeout_ms = 2000, .allow = allow};
    cr_assert_eq(registry_probe_run(p, 2, &o, &err), 0, "%s", err.message);
    cr_assert_str_eq(p[0].status, "not_probed");
    cr_assert_str_eq(p[0].details, "not probed: 127.0.0.1: outside LOOM_REGISTRY_PROBE_ALLOW");
    cr_assert_eq(p[0].connect_ms, -1);
    cr_assert_str_eq(p[1].status, "not_probed");
    cr_assert(strstr(p[1].details, "never probed"), "%s", p[1].details);
    /* Nothing reached the listener. */
    fcntl(up, F_SETFL, O_NONBLOCK);
    cr_assert_lt(accept(up, NULL, NULL), 0);
    registry_probe_allow_free(allow);
    close(up);
}

Test(registry_probe, a_full_backlog_times_out_or_is_slow, .timeout = 60)
{
    /* Never accepted: the SYN is dropped and retried until the timeout. */
    int port, filler;
    int fd = full_listener(&port, &filler);
    registry_probe_t p = {.host = "127.0.0.1", .port = port};
    registry_probe_opts_t o = {.timeout_ms = 1500, .degraded_ms = 300};
    loom_error_t err;
    int64_t t0 = loom_mono_ms();
    cr_assert_eq(registry_probe_run(&p, 1, &o, &err), 0, "%s", err.message);
    int64_t took = loom_mono_ms() - t0;
    cr_assert_str_eq(p.status, "unreachable", "%s (%s)", p.status, p.details);
    cr_assert_str_eq(p.details, "no connection within 1500 ms");
    cr_assert_geq(took, 1400);
    cr_assert_lt(took, 2500);

    /* Accepted after 400 ms: the retransmitted SYN (about 1 s in) gets
     * through, slower than the degraded threshold. */
    acceptor_t a;
    acceptor_start(&a, fd, 400);
    registry_probe_t q = {.host = "127.0.0.1", .port = port};
    o.timeout_ms = 2500;
    cr_assert_eq(registry_probe_run(&q, 1, &o, &err), 0, "%s", err.message);
    acceptor_stop(&a);
    cr_assert_str_eq(q.status, "degraded", "%s (%s)", q.status, q.details);
    cr_assert_geq(q.connect_ms, 300);
    cr_assert_lt(q.connect_ms, 2500);
    cr_assert(strstr(q.details, "connected in "), "%s", q.details);
    close(filler);
    close(fd);
}

/*
 * In a network namespace of its own (unshare: nothing to clean up, it goes
 * with the process) 10.77.0.0/24 is routed to the loopback device, where no
 * address answers: SYNs vanish without a reply, as with a blackholed host.
 * Runs in a child process so the test's own namespace stays untouched.
 */
Test(registry_probe, a_blackholed_address_is_unreachable_by_timeout, .timeout = 60)
{
    int fds[2];
    cr_assert_eq(pipe(fds), 0);
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        close(fds[0]);
        char out[512];
        if (unshare(CLONE_NEWNET) != 0) {
            snprintf(out, sizeof(out), "unshare(CLONE_NEWNET): %s", strerror(errno));
        } else if (system("ip link set lo up && ip route add 10.77.0.0/24 dev lo") != 0) {
            snprintf(out, sizeof(out), "ip could not set up the namespace");
        } else {
            registry_probe_t p[2] = {{.host = "10.77.0.5", .port = 80},
                                     {.host = "10.77.0.6", .port = 443}};
            registry_probe_opts_t o = {.timeout_ms = 700};
            loom_error_t err;
            int64_t t0 = loom_mono_ms();
            registry_probe_run(p, 1, &o, &err);
            int64_t short_ms = loom_mono_ms() - t0;
            t0 = loom_mono_ms();
            registry_probe_run(p + 1, 1, NULL, &err); /* the default 3 s */
            int64_t default_ms = loom_mono_ms() - t0;
            snprintf(out, sizeof(out), "%s|%s|%lld|%s|%s|%lld", p[0].status, p[0].details,
                     (long long)short_ms, p[1].status, p[1].details, (long long)default_ms);
        }
        ssize_t w = write(fds[1], out, strlen(out));
        _exit(w > 0 ? 0 : 1);
    }
    close(fds[1]);
    char buf[512] = {0};
    ssize_t n = 0, r;
    while ((r = read(fds[0], buf + n, sizeof(buf) - 1 - (size_t)n)) > 0)
        n += r;
    close(fds[0]);
    int status;
    waitpid(pid, &status, 0);
    char s0[32], d0[128], s1[32], d1[128];
    long long ms0, ms1;
    cr_assert_eq(
        sscanf(buf, "%31[^|]|%127[^|]|%lld|%31[^|]|%127[^|]|%lld", s0, d0, &ms0, s1, d1, &ms1), 6,
        "child said: %s", buf);
    cr_assert_str_eq(s0, "unreachable");
    cr_assert_str_eq(d0, "no connection within 700 ms");
    cr_assert_geq(ms0, 650);
    cr_assert_lt(ms0, 1500);
    cr_assert_str_eq(s1, "unreachable");
    cr_assert_str_eq(d1, "no connection within 3000 ms");
    cr_assert_geq(ms1, 2950);
    cr_assert_lt(ms1, 4000);
}

Test(registry_probe, thousands_of_probes_with_bounded_sockets, .timeout = 120)
{
    int up_port;
    int up = listener(4096, &up_port);
    acceptor_t a;
    acceptor_start(&a, up, 0);
    int down_port = closed_port();
    size_t n = 3000;
    registry_probe_t *p = calloc(n, sizeof(*p));
    for (size_t i = 0; i < n; i++) {
        p[i].host = "127.0.0.1";
        p[i].port = i % 3 == 0 ? down_port : up_port;
    }
    registry_probe_opts_t o = {.max_in_flight = 64};
    loom_error_t err;
    int64_t t0 = loom_mono_ms();
    cr_assert_eq(registry_probe_run(p, n, &o, &err), 0, "%s", err.message);
    int64_t took = loom_mono_ms() - t0;
    acceptor_stop(&a);
    size_t healthy = 0, unreachable = 0;
    for (size_t i = 0; i < n; i++) {
        if (i % 3 == 0) {
            cr_assert_str_eq(p[i].status, "unreachable", "%zu", i);
            unreachable++;
        } else {
            cr_assert_str_eq(p[i].status, "healthy", "%zu: %s", i, p[i].details);
            healthy++;
        }
    }
    cr_assert_eq(healthy, 2000);
    cr_assert_eq(unreachable, 1000);
    cr_assert_eq(o.peak_in_flight, 64, "peak %d", o.peak_in_flight);
    cr_assert_lt(took, 30000, "took %lld ms", (long long)took);
    free(p);
    close(up);
}

/* ---- the probe job, end to end ----------------------------------------------------- */

static const loom_periodic_def_t *app_job(const char *name)
{
    const loom_app_t *app = loom_test_full_app();
    for (size_t i = 0; i < app->n_jobs; i++)
        if (strcmp(app->jobs[i].name, name) == 0)
            return &app->jobs[i];
    cr_assert_fail("no job %s", name);
    return NULL;
}

static char *status_of(svc_t *s, const char *id)
{
    char sql[300];
    snprintf(sql, sizeof(sql),
             "SELECT status || '|' || coalesce(details, '') || '|' || "
             "(last_heartbeat IS NOT NULL)::text FROM registry_instances WHERE id = '%s'",
             id);
    return loom_test_sql_value(s->url, sql);
}

static void wait_status(svc_t *s, const char *id, const char *want)
{
    int64_t end = loom_mono_ms() + 30000;
    char *got = NULL;
    for (;;) {
        free(got);
        got = status_of(s, id);
        if (strcmp(got, want) == 0 || loom_mono_ms() > end)
            break;
        loom_sleep_ms(100);
    }
    cr_assert_str_eq(got, want, "instance %s", id);
    free(got);
}

Test(registry, the_probe_job_publishes_one_status_per_change, .timeout = 240)
{
    svc_t s;
    svc_start(&s);
    int up_port, full_port, filler;
    int up = listener(128, &up_port);
    acceptor_t a;
    acceptor_start(&a, up, 0);
    int down_port = closed_port();
    int full = full_listener(&full_port, &filler);
    char urls[4][100], ids[4][REGISTRY_INSTANCE_ID_LEN + 1];
    snprintf(urls[0], sizeof(urls[0]), "http://127.0.0.1:%d/up", up_port);
    snprintf(urls[1], sizeof(urls[1]), "http://127.0.0.1:%d/down", down_port);
    snprintf(urls[2], sizeof(urls[2]), "tcp://127.0.0.1:%d", full_port);
    /* Outside the allow-list below: never connected to. */
    snprintf(urls[3], sizeof(urls[3]), "http://127.0.0.2:%d/up", up_port);
    for (int i = 0; i < 4; i++) {
        registry_instance_id(urls[i], ids[i]);
        json_decref(register_as(&s, urls[i], "alice", false, NULL));
    }

    char envurl[600];
    snprintf(envurl, sizeof(envurl), "LOOM_DATABASE_URL=%s", s.url);
    char *env[] = {envurl,
                   "LOOM_REGISTRY_PROBE_INTERVAL=1s",
                   "LOOM_REGISTRY_PROBE_TIMEOUT=500ms",
                   "LOOM_REGISTRY_PROBE_ALLOW=127.0.0.1/32",
                   "LOOM_NODE_ID=00000000-0000-4000-8000-0000000000b1",
                   NULL};
    loom_config_t cfg;
    char eb[256];
    cr_assert_eq(loom_config_load(&cfg, env, loom_test_full_app()->config_vars,
                                  loom_test_full_app()->n_config_vars, eb, sizeof(eb)),
                 0, "%s", eb);
    loom_periodic_opts_t po = {.jobs = app_job("registry.probe"),
                               .n_jobs = 1,
                               .pool = s.worker.pool,
                               .producer = s.worker.relay,
                               .cfg = &cfg,
                               .tick_ms = 100};
    loom_periodic_t *runner;
    loom_error_t err;
    cr_assert_eq(loom_periodic_start(&po, &runner, &err), 0, "%s", err.message);

    wait_status(&s, ids[0], "healthy||true");
    wait_status(&s, ids[1], "unreachable|connection refused|false");
    wait_status(&s, ids[2], "unreachable|no connection within 500 ms|false");
    wait_status(&s, ids[3],
                "not_probed|not probed: 127.0.0.2: outside LOOM_REGISTRY_PROBE_ALLOW|false");

    /* Later runs change nothing but the heartbeat of the healthy one. */
    char sql[300];
    snprintf(sql, sizeof(sql),
             "SELECT last_heartbeat::text FROM registry_instances WHERE id = '%s'", ids[0]);
    char *beat0 = loom_test_sql_value(s.url, sql);
    int64_t runs0 = loom_periodic_runs(runner, "registry.probe");
    int64_t end = loom_mono_ms() + 20000;
    char *beat1 = NULL;
    for (;;) {
        free(beat1);
        beat1 = loom_test_sql_value(s.url, sql);
        if ((strcmp(beat1, beat0) != 0 &&
             loom_periodic_runs(runner, "registry.probe") >= runs0 + 2) ||
            loom_mono_ms() > end)
            break;
        loom_sleep_ms(100);
    }
    cr_assert_str_neq(beat1, beat0, "last_heartbeat did not move on");
    free(beat0);
    free(beat1);
    cr_assert_eq(loom_test_sql_ll(s.url, "SELECT count(*) FROM loom_commands WHERE type = "
                                         "'registry.instance_status'"),
                 4, "one status command per change");

    /* The healthy one goes away: one more status command. */
    acceptor_stop(&a);
    close(up);
    wait_status(&s, ids[0], "unreachable|connection refused|true");
    loom_sleep_ms(1500);
    cr_assert_eq(loom_test_sql_ll(s.url, "SELECT count(*) FROM loom_commands WHERE type = "
                                         "'registry.instance_status'"),
                 5);
    cr_assert_eq(
        loom_test_sql_ll(s.url, "SELECT count(*) FROM loom_commands WHERE status <> 'applied'"), 0);
    loom_periodic_stop(runner);
    loom_config_release(&cfg);
    close(filler);
    close(full);
    svc_stop(&s);
}
