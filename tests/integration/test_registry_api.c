/*
 * The registry service over HTTP (README.md, "HTTP API"): the gateway
 * in-process with the registry's routes, ops and tokens, the registry
 * consumer in an in-process worker against the real Kafka broker and
 * Postgres. Every endpoint and error: definitions created, replaced, listed,
 * deleted (404 when absent, 400 with the field when invalid); instances
 * registered (202, and 200 with ?wait), re-registered, refused to another
 * caller (403 at once) but allowed to an admin, listed with filters,
 * per-slug visibility and cursors, deleted (404, 403); nodes with the stale
 * flag; 401 and 403 for tokens.
 */
#include "api.h"
#include "services.h"
#include "http_client.h"
#include "ops.h"
#include "registry.h"
#include "registry/model.h"
#include "registry/registry.h"
#include "support.h"
#include "loom/bus.h"
#include "loom/clock.h"
#include "loom/gateway.h"
#include "loom/sha256.h"
#include "loom/worker.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define TOK_ALICE  "tok-alice-0123456789"
#define TOK_BOB    "tok-bob-0123456789"
#define TOK_ADMIN  "tok-admin-0123456789"
#define TOK_READER "tok-reader-0123456789"
#define TOK_OTHER  "tok-other-0123456789"

typedef struct env {
    char url[512];
    char tokens_path[256];
    loom_test_app_sub_t sub; /* registry.store on topics of its own */
    loom_route_t routes[32];
    size_t n_routes;
    loom_op_table_t *table;
    loom_db_pool_t *read_pool;
    loom_op_runtime_t rt;
    loom_producer_t *producer;
    loom_test_worker_t worker;
    loom_gateway_opts_t opts;
    loom_gateway_t *gw;
    int port;
} env_t;

/* Compares the JSON text of v (dumped with flags) with want. */
static void expect_text(const json_t *v, size_t flags, const char *want)
{
    char *got = json_dumps(v, flags);
    cr_assert_str_eq(got, want);
    free(got);
}

static void write_tokens(env_t *e)
{
    snprintf(e->tokens_path, sizeof(e->tokens_path), "/tmp/loom-reg-tokens-%d", (int)getpid());
    loom_test_token_t t[] = {
        {TOK_ALICE, "alice registry:read,registry:write"},
        {TOK_BOB, "bob registry:read,registry:write"},
        {TOK_ADMIN, "ops-team registry:read,registry:write,registry:admin"},
        {TOK_READER, "carol registry:read"},
        {TOK_OTHER, "dave messages:read"},
    };
    loom_test_tokens_file(e->tokens_path, t, sizeof(t) / sizeof(t[0]));
}

static void env_start(env_t *e)
{
    memset(e, 0, sizeof(*e));
    const char *brokers = loom_test_kafka_brokers();
    loom_error_t err;
    loom_test_db_create_migrated(e->url, sizeof(e->url));
    loom_test_app_sub_init(&e->sub, "registry.store", "rapi", brokers, 3);
    for (e->n_routes = 0; api_registry_routes[e->n_routes].method; e->n_routes++)
        e->routes[e->n_routes] = api_registry_routes[e->n_routes];
    cr_assert_not_null(e->sub.def.name);

    e->table = loom_op_table_new();
    cr_assert_eq(
        loom_op_table_add(e->table, loom_test_full_app()->ops, loom_test_full_app()->n_ops, &err),
        0, "%s", err.message);
    e->read_pool = loom_test_read_pool(e->url, 4);
    loom_op_runtime_init(&e->rt, e->table, e->read_pool, NULL);
    loom_producer_opts_t o = {.brokers = brokers, .message_timeout_ms = 10000};
    cr_assert_eq(loom_producer_new(&o, &e->producer, &err), 0, "%s", err.message);
    loom_worker_opts_t wo = {.brokers = brokers,
                             .consumers = &e->sub.def,
                             .n_consumers = 1,
                             .group_prefix = e->sub.group};
    loom_test_worker_start(&e->worker, e->url, 3, false, wo);

    write_tokens(e);
    e->opts = (loom_gateway_opts_t){.listen = "127.0.0.1:0",
                                    .threads = 2,
                                    .routes = e->routes,
                                    .n_routes = e->n_routes,
                                    .ops = &e->rt,
                                    .producer = e->producer,
                                    .tokens_file = e->tokens_path,
                                    .site = "test",
                                    .node = "00000000-0000-4000-8000-0000000000c1",
                                    .workers = 4};
    cr_assert_eq(loom_gateway_start(&e->opts, &e->gw, &err), 0, "%s", err.message);
    e->port = loom_gateway_port(e->gw, 0);
}

static void env_stop(env_t *e)
{
    loom_gateway_free(e->gw);
    loom_test_worker_stop(&e->worker);
    loom_producer_free(e->producer);
    loom_db_pool_free(e->read_pool);
    loom_op_table_free(e->table);
    unlink(e->tokens_path);
}

/* One request; the response in *r (free with loom_test_http_res_free). */
static void http(env_t *e, const char *method, const char *path, const char *token,
                 const char *body, loom_test_http_res_t *r)
{
    loom_test_http(e->port, method, path, token, body ? "Content-Type: application/json\r\n" : NULL,
                   body, r);
}

static void expect_status(loom_test_http_res_t *r, int status)
{
    cr_assert_eq(r->status, status, "status %d, want %d: %s", r->status, status, r->body);
}

static void expect_error(env_t *e, const char *method, const char *path, const char *token,
                         const char *body, int status, const char *code, const char *needle)
{
    loom_test_http_res_t r;
    http(e, method, path, token, body, &r);
    cr_expect_eq(r.status, status, "%s %s: status %d, want %d: %s", method, path, r.status, status,
                 r.body);
    cr_expect_str_eq(loom_test_http_error_code(&r), code, "%s %s: %s", method, path, r.body);
    if (needle) {
        const char *msg =
            json_string_value(json_object_get(json_object_get(r.json, "error"), "message"));
        cr_expect(msg && strstr(msg, needle), "%s %s: %s", method, path, r.body);
    }
    loom_test_http_res_free(&r);
}

/* 200 with ?wait: the applied result (new reference). */
static json_t *write_wait(env_t *e, const char *method, const char *path, const char *token,
                          const char *body)
{
    char p[512];
    snprintf(p, sizeof(p), "%s%swait=20s", path, strchr(path, '?') ? "&" : "?");
    loom_test_http_res_t r;
    http(e, method, p, token, body, &r);
    expect_status(&r, 200);
    cr_assert_str_eq(json_string_value(json_object_get(r.json, "status")), "applied", "%s", r.body);
    json_t *res = json_incref(json_object_get(r.json, "result"));
    loom_test_http_res_free(&r);
    return res;
}

/* GET: the JSON body of a 200 (new reference). */
static json_t *get(env_t *e, const char *path, const char *token)
{
    loom_test_http_res_t r;
    http(e, "GET", path, token, NULL, &r);
    expect_status(&r, 200);
    json_t *body = json_incref(r.json);
    loom_test_http_res_free(&r);
    return body;
}

static size_t count_instances(env_t *e, const char *path, const char *token)
{
    json_t *b = get(e, path, token);
    json_t *list = json_object_get(b, "instances");
    cr_assert(json_is_array(list), "%s", json_dumps(b, 0));
    size_t n = json_array_size(list);
    json_decref(b);
    return n;
}

Test(registry_api, definitions, .timeout = 240)
{
    env_t e;
    env_start(&e);
    json_t *b = get(&e, "/v1/registry/definitions", TOK_READER);
    expect_text(b, JSON_COMPACT, "{\"definitions\":[]}");
    json_decref(b);

    /* 202 once Kafka has it; then the op shows it. */
    loom_test_http_res_t r;
    http(&e, "PUT", "/v1/registry/definitions", TOK_ALICE,
         "{\"definition\":{\"id\":\"test-a\",\"image\":{\"name\":\"hashicorp/http-echo\","
         "\"internal_ports\":[8080]},\"ports\":[{\"internal\":8080,\"host\":8887}]}}",
         &r);
    expect_status(&r, 202);
    cr_assert(json_is_string(json_object_get(r.json, "command_id")), "%s", r.body);
    loom_test_http_res_free(&r);
    int64_t end = loom_mono_ms() + 30000;
    size_t n = 0;
    while (n == 0 && loom_mono_ms() < end) {
        b = get(&e, "/v1/registry/definitions", TOK_READER);
        n = json_array_size(json_object_get(b, "definitions"));
        json_decref(b);
        if (n == 0)
            loom_sleep_ms(100);
    }
    cr_assert_eq(n, 1);

    /* Alice put it, so it is hers: Bob may neither replace nor delete it. */
    expect_error(&e, "PUT", "/v1/registry/definitions", TOK_BOB,
                 "{\"definition\":{\"id\":\"test-a\",\"image\":{\"name\":\"evil\"}}}", 403,
                 "DEFINITION_OWNED_BY_OTHER", "alice");
    expect_error(&e, "DELETE", "/v1/registry/definitions/test-a", TOK_BOB, NULL, 403,
                 "DEFINITION_OWNED_BY_OTHER", "alice");

    /* Replace with ?wait (by an admin): the applied result. */
    json_t *res = write_wait(&e, "PUT", "/v1/registry/definitions", TOK_ADMIN,
                             "{\"definition\":{\"id\":\"test-a\",\"repository\":{\"url\":"
                             "\"https://github.com/1backend/1backend.git\",\"container_file\":"
                             "\"server/docker/Dockerfile\"}}}");
    cr_assert_str_eq(json_string_value(json_object_get(res, "id")), "test-a");
    json_decref(res);
    b = get(&e, "/v1/registry/definitions", TOK_READER);
    json_t *d = json_array_get(json_object_get(b, "definitions"), 0);
    cr_assert_null(json_object_get(d, "image"), "replaced whole: %s", json_dumps(b, 0));
    cr_assert_not_null(json_object_get(d, "repository"));
    json_decref(b);

    /* Field-level validation before anything is published. */
    expect_error(&e, "PUT", "/v1/registry/definitions", TOK_ALICE,
                 "{\"definition\":{\"id\":\"x\",\"image\":{\"name\":\"n\","
                 "\"internal_ports\":[80,0]}}}",
                 400, "INVALID_ARGUMENT", "definition.image.internal_ports[1]: must be 1-65535");
    expect_error(&e, "PUT", "/v1/registry/definitions", TOK_ALICE,
                 "{\"definition\":{\"id\":\"x\"}}", 400, "INVALID_ARGUMENT",
                 "definition: needs exactly one of \"image\" and \"repository\"");
    expect_error(&e, "PUT", "/v1/registry/definitions", TOK_ALICE, "{\"id\":\"x\"}", 400,
                 "INVALID_ARGUMENT", "body.id: unknown field");
    expect_error(&e, "PUT", "/v1/registry/definitions", TOK_ALICE, "{}", 400, "INVALID_ARGUMENT",
                 "definition: is required");
    expect_error(&e, "PUT", "/v1/registry/definitions", TOK_ALICE, "{\"definition\":", 400,
                 "INVALID_JSON", NULL);

    /* Delete: 404 when absent (also for an id that cannot exist), else applied. */
    expect_error(&e, "DELETE", "/v1/registry/definitions/nope", TOK_ALICE, NULL, 404,
                 "DEFINITION_NOT_FOUND", "nope");
    expect_error(&e, "DELETE", "/v1/registry/definitions/Bad%20Id", TOK_ALICE, NULL, 404,
                 "DEFINITION_NOT_FOUND", NULL);
    res = write_wait(&e, "DELETE", "/v1/registry/definitions/test-a", TOK_ALICE, NULL);
    cr_assert(json_is_true(json_object_get(res, "deleted")));
    json_decref(res);
    expect_error(&e, "DELETE", "/v1/registry/definitions/test-a", TOK_ALICE, NULL, 404,
                 "DEFINITION_NOT_FOUND", NULL);
    b = get(&e, "/v1/registry/definitions", TOK_READER);
    expect_text(b, JSON_COMPACT, "{\"definitions\":[]}");
    json_decref(b);

    /* Tokens and scopes. */
    expect_error(&e, "GET", "/v1/registry/definitions", NULL, NULL, 401, "UNAUTHENTICATED", NULL);
    expect_error(&e, "GET", "/v1/registry/definitions", "tok-wrong", NULL, 401, "UNAUTHENTICATED",
                 NULL);
    expect_error(&e, "GET", "/v1/registry/definitions", TOK_OTHER, NULL, 403, "PERMISSION_DENIED",
                 NULL);
    expect_error(&e, "PUT", "/v1/registry/definitions", TOK_READER,
                 "{\"definition\":{\"id\":\"x\",\"image\":{\"name\":\"n\"}}}", 403,
                 "PERMISSION_DENIED", NULL);
    expect_error(&e, "DELETE", "/v1/registry/definitions/x", TOK_READER, NULL, 403,
                 "PERMISSION_DENIED", NULL);
    env_stop(&e);
}

Test(registry_api, instances, .timeout = 300)
{
    env_t e;
    env_start(&e);
    const char *url = "http://svc-a.internal:8443/api/v2";
    char id[REGISTRY_INSTANCE_ID_LEN + 1];
    registry_instance_id(url, id);
    char body[300];
    snprintf(body, sizeof(body), "{\"url\":\"%s\",\"deployment_id\":\"dep-1\",\"tags\":[\"a\"]}",
             url);

    /* First registration by alice: the id comes from the url, alice owns it. */
    json_t *res = write_wait(&e, "PUT", "/v1/registry/instances", TOK_ALICE, body);
    cr_assert_str_eq(json_string_value(json_object_get(res, "id")), id);
    cr_assert_str_eq(json_string_value(json_object_get(res, "slug")), "alice");
    cr_assert_str_eq(json_string_value(json_object_get(res, "url")), url, "port and path kept");
    cr_assert_eq(json_integer_value(json_object_get(res, "port")), 8443);
    cr_assert_str_eq(json_string_value(json_object_get(res, "status")), "unknown");
    json_decref(res);

    /* Again (idempotent): one instance, same id; an Idempotency-Key keeps
     * retries on one command. */
    res = write_wait(&e, "PUT", "/v1/registry/instances", TOK_ALICE, body);
    cr_assert_str_eq(json_string_value(json_object_get(res, "id")), id);
    json_decref(res);
    loom_test_http_res_t r1, r2;
    loom_test_http(e.port, "PUT", "/v1/registry/instances", TOK_ALICE, "Idempotency-Key: k-1\r\n",
                   body, &r1);
    loom_test_http(e.port, "PUT", "/v1/registry/instances", TOK_ALICE, "Idempotency-Key: k-1\r\n",
                   body, &r2);
    expect_status(&r1, 202);
    expect_status(&r2, 202);
    cr_assert_str_eq(json_string_value(json_object_get(r1.json, "command_id")),
                     json_string_value(json_object_get(r2.json, "command_id")));
    loom_test_http_res_free(&r1);
    loom_test_http_res_free(&r2);
    cr_assert_eq(count_instances(&e, "/v1/registry/instances", TOK_ADMIN), 1);

    /* Bob may not take it over: 403 at once, nothing published. */
    expect_error(&e, "PUT", "/v1/registry/instances", TOK_BOB, body, 403, "INSTANCE_OWNED_BY_OTHER",
                 "belongs to \"alice\", not to \"bob\"");
    /* The admin may; the owner stays alice. */
    snprintf(body, sizeof(body), "{\"url\":\"%s\",\"tags\":[\"by-admin\"]}", url);
    res = write_wait(&e, "PUT", "/v1/registry/instances", TOK_ADMIN, body);
    cr_assert_str_eq(json_string_value(json_object_get(res, "slug")), "alice");
    expect_text(json_object_get(res, "tags"), JSON_COMPACT, "[\"by-admin\"]");
    json_decref(res);

    /* Validation. */
    expect_error(&e, "PUT", "/v1/registry/instances", TOK_BOB, "{\"url\":\"http://h/x\"}", 400,
                 "INVALID_ARGUMENT", "instance.url: needs a port");
    expect_error(&e, "PUT", "/v1/registry/instances", TOK_BOB, "{}", 400, "INVALID_ARGUMENT",
                 "instance.url: is required");
    expect_error(&e, "PUT", "/v1/registry/instances", TOK_BOB,
                 "{\"url\":\"http://h:1/\",\"slug\":\"alice\"}", 400, "INVALID_ARGUMENT",
                 "instance.slug: unknown field");
    expect_error(&e, "PUT", "/v1/registry/instances", TOK_BOB,
                 "{\"url\":\"http://h:1/\",\"tags\":[1]}", 400, "INVALID_ARGUMENT",
                 "instance.tags[0]");
    expect_error(&e, "PUT", "/v1/registry/instances", TOK_READER, "{\"url\":\"http://h:1/\"}", 403,
                 "PERMISSION_DENIED", NULL);

    /* More instances: bob's own, and a few of alice's on other hosts. */
    json_decref(write_wait(&e, "PUT", "/v1/registry/instances", TOK_BOB,
                           "{\"url\":\"http://b.internal:80/\",\"deployment_id\":\"dep-2\"}"));
    for (int i = 0; i < 5; i++) {
        snprintf(body, sizeof(body),
                 "{\"url\":\"grpc://10.0.0.%d:9000\",\"deployment_id\":"
                 "\"dep-%d\"}",
                 i, i % 2 + 1);
        json_decref(write_wait(&e, "PUT", "/v1/registry/instances", TOK_ALICE, body));
    }

    /* Listing: own slug unless admin; filters; pagination. */
    cr_assert_eq(count_instances(&e, "/v1/registry/instances", TOK_ADMIN), 7);
    cr_assert_eq(count_instances(&e, "/v1/registry/instances", TOK_ALICE), 6);
    cr_assert_eq(count_instances(&e, "/v1/registry/instances", TOK_BOB), 1);
    cr_assert_eq(count_instances(&e, "/v1/registry/instances?slug=alice", TOK_BOB), 0);
    cr_assert_eq(count_instances(&e, "/v1/registry/instances", TOK_READER), 0);
    cr_assert_eq(count_instances(&e, "/v1/registry/instances?slug=bob", TOK_ADMIN), 1);
    cr_assert_eq(count_instances(&e, "/v1/registry/instances?deployment_id=dep-2", TOK_ADMIN), 3);
    cr_assert_eq(
        count_instances(&e, "/v1/registry/instances?deployment_id=dep-2&slug=alice", TOK_ADMIN), 2);
    cr_assert_eq(count_instances(&e, "/v1/registry/instances?host=10.0.0.3", TOK_ALICE), 1);
    cr_assert_eq(count_instances(&e, "/v1/registry/instances?status=unknown", TOK_ADMIN), 7);
    cr_assert_eq(count_instances(&e, "/v1/registry/instances?status=healthy", TOK_ADMIN), 0);
    expect_error(&e, "GET", "/v1/registry/instances?limit=501", TOK_ADMIN, NULL, 400,
                 "INVALID_ARGUMENT", "limit: at most 500");
    expect_error(&e, "GET", "/v1/registry/instances?limit=many", TOK_ADMIN, NULL, 400,
                 "INVALID_ARGUMENT", "limit:");
    expect_error(&e, "GET", "/v1/registry/instances?cursor=xyz", TOK_ADMIN, NULL, 400,
                 "INVALID_ARGUMENT", "cursor:");
    expect_error(&e, "GET", "/v1/registry/instances?status=asleep", TOK_ADMIN, NULL, 400,
                 "INVALID_ARGUMENT", "status:");
    char path[300] = "/v1/registry/instances?limit=3";
    size_t seen = 0;
    int pages = 0;
    for (;;) {
        json_t *b = get(&e, path, TOK_ADMIN);
        seen += json_array_size(json_object_get(b, "instances"));
        pages++;
        const char *next = json_string_value(json_object_get(b, "next_cursor"));
        if (!next) {
            cr_assert(json_is_null(json_object_get(b, "next_cursor")), "%s", json_dumps(b, 0));
            json_decref(b);
            break;
        }
        snprintf(path, sizeof(path), "/v1/registry/instances?limit=3&cursor=%s", next);
        json_decref(b);
    }
    cr_assert_eq(seen, 7);
    cr_assert_eq(pages, 3);

    /* Delete: 404 when absent, 403 for another caller, else applied. */
    char del[200];
    snprintf(del, sizeof(del), "/v1/registry/instances/%s", id);
    expect_error(&e, "DELETE", del, TOK_BOB, NULL, 403, "INSTANCE_OWNED_BY_OTHER", "alice");
    expect_error(&e, "DELETE", "/v1/registry/instances/inst-000000000000000000000000", TOK_BOB,
                 NULL, 404, "INSTANCE_NOT_FOUND", NULL);
    expect_error(&e, "DELETE", "/v1/registry/instances/whatever", TOK_BOB, NULL, 404,
                 "INSTANCE_NOT_FOUND", NULL);
    res = write_wait(&e, "DELETE", del, TOK_ALICE, NULL);
    cr_assert(json_is_true(json_object_get(res, "deleted")));
    json_decref(res);
    expect_error(&e, "DELETE", del, TOK_ALICE, NULL, 404, "INSTANCE_NOT_FOUND", NULL);
    cr_assert_eq(count_instances(&e, "/v1/registry/instances", TOK_ADMIN), 6);
    /* The admin may delete anyone's. */
    char bob_id[REGISTRY_INSTANCE_ID_LEN + 1];
    registry_instance_id("http://b.internal:80/", bob_id);
    snprintf(del, sizeof(del), "/v1/registry/instances/%s", bob_id);
    json_decref(write_wait(&e, "DELETE", del, TOK_ADMIN, NULL));
    cr_assert_eq(count_instances(&e, "/v1/registry/instances", TOK_ADMIN), 5);
    env_stop(&e);
}

Test(registry_api, nodes_with_the_stale_flag, .timeout = 120)
{
    env_t e;
    env_start(&e);
    loom_test_sql(e.url, "INSERT INTO loom_nodes VALUES "
                         "('00000000-0000-4000-8000-0000000000c1', 'api', 'http://10.0.0.1:8080', "
                         "'eu', '1.0', now() - interval '1 hour', now()), "
                         "('00000000-0000-4000-8000-0000000000c2', 'worker', NULL, 'eu', '1.0', "
                         "now() - interval '1 hour', now() - interval '30 seconds')");
    json_t *b = get(&e, "/v1/registry/nodes", TOK_READER);
    json_t *nodes = json_object_get(b, "nodes");
    cr_assert_eq(json_array_size(nodes), 2, "%s", json_dumps(b, 0));
    for (size_t i = 0; i < 2; i++) {
        json_t *n = json_array_get(nodes, i);
        const char *nid = json_string_value(json_object_get(n, "id"));
        bool want_stale = strcmp(nid, "00000000-0000-4000-8000-0000000000c2") == 0;
        cr_assert_eq(json_is_true(json_object_get(n, "stale")), want_stale, "%s", json_dumps(n, 0));
        cr_assert(json_is_string(json_object_get(n, "last_heartbeat")));
        cr_assert(json_is_string(json_object_get(n, "started_at")));
        cr_assert(json_is_string(json_object_get(n, "site")));
        cr_assert(json_is_string(json_object_get(n, "version")));
        cr_assert(json_is_string(json_object_get(n, "role")));
    }
    json_decref(b);
    expect_error(&e, "GET", "/v1/registry/nodes", TOK_OTHER, NULL, 403, "PERMISSION_DENIED", NULL);
    /* /self is the node that serves the request (this gateway's node id). */
    b = get(&e, "/v1/registry/nodes/self", TOK_READER);
    cr_assert_str_eq(json_string_value(json_object_get(b, "id")),
                     "00000000-0000-4000-8000-0000000000c1", "%s", json_dumps(b, 0));
    cr_assert_str_eq(json_string_value(json_object_get(b, "role")), "api");
    cr_assert(json_is_false(json_object_get(b, "stale")), "%s", json_dumps(b, 0));
    json_decref(b);
    env_stop(&e);
}
