/*
 * replay.c: rebuilding a read model from loom_events.
 *
 * Events are read in pages by (recorded_at, stream_id, version) inside the
 * same transaction that emptied the read model, so a failure leaves the old
 * read model untouched.
 */
#include "loom/replay.h"
#include "loom/log.h"

#include <stdlib.h>
#include <string.h>

#define PAGE 1000

typedef struct replay_arg {
    const loom_projection_t *p;
    int64_t applied;
} replay_arg_t;

static int replay_body(loom_db_t *db, void *arg, loom_error_t *err)
{
    replay_arg_t *a = arg;
    a->applied = 0;
    int rc = loom_db_exec_script(db, a->p->reset_sql, err);
    if (rc != 0)
        return rc;
    char prefix[256];
    snprintf(prefix, sizeof(prefix), "%s%%", a->p->event_prefix);
    char last_time[64] = "-infinity", last_stream[1024] = "", last_version[32] = "0";
    for (;;) {
        const char *p[] = {prefix, last_time, last_stream, last_version};
        PGresult *res = NULL;
        rc = loom_db_query(db,
                           "SELECT stream_id, version, type, data::text, "
                           "recorded_at::text FROM loom_events WHERE type LIKE $1 AND "
                           "(recorded_at, stream_id, version) > ($2::timestamptz, $3, $4::bigint) "
                           "ORDER BY recorded_at, stream_id, version LIMIT 1000",
                           4, p, &res, err);
        if (rc != 0)
            return rc;
        int n = PQntuples(res);
        for (int i = 0; i < n && rc == 0; i++) {
            json_error_t jerr;
            json_t *data = json_loads(PQgetvalue(res, i, 3), JSON_DECODE_ANY, &jerr);
            loom_event_row_t ev = {PQgetvalue(res, i, 0), atoll(PQgetvalue(res, i, 1)),
                                   PQgetvalue(res, i, 2), data, PQgetvalue(res, i, 4)};
            rc = data ? a->p->apply(db, &ev, err)
                      : loom_error_set(err, LOOM_CODE_INTERNAL,
                                       "event %s/%lld holds invalid JSON: %s", ev.stream_id,
                                       (long long)ev.version, jerr.text);
            json_decref(data);
            a->applied++;
        }
        if (rc == 0 && n > 0) {
            snprintf(last_time, sizeof(last_time), "%s", PQgetvalue(res, n - 1, 4));
            snprintf(last_stream, sizeof(last_stream), "%s", PQgetvalue(res, n - 1, 0));
            snprintf(last_version, sizeof(last_version), "%s", PQgetvalue(res, n - 1, 1));
        }
        PQclear(res);
        if (rc != 0 || n < PAGE)
            return rc;
    }
}

int loom_replay(loom_db_pool_t *pool, const loom_projection_t *p, int64_t *applied,
                loom_error_t *err)
{
    replay_arg_t a = {p, 0};
    loom_tx_opts_t o = {.isolation = "REPEATABLE READ"};
    int rc = loom_tx_run(pool, &o, replay_body, &a, err);
    if (applied)
        *applied = a.applied;
    if (rc == 0)
        LOOM_INFO("projection rebuilt", "projection=%s events=%lld", p->name, (long long)a.applied);
    return rc;
}
