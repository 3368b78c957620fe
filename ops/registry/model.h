/*
 * model.h: the data model of the registry service (SERVICES.md section 2),
 * shared by its three layers: api/registry.c checks requests with it (a bad
 * field answers 400 before anything is published), consumers/registry/
 * checks every command again (a command may come from anything that can
 * publish to Kafka, not only the gateway), and the ops and the consumer turn
 * instance rows into the same JSON shape.
 *
 * Header-only (static functions), so that api/, consumers/ and ops/ share it
 * without their libraries depending on one another: it needs only jansson,
 * libpq and the engine's public headers. Every check fills err with
 * INVALID_ARGUMENT and a message that starts with the field's path, e.g.
 * `definition.image.internal_ports[0]: must be 1-65535`.
 *
 * Instance ids are derived from the url ("inst-" + 24 hex digits of its
 * SHA-256): a url has one id forever, so the route, a retried command and a
 * re-registration all agree on it without a lookup, and two first
 * registrations of one url racing each other cannot make two ids.
 */
#ifndef LOOM_OPS_REGISTRY_MODEL_H
#define LOOM_OPS_REGISTRY_MODEL_H

#include "loom/clock.h"
#include "loom/error.h"
#include "loom/sha256.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- limits and names ------------------------------------------------------------- */

#define REGISTRY_ID_MAX          64   /* definition ids */
#define REGISTRY_URL_MAX         2048 /* every url field */
#define REGISTRY_TEXT_MAX        512  /* names, versions, paths */
#define REGISTRY_LIST_MAX        64   /* ports, api specs, clients, tags */
#define REGISTRY_ENVARS_MAX      256
#define REGISTRY_ENVAR_VALUE_MAX 32768
#define REGISTRY_TAG_MAX         128
#define REGISTRY_DEPLOYMENT_MAX  128
#define REGISTRY_HOST_MAX        253
#define REGISTRY_LIST_LIMIT_MAX  500 /* instances per page */
#define REGISTRY_LIST_LIMIT_DEF  100
#define REGISTRY_INSTANCE_ID_LEN 29 /* "inst-" + 24 hex digits */

/* The scope that lets a caller act on every slug's instances. */
#define REGISTRY_SCOPE_ADMIN "registry:admin"

/* Instance statuses, as stored and shown. */
static const char *const registry_statuses[] = {"unknown",     "healthy",    "degraded",
                                                "unreachable", "not_probed", NULL};

/* ---- error codes (the catalogue is ops/registry/errors.c) ---------------------------- */

enum {
    REGISTRY_ERR_DEFINITION_NOT_FOUND,
    REGISTRY_ERR_INSTANCE_NOT_FOUND,
    REGISTRY_ERR_INSTANCE_OWNED_BY_OTHER,
    REGISTRY_ERR_NODE_NOT_FOUND,
    REGISTRY_ERR_DEFINITION_OWNED_BY_OTHER,
    REGISTRY_ERR__COUNT
};

static const loom_error_code_t registry_error_codes[REGISTRY_ERR__COUNT] = {
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

static inline int registry_bad(loom_error_t *err, const char *path, const char *what)
{
    return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "%s: %s", path, what);
}

/* [a-z0-9-], 1..max bytes. */
static inline bool registry_slug_valid(const char *s, size_t max)
{
    size_t n = 0;
    for (; s[n]; n++)
        if (!(islower((unsigned char)s[n]) || isdigit((unsigned char)s[n]) || s[n] == '-'))
            return false;
    return n > 0 && n <= max;
}

/* Printable ASCII or UTF-8 without controls and, when no_space, without spaces. */
static inline bool registry_text_clean(const char *s, bool no_space)
{
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c < 0x20 || c == 0x7f || (no_space && c == ' '))
            return false;
    }
    return true;
}

/*
 * The string at obj[key]. Absent or null: *out NULL, and an error when
 * required. Otherwise it must be a string of 1..max bytes (0..max when
 * allow_empty) without control characters (nor spaces when no_space).
 */
static inline int registry_string(const json_t *obj, const char *key, const char *path,
                                  bool required, size_t max, bool no_space, bool allow_empty,
                                  const char **out, loom_error_t *err)
{
    char p[256];
    snprintf(p, sizeof(p), "%s.%s", path, key);
    json_t *v = json_object_get(obj, key);
    *out = NULL;
    if (!v || json_is_null(v))
        return required ? registry_bad(err, p, "is required") : 0;
    if (!json_is_string(v))
        return registry_bad(err, p, "must be a string");
    size_t len = json_string_length(v);
    const char *s = json_string_value(v);
    if ((len == 0 && !allow_empty) || len > max || strlen(s) != len ||
        !registry_text_clean(s, no_space)) {
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "%s: must be a string of %d to %zu bytes without control "
                              "characters%s",
                              p, allow_empty ? 0 : 1, max, no_space ? " or spaces" : "");
    }
    *out = s;
    return 0;
}

/* Fails naming the first member of obj whose name is not in allowed. */
static inline int registry_keys(const json_t *obj, const char *path, const char *const *allowed,
                                loom_error_t *err)
{
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)obj, k, v)
    {
        bool ok = false;
        for (const char *const *a = allowed; *a && !ok; a++)
            ok = strcmp(*a, k) == 0;
        if (!ok)
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "%s.%s: unknown field", path, k);
    }
    return 0;
}

/* obj[key] as an object (absent or null: *out NULL; required fails then). */
static inline int registry_object(const json_t *obj, const char *key, const char *path,
                                  bool required, json_t **out, loom_error_t *err)
{
    char p[256];
    snprintf(p, sizeof(p), "%s.%s", path, key);
    json_t *v = json_object_get(obj, key);
    *out = NULL;
    if (!v || json_is_null(v))
        return required ? registry_bad(err, p, "is required") : 0;
    if (!json_is_object(v))
        return registry_bad(err, p, "must be an object");
    *out = v;
    return 0;
}

/* obj[key] as an array of at most max entries (absent or null: *out NULL). */
static inline int registry_array(const json_t *obj, const char *key, const char *path, size_t max,
                                 json_t **out, loom_error_t *err)
{
    char p[256];
    snprintf(p, sizeof(p), "%s.%s", path, key);
    json_t *v = json_object_get(obj, key);
    *out = NULL;
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_array(v))
        return registry_bad(err, p, "must be an array");
    if (json_array_size(v) > max)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "%s: at most %zu entries", p, max);
    *out = v;
    return 0;
}

static inline int registry_port(const json_t *v, const char *path, loom_error_t *err)
{
    if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > 65535)
        return registry_bad(err, path, "must be 1-65535");
    return 0;
}

/* obj[key]: an optional array of ports. */
static inline int registry_ports(const json_t *obj, const char *key, const char *path,
                                 loom_error_t *err)
{
    json_t *arr;
    int rc = registry_array(obj, key, path, REGISTRY_LIST_MAX, &arr, err);
    size_t i;
    json_t *v;
    json_array_foreach(arr, i, v)
    {
        char p[256];
        snprintf(p, sizeof(p), "%s.%s[%zu]", path, key, i);
        if (rc == 0)
            rc = registry_port(v, p, err);
    }
    return rc;
}

/* ---- definitions ----------------------------------------------------------------- */

/*
 * Checks a service definition:
 *   {id, image?: {name, internal_ports[]}, repository?: {url, version?,
 *    build_context?, container_file?, internal_ports[]}, api_specs?: [{url,
 *    protocol_type?, version?, metadata?{}}], clients?: [{language, url}],
 *    envars?: [{key, value}], ports?: [{internal, host}]}
 * with exactly one of image and repository. Null members count as absent.
 * path names the definition in messages ("definition").
 */
static inline int registry_definition_check(const json_t *def, const char *path, loom_error_t *err)
{
    if (!json_is_object(def))
        return registry_bad(err, path, "must be an object");
    static const char *const keys[] = {"id",      "image",  "repository", "api_specs",
                                       "clients", "envars", "ports",      NULL};
    int rc = registry_keys(def, path, keys, err);
    if (rc != 0)
        return rc;
    const char *s;
    char p[256];
    if ((rc = registry_string(def, "id", path, true, REGISTRY_ID_MAX, true, false, &s, err)) != 0)
        return rc;
    if (!registry_slug_valid(s, REGISTRY_ID_MAX)) {
        snprintf(p, sizeof(p), "%s.id", path);
        return registry_bad(err, p, "must be 1 to 64 of [a-z0-9-]");
    }

    json_t *image, *repo;
    if ((rc = registry_object(def, "image", path, false, &image, err)) != 0 ||
        (rc = registry_object(def, "repository", path, false, &repo, err)) != 0)
        return rc;
    if ((image != NULL) == (repo != NULL))
        return registry_bad(err, path, "needs exactly one of \"image\" and \"repository\"");
    if (image) {
        snprintf(p, sizeof(p), "%s.image", path);
        static const char *const ik[] = {"name", "internal_ports", NULL};
        if ((rc = registry_keys(image, p, ik, err)) != 0 ||
            (rc = registry_string(image, "name", p, true, REGISTRY_TEXT_MAX, true, false, &s,
                                  err)) != 0 ||
            (rc = registry_ports(image, "internal_ports", p, err)) != 0)
            return rc;
    } else {
        snprintf(p, sizeof(p), "%s.repository", path);
        static const char *const rk[] = {
            "url", "version", "build_context", "container_file", "internal_ports", NULL};
        if ((rc = registry_keys(repo, p, rk, err)) != 0 ||
            (rc = registry_string(repo, "url", p, true, REGISTRY_URL_MAX, true, false, &s, err)) !=
                0 ||
            (rc = registry_string(repo, "version", p, false, REGISTRY_TEXT_MAX, true, false, &s,
                                  err)) != 0 ||
            (rc = registry_string(repo, "build_context", p, false, REGISTRY_TEXT_MAX, false, false,
                                  &s, err)) != 0 ||
            (rc = registry_string(repo, "container_file", p, false, REGISTRY_TEXT_MAX, false, false,
                                  &s, err)) != 0 ||
            (rc = registry_ports(repo, "internal_ports", p, err)) != 0)
            return rc;
    }

    json_t *arr, *v;
    size_t i;
    if ((rc = registry_array(def, "api_specs", path, REGISTRY_LIST_MAX, &arr, err)) != 0)
        return rc;
    json_array_foreach(arr, i, v)
    {
        snprintf(p, sizeof(p), "%s.api_specs[%zu]", path, i);
        static const char *const ak[] = {"url", "protocol_type", "version", "metadata", NULL};
        json_t *meta;
        if (!json_is_object(v))
            return registry_bad(err, p, "must be an object");
        if ((rc = registry_keys(v, p, ak, err)) != 0 ||
            (rc = registry_string(v, "url", p, true, REGISTRY_URL_MAX, true, false, &s, err)) !=
                0 ||
            (rc = registry_string(v, "protocol_type", p, false, 64, true, false, &s, err)) != 0 ||
            (rc = registry_string(v, "version", p, false, 64, true, false, &s, err)) != 0 ||
            (rc = registry_object(v, "metadata", p, false, &meta, err)) != 0)
            return rc;
        if (meta && json_object_size(meta) > REGISTRY_LIST_MAX) {
            snprintf(p, sizeof(p), "%s.api_specs[%zu].metadata", path, i);
            return registry_bad(err, p, "at most 64 entries");
        }
        const char *mk;
        json_t *mv;
        json_object_foreach(meta, mk, mv)
        {
            char mp[256];
            snprintf(mp, sizeof(mp), "%s.api_specs[%zu].metadata", path, i);
            if ((rc = registry_string(meta, mk, mp, true, 1024, false, true, &s, err)) != 0)
                return rc;
        }
    }

    if ((rc = registry_array(def, "clients", path, REGISTRY_LIST_MAX, &arr, err)) != 0)
        return rc;
    json_array_foreach(arr, i, v)
    {
        snprintf(p, sizeof(p), "%s.clients[%zu]", path, i);
        static const char *const ck[] = {"language", "url", NULL};
        if (!json_is_object(v))
            return registry_bad(err, p, "must be an object");
        if ((rc = registry_keys(v, p, ck, err)) != 0 ||
            (rc = registry_string(v, "language", p, true, 64, true, false, &s, err)) != 0 ||
            (rc = registry_string(v, "url", p, true, REGISTRY_URL_MAX, true, false, &s, err)) != 0)
            return rc;
    }

    if ((rc = registry_array(def, "envars", path, REGISTRY_ENVARS_MAX, &arr, err)) != 0)
        return rc;
    json_array_foreach(arr, i, v)
    {
        snprintf(p, sizeof(p), "%s.envars[%zu]", path, i);
        static const char *const ek[] = {"key", "value", NULL};
        if (!json_is_object(v))
            return registry_bad(err, p, "must be an object");
        if ((rc = registry_keys(v, p, ek, err)) != 0 ||
            (rc = registry_string(v, "key", p, true, 256, true, false, &s, err)) != 0)
            return rc;
        bool ok = isalpha((unsigned char)s[0]) || s[0] == '_';
        for (const char *c = s; *c && ok; c++)
            ok = isalnum((unsigned char)*c) || *c == '_';
        if (!ok) {
            snprintf(p, sizeof(p), "%s.envars[%zu].key", path, i);
            return registry_bad(err, p, "must match [A-Za-z_][A-Za-z0-9_]*");
        }
        for (size_t j = 0; j < i; j++) {
            if (strcmp(json_string_value(json_object_get(json_array_get(arr, j), "key")), s) == 0) {
                snprintf(p, sizeof(p), "%s.envars[%zu].key", path, i);
                return registry_bad(err, p, "is set twice");
            }
        }
        json_t *val = json_object_get(v, "value");
        if (!val || !json_is_string(val) || json_string_length(val) > REGISTRY_ENVAR_VALUE_MAX) {
            snprintf(p, sizeof(p), "%s.envars[%zu].value", path, i);
            return registry_bad(err, p, "must be a string of at most 32768 bytes");
        }
    }

    if ((rc = registry_array(def, "ports", path, REGISTRY_LIST_MAX, &arr, err)) != 0)
        return rc;
    json_array_foreach(arr, i, v)
    {
        snprintf(p, sizeof(p), "%s.ports[%zu]", path, i);
        static const char *const pk[] = {"internal", "host", NULL};
        if (!json_is_object(v))
            return registry_bad(err, p, "must be an object");
        if ((rc = registry_keys(v, p, pk, err)) != 0)
            return rc;
        char pp[280];
        snprintf(pp, sizeof(pp), "%s.internal", p);
        if ((rc = registry_port(json_object_get(v, "internal"), pp, err)) != 0)
            return rc;
        snprintf(pp, sizeof(pp), "%s.host", p);
        if ((rc = registry_port(json_object_get(v, "host"), pp, err)) != 0)
            return rc;
    }
    return 0;
}

/* ---- instances ------------------------------------------------------------------- */

/* The parts of an instance url the registry uses. */
typedef struct registry_url {
    char host[REGISTRY_HOST_MAX + 1]; /* lower-case; an IPv6 address without brackets */
    int port;
} registry_url_t;

/*
 * Checks an instance url: absolute ("scheme://host:port[/path][?query]"),
 * with an explicit port, no user info, at most 2048 bytes. The whole url is
 * kept as given (host, port, path); out gets the host and port to probe.
 */
static inline int registry_url_parse(const char *url, const char *path, registry_url_t *out,
                                     loom_error_t *err)
{
    size_t len = strlen(url);
    if (len == 0 || len > REGISTRY_URL_MAX || !registry_text_clean(url, true))
        return registry_bad(err, path,
                            "must be an absolute url of at most 2048 bytes without spaces");
    const char *p = url;
    if (!isalpha((unsigned char)*p))
        return registry_bad(err, path, "must be an absolute url (scheme://host:port/...)");
    while (isalnum((unsigned char)*p) || *p == '+' || *p == '-' || *p == '.')
        p++;
    if (strncmp(p, "://", 3) != 0)
        return registry_bad(err, path, "must be an absolute url (scheme://host:port/...)");
    const char *auth = p + 3;
    size_t alen = strcspn(auth, "/?#");
    if (memchr(auth, '@', alen))
        return registry_bad(err, path, "must not carry user info");
    const char *host = auth, *port = NULL;
    size_t hlen;
    if (auth[0] == '[') {
        const char *close = memchr(auth, ']', alen);
        if (!close)
            return registry_bad(err, path, "has an IPv6 host without \"]\"");
        host = auth + 1;
        hlen = (size_t)(close - host);
        if (close + 1 < auth + alen && close[1] == ':')
            port = close + 2;
        char v6[64];
        struct in6_addr a6;
        if (hlen == 0 || hlen >= sizeof(v6))
            return registry_bad(err, path, "has an invalid IPv6 host");
        memcpy(v6, host, hlen);
        v6[hlen] = '\0';
        if (inet_pton(AF_INET6, v6, &a6) != 1)
            return registry_bad(err, path, "has an invalid IPv6 host");
    } else {
        const char *colon = NULL;
        for (const char *c = auth; c < auth + alen; c++)
            if (*c == ':')
                colon = c;
        hlen = colon ? (size_t)(colon - auth) : alen;
        if (colon)
            port = colon + 1;
        if (hlen == 0 || hlen > REGISTRY_HOST_MAX)
            return registry_bad(err, path, "needs a host of 1 to 253 bytes");
        for (size_t i = 0; i < hlen; i++)
            if (!isalnum((unsigned char)host[i]) && host[i] != '.' && host[i] != '-' &&
                host[i] != '_')
                return registry_bad(err, path,
                                    "has a host with characters other than "
                                    "[A-Za-z0-9._-]");
    }
    if (!port || port >= auth + alen)
        return registry_bad(err, path, "needs a port (scheme://host:port/...)");
    long n = 0;
    const char *c = port;
    for (; c < auth + alen && isdigit((unsigned char)*c) && n <= 65535; c++)
        n = n * 10 + (*c - '0');
    if (c != auth + alen || n < 1 || n > 65535)
        return registry_bad(err, path, "has a port that is not 1-65535");
    if (out) {
        for (size_t i = 0; i < hlen; i++)
            out->host[i] = (char)tolower((unsigned char)host[i]);
        out->host[hlen] = '\0';
        out->port = (int)n;
    }
    return 0;
}

/* The instance id of a url: "inst-" + the first 24 hex digits of SHA-256(url). */
static inline void registry_instance_id(const char *url, char out[REGISTRY_INSTANCE_ID_LEN + 1])
{
    char hex[2 * LOOM_SHA256_LEN + 1];
    loom_sha256_hex(url, strlen(url), hex);
    snprintf(out, REGISTRY_INSTANCE_ID_LEN + 1, "inst-%.24s", hex);
}

/* "inst-" + 24 lower-case hex digits. */
static inline bool registry_instance_id_valid(const char *id)
{
    if (strncmp(id, "inst-", 5) != 0 || strlen(id) != REGISTRY_INSTANCE_ID_LEN)
        return false;
    for (const char *c = id + 5; *c; c++)
        if (!isdigit((unsigned char)*c) && !(*c >= 'a' && *c <= 'f'))
            return false;
    return true;
}

static inline bool registry_status_valid(const char *s)
{
    for (const char *const *st = registry_statuses; *st; st++)
        if (strcmp(*st, s) == 0)
            return true;
    return false;
}

/* What a registration carries (borrowed from the checked JSON). */
typedef struct registry_instance_in {
    const char *url, *deployment_id, *node_url;
    json_t *tags; /* array of strings, or NULL */
    registry_url_t parsed;
    char id[REGISTRY_INSTANCE_ID_LEN + 1];
} registry_instance_in_t;

/*
 * Checks a registration {url, deployment_id?, node_url?, tags?[]} (plus the
 * members named in extra, which the caller checks) and fills in.
 */
static inline int registry_instance_check(const json_t *body, const char *const *extra,
                                          registry_instance_in_t *in, loom_error_t *err)
{
    const char *path = "instance";
    if (!json_is_object(body))
        return registry_bad(err, path, "must be an object");
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)body, k, v)
    {
        static const char *const keys[] = {"url", "deployment_id", "node_url", "tags", NULL};
        bool ok = false;
        for (const char *const *a = keys; *a && !ok; a++)
            ok = strcmp(*a, k) == 0;
        for (const char *const *a = extra; a && *a && !ok; a++)
            ok = strcmp(*a, k) == 0;
        if (!ok)
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "%s.%s: unknown field", path, k);
    }
    memset(in, 0, sizeof(*in));
    int rc;
    if ((rc = registry_string(body, "url", path, true, REGISTRY_URL_MAX, true, false, &in->url,
                              err)) != 0 ||
        (rc = registry_url_parse(in->url, "instance.url", &in->parsed, err)) != 0 ||
        (rc = registry_string(body, "deployment_id", path, false, REGISTRY_DEPLOYMENT_MAX, true,
                              false, &in->deployment_id, err)) != 0 ||
        (rc = registry_string(body, "node_url", path, false, REGISTRY_URL_MAX, true, false,
                              &in->node_url, err)) != 0 ||
        (rc = registry_array(body, "tags", path, REGISTRY_LIST_MAX, &in->tags, err)) != 0)
        return rc;
    size_t i;
    json_array_foreach(in->tags, i, v)
    {
        char p[64];
        snprintf(p, sizeof(p), "instance.tags[%zu]", i);
        if (!json_is_string(v) || json_string_length(v) == 0 ||
            json_string_length(v) > REGISTRY_TAG_MAX ||
            strlen(json_string_value(v)) != json_string_length(v) ||
            !registry_text_clean(json_string_value(v), false))
            return registry_bad(err, p, "must be a string of 1 to 128 bytes");
    }
    registry_instance_id(in->url, in->id);
    return 0;
}

/* ---- rows ------------------------------------------------------------------------ */

/* The columns registry_instance_json() reads, for SELECT and RETURNING. */
#define REGISTRY_INSTANCE_COLUMNS                                                               \
    "id, url, slug, host, port, deployment_id, node_url, status, details, tags::TEXT AS tags, " \
    "(extract(epoch FROM last_heartbeat) * 1000000)::BIGINT AS heartbeat_us, "                  \
    "(extract(epoch FROM registered_at) * 1000000)::BIGINT AS registered_us, "                  \
    "(extract(epoch FROM updated_at) * 1000000)::BIGINT AS updated_us"

static inline const char *registry_col(const PGresult *res, int row, const char *col)
{
    int c = PQfnumber(res, col);
    return c < 0 || PQgetisnull(res, row, c) ? NULL : PQgetvalue(res, row, c);
}

static inline void registry_set_time(json_t *o, const char *key, const char *us)
{
    if (!us)
        return;
    char buf[40];
    loom_rfc3339_format(strtoll(us, NULL, 10), buf, sizeof(buf));
    json_object_set_new(o, key, json_string(buf));
}

static inline void registry_set_text(json_t *o, const char *key, const char *v)
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
static inline json_t *registry_instance_json(const PGresult *res, int row)
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

#endif
