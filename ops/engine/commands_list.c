/*
 * engine.commands.list: the rows of loom_commands, newest first, a page at a
 * time, for the console's command list (docs/console.md).
 *
 *   request  {"status"?, "consumer"?, "type"?, "key"?, "ray_id"?,
 *             "from"?, "to"?  (RFC 3339, on received_at: from <= t < to),
 *             "limit"? (1-200, default 50), "cursor"?}
 *   result   {"commands": [{"id", "consumer", "type", "status", "attempts",
 *             "last_error", "stream_id", "ray_id", "causation_id",
 *             "received_at", "updated_at"}], "next_cursor": "..." | null}
 *
 * Paging is by key, not by offset: the order is (received_at, id, consumer)
 * descending, received_at never changes once a row exists, and the cursor
 * holds the last row's key, so a page costs the same at row 10 and at row
 * 1,000,000 and a row written meanwhile never shifts a page. The statement
 * holds only the filters asked for, so PostgreSQL plans each call with the
 * index that fits (migrations/engine/0007_console.up.sql).
 */
#include "loom/mem.h"
#include "loom/op.h"
#include "../row.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define LIST_LIMIT_MAX 200

/* "2026-12-07T03:04:05[.123456](Z|+01:00)" as Unix microseconds. */
static bool parse_time(const char *s, int64_t *out_us)
{
    int y, mo, d, h, mi, sec = 0, n = 0;
    if (sscanf(s, "%4d-%2d-%2dT%2d:%2d%n", &y, &mo, &d, &h, &mi, &n) != 5 || n != 16)
        return false;
    const char *p = s + n;
    int64_t frac = 0;
    if (*p == ':') {
        if (p[1] < '0' || p[1] > '9' || p[2] < '0' || p[2] > '9')
            return false;
        sec = (p[1] - '0') * 10 + (p[2] - '0');
        p += 3;
        if (*p == '.') {
            int digits = 0;
            for (p++; *p >= '0' && *p <= '9'; p++, digits++)
                if (digits < 6)
                    frac = frac * 10 + (*p - '0');
            if (digits == 0)
                return false;
            for (; digits < 6; digits++)
                frac *= 10;
        }
    }
    int64_t offset_s = 0;
    if (*p == 'Z' || *p == 'z') {
        p++;
    } else if (*p == '+' || *p == '-') {
        int oh, om, m = 0;
        if (sscanf(p + 1, "%2d:%2d%n", &oh, &om, &m) != 2 || m != 5 || oh > 23 || om > 59)
            return false;
        offset_s = (oh * 3600 + om * 60) * (*p == '-' ? -1 : 1);
        p += 6;
    } else {
        return false;
    }
    if (*p || mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 || mi > 59 || sec > 60 || y < 1970)
        return false;
    struct tm tm = {.tm_year = y - 1900,
                    .tm_mon = mo - 1,
                    .tm_mday = d,
                    .tm_hour = h,
                    .tm_min = mi,
                    .tm_sec = sec};
    time_t t = timegm(&tm);
    if (t == (time_t)-1)
        return false;
    *out_us = ((int64_t)t - offset_s) * 1000000 + frac;
    return true;
}

/* The cursor is the hex of the JSON [received_us, id, consumer] of a page's
 * last row: opaque to callers, checked like any other input. */
static char *cursor_encode(const char *us, const char *id, const char *consumer)
{
    json_t *a = json_pack("[I, s, s]", (json_int_t)strtoll(us, NULL, 10), id, consumer);
    char *text = a ? json_dumps(a, JSON_COMPACT) : NULL;
    json_decref(a);
    if (!text)
        return NULL;
    size_t n = strlen(text);
    char *hex = loom_xmalloc(2 * n + 1);
    for (size_t i = 0; i < n; i++)
        snprintf(hex + 2 * i, 3, "%02x", (unsigned char)text[i]);
    free(text);
    return hex;
}

static int hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

static json_t *cursor_decode(const char *hex)
{
    size_t n = strlen(hex);
    if (n == 0 || n % 2 || n > 2000)
        return NULL;
    char buf[1001];
    for (size_t i = 0; i < n / 2; i++) {
        int a = hexval(hex[2 * i]), b = hexval(hex[2 * i + 1]);
        if (a < 0 || b < 0)
            return NULL;
        buf[i] = (char)(a * 16 + b);
    }
    json_t *c = json_loadb(buf, n / 2, 0, NULL);
    if (!json_is_array(c) || json_array_size(c) != 3 || !json_is_integer(json_array_get(c, 0)) ||
        !json_is_string(json_array_get(c, 1)) || !json_is_string(json_array_get(c, 2))) {
        json_decref(c);
        return NULL;
    }
    return c;
}

static bool valid_status(const char *s)
{
    static const char *const statuses[] = {"applied", "rejected", "retrying",
                                           "parked",  "expired",  "conflict"};
    for (size_t i = 0; s && i < sizeof(statuses) / sizeof(statuses[0]); i++)
        if (strcmp(s, statuses[i]) == 0)
            return true;
    return !s;
}

static int commands_list(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                         loom_error_t *err)
{
    (void)ctx;
    static const char *const keys[] = {"status", "consumer", "type",  "key",    "ray_id",
                                       "from",   "to",       "limit", "cursor", NULL};
    const char *status = NULL, *consumer = NULL, *type = NULL, *key = NULL, *ray = NULL,
               *from = NULL, *to = NULL, *cursor = NULL;
    int rc = loom_op_req_check_keys(req, keys, err);
    if (rc == 0)
        rc = loom_op_req_string(req, "status", false, 20, &status, err);
    if (rc == 0)
        rc = loom_op_req_string(req, "consumer", false, 200, &consumer, err);
    if (rc == 0)
        rc = loom_op_req_string(req, "type", false, 200, &type, err);
    if (rc == 0)
        rc = loom_op_req_string(req, "key", false, 1000, &key, err);
    if (rc == 0)
        rc = loom_op_req_string(req, "ray_id", false, 200, &ray, err);
    if (rc == 0)
        rc = loom_op_req_string(req, "from", false, 40, &from, err);
    if (rc == 0)
        rc = loom_op_req_string(req, "to", false, 40, &to, err);
    if (rc == 0)
        rc = loom_op_req_string(req, "cursor", false, 2000, &cursor, err);
    if (rc != 0)
        return rc;
    if (!valid_status(status))
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "field \"status\" must be applied, rejected, retrying, parked, "
                              "expired or conflict");
    json_int_t limit = 50;
    json_t *jl = json_object_get(req, "limit");
    if (jl && !json_is_null(jl)) {
        if (!json_is_integer(jl) || json_integer_value(jl) < 1 ||
            json_integer_value(jl) > LIST_LIMIT_MAX)
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                                  "field \"limit\" must be an integer from 1 to %d",
                                  LIST_LIMIT_MAX);
        limit = json_integer_value(jl);
    }
    int64_t from_us = 0, to_us = 0;
    if (from && !parse_time(from, &from_us))
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "field \"from\" must be an RFC 3339 time, 2026-01-31T12:00:00Z");
    if (to && !parse_time(to, &to_us))
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "field \"to\" must be an RFC 3339 time, 2026-01-31T12:00:00Z");
    json_t *cur = NULL;
    if (cursor && !(cur = cursor_decode(cursor)))
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "field \"cursor\" is not a cursor this op returned");

    /* Only the filters asked for, so each call is planned for its own. */
    char sql[2048], num[4][32];
    const char *params[12];
    int np = 0;
    size_t off = (size_t)snprintf(
        sql, sizeof(sql),
        "SELECT message_id, consumer, type, status, attempts, last_error, stream_id, ray_id, "
        "causation_id, (extract(epoch FROM received_at) * 1000000)::BIGINT AS received_us, "
        "(extract(epoch FROM updated_at) * 1000000)::BIGINT AS updated_us "
        "FROM loom_commands WHERE true");
#define FILTER(cond, value)                                              \
    do {                                                                 \
        params[np++] = (value);                                          \
        off += (size_t)snprintf(sql + off, sizeof(sql) - off, cond, np); \
    } while (0)
    if (status)
        FILTER(" AND status = $%d", status);
    if (consumer)
        FILTER(" AND consumer = $%d", consumer);
    if (type)
        FILTER(" AND type = $%d", type);
    if (key)
        FILTER(" AND stream_id = $%d", key);
    if (ray)
        FILTER(" AND ray_id = $%d", ray);
    if (from) {
        snprintf(num[0], sizeof(num[0]), "%" PRId64, from_us);
        FILTER(" AND received_at >= 'epoch'::timestamptz + $%d::BIGINT * interval '1 microsecond'",
               num[0]);
    }
    if (to) {
        snprintf(num[1], sizeof(num[1]), "%" PRId64, to_us);
        FILTER(" AND received_at < 'epoch'::timestamptz + $%d::BIGINT * interval '1 microsecond'",
               num[1]);
    }
    if (cur) {
        snprintf(num[2], sizeof(num[2]), "%" JSON_INTEGER_FORMAT,
                 json_integer_value(json_array_get(cur, 0)));
        params[np++] = num[2];
        params[np++] = json_string_value(json_array_get(cur, 1));
        params[np++] = json_string_value(json_array_get(cur, 2));
        off += (size_t)snprintf(sql + off, sizeof(sql) - off,
                                " AND (received_at, message_id, consumer) < ('epoch'::timestamptz "
                                "+ $%d::BIGINT * interval '1 microsecond', $%d, $%d)",
                                np - 2, np - 1, np);
    }
#undef FILTER
    snprintf(num[3], sizeof(num[3]), "%d", (int)limit + 1);
    params[np++] = num[3];
    snprintf(sql + off, sizeof(sql) - off,
             " ORDER BY received_at DESC, message_id DESC, consumer DESC LIMIT $%d::INT", np);

    PGresult *r = NULL;
    rc = loom_db_query(db, sql, np, params, &r, err);
    json_decref(cur);
    if (rc != 0)
        return rc;
    int n = PQntuples(r);
    int shown = n > limit ? (int)limit : n;
    json_t *list = json_array();
    for (int i = 0; i < shown; i++) {
        json_t *c = json_object();
        json_object_set_new(c, "id", row_string(r, i, "message_id"));
        json_object_set_new(c, "consumer", row_string(r, i, "consumer"));
        json_object_set_new(c, "type", row_string(r, i, "type"));
        json_object_set_new(c, "status", row_string(r, i, "status"));
        json_object_set_new(c, "attempts", row_integer(r, i, "attempts"));
        json_object_set_new(c, "last_error", row_string(r, i, "last_error"));
        json_object_set_new(c, "stream_id", row_string(r, i, "stream_id"));
        json_object_set_new(c, "ray_id", row_string(r, i, "ray_id"));
        json_object_set_new(c, "causation_id", row_string(r, i, "causation_id"));
        json_object_set_new(c, "received_at", row_time(r, i, "received_us"));
        json_object_set_new(c, "updated_at", row_time(r, i, "updated_us"));
        json_array_append_new(list, c);
    }
    json_t *next = json_null();
    if (n > limit) {
        char *hex =
            cursor_encode(row_text(r, shown - 1, "received_us"),
                          row_text(r, shown - 1, "message_id"), row_text(r, shown - 1, "consumer"));
        if (hex) {
            next = json_string(hex);
            free(hex);
        }
    }
    PQclear(r);
    *res = json_pack("{s:o, s:o}", "commands", list, "next_cursor", next);
    return 0;
}

const loom_op_t loom_op_engine_commands_list = {
    .name = "engine.commands.list",
    .fn = commands_list,
    .timeout_ms = 5000,
    .description = "commands newest first, filtered by status, consumer, type, key, ray id and "
                   "time, paged by cursor",
};
