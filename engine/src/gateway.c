/*
 * gateway.c: the HTTP gateway: start and stop, API tokens, the request
 * pipeline (ids, operational endpoints, routing, authentication, scopes,
 * dispatch), answers and errors, the access log and the HTTP metrics.
 *
 * The op and write helpers live in gateway_ops.c and gateway_write.c.
 */
#include "gateway_int.h"
#include "loom/clock.h"
#include "loom/console.h"
#include "loom/db.h"
#include "loom/log.h"
#include "loom/mem.h"
#include "loom/uuid.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Latency buckets for HTTP requests, in seconds: 0.25 ms to 30 s. */
static const double http_buckets[] = {0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                      0.1,     0.25,   0.5,   1,      2.5,   5,    10,    30};

gw_req_t *gw_req(const loom_http_req_t *req)
{
    return loom_http_req_data(req);
}

/* ---- tokens ------------------------------------------------------------------------- */

static void token_free(gw_token_t *t)
{
    if (!t)
        return;
    free(t->slug);
    for (char **s = t->scopes; s && *s; s++)
        free(*s);
    free(t->scopes);
    free(t);
}

static bool valid_word(const char *s, size_t len, bool scope)
{
    if (len == 0 || len > 128)
        return false;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '-' || c == '_' || c == '.' || (scope && (c == ':' || c == '*'));
        if (!ok)
            return false;
    }
    return !scope || len == 1 || !memchr(s, '*', len);
}

/* Splits "a,b,c" into a new NULL-terminated list; NULL when malformed. */
static char **parse_scopes(const char *text, size_t len, bool *all)
{
    size_t n = 1;
    for (size_t i = 0; i < len; i++)
        n += text[i] == ',';
    char **out = loom_xcalloc(n + 1, sizeof(char *));
    size_t k = 0;
    *all = false;
    const char *p = text, *end = text + len;
    while (p <= end) {
        const char *comma = memchr(p, ',', (size_t)(end - p));
        size_t sl = comma ? (size_t)(comma - p) : (size_t)(end - p);
        if (!valid_word(p, sl, true)) {
            for (size_t i = 0; i < k; i++)
                free(out[i]);
            free(out);
            return NULL;
        }
        out[k] = loom_xstrndup(p, sl);
        if (strcmp(out[k], LOOM_GATEWAY_SCOPE_ALL) == 0)
            *all = true;
        k++;
        if (!comma)
            break;
        p = comma + 1;
    }
    return out;
}

static gw_token_t *token_new(const uint8_t hash[LOOM_SHA256_LEN], const char *slug, size_t slug_len,
                             const char *scopes, size_t scopes_len)
{
    if (!valid_word(slug, slug_len, false))
        return NULL;
    bool all = false;
    char **list = parse_scopes(scopes, scopes_len, &all);
    if (!list)
        return NULL;
    gw_token_t *t = loom_xcalloc(1, sizeof(*t));
    memcpy(t->hash, hash, LOOM_SHA256_LEN);
    t->slug = loom_xstrndup(slug, slug_len);
    t->scopes = list;
    t->all = all;
    return t;
}

static int hex_decode(const char *s, size_t len, uint8_t *out, size_t n)
{
    if (len != 2 * n)
        return -1;
    for (size_t i = 0; i < n; i++) {
        int hi = isxdigit((unsigned char)s[2 * i]) ? s[2 * i] : -1;
        int lo = isxdigit((unsigned char)s[2 * i + 1]) ? s[2 * i + 1] : -1;
        if (hi < 0 || lo < 0)
            return -1;
        hi = hi <= '9' ? hi - '0' : (tolower(hi) - 'a' + 10);
        lo = lo <= '9' ? lo - '0' : (tolower(lo) - 'a' + 10);
        out[i] = (uint8_t)(hi * 16 + lo);
    }
    return 0;
}

/* Reads a tokens file. Each line: sha256-hex slug scope[,scope...]; '#'
 * starts a comment; blank lines are skipped. */
static int tokens_load(const char *path, gw_token_t ***out, size_t *count, loom_error_t *err)
{
    *out = NULL;
    *count = 0;
    FILE *f = fopen(path, "r");
    if (!f)
        return loom_error_set(err, LOOM_CODE_CONFIG_INVALID,
                              "could not open LOOM_API_TOKENS_FILE \"%s\": %s", path,
                              strerror(errno));
    char *line = NULL;
    size_t cap = 0, n = 0, alloc = 0;
    ssize_t len;
    int lineno = 0, rc = 0;
    gw_token_t **list = NULL;
    while ((len = getline(&line, &cap, f)) >= 0) {
        lineno++;
        char *hash = strchr(line, '#');
        if (hash)
            *hash = '\0';
        char *fields[4] = {0};
        size_t lens[4] = {0};
        int nf = 0;
        for (char *p = line; *p;) {
            while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')
                p++;
            if (!*p)
                break;
            size_t fl = strcspn(p, " \t\r\n");
            if (nf < 4) {
                fields[nf] = p;
                lens[nf] = fl;
            }
            nf++;
            p += fl;
        }
        if (nf == 0)
            continue;
        uint8_t digest[LOOM_SHA256_LEN];
        gw_token_t *t = NULL;
        if (nf != 3) {
            rc = loom_error_set(err, LOOM_CODE_CONFIG_INVALID,
                                "LOOM_API_TOKENS_FILE \"%s\" line %d: expected 3 fields "
                                "\"sha256-of-token slug scope[,scope...]\", found %d",
                                path, lineno, nf);
        } else if (hex_decode(fields[0], lens[0], digest, LOOM_SHA256_LEN) != 0) {
            rc = loom_error_set(err, LOOM_CODE_CONFIG_INVALID,
                                "LOOM_API_TOKENS_FILE \"%s\" line %d: the first field must be "
                                "the SHA-256 of the token as 64 hex characters",
                                path, lineno);
        } else if (!(t = token_new(digest, fields[1], lens[1], fields[2], lens[2]))) {
            rc = loom_error_set(err, LOOM_CODE_CONFIG_INVALID,
                                "LOOM_API_TOKENS_FILE \"%s\" line %d: the slug must be "
                                "[A-Za-z0-9._-] and the scopes a comma-separated list of "
                                "[A-Za-z0-9._:-] names or \"*\"",
                                path, lineno);
        }
        if (rc != 0)
            break;
        for (size_t i = 0; i < n; i++)
            if (memcmp(list[i]->hash, t->hash, LOOM_SHA256_LEN) == 0) {
                token_free(t);
                t = NULL;
                rc = loom_error_set(err, LOOM_CODE_CONFIG_INVALID,
                                    "LOOM_API_TOKENS_FILE \"%s\" line %d: the same token hash "
                                    "is listed twice",
                                    path, lineno);
                break;
            }
        if (rc != 0)
            break;
        if (n == alloc) {
            alloc = alloc ? alloc * 2 : 16;
            list = loom_xrealloc(list, alloc * sizeof(*list));
        }
        list[n++] = t;
    }
    free(line);
    fclose(f);
    if (rc != 0) {
        for (size_t i = 0; i < n; i++)
            token_free(list[i]);
        free(list);
        return rc;
    }
    *out = list;
    *count = n;
    return 0;
}

int loom_gateway_tokens_check(const char *path, size_t *count, loom_error_t *err)
{
    gw_token_t **list = NULL;
    size_t n = 0;
    int rc = tokens_load(path, &list, &n, err);
    for (size_t i = 0; i < n; i++)
        token_free(list[i]);
    free(list);
    if (count)
        *count = n;
    return rc;
}

static void tokens_add(loom_gateway_t *gw, gw_token_t *t)
{
    pthread_rwlock_wrlock(&gw->tokens_mu);
    if (gw->n_tokens == gw->cap_tokens) {
        gw->cap_tokens = gw->cap_tokens ? gw->cap_tokens * 2 : 16;
        gw->tokens = loom_xrealloc(gw->tokens, gw->cap_tokens * sizeof(*gw->tokens));
    }
    gw->tokens[gw->n_tokens++] = t;
    pthread_rwlock_unlock(&gw->tokens_mu);
}

int loom_gateway_add_token(loom_gateway_t *gw, const char *token, const char *slug,
                           const char *scopes, loom_error_t *err)
{
    if (!gw || !token || !*token || !slug || !scopes)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "a token needs a slug and scopes");
    uint8_t digest[LOOM_SHA256_LEN];
    loom_sha256(token, strlen(token), digest);
    gw_token_t *t = token_new(digest, slug, strlen(slug), scopes, strlen(scopes));
    if (!t)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "invalid slug \"%s\" or scopes \"%s\"", slug, scopes);
    tokens_add(gw, t);
    return 0;
}

int loom_gateway_dev_token(loom_gateway_t *gw, char *out, size_t size)
{
    static const char hex[] = "0123456789abcdef";
    uint8_t rnd[16];
    if (!gw || !out || size < 41)
        return LOOM_EINVAL;
    loom_random_bytes(rnd, sizeof(rnd));
    char tok[41] = "loomdev_";
    for (size_t i = 0; i < sizeof(rnd); i++) {
        tok[8 + 2 * i] = hex[rnd[i] >> 4];
        tok[9 + 2 * i] = hex[rnd[i] & 15];
    }
    tok[40] = '\0';
    int rc = loom_gateway_add_token(gw, tok, "dev", LOOM_GATEWAY_SCOPE_ALL, NULL);
    if (rc == 0)
        snprintf(out, size, "%s", tok);
    return rc;
}

/* The token whose hash matches, comparing every entry in constant time. */
static const gw_token_t *tokens_find(loom_gateway_t *gw, const char *token, size_t len)
{
    uint8_t digest[LOOM_SHA256_LEN];
    loom_sha256(token, len, digest);
    const gw_token_t *found = NULL;
    pthread_rwlock_rdlock(&gw->tokens_mu);
    /* Every entry is compared, each in constant time, whichever matches. */
    for (size_t i = 0; i < gw->n_tokens; i++)
        if (loom_sha256_equal(gw->tokens[i]->hash, digest))
            found = gw->tokens[i];
    pthread_rwlock_unlock(&gw->tokens_mu);
    return found;
}

static bool token_has_scope(const gw_token_t *t, const char *scope)
{
    if (!t)
        return false;
    if (!scope || t->all)
        return true;
    for (char **s = t->scopes; *s; s++)
        if (strcmp(*s, scope) == 0)
            return true;
    return false;
}

/* ---- for handlers ------------------------------------------------------------------- */

const char *loom_gateway_caller(const loom_http_req_t *req)
{
    gw_req_t *g = gw_req(req);
    return g && g->token ? g->token->slug : NULL;
}

const char *loom_gateway_node(const loom_http_req_t *req)
{
    gw_req_t *g = gw_req(req);
    return g && g->gw->opts.node ? g->gw->opts.node : "gateway";
}

bool loom_gateway_has_scope(const loom_http_req_t *req, const char *scope)
{
    gw_req_t *g = gw_req(req);
    return g && token_has_scope(g->token, scope);
}

const char *loom_gateway_ray_id(const loom_http_req_t *req)
{
    gw_req_t *g = gw_req(req);
    return g ? g->ray_id : NULL;
}

const char *loom_gateway_request_id(const loom_http_req_t *req)
{
    gw_req_t *g = gw_req(req);
    return g ? g->request_id : NULL;
}

char *loom_gateway_param_decode(loom_arena_t *a, const char *v, size_t len, bool *clean)
{
    char *out = loom_arena_alloc(a, len + 1);
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        if (v[i] == '%' && i + 2 < len && isxdigit((unsigned char)v[i + 1]) &&
            isxdigit((unsigned char)v[i + 2])) {
            char h[3] = {v[i + 1], v[i + 2], 0};
            out[o++] = (char)strtol(h, NULL, 16);
            i += 2;
        } else {
            out[o++] = v[i];
        }
    }
    out[o] = '\0';
    if (clean)
        *clean = strlen(out) == o && loom_http_utf8_valid(out, o);
    return out;
}

const char *loom_gateway_param(loom_http_req_t *req, const char *name)
{
    gw_req_t *g = gw_req(req);
    const char *v;
    size_t len;
    if (!g || !g->route ||
        !loom_route_param(g->route->pattern, loom_http_req_path(req), name, &v, &len))
        return NULL;
    return loom_gateway_param_decode(loom_http_req_arena(req), v, len, NULL);
}

/* The first parameter of the route whose value does not decode to clean
 * text; NULL when all do. Handlers may then take every parameter as text. */
static const char *unclean_param(loom_http_req_t *req, const loom_route_t *route, char *name,
                                 size_t size)
{
    const char *path = loom_http_req_path(req);
    for (const char *p = strchr(route->pattern, '{'); p; p = strchr(p + 1, '{')) {
        size_t nl = strcspn(p + 1, "}");
        snprintf(name, size, "%.*s", (int)nl, p + 1);
        const char *v;
        size_t len;
        bool clean = true;
        if (loom_route_param(route->pattern, path, name, &v, &len))
            loom_gateway_param_decode(loom_http_req_arena(req), v, len, &clean);
        if (!clean)
            return name;
    }
    return NULL;
}

int loom_gateway_parse_json(const char *text, size_t len, bool want_object, json_t **out,
                            loom_error_t *err)
{
    *out = NULL;
    size_t i = 0;
    while (i < len && (text[i] == ' ' || text[i] == '\t' || text[i] == '\r' || text[i] == '\n'))
        i++;
    if (i == len) {
        *out = json_object();
        return 0;
    }
    json_error_t jerr;
    json_t *v = json_loadb(text, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &jerr);
    if (!v)
        return loom_error_set(err, LOOM_CODE_INVALID_JSON,
                              "the body is not valid JSON: %s (line %d, column %d)", jerr.text,
                              jerr.line, jerr.column);
    if (want_object && !json_is_object(v)) {
        json_decref(v);
        return loom_error_set(err, LOOM_CODE_INVALID_JSON, "the body must be a JSON object");
    }
    *out = v;
    return 0;
}

int loom_gateway_body_json(loom_http_req_t *req, bool want_object, json_t **out, loom_error_t *err)
{
    gw_req_t *g = gw_req(req);
    *out = NULL;
    if (g && g->body) {
        if (want_object && !json_is_object(g->body))
            return loom_error_set(err, LOOM_CODE_INVALID_JSON, "the body must be a JSON object");
        *out = g->body;
        return 0;
    }
    size_t len;
    const char *text = loom_http_req_body(req, &len);
    json_t *v = NULL;
    int rc = loom_gateway_parse_json(text, len, want_object, &v, err);
    if (rc != 0)
        return rc;
    if (g)
        g->body = v; /* released when the request is over */
    *out = v;
    return 0;
}

int loom_gateway_reply(loom_http_req_t *req, loom_http_res_t *res, int status, json_t *body)
{
    loom_http_res_status(res, status);
    if (body) {
        char *text = json_dumps(body, JSON_COMPACT | JSON_ENCODE_ANY);
        json_decref(body);
        if (!text) {
            /* Never an empty answer: say what went wrong, as JSON. */
            LOOM_ERROR("an answer could not be encoded as JSON", "status=%d", status);
            loom_http_res_status(res, 500);
            text = loom_xasprintf("{\"error\":{\"code\":\"INTERNAL\",\"message\":\"the "
                                  "answer could not be encoded as JSON\",\"ray_id\":\"%s\"}}",
                                  loom_gateway_ray_id(req) ? loom_gateway_ray_id(req) : "");
        }
        loom_http_res_header(res, "Content-Type", "application/json");
        loom_http_res_body_take(res, text, strlen(text));
    }
    loom_http_res_send(res);
    return 0;
}

int loom_gateway_fail(loom_http_req_t *req, loom_http_res_t *res, const loom_error_t *err)
{
    loom_error_t fallback;
    if (!err || !err->code) {
        loom_error_set(&fallback, LOOM_CODE_INTERNAL, "unexpected failure");
        err = &fallback;
    }
    int status = loom_error_class_http_status(err->cls);
    const char *ray = loom_gateway_ray_id(req);
    char msg[sizeof(err->message)];
    snprintf(msg, sizeof(msg), "%s", err->message);
    loom_http_utf8_repair(msg); /* messages echo client bytes, and may be cut in a character */
    json_t *e = json_pack("{s:s, s:s}", "code", err->code, "message", msg);
    if (e && ray)
        json_object_set_new(e, "ray_id", json_string(ray));
    if (err->retriable && (status == 503 || status == 429))
        loom_http_res_header(res, "Retry-After", "1");
    if (status == 401)
        loom_http_res_header(res, "WWW-Authenticate", "Bearer realm=\"loom\"");
    return loom_gateway_reply(req, res, status, json_pack("{s:o}", "error", e));
}

/* Answers with a code whose HTTP status is more specific than its class's. */
static void fail_status(loom_http_req_t *req, loom_http_res_t *res, int status,
                        const loom_error_t *err)
{
    char msg[sizeof(err->message)];
    snprintf(msg, sizeof(msg), "%s", err->message);
    loom_http_utf8_repair(msg);
    json_t *e = json_pack("{s:s, s:s, s:s}", "code", err->code, "message", msg, "ray_id",
                          loom_gateway_ray_id(req));
    loom_gateway_reply(req, res, status, json_pack("{s:o}", "error", e));
}

/* ---- the pipeline ------------------------------------------------------------------- */

/* Accepts ids of [A-Za-z0-9._:/+=-], 1..max bytes. */
static bool valid_id(const char *s, size_t max)
{
    if (!s)
        return false;
    size_t n = 0;
    for (; s[n]; n++) {
        char c = s[n];
        if (n >= max || !(isalnum((unsigned char)c) || strchr("._:/+=-", c)))
            return false;
    }
    return n > 0;
}

static void serve_healthz(loom_http_req_t *req, loom_http_res_t *res)
{
    loom_gateway_reply(req, res, 200, json_pack("{s:s}", "status", "ok"));
}

static void serve_metrics(loom_gateway_t *gw, loom_http_req_t *req, loom_http_res_t *res)
{
    (void)req;
    loom_metrics_gauge_set(gw->connections, NULL,
                           gw->http ? loom_http_server_connections(gw->http) : 0);
    loom_metrics_gauge_set(gw->waiters_gauge, NULL, atomic_load(&gw->waiters));
    size_t len = 0;
    char *text = loom_metrics_render_string(gw->metrics, &len);
    loom_http_res_status(res, 200);
    loom_http_res_header(res, "Content-Type", LOOM_METRICS_CONTENT_TYPE);
    loom_http_res_body_take(res, text, len);
    loom_http_res_send(res);
}

/* /readyz: the database and the broker, checked on a worker thread and
 * cached for ready_cache_ms. */
typedef struct ready_task {
    gw_task_t task;
    loom_gateway_t *gw;
    bool ok;
    char db[200], kafka[200];
} ready_task_t;

static void ready_run(gw_task_t *t)
{
    ready_task_t *rt = (ready_task_t *)t;
    loom_gateway_t *gw = rt->gw;
    int64_t cache = gw->opts.ready_cache_ms > 0 ? gw->opts.ready_cache_ms : 1000;
    int64_t tmo = gw->opts.ready_timeout_ms > 0 ? gw->opts.ready_timeout_ms : 1000;
    pthread_mutex_lock(&gw->ready_mu);
    if (!gw->ready_at || loom_mono_ms() - gw->ready_at >= cache) {
        /* Database: SELECT 1 on a pooled connection of the ops. */
        if (!gw->opts.ops || !gw->opts.ops->pool) {
            snprintf(gw->ready_db, sizeof(gw->ready_db), "not configured");
        } else {
            loom_db_t *db = NULL;
            loom_error_t err;
            int rc = loom_db_acquire(gw->opts.ops->pool, &db, &err);
            if (rc == 0)
                rc = loom_db_query(db, "SELECT 1", 0, NULL, NULL, &err);
            if (db)
                loom_db_release(db);
            snprintf(gw->ready_db, sizeof(gw->ready_db), "%s", rc == 0 ? "ok" : err.message);
        }
        /* Kafka: a metadata request on the producer's handle. */
        if (!gw->opts.producer) {
            snprintf(gw->ready_kafka, sizeof(gw->ready_kafka), "not configured");
        } else {
            const struct rd_kafka_metadata *md = NULL;
            rd_kafka_resp_err_t e =
                rd_kafka_metadata(loom_producer_handle(gw->opts.producer), 0, NULL, &md, (int)tmo);
            if (md)
                rd_kafka_metadata_destroy(md);
            snprintf(gw->ready_kafka, sizeof(gw->ready_kafka), "%s",
                     e == RD_KAFKA_RESP_ERR_NO_ERROR ? "ok" : rd_kafka_err2str(e));
        }
        gw->ready_ok = strcmp(gw->ready_db, "ok") == 0 && strcmp(gw->ready_kafka, "ok") == 0;
        gw->ready_at = loom_mono_ms();
    }
    rt->ok = gw->ready_ok;
    snprintf(rt->db, sizeof(rt->db), "%s", gw->ready_db);
    snprintf(rt->kafka, sizeof(rt->kafka), "%s", gw->ready_kafka);
    pthread_mutex_unlock(&gw->ready_mu);
}

static void ready_done(loom_http_req_t *req, void *arg, bool cancelled)
{
    ready_task_t *rt = arg;
    if (!cancelled && !loom_http_req_detached(req)) {
        loom_http_res_t *res = loom_http_req_res(req);
        if (!rt->ok)
            loom_http_res_header(res, "Retry-After", "1");
        loom_gateway_reply(req, res, rt->ok ? 200 : 503,
                           json_pack("{s:s, s:{s:s, s:s}}", "status",
                                     rt->ok ? "ready" : "not_ready", "checks", "database", rt->db,
                                     "kafka", rt->kafka));
    }
    free(rt);
    loom_http_req_unref(req);
}

static void serve_readyz(loom_gateway_t *gw, loom_http_req_t *req, loom_http_res_t *res)
{
    if (atomic_load(&gw->stopping) || (gw->http && loom_http_server_draining(gw->http))) {
        loom_http_res_header(res, "Retry-After", "1");
        loom_gateway_reply(req, res, 503, json_pack("{s:s}", "status", "shutting_down"));
        return;
    }
    ready_task_t *rt = loom_xcalloc(1, sizeof(*rt));
    rt->gw = gw;
    rt->task.run = ready_run;
    rt->task.done = ready_done;
    rt->task.req = req;
    gw_req(req)->async = true;
    gw_task_submit(gw, &rt->task);
}

static void gateway_handle(loom_http_req_t *req, loom_http_res_t *res, void *opaque)
{
    loom_gateway_t *gw = opaque;
    gw_req_t *g = loom_arena_calloc(loom_http_req_arena(req), 1, sizeof(*g));
    g->gw = gw;
    loom_http_req_set_data(req, g);
    loom_metrics_gauge_add(gw->in_flight, NULL, 1);

    /* Ids: X-Ray-Id and X-Request-ID when valid, else a new UUIDv7. */
    loom_arena_t *a = loom_http_req_arena(req);
    const char *ray = loom_http_req_header(req, "X-Ray-Id");
    if (valid_id(ray, 64)) {
        g->ray_id = ray;
    } else {
        char *buf = loom_arena_alloc(a, LOOM_UUID_STRLEN + 1);
        loom_uuid_v7_string(buf);
        g->ray_id = buf;
    }
    const char *rid = loom_http_req_header(req, "X-Request-ID");
    g->request_id = valid_id(rid, 128) ? rid : g->ray_id;
    const char *tp = loom_http_req_header(req, "traceparent");
    if (valid_id(tp, 128))
        g->traceparent = tp;
    loom_http_res_header(res, "X-Request-ID", g->request_id);
    loom_http_res_header(res, "X-Ray-Id", g->ray_id);

    const char *method = loom_http_req_method(req);
    const char *path = loom_http_req_path(req);
    bool get = strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0;
    loom_error_t err;

    /* The caller: the token, when a valid one came (checked against the
     * route below). */
    const char *auth = loom_http_req_header(req, "Authorization");
    const char *tok = NULL;
    if (auth && strncasecmp(auth, "Bearer ", 7) == 0) {
        tok = auth + 7;
        while (*tok == ' ')
            tok++;
    }
    if (tok && *tok)
        g->token = tokens_find(gw, tok, strlen(tok));

    /* Rate limit: per token, else per remote address. */
    if (gw->limiter) {
        char key[200];
        int retry = 1;
        loom_rate_limiter_key(g->token ? g->token->slug : NULL, loom_http_req_remote(req), key,
                              sizeof(key));
        if (!loom_rate_limiter_take(gw->limiter, key, loom_mono_ns(), &retry)) {
            char ra[16];
            snprintf(ra, sizeof(ra), "%d", retry);
            loom_metrics_counter_inc(gw->rate_limited,
                                     (const char *[]){g->token ? "token" : "address"});
            g->route_label = "_rate_limited";
            loom_http_res_header(res, "Retry-After", ra);
            loom_error_set(&err, LOOM_CODE_RATE_LIMITED,
                           "over the rate limit of %d requests a second (burst %d) for %s; retry "
                           "in %d s",
                           gw->opts.rate_limit,
                           gw->opts.rate_burst > 0 ? gw->opts.rate_burst : gw->opts.rate_limit,
                           g->token ? "this token" : "this address", retry);
            fail_status(req, res, 429, &err);
            return;
        }
    }

    /* Operational endpoints: no token. */
    if (strcmp(path, "/healthz") == 0 || strcmp(path, "/readyz") == 0 ||
        strcmp(path, "/metrics") == 0) {
        g->route_label = path;
        if (!get) {
            loom_http_res_header(res, "Allow", "GET, HEAD");
            loom_error_set(&err, LOOM_CODE_METHOD_NOT_ALLOWED, "%s takes GET or HEAD", path);
            fail_status(req, res, 405, &err);
        } else if (path[1] == 'h') {
            serve_healthz(req, res);
        } else if (path[1] == 'm') {
            serve_metrics(gw, req, res);
        } else {
            serve_readyz(gw, req, res);
        }
        return;
    }

    /* The console's static files: no token (they hold no data). */
    if (loom_console_path(path)) {
        g->route_label = "/console";
        loom_console_serve(req, res);
        return;
    }

    /* Routing. HEAD runs the GET route and sends no body. */
    bool known = false;
    char allow[128];
    const char *m = strcmp(method, "HEAD") == 0 ? "GET" : method;
    const loom_route_t *route =
        loom_route_match(gw->opts.routes, gw->opts.n_routes, m, path, &known, allow, sizeof(allow));
    if (!route) {
        g->route_label = known ? "_method_not_allowed" : "_unmatched";
        if (known) {
            loom_http_res_header(res, "Allow", allow);
            loom_error_set(&err, LOOM_CODE_METHOD_NOT_ALLOWED, "%s is not allowed on %.200s",
                           method, path);
            fail_status(req, res, 405, &err);
        } else {
            loom_error_set(&err, LOOM_CODE_NOT_FOUND, "no route for %s %.200s", method, path);
            loom_gateway_fail(req, res, &err);
        }
        return;
    }
    g->route = route;
    g->route_label = route->pattern;

    /* Authentication and scope. */
    if (!g->token) {
        loom_error_set(&err, LOOM_CODE_UNAUTHENTICATED, "%s",
                       !auth  ? "no API token: send Authorization: Bearer TOKEN"
                       : !tok ? "the Authorization header must be \"Bearer TOKEN\""
                              : "unknown API token");
        loom_gateway_fail(req, res, &err);
        return;
    }
    if (!token_has_scope(g->token, route->scope)) {
        char hdr[200];
        snprintf(hdr, sizeof(hdr), "Bearer error=\"insufficient_scope\", scope=\"%s\"",
                 route->scope);
        loom_http_res_header(res, "WWW-Authenticate", hdr);
        loom_error_set(&err, LOOM_CODE_PERMISSION_DENIED,
                       "%s %s needs the scope \"%s\", which the token of \"%s\" does not hold",
                       route->method, route->pattern, route->scope, g->token->slug);
        loom_gateway_fail(req, res, &err);
        return;
    }

    /* Parameters are text: a value that decodes to a NUL or to bytes that
     * are not UTF-8 is refused here, naming it, for every route. */
    char pname[64];
    const char *bad = unclean_param(req, route, pname, sizeof(pname));
    const char *badq = bad ? NULL : loom_http_req_query_unclean(req);
    if (bad || badq) {
        char name[64];
        snprintf(name, sizeof(name), "%s", bad ? bad : badq);
        loom_http_utf8_repair(name);
        loom_error_set(&err, LOOM_CODE_INVALID_ARGUMENT,
                       "%s parameter \"%s\" is not valid UTF-8 text (percent-decoded, it holds "
                       "a NUL or bytes that are not UTF-8)",
                       bad ? "path" : "query", name);
        loom_gateway_fail(req, res, &err);
        return;
    }

    route->handler(req, res);
    if (!loom_http_res_sent(res) && !g->async) {
        LOOM_ERROR("route handler sent no answer", "route=%s", route->pattern);
        loom_error_set(&err, LOOM_CODE_INTERNAL, "the handler of %s %s sent no answer",
                       route->method, route->pattern);
        loom_gateway_fail(req, res, &err);
    }
}

static void gateway_done(loom_http_req_t *req, loom_http_res_t *res, void *opaque)
{
    loom_gateway_t *gw = opaque;
    gw_req_t *g = gw_req(req);
    int status = loom_http_res_get_status(res);
    const char *label = g && g->route_label ? g->route_label : "_invalid";
    char st[8];
    snprintf(st, sizeof(st), "%d", status);
    const char *method = loom_http_req_method(req);
    loom_metrics_counter_inc(gw->requests, (const char *[]){label, method, st});
    double secs = (double)(loom_mono_ns() - loom_http_req_start_ns(req)) / 1e9;
    loom_metrics_histogram_observe(gw->duration, (const char *[]){label}, secs);
    if (g) {
        loom_metrics_gauge_add(gw->in_flight, NULL, -1);
        json_decref(g->body);
        g->body = NULL;
    }
    if (!gw->opts.no_access_log)
        LOOM_INFO("http request",
                  "method=%s path=%.300s route=%s status=%d duration_ms=%.3f bytes=%zu caller=%s "
                  "request_id=%s ray_id=%s remote=%s",
                  method, loom_http_req_path(req), label, status, secs * 1000.0,
                  loom_http_res_body_len(res), g && g->token ? g->token->slug : "-",
                  g && g->request_id ? g->request_id : "-", g && g->ray_id ? g->ray_id : "-",
                  loom_http_req_remote(req));
}

/* ---- workers ------------------------------------------------------------------------ */

static void *worker_main(void *arg)
{
    loom_gateway_t *gw = arg;
    for (;;) {
        pthread_mutex_lock(&gw->tasks_mu);
        while (!gw->tasks && !atomic_load(&gw->stopping))
            pthread_cond_wait(&gw->tasks_cond, &gw->tasks_mu);
        gw_task_t *t = gw->tasks;
        if (t) {
            gw->tasks = t->next;
            if (!gw->tasks)
                gw->tasks_tail = NULL;
            atomic_fetch_sub(&gw->queued, 1);
        }
        pthread_mutex_unlock(&gw->tasks_mu);
        if (!t)
            return NULL; /* stopping and nothing queued */
        t->run(t);
        loom_http_req_post(t->req, t->done, t);
    }
}

void gw_task_submit(loom_gateway_t *gw, gw_task_t *t)
{
    loom_http_req_ref(t->req);
    t->next = NULL;
    pthread_mutex_lock(&gw->tasks_mu);
    if (gw->tasks_tail)
        gw->tasks_tail->next = t;
    else
        gw->tasks = t;
    gw->tasks_tail = t;
    atomic_fetch_add(&gw->queued, 1);
    pthread_cond_signal(&gw->tasks_cond);
    pthread_mutex_unlock(&gw->tasks_mu);
}

/* ---- start and stop ----------------------------------------------------------------- */

static void gateway_destroy(loom_gateway_t *gw)
{
    for (size_t i = 0; i < gw->n_tokens; i++)
        token_free(gw->tokens[i]);
    free(gw->tokens);
    free(gw->workers);
    free(gw->poller.waiting); /* empty once the poller stopped */
    loom_rate_limiter_free(gw->limiter);
    pthread_rwlock_destroy(&gw->tokens_mu);
    pthread_mutex_destroy(&gw->tasks_mu);
    pthread_cond_destroy(&gw->tasks_cond);
    pthread_mutex_destroy(&gw->ready_mu);
    gw_wait_limit_destroy(&gw->wait_limit);
    loom_metrics_free(gw->own_metrics);
    free(gw);
}

int loom_gateway_start(const loom_gateway_opts_t *opts, loom_gateway_t **out, loom_error_t *err)
{
    if (!opts || !opts->listen)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "the gateway needs a listen address");
    int rc = loom_route_table_check(opts->routes, opts->n_routes, err);
    if (rc != 0)
        return rc;
    loom_gateway_t *gw = loom_xcalloc(1, sizeof(*gw));
    gw->opts = *opts;
    pthread_rwlock_init(&gw->tokens_mu, NULL);
    pthread_mutex_init(&gw->tasks_mu, NULL);
    pthread_cond_init(&gw->tasks_cond, NULL);
    pthread_mutex_init(&gw->ready_mu, NULL);
    if (opts->tokens_file) {
        rc = tokens_load(opts->tokens_file, &gw->tokens, &gw->n_tokens, err);
        if (rc != 0) {
            gateway_destroy(gw);
            return rc;
        }
        gw->cap_tokens = gw->n_tokens;
    }
    gw->metrics = opts->metrics;
    if (!gw->metrics)
        gw->metrics = gw->own_metrics = loom_metrics_new();
    static const char *const req_labels[] = {"route", "method", "status", NULL};
    static const char *const route_labels[] = {"route", NULL};
    gw->requests =
        loom_metrics_counter(gw->metrics, "loom_http_requests_total",
                             "HTTP requests by route pattern, method and status.", req_labels);
    gw->duration = loom_metrics_histogram(
        gw->metrics, "loom_http_request_duration_seconds",
        "Time from a request's first byte to its answer, by route pattern, in seconds.",
        route_labels, http_buckets, sizeof(http_buckets) / sizeof(http_buckets[0]));
    gw->in_flight = loom_metrics_gauge(gw->metrics, "loom_http_in_flight",
                                       "HTTP requests being handled.", NULL);
    gw->connections =
        loom_metrics_gauge(gw->metrics, "loom_http_connections", "Open HTTP connections.", NULL);
    static const char *const by_labels[] = {"by", NULL};
    gw->rate_limited = loom_metrics_counter(
        gw->metrics, "loom_http_rate_limited_total",
        "Requests answered 429 by the per-caller rate limit, by what keyed the caller's bucket "
        "(token or address).",
        by_labels);
    static const char *const path_labels[] = {"path", NULL};
    gw->op_paths = loom_metrics_counter(
        gw->metrics, "loom_http_op_calls_total",
        "Op calls of the gateway by where they ran: \"loop\" (a statement op pipelined on the "
        "event loop's own connection) or \"thread\" (a worker thread).",
        path_labels);
    gw->limiter = loom_rate_limiter_new(opts->rate_limit, opts->rate_burst, 0);
    gw_limits_init(gw);

    gw->n_workers = opts->workers > 0 ? opts->workers : 8;
    gw->workers = loom_xcalloc((size_t)gw->n_workers, sizeof(pthread_t));
    for (int i = 0; i < gw->n_workers; i++)
        if (pthread_create(&gw->workers[i], NULL, worker_main, gw) != 0) {
            atomic_store(&gw->stopping, true);
            pthread_cond_broadcast(&gw->tasks_cond);
            for (int j = 0; j < i; j++)
                pthread_join(gw->workers[j], NULL);
            gateway_destroy(gw);
            return loom_error_set(err, LOOM_CODE_INTERNAL, "could not start a gateway worker");
        }

    rc = gw_poller_start(gw);
    if (rc != 0) {
        atomic_store(&gw->stopping, true);
        pthread_cond_broadcast(&gw->tasks_cond);
        for (int i = 0; i < gw->n_workers; i++)
            pthread_join(gw->workers[i], NULL);
        gateway_destroy(gw);
        return loom_error_set(err, LOOM_CODE_INTERNAL, "could not start the ?wait poller");
    }

    loom_http_opts_t hopts = {.listen = opts->listen,
                              .threads = opts->threads,
                              .limits = opts->limits,
                              .handler = gateway_handle,
                              .on_done = gateway_done,
                              .opaque = gw,
                              .loop_start = gw_pipe_loop_start,
                              .loop_stop = gw_pipe_loop_stop};
    rc = loom_http_server_start(&hopts, &gw->http, err);
    if (rc != 0) {
        gw_poller_stop(gw);
        atomic_store(&gw->stopping, true);
        pthread_cond_broadcast(&gw->tasks_cond);
        for (int i = 0; i < gw->n_workers; i++)
            pthread_join(gw->workers[i], NULL);
        gateway_destroy(gw);
        return rc;
    }
    LOOM_INFO("gateway started", "routes=%zu tokens=%zu workers=%d", opts->n_routes, gw->n_tokens,
              gw->n_workers);
    *out = gw;
    return 0;
}

size_t loom_gateway_naddrs(const loom_gateway_t *gw)
{
    return loom_http_server_naddrs(gw->http);
}

const char *loom_gateway_addr(const loom_gateway_t *gw, size_t i)
{
    return loom_http_server_addr(gw->http, i);
}

int loom_gateway_port(const loom_gateway_t *gw, size_t i)
{
    return loom_http_server_port(gw->http, i);
}

void loom_gateway_stop(loom_gateway_t *gw, int64_t timeout_ms)
{
    if (!gw || gw->stopped)
        return;
    gw->stopped = true;
    int64_t end = loom_mono_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    LOOM_INFO("gateway stopping", "timeout_ms=%lld", (long long)timeout_ms);
    /* The loops drain first (answers still need the workers), then the
     * workers finish what is queued; their answers to requests whose loop
     * has gone are cancelled. */
    loom_http_server_stop(gw->http, timeout_ms);
    atomic_store(&gw->stopping, true);
    pthread_mutex_lock(&gw->tasks_mu);
    pthread_cond_broadcast(&gw->tasks_cond);
    pthread_mutex_unlock(&gw->tasks_mu);
    for (int i = 0; i < gw->n_workers; i++)
        pthread_join(gw->workers[i], NULL);
    gw->n_workers = 0;
    gw_poller_stop(gw); /* after the loops: waits still running were answered */
    if (gw->opts.producer) {
        int64_t left = end - loom_mono_ms();
        if (loom_producer_flush(gw->opts.producer, left > 0 ? left : 0) != 0)
            LOOM_WARN("producer not flushed before the deadline", "in_flight=%d",
                      loom_producer_in_flight(gw->opts.producer));
    }
    LOOM_INFO("gateway stopped");
}

void loom_gateway_free(loom_gateway_t *gw)
{
    if (!gw)
        return;
    loom_gateway_stop(gw, 0);
    if (gw->opts.producer && loom_producer_in_flight(gw->opts.producer) > 0) {
        /* Delivery reports still to come would reach freed loops: wait for
         * them rather than risk it. */
        loom_producer_flush(gw->opts.producer, 60000);
    }
    loom_http_server_free(gw->http);
    gateway_destroy(gw);
}
