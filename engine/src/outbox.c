/*
 * outbox.c: the outbox relay. Handlers publish follow-up messages by writing
 * loom_outbox rows in their transaction; the relay sends them to Kafka in id
 * order and deletes them once the broker acknowledged every one.
 *
 * The rows stay locked (SELECT ... FOR UPDATE, no SKIP LOCKED) while they are
 * sent, so relays of several workers take turns and keep the order. A row
 * whose send fails stays and is sent again: consumers dedup by message id.
 */
#include "worker_int.h"
#include "loom/clock.h"
#include "loom/log.h"
#include "loom/mem.h"

#include <stdlib.h>
#include <string.h>

#define RELAY_BATCH 500

typedef struct relay_arg {
    loom_worker_t *w;
    int sent;
} relay_arg_t;

static const loom_db_stmt_t stmt_take = {
    "loom_outbox_take",
    "SELECT id, topic, msg_key, headers::text, payload FROM loom_outbox "
    "ORDER BY id LIMIT 500 FOR UPDATE",
    0};

static const loom_db_stmt_t stmt_delete = {
    "loom_outbox_delete", "DELETE FROM loom_outbox WHERE id = ANY($1::bigint[])", 1};

static int relay_body(loom_db_t *db, void *arg, loom_error_t *err)
{
    relay_arg_t *r = arg;
    r->sent = 0;
    PGresult *res = NULL;
    int rc = loom_db_exec(db, &stmt_take, NULL, &res, err);
    if (rc != 0)
        return rc;
    int n = PQntuples(res);
    if (n == 0) {
        PQclear(res);
        return 0;
    }
    loom_delivery_t *d = loom_xcalloc((size_t)n, sizeof(*d));
    int queued = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        size_t len = 0;
        unsigned char *payload =
            PQunescapeBytea((const unsigned char *)PQgetvalue(res, i, 4), &len);
        const char *key = PQgetisnull(res, i, 2) ? NULL : PQgetvalue(res, i, 2);
        loom_delivery_init(&d[i]);
        rd_kafka_headers_t *h = loom_kafka_headers_from_json(PQgetvalue(res, i, 3));
        rc = loom_producer_send_raw(r->w->opts.producer, PQgetvalue(res, i, 1), key,
                                    key ? strlen(key) : 0, h, payload, len, loom_delivery_future_cb,
                                    &d[i], err);
        if (rc != 0)
            rd_kafka_headers_destroy(h);
        else
            queued++;
        PQfreemem(payload);
    }
    /* Every queued message must be reported before the futures go away. */
    for (int i = 0; i < queued; i++) {
        loom_error_t derr;
        int drc = loom_delivery_wait(&d[i], 60000, &derr);
        if (drc != 0 && rc == 0) {
            rc = drc;
            if (err)
                *err = derr;
        }
    }
    for (int i = 0; i < n; i++)
        loom_delivery_release(&d[i]);
    free(d);
    if (rc == 0) {
        loom_db_array_t ids = {0};
        for (int i = 0; i < n; i++)
            loom_db_array_add(&ids, PQgetvalue(res, i, 0));
        const char *p[] = {loom_db_array_str(&ids)};
        rc = loom_db_exec(db, &stmt_delete, p, NULL, err);
        loom_db_array_free(&ids);
        if (rc == 0)
            r->sent = n;
    }
    PQclear(res);
    return rc;
}

void *loom__outbox_relay_run(void *arg)
{
    loom_worker_t *w = arg;
    int failures = 0;
    while (!atomic_load(&w->stop)) {
        relay_arg_t r = {.w = w};
        loom_error_t err;
        loom_tx_opts_t o = {.max_attempts = 3};
        if (loom_tx_run(w->opts.pool, &o, relay_body, &r, &err) != 0) {
            int64_t delay = loom_backoff_ms(failures++, 100, 10000);
            LOOM_WARN("outbox relay failed, will retry", "retry_in_ms=%lld error=%s",
                      (long long)delay, err.message);
            for (int64_t t = 0; t < delay && !atomic_load(&w->stop); t += 50)
                loom_sleep_ms(50);
            continue;
        }
        failures = 0;
        atomic_fetch_add(&w->relayed, r.sent);
        if (r.sent > 0)
            loom_metrics_counter_add(w->m_relayed, NULL, r.sent);
        if (r.sent < RELAY_BATCH)
            loom_sleep_ms(r.sent > 0 ? 5 : 100);
    }
    return NULL;
}
