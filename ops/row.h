/*
 * row.h: turning PGresult columns into jansson values, for op handlers.
 * Columns are looked up by name. Every function returns a new reference,
 * never NULL: SQL NULL, and a value jansson cannot hold, become JSON null.
 */
#ifndef LOOM_OPS_ROW_H
#define LOOM_OPS_ROW_H

#include "loom/clock.h"

#include <jansson.h>
#include <libpq-fe.h>
#include <stdlib.h>

static inline const char *row_text(const PGresult *res, int row, const char *col)
{
    int c = PQfnumber(res, col);
    return c < 0 || PQgetisnull(res, row, c) ? NULL : PQgetvalue(res, row, c);
}

static inline json_t *or_null(json_t *v)
{
    return v ? v : json_null();
}

static inline json_t *row_string(const PGresult *res, int row, const char *col)
{
    const char *v = row_text(res, row, col);
    return v ? or_null(json_string(v)) : json_null();
}

static inline json_t *row_integer(const PGresult *res, int row, const char *col)
{
    const char *v = row_text(res, row, col);
    return v ? or_null(json_integer(strtoll(v, NULL, 10))) : json_null();
}

static inline json_t *row_bool(const PGresult *res, int row, const char *col)
{
    const char *v = row_text(res, row, col);
    return v ? json_boolean(v[0] == 't') : json_null();
}

/* A JSON/JSONB column (selected as text) as its JSON value. */
static inline json_t *row_json(const PGresult *res, int row, const char *col)
{
    const char *v = row_text(res, row, col);
    return v ? or_null(json_loads(v, JSON_DECODE_ANY, NULL)) : json_null();
}

/* A column of Unix microseconds as an RFC 3339 UTC timestamp. Selecting
 * (extract(epoch FROM t) * 1000000)::BIGINT works on Postgres and
 * CockroachDB alike, whatever the session's time zone. */
static inline json_t *row_time(const PGresult *res, int row, const char *col)
{
    const char *v = row_text(res, row, col);
    if (!v)
        return json_null();
    char buf[40];
    loom_rfc3339_format(strtoll(v, NULL, 10), buf, sizeof(buf));
    return or_null(json_string(buf));
}

#endif
