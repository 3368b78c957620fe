/*
 * registry.instances.list: service instances, filtered and paginated.
 *
 *   request  {"slug"?, "deployment_id"?, "status"?, "host"?, "limit"?: 1..500
 *             (default 100), "cursor"?}
 *   result   {"instances": [instance, ...], "next_cursor": "..." or null}
 *
 * Filters are exact matches, ANDed (host compared lower-case, as stored). A
 * caller through the gateway without registry:admin sees only its own slug's
 * instances (access.h). Pages follow the instances' seq, a key assigned at
 * registration and never changed: the cursor is the last seq of the page
 * (base64url, opaque to clients), so paging on while instances are added
 * never repeats nor skips an instance that existed when paging began; ones
 * added meanwhile show up on a later page.
 */
#include "../ops.h"
#include "access.h"

#include <ctype.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#define CURSOR_PREFIX "i1:"

static const char b64url[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

static void cursor_encode(const char *seq, char *out, size_t size)
{
    char raw[64];
    int n = snprintf(raw, sizeof(raw), CURSOR_PREFIX "%s", seq);
    size_t o = 0;
    for (int i = 0; i < n && o + 5 < size; i += 3) {
        unsigned v = (unsigned char)raw[i] << 16;
        if (i + 1 < n)
            v |= (unsigned char)raw[i + 1] << 8;
        if (i + 2 < n)
            v |= (unsigned char)raw[i + 2];
        out[o++] = b64url[(v >> 18) & 63];
        out[o++] = b64url[(v >> 12) & 63];
        if (i + 1 < n)
            out[o++] = b64url[(v >> 6) & 63];
        if (i + 2 < n)
            out[o++] = b64url[v & 63];
    }
    out[o] = '\0';
}

/* The seq a cursor holds; false when it is not one of ours. */
static bool cursor_decode(const char *cur, long long *seq)
{
    unsigned char raw[64];
    size_t n = 0, len = strlen(cur);
    if (len == 0 || len > 80 || len % 4 == 1)
        return false;
    unsigned v = 0;
    int bits = 0;
    for (size_t i = 0; i < len; i++) {
        const char *p = memchr(b64url, cur[i], 64);
        if (!p || !cur[i])
            return false;
        v = (v << 6) | (unsigned)(p - b64url);
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            if (n + 1 >= sizeof(raw))
                return false;
            raw[n++] = (unsigned char)(v >> bits);
            v &= (1u << bits) - 1;
        }
    }
    raw[n] = '\0';
    size_t plen = strlen(CURSOR_PREFIX);
    if (n <= plen || memcmp(raw, CURSOR_PREFIX, plen) != 0)
        return false;
    long long s = 0;
    for (size_t i = plen; i < n; i++) {
        if (!isdigit(raw[i]) || s > (INT64_MAX - 9) / 10)
            return false;
        s = s * 10 + (raw[i] - '0');
    }
    *seq = s;
    return true;
}

static int instances_list(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                          loom_error_t *err)
{
    static const char *const keys[] = {"slug",  "deployment_id", "status", "host",
                                       "limit", "cursor",        NULL};
    static const char *const filters[] = {"slug", "deployment_id", "status", "host"};
    static const size_t max_len[] = {256, REGISTRY_DEPLOYMENT_MAX, 32, REGISTRY_HOST_MAX};
    const char *val[4] = {0}, *cursor = NULL;
    int rc = loom_op_req_check_keys(req, keys, err);
    for (int i = 0; i < 4 && rc == 0; i++)
        rc = loom_op_req_string(req, filters[i], false, max_len[i], &val[i], err);
    if (rc == 0)
        rc = loom_op_req_string(req, "cursor", false, 80, &cursor, err);
    if (rc != 0)
        return rc;
    if (val[2] && !registry_status_valid(val[2]))
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "status: must be unknown, healthy, degraded or unreachable");
    json_t *jl = json_object_get(req, "limit");
    long long limit = REGISTRY_LIST_LIMIT_DEF;
    if (jl && !json_is_null(jl)) {
        if (!json_is_integer(jl) || json_integer_value(jl) < 1)
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                                  "limit: must be an integer from 1 to %d",
                                  REGISTRY_LIST_LIMIT_MAX);
        if (json_integer_value(jl) > REGISTRY_LIST_LIMIT_MAX)
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "limit: at most %d",
                                  REGISTRY_LIST_LIMIT_MAX);
        limit = (long long)json_integer_value(jl);
    }
    long long after = 0;
    if (cursor && !cursor_decode(cursor, &after))
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "cursor: not a cursor of this listing");

    /* Callers restricted to their own slug: another slug's filter finds nothing. */
    if (!registry_ctx_admin(ctx)) {
        const char *own = ctx->caller ? ctx->caller : "";
        if (val[0] && strcmp(val[0], own) != 0) {
            *res = json_pack("{s:[], s:n}", "instances", "next_cursor");
            return 0;
        }
        val[0] = own;
    }
    char host[REGISTRY_HOST_MAX + 1];
    if (val[3]) {
        size_t i = 0;
        for (; val[3][i] && i < REGISTRY_HOST_MAX; i++)
            host[i] = (char)tolower((unsigned char)val[3][i]);
        host[i] = '\0';
        val[3] = host;
    }

    /* Only the filters given, so each can use its (column, seq) index. */
    char sql[1024], after_s[32], limit_s[32];
    snprintf(after_s, sizeof(after_s), "%lld", after);
    snprintf(limit_s, sizeof(limit_s), "%lld", limit + 1);
    const char *params[6] = {after_s};
    int np = 1;
    size_t len = (size_t)snprintf(sql, sizeof(sql),
                                  "SELECT seq, " REGISTRY_INSTANCE_COLUMNS
                                  " FROM registry_instances WHERE seq > $1::BIGINT");
    for (int i = 0; i < 4; i++) {
        if (!val[i])
            continue;
        params[np++] = val[i];
        len += (size_t)snprintf(sql + len, sizeof(sql) - len, " AND %s = $%d", filters[i], np);
    }
    params[np++] = limit_s;
    snprintf(sql + len, sizeof(sql) - len, " ORDER BY seq LIMIT $%d::INT", np);
    PGresult *r = NULL;
    if ((rc = loom_db_query(db, sql, np, params, &r, err)) != 0)
        return rc;
    int n = PQntuples(r);
    int shown = n > limit ? (int)limit : n;
    json_t *list = json_array();
    for (int i = 0; i < shown; i++)
        json_array_append_new(list, registry_instance_json(r, i));
    json_t *next = json_null();
    if (n > limit) {
        char cur[128];
        cursor_encode(PQgetvalue(r, shown - 1, 0), cur, sizeof(cur));
        json_decref(next);
        next = json_string(cur);
    }
    PQclear(r);
    *res = json_pack("{s:o, s:o}", "instances", list, "next_cursor", next);
    return 0;
}

const loom_op_t loom_op_registry_instances_list = {
    .name = "registry.instances.list",
    .fn = instances_list,
    .timeout_ms = 10000,
    .description = "service instances with exact-match filters, limit and cursor (max 500)",
};
