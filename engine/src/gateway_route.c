/*
 * gateway_route.c: route patterns: checking a table and matching a path.
 *
 * A pattern is a path of segments, each literal or "{name}". Matching walks
 * pattern and path segment by segment, so a parameter never spans a '/'.
 * When several patterns match one path, the one with a literal segment
 * earliest wins ("/v1/registry/nodes/self" over "/v1/registry/nodes/{id}").
 * Tables are small (tens of routes), so a linear scan is the index.
 */
#include "loom/gateway.h"

#include <stdio.h>
#include <string.h>

#define MAX_SEGMENTS 32

static bool is_param(const char *seg, size_t len)
{
    return len >= 3 && seg[0] == '{' && seg[len - 1] == '}';
}

/* Matches; *score has a bit per literal segment, earlier segments higher. */
static bool match(const char *pattern, const char *path, unsigned *score)
{
    const char *p = pattern, *q = path;
    unsigned s = 0;
    int i = 0;
    if (*p != '/' || *q != '/')
        return false;
    for (;;) {
        p++;
        q++;
        size_t pl = strcspn(p, "/"), ql = strcspn(q, "/");
        if (is_param(p, pl)) {
            if (ql == 0)
                return false;
        } else {
            if (pl != ql || memcmp(p, q, pl) != 0)
                return false;
            if (i < MAX_SEGMENTS)
                s |= 1u << (MAX_SEGMENTS - 1 - i);
        }
        p += pl;
        q += ql;
        i++;
        if (*p == '\0' || *q == '\0')
            break;
    }
    if (*p != '\0' || *q != '\0')
        return false;
    *score = s;
    return true;
}

bool loom_route_param(const char *pattern, const char *path, const char *name, const char **value,
                      size_t *len)
{
    unsigned score;
    if (!pattern || !path || !name || !match(pattern, path, &score))
        return false;
    size_t nl = strlen(name);
    const char *p = pattern, *q = path;
    for (;;) {
        p++;
        q++;
        size_t pl = strcspn(p, "/"), ql = strcspn(q, "/");
        if (is_param(p, pl) && pl - 2 == nl && memcmp(p + 1, name, nl) == 0) {
            *value = q;
            *len = ql;
            return true;
        }
        p += pl;
        q += ql;
        if (*p == '\0')
            return false;
    }
}

const loom_route_t *loom_route_match(const loom_route_t *routes, size_t n, const char *method,
                                     const char *path, bool *path_known, char *allow,
                                     size_t allow_size)
{
    const loom_route_t *best = NULL;
    unsigned best_score = 0;
    bool known = false;
    if (allow && allow_size)
        allow[0] = '\0';
    /* The best score of a path match decides, among all methods, which
     * pattern the path means; methods of other patterns do not count. */
    unsigned path_score = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned s;
        if (match(routes[i].pattern, path, &s) && (!known || s > path_score)) {
            path_score = s;
            known = true;
        }
    }
    if (!known) {
        if (path_known)
            *path_known = false;
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned s;
        if (!match(routes[i].pattern, path, &s) || s != path_score)
            continue;
        if (strcmp(routes[i].method, method) == 0 && (!best || s > best_score)) {
            best = &routes[i];
            best_score = s;
        }
        if (allow && allow_size && !strstr(allow, routes[i].method)) {
            size_t len = strlen(allow);
            snprintf(allow + len, allow_size - len, "%s%s", len ? ", " : "", routes[i].method);
        }
    }
    if (path_known)
        *path_known = true;
    return best;
}

static bool valid_method(const char *m)
{
    static const char *const methods[] = {"GET", "POST", "PUT", "PATCH", "DELETE", NULL};
    for (const char *const *x = methods; *x; x++)
        if (m && strcmp(m, *x) == 0)
            return true;
    return false;
}

static bool valid_pattern(const char *pattern)
{
    if (!pattern || pattern[0] != '/' || strlen(pattern) > 512)
        return false;
    const char *p = pattern;
    int segs = 0;
    while (*p) {
        p++;
        size_t len = strcspn(p, "/");
        if (len == 0 && p[len] == '/')
            return false; /* "//" */
        if (memchr(p, '{', len) || memchr(p, '}', len)) {
            if (!is_param(p, len))
                return false;
            for (size_t i = 1; i + 1 < len; i++)
                if (!((p[i] >= 'a' && p[i] <= 'z') || p[i] == '_' || (p[i] >= '0' && p[i] <= '9')))
                    return false;
        }
        for (size_t i = 0; i < len; i++)
            if ((unsigned char)p[i] <= ' ' || p[i] == '?' || p[i] == '#' || p[i] == 0x7f)
                return false;
        p += len;
        if (++segs > MAX_SEGMENTS)
            return false;
    }
    return true;
}

int loom_route_table_check(const loom_route_t *routes, size_t n, loom_error_t *err)
{
    for (size_t i = 0; i < n; i++) {
        const loom_route_t *r = &routes[i];
        if (!valid_method(r->method))
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                                  "route \"%s\": method \"%s\" is not GET, POST, PUT, PATCH or "
                                  "DELETE",
                                  r->pattern ? r->pattern : "(null)",
                                  r->method ? r->method : "(null)");
        if (!valid_pattern(r->pattern))
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                                  "route %s \"%s\": a pattern is a path of literal segments and "
                                  "{name} parameters ([a-z0-9_])",
                                  r->method, r->pattern ? r->pattern : "(null)");
        if (!r->handler)
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "route %s %s has no handler",
                                  r->method, r->pattern);
        for (size_t j = 0; j < i; j++)
            if (strcmp(routes[j].method, r->method) == 0 &&
                strcmp(routes[j].pattern, r->pattern) == 0)
                return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                                      "route %s %s is registered twice", r->method, r->pattern);
    }
    return 0;
}
