/*
 * docs/openapi.json and the gateway's routes (loom_test_full_app()'s, plus the
 * gateway's own GET /healthz, /readyz and /metrics) must describe the same
 * endpoints: a route cannot be added without its operation, nor an
 * operation outlive its route. Each operation names the route's scope in
 * x-loom-scope (null or absent: none), has an operationId and at least one
 * response, and every $ref of the document resolves within it.
 */
#include "api.h"
#include "services.h"
#include "loom/gateway.h"
#include "../../ops/messages/model.h"
#include "../../ops/registry/model.h"

#include <criterion/criterion.h>
#include <ctype.h>
#include <jansson.h>
#include <stdio.h>
#include <strings.h>
#include <string.h>

static const char *const http_methods[] = {"get",  "put",     "post",  "delete",
                                           "head", "options", "patch", "trace"};
#define N_METHODS (sizeof(http_methods) / sizeof(http_methods[0]))

static const loom_route_t builtins[] = {
    {"GET", "/healthz", NULL, NULL},
    {"GET", "/readyz", NULL, NULL},
    {"GET", "/metrics", NULL, NULL},
};
#define N_BUILTINS (sizeof(builtins) / sizeof(builtins[0]))

static json_t *load_doc(void)
{
    json_error_t jerr;
    json_t *doc = json_load_file(LOOM_TEST_OPENAPI, 0, &jerr);
    cr_assert_not_null(doc, "%s: line %d: %s", LOOM_TEST_OPENAPI, jerr.line, jerr.text);
    cr_assert(json_is_object(json_object_get(doc, "paths")), "%s has no \"paths\" object",
              LOOM_TEST_OPENAPI);
    return doc;
}

static void lower(const char *in, char *out, size_t size)
{
    size_t i = 0;
    for (; in[i] && i + 1 < size; i++)
        out[i] = (char)tolower((unsigned char)in[i]);
    out[i] = '\0';
}

/* The operation of method+path in the document, or NULL. */
static json_t *operation(json_t *doc, const char *method, const char *path)
{
    char m[16];
    lower(method, m, sizeof(m));
    return json_object_get(json_object_get(json_object_get(doc, "paths"), path), m);
}

static bool is_route(const loom_route_t *routes, size_t n, const char *method, const char *path)
{
    for (size_t i = 0; i < n; i++)
        if (strcasecmp(routes[i].method, method) == 0 && strcmp(routes[i].pattern, path) == 0)
            return true;
    return false;
}

Test(openapi, document_is_openapi_3)
{
    json_t *doc = load_doc();
    cr_expect_str_eq(json_string_value(json_object_get(doc, "openapi")), "3.0.3");
    cr_expect(json_is_object(json_object_get(doc, "info")), "no \"info\" object");
    json_t *bearer = json_object_get(
        json_object_get(json_object_get(doc, "components"), "securitySchemes"), "bearer");
    cr_expect_str_eq(json_string_value(json_object_get(bearer, "scheme")), "bearer",
                     "components.securitySchemes.bearer must be an http bearer scheme");
    json_decref(doc);
}

Test(openapi, every_route_is_documented_with_its_scope)
{
    json_t *doc = load_doc();
    size_t n = loom_test_full_app()->n_routes;
    const loom_route_t *routes = loom_test_full_app()->routes;
    cr_assert_gt(n, 0);
    for (size_t i = 0; i < n; i++) {
        const loom_route_t *r = &routes[i];
        json_t *op = operation(doc, r->method, r->pattern);
        cr_expect(json_is_object(op), "route %s %s is not in %s", r->method, r->pattern,
                  LOOM_TEST_OPENAPI);
        if (!json_is_object(op))
            continue;
        json_t *scope = json_object_get(op, "x-loom-scope");
        if (r->scope)
            cr_expect(json_is_string(scope) && strcmp(json_string_value(scope), r->scope) == 0,
                      "route %s %s: x-loom-scope must be \"%s\"", r->method, r->pattern, r->scope);
        else
            cr_expect(!scope || json_is_null(scope),
                      "route %s %s needs no scope: x-loom-scope must be null or absent", r->method,
                      r->pattern);
        /* a route needs a token: not "security": [] */
        json_t *sec = json_object_get(op, "security");
        if (!sec)
            sec = json_object_get(doc, "security");
        cr_expect(json_array_size(sec) > 0, "route %s %s needs a bearer token: security is empty",
                  r->method, r->pattern);
    }
    for (size_t i = 0; i < N_BUILTINS; i++) {
        const loom_route_t *r = &builtins[i];
        json_t *op = operation(doc, r->method, r->pattern);
        cr_expect(json_is_object(op), "built-in %s %s is not in %s", r->method, r->pattern,
                  LOOM_TEST_OPENAPI);
        if (!json_is_object(op))
            continue;
        json_t *scope = json_object_get(op, "x-loom-scope");
        cr_expect(!scope || json_is_null(scope), "built-in %s %s: x-loom-scope must be null",
                  r->method, r->pattern);
        json_t *sec = json_object_get(op, "security");
        cr_expect(json_is_array(sec) && json_array_size(sec) == 0,
                  "built-in %s %s needs no token: security must be []", r->method, r->pattern);
    }
    json_decref(doc);
}

Test(openapi, every_documented_operation_is_a_route)
{
    json_t *doc = load_doc();
    size_t n = loom_test_full_app()->n_routes;
    const loom_route_t *routes = loom_test_full_app()->routes;
    json_t *ids = json_object();
    const char *path;
    json_t *item;
    json_object_foreach(json_object_get(doc, "paths"), path, item)
    {
        bool any = false;
        for (size_t m = 0; m < N_METHODS; m++) {
            json_t *op = json_object_get(item, http_methods[m]);
            if (!op)
                continue;
            any = true;
            char up[16];
            snprintf(up, sizeof(up), "%s", http_methods[m]);
            for (char *c = up; *c; c++)
                *c = (char)toupper((unsigned char)*c);
            cr_expect(is_route(routes, n, up, path) || is_route(builtins, N_BUILTINS, up, path),
                      "%s documents %s %s, which is not a route of the app nor a "
                      "built-in endpoint",
                      LOOM_TEST_OPENAPI, up, path);
            const char *id = json_string_value(json_object_get(op, "operationId"));
            cr_expect(id && *id, "%s %s has no operationId", up, path);
            if (id && *id) {
                cr_expect(!json_object_get(ids, id), "%s %s: operationId \"%s\" is used twice", up,
                          path, id);
                json_object_set_new(ids, id, json_true());
            }
            json_t *responses = json_object_get(op, "responses");
            cr_expect(json_is_object(responses) && json_object_size(responses) > 0,
                      "%s %s has no responses", up, path);
        }
        cr_expect(any, "path %s has no operation", path);
    }
    json_decref(ids);
    json_decref(doc);
}

/* The value a local reference ("#/a/b~1c") points at, or NULL. */
static json_t *resolve(json_t *doc, const char *ref)
{
    if (strncmp(ref, "#/", 2) != 0)
        return NULL;
    json_t *at = doc;
    const char *p = ref + 2;
    while (at) {
        size_t len = strcspn(p, "/");
        char tok[256];
        size_t k = 0;
        for (size_t i = 0; i < len && k + 1 < sizeof(tok); i++) {
            if (p[i] == '~' && i + 1 < len && (p[i + 1] == '0' || p[i + 1] == '1')) {
                tok[k++] = p[i + 1] == '0' ? '~' : '/';
                i++;
            } else {
                tok[k++] = p[i];
            }
        }
        tok[k] = '\0';
        at = json_object_get(at, tok);
        if (!p[len])
            break;
        p += len + 1;
    }
    return at;
}

static size_t check_refs(json_t *doc, json_t *v, const char *where)
{
    size_t n = 0;
    if (json_is_object(v)) {
        const char *k;
        json_t *child;
        json_object_foreach(v, k, child)
        {
            if (strcmp(k, "$ref") == 0) {
                const char *ref = json_string_value(child);
                cr_expect(ref && resolve(doc, ref), "%s: $ref \"%s\" does not resolve in %s", where,
                          ref ? ref : "(not a string)", LOOM_TEST_OPENAPI);
                n++;
            } else {
                char sub[512]; /* a JSON pointer: "/" in a key is "~1" */
                size_t len = (size_t)snprintf(sub, sizeof(sub), "%s/", where);
                for (const char *c = k; *c && len + 3 < sizeof(sub); c++)
                    len += (size_t)snprintf(sub + len, sizeof(sub) - len, "%s",
                                            *c == '/'   ? "~1"
                                            : *c == '~' ? "~0"
                                                        : (char[]){*c, 0});
                n += check_refs(doc, child, sub);
            }
        }
    } else if (json_is_array(v)) {
        size_t i;
        json_t *child;
        json_array_foreach(v, i, child)
        {
            char sub[512];
            snprintf(sub, sizeof(sub), "%s/%zu", where, i);
            n += check_refs(doc, child, sub);
        }
    }
    return n;
}

Test(openapi, every_ref_resolves)
{
    json_t *doc = load_doc();
    cr_expect_gt(check_refs(doc, doc, "#"), 0, "no $ref at all: is the document complete?");
    json_decref(doc);
}

/* Each {param} of a path has an "in": "path" parameter (path item or operation). */
static bool has_path_param(json_t *doc, json_t *params, const char *name)
{
    size_t i;
    json_t *p;
    json_array_foreach(params, i, p)
    {
        const char *ref = json_string_value(json_object_get(p, "$ref"));
        if (ref)
            p = resolve(doc, ref);
        const char *in = json_string_value(json_object_get(p, "in"));
        const char *pname = json_string_value(json_object_get(p, "name"));
        if (in && pname && strcmp(in, "path") == 0 && strcmp(pname, name) == 0)
            return true;
    }
    return false;
}

Test(openapi, every_path_parameter_is_declared)
{
    json_t *doc = load_doc();
    const char *path;
    json_t *item;
    json_object_foreach(json_object_get(doc, "paths"), path, item)
    {
        for (const char *b = strchr(path, '{'); b; b = strchr(b + 1, '{')) {
            char name[64];
            snprintf(name, sizeof(name), "%.*s", (int)strcspn(b + 1, "}"), b + 1);
            bool on_item = has_path_param(doc, json_object_get(item, "parameters"), name);
            for (size_t m = 0; m < N_METHODS; m++) {
                json_t *op = json_object_get(item, http_methods[m]);
                if (op)
                    cr_expect(
                        on_item || has_path_param(doc, json_object_get(op, "parameters"), name),
                        "%s %s: path parameter {%s} is not declared", http_methods[m], path, name);
            }
        }
    }
    json_decref(doc);
}

/* The value at a "/"-separated path of object keys (array indexes not
 * needed here). */
static json_t *at(json_t *doc, const char *path)
{
    char buf[512];
    snprintf(buf, sizeof(buf), "%s", path);
    json_t *v = doc;
    for (char *save = NULL, *k = strtok_r(buf, "/", &save); k && v; k = strtok_r(NULL, "/", &save))
        v = json_object_get(v, k);
    return v;
}

static long long num_at(json_t *doc, const char *path)
{
    json_t *v = at(doc, path);
    cr_assert(json_is_integer(v), "%s is not an integer in the document", path);
    return json_integer_value(v);
}

/* The limits the server enforces are the document's, from the same constants. */
Test(openapi, limits_are_the_servers)
{
    json_t *doc = load_doc();
    cr_expect_eq(num_at(doc, "components/schemas/Msgs/properties/msgs/maxItems"),
                 MESSAGES_BATCH_MAX);
    cr_expect_eq(num_at(doc, "components/schemas/Ids/properties/ids/maxItems"), MESSAGES_BATCH_MAX);
    cr_expect_eq(num_at(doc, "components/schemas/Ids/properties/ids/items/maxLength"),
                 MESSAGES_ID_MAX);
    cr_expect_eq(num_at(doc, "components/schemas/CloudEvent/properties/id/maxLength"),
                 MESSAGES_ID_MAX);
    cr_expect_eq(num_at(doc, "components/parameters/MessageIdPath/schema/maxLength"),
                 MESSAGES_ID_MAX);
    cr_expect_eq(num_at(doc, "components/parameters/IdempotencyKey/schema/maxLength"),
                 LOOM_GATEWAY_IDEMPOTENCY_KEY_MAX);
    cr_expect_eq(num_at(doc, "components/schemas/Definition/properties/id/maxLength"),
                 REGISTRY_ID_MAX);
    /* Empty optional CloudEvent attributes are refused. */
    cr_expect_eq(num_at(doc, "components/schemas/CloudEvent/properties/subject/minLength"), 1);
    cr_expect_eq(num_at(doc, "components/schemas/CloudEvent/properties/datacontenttype/minLength"),
                 1);
    /* Exactly one of image and repository. */
    cr_expect(json_is_array(at(doc, "components/schemas/Definition/oneOf")));
    /* The statuses an instance may have. */
    json_t *st = at(doc, "components/schemas/Instance/properties/status/enum");
    size_t n = 0;
    for (const char *const *s = registry_statuses; *s; s++, n++) {
        bool found = false;
        for (size_t i = 0; i < json_array_size(st); i++)
            found = found || strcmp(json_string_value(json_array_get(st, i)), *s) == 0;
        cr_expect(found, "status %s is not in the document", *s);
    }
    cr_expect_eq(json_array_size(st), n);
    /* Every operation may be rate limited. */
    const char *path;
    json_t *item;
    json_object_foreach(json_object_get(doc, "paths"), path, item)
    {
        const char *m;
        json_t *op;
        json_object_foreach(item, m, op)
        {
            if (strcmp(m, "parameters") != 0)
                cr_expect_not_null(json_object_get(json_object_get(op, "responses"), "429"),
                                   "%s %s documents no 429", m, path);
        }
    }
    json_decref(doc);
}
