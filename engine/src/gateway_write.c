/*
 * gateway_write.c: the write path: publish a command, answer after the
 * broker's acknowledgement, and optionally wait until a worker applied it.
 *
 * A write is a small state machine per request (pub_t):
 *
 *   PUBLISHING  loom_producer_send() queued it; the delivery report arrives
 *               on the producer's thread and is posted back to the loop
 *   WAITING     (?wait) the request is in the gateway's poller (below) until
 *               its command reached a final status or the wait ran out; the
 *               poller then posts the outcome back to the loop
 *
 * The poller: one thread per gateway. Every tick while requests wait, it
 * reads the status of the waiting commands in at most
 * WAIT_QUERIES_PER_TICK queries of at most WAIT_IDS_PER_QUERY ids each (one
 * probe of the loom_commands_by_message index per id, LOOM_SQL_WAIT_STATUS),
 * taking the waiters in turn when there are more. So waiting costs the database a
 * bounded number of queries a second whatever the number of waiters, instead
 * of a query per waiter that grows with the load. A tick is WAIT_TICK_MIN_MS
 * (an answer waits about half a tick after its command was applied),
 * stretched to WAIT_TICK_SHARE times what the last round's queries took, up
 * to WAIT_TICK_MAX_MS: a slow database is asked less often. Ticks of 2 ms
 * made the poller's 500 queries a second most of the database's
 * transactions at a light load, and the worker's commits waited behind
 * them on this kind of 2-core machine: the tail of ?wait grew; 5 ms keeps
 * that cost at 200 queries a second per gateway. The number of waiters is
 * bounded too (LOOM_API_MAX_WAITERS, gateway_limit.c): past it a ?wait
 * request is refused with 503 before anything is published.
 *
 * Ownership: a waiter in the poller's list belongs to the poller; whoever
 * takes it out of the list (the poller to answer it, or the detach hook of a
 * client that went away) frees it or posts it. While the poller reads a
 * waiter's rows (inflight) the detach hook only marks it gone. No libuv
 * handle is held while waiting, so a shutdown leaves none behind.
 *
 * Idempotency-Key: the command id is derived from (caller, route, key), so a
 * retry publishes the same id and the consumers' dedup rows apply it once;
 * nothing is stored in the gateway. A retry with the same key but another
 * body is the same command: the first one applied wins.
 */
#include "gateway_int.h"
#include "loom/clock.h"
#include "loom/db.h"
#include "loom/envelope.h"
#include "loom/log.h"
#include "loom/mem.h"
#include "loom/uuid.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define WAIT_TICK_MIN_MS 5
#define WAIT_TICK_MAX_MS 10
/* While the database cannot be read: a round this often, and a warning at
 * most once a second (the waits still end at their deadlines). */
#define WAIT_TICK_DOWN_MS     100
#define WAIT_WARN_EVERY_MS    1000
#define WAIT_TICK_SHARE       5
#define WAIT_IDS_PER_QUERY    500
#define WAIT_QUERIES_PER_TICK 4
#define WAIT_BATCH            (WAIT_IDS_PER_QUERY * WAIT_QUERIES_PER_TICK)

typedef enum { P_PUBLISHING, P_WAITING } pstate_t;

/* What the poller found. */
typedef enum { W_NONE, W_APPLIED, W_REJECTED, W_PARKED, W_EXPIRED, W_RAN_OUT } woutcome_t;

struct pub {
    loom_gateway_t *gw;
    loom_http_req_t *req;
    char id[LOOM_UUID_STRLEN + 1];
    int64_t wait_ms, deadline_ms;
    pstate_t state;
    bool failed;
    bool admitted; /* holds a place among the waiters */
    int64_t admitted_ns;
    int held_at_admit; /* waiters held then, itself included */
    int64_t admit_seq; /* its number among the admissions */
    loom_error_t err;
    size_t bytes; /* of the command's data, for a too-large answer */
    char topic[300];
    /* Under poller.mu: */
    ssize_t slot;  /* index in poller.waiting; -1: not there */
    bool inflight; /* the poller reads its rows now */
    bool gone;     /* the client went away while inflight */
    /* Written by the poller while inflight or out of the list: */
    woutcome_t outcome;
    int n_rows, n_applied;
    char *text;      /* the first applied row's result, or the reason of a rejection */
    char status[16]; /* last status seen while waiting */
};

/* Kafka refused the record for its size (the topic's max.message.bytes, or
 * the producer's message.max.bytes): 413 naming the limit, not retriable. */
static void too_large(loom_error_t *err, const char *topic, size_t bytes)
{
    loom_error_set(err, LOOM_CODE_PAYLOAD_TOO_LARGE,
                   "the command (%zu bytes of data) is larger than Kafka accepts on topic %s: "
                   "its max.message.bytes (on a stock broker message.max.bytes, 1048588 bytes) "
                   "caps a record; send less per request or raise the topic's limit",
                   bytes, topic);
    err->retriable = false;
}

void loom_gateway_idempotent_id(const char *caller, const char *route, const char *key,
                                char out[37])
{
    loom_sha256_t ctx;
    uint8_t d[LOOM_SHA256_LEN];
    loom_sha256_init(&ctx);
    loom_sha256_update(&ctx, caller ? caller : "", strlen(caller ? caller : "") + 1);
    loom_sha256_update(&ctx, route ? route : "", strlen(route ? route : "") + 1);
    loom_sha256_update(&ctx, key, strlen(key));
    loom_sha256_final(&ctx, d);
    loom_uuid_t u;
    memcpy(u.b, d, 16);
    u.b[6] = (uint8_t)((u.b[6] & 0x0f) | 0x80); /* version 8 */
    u.b[8] = (uint8_t)((u.b[8] & 0x3f) | 0x80); /* RFC 9562 variant */
    loom_uuid_format(&u, out);
}

/* True when s is valid UTF-8 without control characters. */
static bool printable_utf8(const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        unsigned char c = s[i];
        size_t len = c < 0x80             ? 1
                     : (c & 0xe0) == 0xc0 ? 2
                     : (c & 0xf0) == 0xe0 ? 3
                     : (c & 0xf8) == 0xf0 ? 4
                                          : 0;
        if (len == 0 || i + len > n || (len == 1 && (c < 0x20 || c == 0x7f)))
            return false;
        uint32_t cp = len == 1 ? c : len == 2 ? c & 0x1f : len == 3 ? c & 0x0f : c & 0x07;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80)
                return false;
            cp = (cp << 6) | (s[i + k] & 0x3f);
        }
        /* overlong forms, surrogates, past U+10FFFF */
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
            (cp >= 0xd800 && cp <= 0xdfff) || cp > 0x10ffff)
            return false;
        i += len;
    }
    return true;
}

int loom_gateway_partition_key(loom_http_req_t *req, const char **key, loom_error_t *err)
{
    *key = loom_http_req_header(req, "Partition-Key");
    if (!*key)
        return 0;
    size_t n = strlen(*key);
    if (n == 0 || n > LOOM_GATEWAY_PARTITION_KEY_MAX ||
        !printable_utf8((const unsigned char *)*key, n)) {
        *key = NULL;
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "Partition-Key must be 1 to %d bytes of printable UTF-8",
                              LOOM_GATEWAY_PARTITION_KEY_MAX);
    }
    return 0;
}

static void pub_free(pub_t *p)
{
    loom_http_req_t *req = p->req;
    loom_http_req_on_detach(req, NULL, NULL);
    if (p->admitted) {
        /* A wait that ended with the command's outcome tells the adaptive
         * bound how long the way through Kafka and the workers took. One
         * that ran out or whose client left says nothing of it (a stopped
         * consumer would otherwise bring the bound down for every route):
         * it counts as on time. One never published is not counted. */
        int64_t held = -1;
        if (p->state == P_WAITING)
            held = p->outcome == W_NONE || p->outcome == W_RAN_OUT
                       ? 0
                       : loom_mono_ns() - p->admitted_ns;
        gw_waiter_release(p->gw, held, p->held_at_admit, p->admit_seq);
    }
    free(p->text);
    free(p);
    loom_http_req_unref(req);
}

static void reply_accepted(pub_t *p, const char *status)
{
    loom_http_res_t *res = loom_http_req_res(p->req);
    char loc[80];
    snprintf(loc, sizeof(loc), "/v1/commands/%s", p->id);
    loom_http_res_header(res, "Location", loc);
    json_t *body = json_pack("{s:s}", "command_id", p->id);
    if (status)
        json_object_set_new(body, "status", json_string(status));
    loom_gateway_reply(p->req, res, 202, body);
}

/* ---- the poller --------------------------------------------------------------------- */

/* Planned once per connection: its plan is an index probe per id whatever
 * the statistics (gateway_int.h), and planning it at every tick cost more
 * than running it. */
static const loom_db_stmt_t wait_status_stmt = {"loom_gateway_wait_status", LOOM_SQL_WAIT_STATUS, 1,
                                                .plan_once = true};

/* poller.mu held. */
static void waiting_remove(gw_poller_t *pl, pub_t *p)
{
    size_t i = (size_t)p->slot;
    pl->waiting[i] = pl->waiting[--pl->n];
    pl->waiting[i]->slot = (ssize_t)i;
    p->slot = -1;
}

/* On the loop: the poller's outcome. */
static void wait_done(loom_http_req_t *req, void *arg, bool cancelled)
{
    pub_t *p = arg;
    if (cancelled || loom_http_req_detached(req)) {
        pub_free(p);
        return;
    }
    loom_error_t err;
    switch (p->outcome) {
    case W_APPLIED: {
        json_t *res = p->text ? json_loads(p->text, JSON_DECODE_ANY, NULL) : NULL;
        json_t *body = json_pack("{s:s, s:s, s:o}", "command_id", p->id, "status", "applied",
                                 "result", res ? res : json_null());
        loom_gateway_reply(req, loom_http_req_res(req), 200, body);
        break;
    }
    case W_REJECTED:
        loom_error_set(&err, LOOM_CODE_COMMAND_REJECTED, "command %s was rejected: %s", p->id,
                       p->text ? p->text : "no reason recorded");
        loom_gateway_fail(req, loom_http_req_res(req), &err);
        break;
    case W_PARKED:
        reply_accepted(p, "parked");
        break;
    case W_EXPIRED:
        loom_error_set(&err, LOOM_CODE_COMMAND_EXPIRED,
                       "command %s was not applied: its deadline had passed when a worker took it",
                       p->id);
        loom_gateway_fail(req, loom_http_req_res(req), &err);
        break;
    default:
        reply_accepted(p, p->status[0] ? p->status : "pending");
        break;
    }
    pub_free(p);
}

/* On the loop: the client went away. */
static void on_detach(loom_http_req_t *req, void *arg)
{
    (void)req;
    pub_t *p = arg;
    if (p->state != P_WAITING)
        return; /* the delivery report frees it */
    gw_poller_t *pl = &p->gw->poller;
    pthread_mutex_lock(&pl->mu);
    bool mine = p->slot >= 0 && !p->inflight;
    if (mine)
        waiting_remove(pl, p);
    else if (p->slot >= 0)
        p->gone = true;
    pthread_mutex_unlock(&pl->mu);
    if (mine)
        pub_free(p);
}

/* Adds one row of the waiter's command to what the poller found; rows come
 * by consumer, as engine.commands.get lists them. */
static void waiter_row(pub_t *p, const char *status, const char *last_error, const char *result)
{
    if (p->outcome != W_NONE)
        return;
    snprintf(p->status, sizeof(p->status), "%s", status);
    p->n_rows++;
    if (strcmp(status, "rejected") == 0) {
        p->outcome = W_REJECTED;
        free(p->text);
        p->text = last_error ? loom_xstrdup(last_error) : NULL;
    } else if (strcmp(status, "parked") == 0) {
        p->outcome = W_PARKED;
    } else if (strcmp(status, "expired") == 0) {
        p->outcome = W_EXPIRED;
    } else if (strcmp(status, "applied") == 0 && p->n_applied++ == 0) {
        free(p->text);
        p->text = result ? loom_xstrdup(result) : NULL;
    }
}

static int by_id(const void *a, const void *b)
{
    return strcmp((*(pub_t *const *)a)->id, (*(pub_t *const *)b)->id);
}

/* One query for batch[0..n) (sorted by id); fills their outcomes. */
/* A warning of the poller, at most once every WAIT_WARN_EVERY_MS (the
 * poller's thread only). */
static void poll_warn(gw_poller_t *pl, const char *what, const char *error)
{
    int64_t now = loom_mono_ms();
    if (pl->warned_ms && now - pl->warned_ms < WAIT_WARN_EVERY_MS) {
        pl->warnings_held++;
        return;
    }
    LOOM_WARN(what, "error=%s warnings_held=%d", error, pl->warnings_held);
    pl->warned_ms = now;
    pl->warnings_held = 0;
}

/* Returns 0, or -1 when the query failed. */
static int poll_chunk(loom_gateway_t *gw, loom_db_t *db, pub_t **batch, size_t n)
{
    char *arr = loom_xmalloc(n * (LOOM_UUID_STRLEN + 1) + 3);
    size_t o = 0;
    arr[o++] = '{';
    for (size_t i = 0; i < n; i++) {
        if (i > 0 && strcmp(batch[i]->id, batch[i - 1]->id) == 0)
            continue;
        if (o > 1)
            arr[o++] = ',';
        size_t l = strlen(batch[i]->id);
        memcpy(arr + o, batch[i]->id, l);
        o += l;
    }
    arr[o++] = '}';
    arr[o] = '\0';
    for (size_t i = 0; i < n; i++) {
        batch[i]->n_rows = batch[i]->n_applied = 0;
        free(batch[i]->text);
        batch[i]->text = NULL;
    }
    const char *params[] = {arr};
    PGresult *r = NULL;
    loom_error_t err;
    loom_metrics_counter_inc(gw->wait_queries, NULL);
    int rc = loom_db_exec(db, &wait_status_stmt, params, &r, &err);
    free(arr);
    if (rc != 0) {
        poll_warn(&gw->poller, "?wait poll failed; the waits go on", err.message);
        return -1;
    }
    for (int row = 0; row < PQntuples(r); row++) {
        const char *id = PQgetvalue(r, row, 0);
        const char *st = PQgetisnull(r, row, 1) ? NULL : PQgetvalue(r, row, 1);
        if (!st)
            continue;
        const char *why = PQgetisnull(r, row, 2) ? NULL : PQgetvalue(r, row, 2);
        const char *res = PQgetisnull(r, row, 3) ? NULL : PQgetvalue(r, row, 3);
        /* The first waiter of that id, then the ones after it. */
        size_t lo = 0, hi = n;
        while (lo < hi) {
            size_t mid = (lo + hi) / 2;
            if (strcmp(batch[mid]->id, id) < 0)
                lo = mid + 1;
            else
                hi = mid;
        }
        for (size_t i = lo; i < n && strcmp(batch[i]->id, id) == 0; i++)
            waiter_row(batch[i], st, why, res);
    }
    PQclear(r);
    for (size_t i = 0; i < n; i++)
        if (batch[i]->outcome == W_NONE && batch[i]->n_rows > 0 &&
            batch[i]->n_applied == batch[i]->n_rows)
            batch[i]->outcome = W_APPLIED;
    return 0;
}

static void abs_ms(struct timespec *ts, int64_t mono_ms)
{
    ts->tv_sec = (time_t)(mono_ms / 1000);
    ts->tv_nsec = (long)(mono_ms % 1000) * 1000000L;
}

static void *poller_main(void *arg)
{
    loom_gateway_t *gw = arg;
    gw_poller_t *pl = &gw->poller;
    pub_t **batch = loom_xcalloc(WAIT_BATCH, sizeof(*batch));
    size_t cap_post = 64;
    pub_t **post = loom_xcalloc(cap_post, sizeof(*post));
    pthread_mutex_lock(&pl->mu);
    while (!pl->stop) {
        if (pl->n == 0) {
            pthread_cond_wait(&pl->cond, &pl->mu);
            /* The first waiter after a pause: its command was acknowledged
             * just now, and a worker still has to fetch and apply it, so a
             * query at once would find nothing. The first round is a tick
             * later. */
            int64_t first = loom_mono_ms() + WAIT_TICK_MIN_MS;
            struct timespec ts;
            abs_ms(&ts, first);
            while (!pl->stop && loom_mono_ms() < first)
                if (pthread_cond_timedwait(&pl->cond, &pl->mu, &ts) == ETIMEDOUT)
                    break;
            continue;
        }
        int64_t tick = loom_mono_ms();
        /* Take up to WAIT_BATCH waiters, in turn from the cursor. */
        size_t nb = 0;
        if (pl->cursor >= pl->n)
            pl->cursor = 0;
        for (size_t k = 0; k < pl->n && nb < WAIT_BATCH; k++) {
            pub_t *p = pl->waiting[(pl->cursor + k) % pl->n];
            p->inflight = true;
            batch[nb++] = p;
        }
        pl->cursor = (pl->cursor + nb) % pl->n;
        pthread_mutex_unlock(&pl->mu);

        loom_metrics_counter_inc(gw->wait_ticks, NULL);
        qsort(batch, nb, sizeof(*batch), by_id);
        int64_t q0 = loom_mono_ns();
        loom_db_t *db = NULL;
        loom_error_t err;
        bool failed = false;
        if (loom_db_acquire(gw->opts.ops->pool, &db, &err) == 0) {
            for (size_t i = 0; i < nb; i += WAIT_IDS_PER_QUERY) {
                size_t m = nb - i < WAIT_IDS_PER_QUERY ? nb - i : WAIT_IDS_PER_QUERY;
                if (poll_chunk(gw, db, batch + i, m) != 0)
                    failed = true;
            }
            loom_db_release(db);
        } else {
            failed = true;
            poll_warn(pl, "?wait poll has no database connection; the waits go on", err.message);
        }

        int64_t query_ns = loom_mono_ns() - q0;

        /* Out of the list: the decided, the gone, and those whose wait ran
         * out; then posted to their loops, outside the lock. */
        size_t np = 0;
        int64_t now = loom_mono_ms();
        pthread_mutex_lock(&pl->mu);
        for (size_t i = 0; i < nb; i++) {
            pub_t *p = batch[i];
            p->inflight = false;
            if (p->gone || p->outcome != W_NONE) {
                waiting_remove(pl, p);
                if (np == cap_post)
                    post = loom_xrealloc(post, (cap_post *= 2) * sizeof(*post));
                post[np++] = p;
            }
        }
        for (size_t i = 0; i < pl->n;) {
            pub_t *p = pl->waiting[i];
            if (p->deadline_ms > now) {
                i++;
                continue;
            }
            p->outcome = W_RAN_OUT;
            waiting_remove(pl, p);
            if (np == cap_post)
                post = loom_xrealloc(post, (cap_post *= 2) * sizeof(*post));
            post[np++] = p;
        }
        pthread_mutex_unlock(&pl->mu);
        for (size_t i = 0; i < np; i++)
            loom_http_req_post(post[i]->req, wait_done, post[i]);

        /* The next tick. */
        int64_t tk = (WAIT_TICK_SHARE * query_ns + 999999) / 1000000;
        tk = tk < WAIT_TICK_MIN_MS   ? WAIT_TICK_MIN_MS
             : tk > WAIT_TICK_MAX_MS ? WAIT_TICK_MAX_MS
                                     : tk;
        if (failed)
            tk = WAIT_TICK_DOWN_MS;
        pthread_mutex_lock(&pl->mu);
        struct timespec ts;
        abs_ms(&ts, tick + tk);
        while (!pl->stop && loom_mono_ms() < tick + tk)
            if (pthread_cond_timedwait(&pl->cond, &pl->mu, &ts) == ETIMEDOUT)
                break;
    }
    pthread_mutex_unlock(&pl->mu);
    free(batch);
    free(post);
    return NULL;
}

int gw_poller_start(loom_gateway_t *gw)
{
    gw_poller_t *pl = &gw->poller;
    pthread_mutex_init(&pl->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&pl->cond, &ca);
    pthread_condattr_destroy(&ca);
    if (!gw->opts.ops || !gw->opts.ops->pool)
        return 0; /* no database: ?wait answers 202 at once */
    if (pthread_create(&pl->thread, NULL, poller_main, gw) != 0)
        return -1;
    pl->running = true;
    return 0;
}

void gw_poller_stop(loom_gateway_t *gw)
{
    gw_poller_t *pl = &gw->poller;
    if (pl->running) {
        pthread_mutex_lock(&pl->mu);
        pl->stop = true;
        pthread_cond_broadcast(&pl->cond);
        pthread_mutex_unlock(&pl->mu);
        pthread_join(pl->thread, NULL);
        pl->running = false;
    }
    /* Waiters left have a stopped loop: posting cancels and frees them. */
    pthread_mutex_lock(&pl->mu);
    while (pl->n > 0) {
        pub_t *p = pl->waiting[pl->n - 1];
        waiting_remove(pl, p);
        pthread_mutex_unlock(&pl->mu);
        loom_http_req_post(p->req, wait_done, p);
        pthread_mutex_lock(&pl->mu);
    }
    pthread_mutex_unlock(&pl->mu);
}

/* On the loop: the request joins the poller. */
static void wait_start(pub_t *p)
{
    gw_poller_t *pl = &p->gw->poller;
    p->deadline_ms = loom_mono_ms() + p->wait_ms;
    p->state = P_WAITING;
    pthread_mutex_lock(&pl->mu);
    if (pl->n == pl->cap) {
        pl->cap = pl->cap ? pl->cap * 2 : 256;
        pl->waiting = loom_xrealloc(pl->waiting, pl->cap * sizeof(*pl->waiting));
    }
    p->slot = (ssize_t)pl->n;
    pl->waiting[pl->n++] = p;
    if (pl->n == 1)
        pthread_cond_signal(&pl->cond);
    pthread_mutex_unlock(&pl->mu);
}

/* On the loop: the broker's answer. */
static void delivered(loom_http_req_t *req, void *arg, bool cancelled)
{
    pub_t *p = arg;
    if (cancelled || loom_http_req_detached(req)) {
        pub_free(p);
        return;
    }
    if (p->failed) {
        loom_gateway_fail(req, loom_http_req_res(req), &p->err);
        pub_free(p);
        return;
    }
    if (p->wait_ms <= 0 || !p->gw->poller.running || !loom_http_req_loop(req)) {
        reply_accepted(p, NULL);
        pub_free(p);
        return;
    }
    wait_start(p);
}

/* On the producer's thread. */
static void on_delivery(void *opaque, const loom_error_t *err, int32_t partition, int64_t offset)
{
    (void)partition;
    (void)offset;
    pub_t *p = opaque;
    if (err && err->cls == LOOM_ERR_TOO_LARGE) {
        p->failed = true;
        too_large(&p->err, p->topic, p->bytes);
    } else if (err) {
        p->failed = true;
        p->err = *err;
        /* Whatever librdkafka said, the client may retry later. */
        if (p->err.cls != LOOM_ERR_UNAVAILABLE)
            loom_error_set(&p->err, LOOM_CODE_BROKER_UNAVAILABLE, "%s", err->message);
        p->err.retriable = true;
    }
    loom_http_req_post(p->req, delivered, p);
}

/* The HTTP request, for the command's story (LOOM_CE_EXT_REQUEST): method,
 * path, route, the token's name and the time, as JSON in the request's arena. */
static const char *request_json(loom_http_req_t *req, const gw_req_t *g, loom_arena_t *arena)
{
    const char *path = loom_http_req_path(req);
    char *safe = loom_text_escape(path, strlen(path), 300);
    char at[40], route[600];
    loom_rfc3339_format(loom_now_us(), at, sizeof(at));
    snprintf(route, sizeof(route), "%s %s", g->route ? g->route->method : "",
             g->route ? g->route->pattern : "");
    json_t *o =
        json_pack("{s:s, s:s, s:s, s:s?, s:s}", "method", loom_http_req_method(req), "path", safe,
                  "route", route, "principal", g->token ? g->token->slug : NULL, "at", at);
    free(safe);
    char *text = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    const char *out =
        text && strlen(text) <= LOOM_CE_REQUEST_MAX ? loom_arena_strdup(arena, text) : NULL;
    free(text);
    return out;
}

static bool valid_key(const char *k)
{
    size_t n = 0;
    for (; k[n]; n++)
        if (n >= LOOM_GATEWAY_IDEMPOTENCY_KEY_MAX || (unsigned char)k[n] < 0x20 ||
            (unsigned char)k[n] > 0x7e)
            return false;
    return n > 0;
}

int loom_gateway_publish(loom_http_req_t *req, loom_http_res_t *res,
                         const loom_gateway_command_t *cmd)
{
    gw_req_t *g = gw_req(req);
    json_t *data = cmd ? cmd->data : NULL;
    loom_error_t err;
    if (!g || !cmd || !cmd->type || !*cmd->type) {
        json_decref(data);
        loom_error_set(&err, LOOM_CODE_INTERNAL, "a command needs a type");
        return loom_gateway_fail(req, res, &err);
    }
    /* ?wait */
    int64_t wait_ms = 0;
    const char *wait = loom_http_req_query(req, "wait");
    if (wait && (loom_duration_parse_ms(wait, &wait_ms) != 0 || wait_ms < 0 ||
                 wait_ms > LOOM_GATEWAY_WAIT_MAX_MS)) {
        json_decref(data);
        loom_error_set(&err, LOOM_CODE_INVALID_ARGUMENT,
                       "?wait must be a duration of at most 30s (such as 500ms or 5s), not "
                       "\"%.40s\"",
                       wait);
        return loom_gateway_fail(req, res, &err);
    }
    /* Command-Deadline: the command is not applied when a worker takes it
     * later (ce_deadline). */
    const char *deadline = loom_http_req_header(req, "Command-Deadline");
    int64_t deadline_us = 0;
    if (deadline && (strlen(deadline) > 64 || loom_rfc3339_parse(deadline, &deadline_us) != 0)) {
        json_decref(data);
        loom_error_set(&err, LOOM_CODE_INVALID_ARGUMENT,
                       "Command-Deadline must be an RFC 3339 time such as 2026-01-02T15:04:05Z");
        return loom_gateway_fail(req, res, &err);
    }
    /* Idempotency-Key */
    pub_t *p = loom_xcalloc(1, sizeof(*p));
    p->gw = g->gw;
    p->req = req;
    p->wait_ms = wait_ms;
    p->slot = -1;
    const char *key = loom_http_req_header(req, "Idempotency-Key");
    if (key) {
        if (!valid_key(key)) {
            free(p);
            json_decref(data);
            loom_error_set(&err, LOOM_CODE_INVALID_ARGUMENT,
                           "Idempotency-Key must be 1 to %d printable ASCII characters",
                           LOOM_GATEWAY_IDEMPOTENCY_KEY_MAX);
            return loom_gateway_fail(req, res, &err);
        }
        char route[600];
        snprintf(route, sizeof(route), "%s %s", g->route ? g->route->method : "",
                 g->route ? g->route->pattern : loom_http_req_path(req));
        loom_gateway_idempotent_id(g->token ? g->token->slug : "", route, key, p->id);
    } else {
        loom_uuid_v7_string(p->id);
    }
    if (!g->gw->opts.producer) {
        free(p);
        json_decref(data);
        loom_error_set(&err, LOOM_CODE_BROKER_UNAVAILABLE, "this gateway has no Kafka producer");
        return loom_gateway_fail(req, res, &err);
    }

    loom_arena_t *arena = loom_http_req_arena(req);
    loom_ce_t ce;
    loom_ce_init(&ce, arena, g->gw->opts.site ? g->gw->opts.site : "local",
                 g->gw->opts.node ? g->gw->opts.node : "gateway", cmd->type);
    ce.id = p->id;
    ce.rayid = g->ray_id;
    ce.traceparent = g->traceparent;
    ce.deadline = deadline;
    ce.datacontenttype = "application/json";
    ce.ext[0] = (loom_ce_ext_t){LOOM_CE_EXT_REQUEST, request_json(req, g, arena)};
    ce.n_ext = ce.ext[0].value ? 1 : 0;
    char *text = data ? json_dumps(data, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
    json_decref(data);
    ce.data = text ? text : "{}";
    ce.data_len = strlen(ce.data);
    char topic[300];
    if (cmd->topic)
        snprintf(topic, sizeof(topic), "%s", cmd->topic);
    else
        loom_topic_for_command(cmd->type, topic, sizeof(topic));
    const char *k = cmd->key ? cmd->key : p->id;
    p->bytes = ce.data_len;
    snprintf(p->topic, sizeof(p->topic), "%s", topic);

    /* A ?wait request takes a place among the waiters before anything is
     * published; with none left it is refused at once. */
    if (wait_ms > 0 && g->gw->poller.running) {
        if (!gw_waiter_admit(g->gw, &p->held_at_admit, &p->admit_seq)) {
            free(text);
            free(p);
            return gw_shed(req, res, "waiters");
        }
        p->admitted = true;
        p->admitted_ns = loom_mono_ns();
    }
    loom_http_req_ref(req);
    loom_http_req_on_detach(req, on_detach, p);
    g->async = true;
    p->state = P_PUBLISHING;
    int rc =
        loom_producer_send(g->gw->opts.producer, topic, k, strlen(k), &ce, on_delivery, p, &err);
    free(text);
    if (rc != 0) {
        g->async = false;
        if (err.cls == LOOM_ERR_TOO_LARGE)
            too_large(&err, p->topic, p->bytes);
        pub_free(p);
        if (err.cls != LOOM_ERR_UNAVAILABLE && err.cls != LOOM_ERR_BAD_REQUEST &&
            err.cls != LOOM_ERR_TOO_LARGE)
            loom_error_set(&err, LOOM_CODE_BROKER_UNAVAILABLE, "%s", err.message);
        if (err.cls == LOOM_ERR_UNAVAILABLE)
            err.retriable = true;
        return loom_gateway_fail(req, res, &err);
    }
    return 0;
}
