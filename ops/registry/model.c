/*
 * model.c: the registry's model (model.h): field tables and the one function
 * that walks them, the definition and instance checks built on them, urls
 * and instance ids, and instance rows as JSON.
 */
#include "model.h"

#include "loom/clock.h"
#include "loom/sha256.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *const registry_statuses[] = {"unknown",     "healthy",    "degraded",
                                         "unreachable", "not_probed", NULL};

const loom_error_code_t registry_error_codes[REGISTRY_ERR__COUNT] = {
    {"DEFINITION_NOT_FOUND", LOOM_ERR_NOT_FOUND, false,
     "No service definition with that id is registered."},
    {"INSTANCE_NOT_FOUND", LOOM_ERR_NOT_FOUND, false,
     "No service instance with that id is registered."},
    {"INSTANCE_OWNED_BY_OTHER", LOOM_ERR_FORBIDDEN, false,
     "The instance's url was registered by another caller; only it or a `registry:admin` "
     "caller may change or delete it."},
    {"NODE_NOT_FOUND", LOOM_ERR_NOT_FOUND, false,
     "No Loom node with that id ever sent a heartbeat."},
    {"DEFINITION_OWNED_BY_OTHER", LOOM_ERR_FORBIDDEN, false,
     "The definition was put by another caller; only it or a `registry:admin` caller may "
     "replace or delete it."},
};

/* ---- small checks ------------------------------------------------------------------ */

static int bad(loom_error_t *err, const char *path, const char *what)
{
    return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "%s: %s", path, what);
}

bool registry_slug_valid(const char *s, size_t max)
{
    size_t n = 0;
    for (; s[n]; n++)
        if (!(islower((unsigned char)s[n]) || isdigit((unsigned char)s[n]) || s[n] == '-'))
            return false;
    return n > 0 && n <= max;
}

bool registry_status_valid(const char *s)
{
    for (const char *const *st = registry_statuses; *st; st++)
        if (strcmp(*st, s) == 0)
            return true;
    return false;
}

/* Printable ASCII or UTF-8 without controls and, when no_space, without spaces. */
static bool text_clean(const char *s, bool no_space)
{
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c < 0x20 || c == 0x7f || (no_space && c == ' '))
            return false;
    }
    return true;
}

int registry_keys(const json_t *obj, const char *path, const char *const *allowed,
                  loom_error_t *err)
{
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)obj, k, v)
    {
        bool ok = false;
        for (const char *const *a = allowed; a && *a && !ok; a++)
            ok = strcmp(*a, k) == 0;
        if (!ok)
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "%s.%s: unknown field", path, k);
    }
    return 0;
}

/* ---- the walker ------------------------------------------------------------------- */

int registry_value_check(const json_t *v, const char *path, const registry_field_t *f,
                         loom_error_t *err)
{
    if (!v || json_is_null(v))
        return f->flags & REGISTRY_REQUIRED ? bad(err, path, "is required") : 0;
    char p[300];
    int rc = 0;
    switch (f->kind) {
    case REGISTRY_TEXT: {
        size_t len = json_string_length(v);
        bool empty_ok = f->flags & REGISTRY_EMPTY_OK, no_space = f->flags & REGISTRY_NO_SPACE;
        if (!json_is_string(v))
            return bad(err, path, "must be a string");
        if ((len == 0 && !empty_ok) || len > f->max || strlen(json_string_value(v)) != len ||
            !text_clean(json_string_value(v), no_space))
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                                  "%s: must be a string of %d to %zu bytes without control "
                                  "characters%s",
                                  path, empty_ok ? 0 : 1, f->max, no_space ? " or spaces" : "");
        break;
    }
    case REGISTRY_BYTES:
        if (!json_is_string(v) || json_string_length(v) > f->max)
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                                  "%s: must be a string of at most %zu bytes", path, f->max);
        break;
    case REGISTRY_PORT:
        if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > 65535)
            return bad(err, path, "must be 1-65535");
        break;
    case REGISTRY_BOOL:
        if (!json_is_boolean(v))
            return bad(err, path, "must be true or false");
        break;
    case REGISTRY_OBJECT:
        if (!json_is_object(v))
            return bad(err, path, "must be an object");
        rc = registry_fields_check(v, path, f->fields, NULL, err);
        break;
    case REGISTRY_MAP: {
        if (!json_is_object(v))
            return bad(err, path, "must be an object");
        if (json_object_size(v) > f->max)
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "%s: at most %zu entries", path,
                                  f->max);
        const char *k;
        json_t *m;
        json_object_foreach((json_t *)v, k, m)
        {
            snprintf(p, sizeof(p), "%s.%s", path, k);
            if ((rc = registry_value_check(m, p, f->items, err)) != 0)
                return rc;
        }
        break;
    }
    case REGISTRY_LIST: {
        if (!json_is_array(v))
            return bad(err, path, "must be an array");
        if (json_array_size(v) > f->max)
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "%s: at most %zu entries", path,
                                  f->max);
        size_t i;
        json_t *m;
        json_array_foreach(v, i, m)
        {
            snprintf(p, sizeof(p), "%s[%zu]", path, i);
            if (json_is_null(m)) /* an entry is there: null is not "absent" */
                return bad(err, p, "must not be null");
            if ((rc = registry_value_check(m, p, f->items, err)) != 0)
                return rc;
        }
        break;
    }
    }
    if (rc == 0 && f->check)
        rc = f->check(v, path, err);
    return rc;
}

int registry_fields_check(const json_t *obj, const char *path, const registry_field_t *fields,
                          const char *const *extra, loom_error_t *err)
{
    if (!json_is_object(obj))
        return bad(err, path, "must be an object");
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)obj, k, v)
    {
        bool ok = false;
        for (const registry_field_t *f = fields; f->key && !ok; f++)
            ok = strcmp(f->key, k) == 0;
        for (const char *const *a = extra; a && *a && !ok; a++)
            ok = strcmp(*a, k) == 0;
        if (!ok)
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "%s.%s: unknown field", path, k);
    }
    for (const registry_field_t *f = fields; f->key; f++) {
        char p[300];
        snprintf(p, sizeof(p), "%s.%s", path, f->key);
        int rc = registry_value_check(json_object_get(obj, f->key), p, f, err);
        if (rc != 0)
            return rc;
    }
    return 0;
}

/* ---- definitions ------------------------------------------------------------------- */

static int definition_id_rule(const json_t *v, const char *path, loom_error_t *err)
{
    return registry_slug_valid(json_string_value(v), REGISTRY_ID_MAX)
               ? 0
               : bad(err, path, "must be 1 to 64 of [a-z0-9-]");
}

static int envar_key_rule(const json_t *v, const char *path, loom_error_t *err)
{
    const char *s = json_string_value(v);
    bool ok = isalpha((unsigned char)s[0]) || s[0] == '_';
    for (const char *c = s; *c && ok; c++)
        ok = isalnum((unsigned char)*c) || *c == '_';
    return ok ? 0 : bad(err, path, "must match [A-Za-z_][A-Za-z0-9_]*");
}

static int envars_unique_rule(const json_t *v, const char *path, loom_error_t *err)
{
    for (size_t i = 1; i < json_array_size(v); i++) {
        const char *k = json_string_value(json_object_get(json_array_get(v, i), "key"));
        for (size_t j = 0; j < i; j++)
            if (strcmp(json_string_value(json_object_get(json_array_get(v, j), "key")), k) == 0) {
                char p[300];
                snprintf(p, sizeof(p), "%s[%zu].key", path, i);
                return bad(err, p, "is set twice");
            }
    }
    return 0;
}

static const registry_field_t port_item = {"port", REGISTRY_PORT};

static const registry_field_t image_fields[] = {
    {"name", REGISTRY_TEXT, REGISTRY_REQUIRED | REGISTRY_NO_SPACE, REGISTRY_TEXT_MAX},
    {"internal_ports", REGISTRY_LIST, 0, REGISTRY_LIST_MAX, .items = &port_item},
    {NULL}};

static const registry_field_t repository_fields[] = {
    {"url", REGISTRY_TEXT, REGISTRY_REQUIRED | REGISTRY_NO_SPACE, REGISTRY_URL_MAX},
    {"version", REGISTRY_TEXT, REGISTRY_NO_SPACE, REGISTRY_TEXT_MAX},
    {"build_context", REGISTRY_TEXT, 0, REGISTRY_TEXT_MAX},
    {"container_file", REGISTRY_TEXT, 0, REGISTRY_TEXT_MAX},
    {"internal_ports", REGISTRY_LIST, 0, REGISTRY_LIST_MAX, .items = &port_item},
    {NULL}};

static const registry_field_t metadata_value = {"value", REGISTRY_TEXT, REGISTRY_EMPTY_OK,
                                                REGISTRY_METADATA_MAX};

static const registry_field_t api_spec_fields[] = {
    {"url", REGISTRY_TEXT, REGISTRY_REQUIRED | REGISTRY_NO_SPACE, REGISTRY_URL_MAX},
    {"protocol_type", REGISTRY_TEXT, REGISTRY_NO_SPACE, REGISTRY_SHORT_MAX},
    {"version", REGISTRY_TEXT, REGISTRY_NO_SPACE, REGISTRY_SHORT_MAX},
    {"metadata", REGISTRY_MAP, 0, REGISTRY_LIST_MAX, .items = &metadata_value},
    {NULL}};
static const registry_field_t api_spec = {"api_spec", REGISTRY_OBJECT, 0, 0, api_spec_fields};

static const registry_field_t client_fields[] = {
    {"language", REGISTRY_TEXT, REGISTRY_REQUIRED | REGISTRY_NO_SPACE, REGISTRY_SHORT_MAX},
    {"url", REGISTRY_TEXT, REGISTRY_REQUIRED | REGISTRY_NO_SPACE, REGISTRY_URL_MAX},
    {NULL}};
static const registry_field_t client = {"client", REGISTRY_OBJECT, 0, 0, client_fields};

static const registry_field_t envar_fields[] = {
    {"key", REGISTRY_TEXT, REGISTRY_REQUIRED | REGISTRY_NO_SPACE, REGISTRY_ENVAR_KEY_MAX,
     .check = envar_key_rule},
    {"value", REGISTRY_BYTES, REGISTRY_REQUIRED, REGISTRY_ENVAR_VALUE_MAX},
    {NULL}};
static const registry_field_t envar = {"envar", REGISTRY_OBJECT, 0, 0, envar_fields};

static const registry_field_t port_map_fields[] = {{"internal", REGISTRY_PORT, REGISTRY_REQUIRED},
                                                   {"host", REGISTRY_PORT, REGISTRY_REQUIRED},
                                                   {NULL}};
static const registry_field_t port_map = {"port", REGISTRY_OBJECT, 0, 0, port_map_fields};

static const registry_field_t definition_fields[] = {
    {"id", REGISTRY_TEXT, REGISTRY_REQUIRED | REGISTRY_NO_SPACE, REGISTRY_ID_MAX,
     .check = definition_id_rule},
    {"image", REGISTRY_OBJECT, 0, 0, image_fields},
    {"repository", REGISTRY_OBJECT, 0, 0, repository_fields},
    {"api_specs", REGISTRY_LIST, 0, REGISTRY_LIST_MAX, .items = &api_spec},
    {"clients", REGISTRY_LIST, 0, REGISTRY_LIST_MAX, .items = &client},
    {"envars", REGISTRY_LIST, 0, REGISTRY_ENVARS_MAX, .items = &envar, .check = envars_unique_rule},
    {"ports", REGISTRY_LIST, 0, REGISTRY_LIST_MAX, .items = &port_map},
    {NULL}};

static int definition_rule(const json_t *def, const char *path, loom_error_t *err)
{
    json_t *image = json_object_get(def, "image"), *repo = json_object_get(def, "repository");
    bool has_image = image && !json_is_null(image), has_repo = repo && !json_is_null(repo);
    if (has_image == has_repo)
        return bad(err, path, "needs exactly one of \"image\" and \"repository\"");
    return 0;
}

static const registry_field_t definition = {"definition",      REGISTRY_OBJECT,
                                            REGISTRY_REQUIRED, 0,
                                            definition_fields, .check = definition_rule};

int registry_definition_check(const json_t *def, const char *path, loom_error_t *err)
{
    return registry_value_check(def, path, &definition, err);
}

/* ---- instances ------------------------------------------------------------------- */

int registry_url_parse(const char *url, const char *path, registry_url_t *out, loom_error_t *err)
{
    size_t len = strlen(url);
    if (len == 0 || len > REGISTRY_URL_MAX || !text_clean(url, true))
        return bad(err, path, "must be an absolute url of at most 2048 bytes without spaces");
    const char *p = url;
    if (!isalpha((unsigned char)*p))
        return bad(err, path, "must be an absolute url (scheme://host:port/...)");
    while (isalnum((unsigned char)*p) || *p == '+' || *p == '-' || *p == '.')
        p++;
    if (strncmp(p, "://", 3) != 0)
        return bad(err, path, "must be an absolute url (scheme://host:port/...)");
    const char *auth = p + 3;
    size_t alen = strcspn(auth, "/?#");
    if (memchr(auth, '@', alen))
        return bad(err, path, "must not carry user info");
    const char *host = auth, *port = NULL;
    size_t hlen;
    if (auth[0] == '[') {
        const char *close = memchr(auth, ']', alen);
        if (!close)
            return bad(err, path, "has an IPv6 host without \"]\"");
        host = auth + 1;
        hlen = (size_t)(close - host);
        if (close + 1 < auth + alen && close[1] == ':')
            port = close + 2;
        char v6[64];
        struct in6_addr a6;
        if (hlen == 0 || hlen >= sizeof(v6))
            return bad(err, path, "has an invalid IPv6 host");
        memcpy(v6, host, hlen);
        v6[hlen] = '\0';
        if (inet_pton(AF_INET6, v6, &a6) != 1)
            return bad(err, path, "has an invalid IPv6 host");
    } else {
        const char *colon = NULL;
        for (const char *c = auth; c < auth + alen; c++)
            if (*c == ':')
                colon = c;
        hlen = colon ? (size_t)(colon - auth) : alen;
        if (colon)
            port = colon + 1;
        if (hlen == 0 || hlen > REGISTRY_HOST_MAX)
            return bad(err, path, "needs a host of 1 to 253 bytes");
        for (size_t i = 0; i < hlen; i++)
            if (!isalnum((unsigned char)host[i]) && host[i] != '.' && host[i] != '-' &&
                host[i] != '_')
                return bad(err, path,
                           "has a host with characters other than "
                           "[A-Za-z0-9._-]");
    }
    if (!port || port >= auth + alen)
        return bad(err, path, "needs a port (scheme://host:port/...)");
    long n = 0;
    const char *c = port;
    for (; c < auth + alen && isdigit((unsigned char)*c) && n <= 65535; c++)
        n = n * 10 + (*c - '0');
    if (c != auth + alen || n < 1 || n > 65535)
        return bad(err, path, "has a port that is not 1-65535");
    if (out) {
        for (size_t i = 0; i < hlen; i++)
            out->host[i] = (char)tolower((unsigned char)host[i]);
        out->host[hlen] = '\0';
        out->port = (int)n;
    }
    return 0;
}

/* The instance id of a url: "inst-" + the first 24 hex digits of SHA-256(url). */
void registry_instance_id(const char *url, char out[REGISTRY_INSTANCE_ID_LEN + 1])
{
    char hex[2 * LOOM_SHA256_LEN + 1];
    loom_sha256_hex(url, strlen(url), hex);
    snprintf(out, REGISTRY_INSTANCE_ID_LEN + 1, "inst-%.24s", hex);
}

/* "inst-" + 24 lower-case hex digits. */
bool registry_instance_id_valid(const char *id)
{
    if (strncmp(id, "inst-", 5) != 0 || strlen(id) != REGISTRY_INSTANCE_ID_LEN)
        return false;
    for (const char *c = id + 5; *c; c++)
        if (!isdigit((unsigned char)*c) && !(*c >= 'a' && *c <= 'f'))
            return false;
    return true;
}

static int instance_url_rule(const json_t *v, const char *path, loom_error_t *err)
{
    return registry_url_parse(json_string_value(v), path, NULL, err);
}

static const registry_field_t tag = {"tag", REGISTRY_TEXT, 0, REGISTRY_TAG_MAX};

static const registry_field_t instance_fields[] = {
    {"url", REGISTRY_TEXT, REGISTRY_REQUIRED | REGISTRY_NO_SPACE, REGISTRY_URL_MAX,
     .check = instance_url_rule},
    {"deployment_id", REGISTRY_TEXT, REGISTRY_NO_SPACE, REGISTRY_DEPLOYMENT_MAX},
    {"node_url", REGISTRY_TEXT, REGISTRY_NO_SPACE, REGISTRY_URL_MAX},
    {"tags", REGISTRY_LIST, 0, REGISTRY_LIST_MAX, .items = &tag},
    {NULL}};

int registry_instance_check(const json_t *body, const char *const *extra,
                            registry_instance_in_t *in, loom_error_t *err)
{
    int rc = registry_fields_check(body, "instance", instance_fields, extra, err);
    if (rc != 0)
        return rc;
    memset(in, 0, sizeof(*in));
    in->url = json_string_value(json_object_get(body, "url"));
    in->deployment_id = json_string_value(json_object_get(body, "deployment_id"));
    in->node_url = json_string_value(json_object_get(body, "node_url"));
    json_t *tags = json_object_get(body, "tags");
    in->tags = json_is_array(tags) ? tags : NULL;
    if ((rc = registry_url_parse(in->url, "instance.url", &in->parsed, err)) != 0)
        return rc;
    registry_instance_id(in->url, in->id);
    return 0;
}

/* ---- commands ---------------------------------------------------------------------- */

const char *const registry_caller_keys[] = {"caller", "admin", NULL};

static const registry_field_t caller_fields[] = {
    {"caller", REGISTRY_TEXT, REGISTRY_REQUIRED | REGISTRY_NO_SPACE, REGISTRY_CALLER_MAX},
    {"admin", REGISTRY_BOOL},
    {NULL}};

int registry_caller_of(const json_t *d, const char **caller, bool *admin, loom_error_t *err)
{
    for (const registry_field_t *f = caller_fields; f->key; f++) {
        char p[64];
        snprintf(p, sizeof(p), "command.%s", f->key);
        int rc = registry_value_check(json_object_get(d, f->key), p, f, err);
        if (rc != 0)
            return rc;
    }
    *caller = json_string_value(json_object_get(d, "caller"));
    *admin = json_is_true(json_object_get(d, "admin"));
    return 0;
}

/* ---- rows ------------------------------------------------------------------------ */

const char *registry_col(const PGresult *res, int row, const char *col)
{
    int c = PQfnumber(res, col);
    return c < 0 || PQgetisnull(res, row, c) ? NULL : PQgetvalue(res, row, c);
}

static void registry_set_time(json_t *o, const char *key, const char *us)
{
    if (!us)
        return;
    char buf[40];
    loom_rfc3339_format(strtoll(us, NULL, 10), buf, sizeof(buf));
    json_object_set_new(o, key, json_string(buf));
}

static void registry_set_text(json_t *o, const char *key, const char *v)
{
    if (v)
        json_object_set_new(o, key, json_string(v));
}

/*
 * An instance row as the API shows it: {id, url, slug, host, port,
 * deployment_id?, node_url?, status, last_heartbeat?, details?, tags[],
 * registered_at, updated_at}. Optional members are left out when unset.
 * Returns a new reference.
 */
json_t *registry_instance_json(const PGresult *res, int row)
{
    json_t *o = json_object();
    registry_set_text(o, "id", registry_col(res, row, "id"));
    registry_set_text(o, "url", registry_col(res, row, "url"));
    registry_set_text(o, "slug", registry_col(res, row, "slug"));
    registry_set_text(o, "host", registry_col(res, row, "host"));
    const char *port = registry_col(res, row, "port");
    if (port)
        json_object_set_new(o, "port", json_integer(atoi(port)));
    registry_set_text(o, "deployment_id", registry_col(res, row, "deployment_id"));
    registry_set_text(o, "node_url", registry_col(res, row, "node_url"));
    registry_set_text(o, "status", registry_col(res, row, "status"));
    registry_set_time(o, "last_heartbeat", registry_col(res, row, "heartbeat_us"));
    registry_set_text(o, "details", registry_col(res, row, "details"));
    const char *tags = registry_col(res, row, "tags");
    json_t *t = tags ? json_loads(tags, 0, NULL) : NULL;
    json_object_set_new(o, "tags", json_is_array(t) ? t : json_array());
    if (t && !json_is_array(t))
        json_decref(t);
    registry_set_time(o, "registered_at", registry_col(res, row, "registered_us"));
    registry_set_time(o, "updated_at", registry_col(res, row, "updated_us"));
    return o;
}
