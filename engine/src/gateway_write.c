/*
 * gateway_write.c: the write path: publish a command, answer after the
 * broker's acknowledgement, and optionally wait until a worker applied it.
 *
 * A write is a small state machine per request (pub_t):
 *
 *   PUBLISHING  loom_producer_send() queued it; the delivery report arrives
 *               on the producer's thread and is posted back to the loop
 *   POLLING     (?wait) the op engine.commands.get runs on a worker thread
 *   TIMER       (?wait) waiting before the next poll: 2 ms, doubling to 25 ms
 *   CLOSING     the timer handle is closing; the next poll starts after it
 *
 * Only the TIMER state holds a libuv handle, and a client that goes away in
 * that state has it closed by the detach hook, so a shutdown never leaves a
 * handle behind. In the other states the pending completion notices that
 * the request is detached and only cleans up.
 *
 * Idempotency-Key: the command id is derived from (caller, route, key), so a
 * retry publishes the same id and the consumers' dedup rows apply it once;
 * nothing is stored in the gateway. A retry with the same key but another
 * body is the same command: the first one applied wins.
 */
#include "gateway_int.h"
#include "loom/clock.h"
#include "loom/envelope.h"
#include "loom/log.h"
#include "loom/mem.h"
#include "loom/uuid.h"

#include <stdlib.h>
#include <string.h>

#define POLL_FIRST_MS 2
#define POLL_MAX_MS   25

typedef enum { P_PUBLISHING, P_POLLING, P_TIMER, P_CLOSING } pstate_t;

typedef struct pub {
    loom_gateway_t *gw;
    loom_http_req_t *req;
    char id[LOOM_UUID_STRLEN + 1];
    int64_t wait_ms, deadline_ms;
    int delay_ms;
    pstate_t state;
    uv_timer_t timer;
    bool failed;
    loom_error_t err;
    char status[16]; /* last status seen while waiting */
    size_t bytes;    /* of the command's data, for a too-large answer */
    char topic[300];
} pub_t;

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

static void poll_start(pub_t *p);

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

static void on_timer_closed(uv_handle_t *h)
{
    pub_t *p = h->data;
    if (loom_http_req_detached(p->req))
        pub_free(p);
    else
        poll_start(p);
}

static void on_timer(uv_timer_t *t)
{
    pub_t *p = t->data;
    p->state = P_CLOSING;
    uv_close((uv_handle_t *)&p->timer, on_timer_closed);
}

static void on_detach(loom_http_req_t *req, void *arg)
{
    (void)req;
    pub_t *p = arg;
    if (p->state == P_TIMER) {
        uv_timer_stop(&p->timer);
        p->state = P_CLOSING;
        uv_close((uv_handle_t *)&p->timer, on_timer_closed);
    }
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

/* Reads the rows of engine.commands.get: true when the wait is over (and
 * answered). */
static bool poll_decide(pub_t *p, json_t *result)
{
    json_t *rows = json_object_get(result, "commands");
    size_t n = json_array_size(rows);
    if (n == 0)
        return false;
    size_t applied = 0;
    json_t *first_applied = NULL;
    for (size_t i = 0; i < n; i++) {
        json_t *row = json_array_get(rows, i);
        const char *st = json_string_value(json_object_get(row, "status"));
        if (!st)
            continue;
        snprintf(p->status, sizeof(p->status), "%s", st);
        if (strcmp(st, "rejected") == 0) {
            loom_error_t err;
            const char *why = json_string_value(json_object_get(row, "last_error"));
            loom_error_set(&err, LOOM_CODE_COMMAND_REJECTED, "command %s was rejected: %s", p->id,
                           why ? why : "no reason recorded");
            loom_gateway_fail(p->req, loom_http_req_res(p->req), &err);
            return true;
        }
        if (strcmp(st, "parked") == 0) {
            reply_accepted(p, "parked");
            return true;
        }
        if (strcmp(st, "expired") == 0) {
            loom_error_t err;
            loom_error_set(&err, LOOM_CODE_COMMAND_EXPIRED,
                           "command %s was not applied: its deadline had passed when a worker "
                           "took it",
                           p->id);
            loom_gateway_fail(p->req, loom_http_req_res(p->req), &err);
            return true;
        }
        if (strcmp(st, "applied") == 0 && applied++ == 0)
            first_applied = row;
    }
    if (applied < n)
        return false;
    json_t *res = json_object_get(first_applied, "result");
    json_t *body = json_pack("{s:s, s:s, s:O}", "command_id", p->id, "status", "applied", "result",
                             res ? res : json_null());
    loom_gateway_reply(p->req, loom_http_req_res(p->req), 200, body);
    return true;
}

static void poll_fin(loom_http_req_t *req, gw_op_task_t *t, bool cancelled)
{
    (void)req;
    pub_t *p = t->arg;
    if (cancelled) {
        gw_op_task_free(t);
        pub_free(p);
        return;
    }
    bool done = t->rc == 0 && poll_decide(p, t->result);
    gw_op_task_free(t);
    if (done) {
        pub_free(p);
        return;
    }
    int64_t now = loom_mono_ms();
    if (now + p->delay_ms >= p->deadline_ms) {
        reply_accepted(p, p->status[0] ? p->status : "pending");
        pub_free(p);
        return;
    }
    p->state = P_TIMER;
    uv_timer_init(loom_http_req_loop(p->req), &p->timer);
    p->timer.data = p;
    uv_timer_start(&p->timer, on_timer, (uint64_t)p->delay_ms, 0);
    p->delay_ms = p->delay_ms * 2 > POLL_MAX_MS ? POLL_MAX_MS : p->delay_ms * 2;
}

static void poll_start(pub_t *p)
{
    p->state = P_POLLING;
    gw_op_task_t *t = loom_xcalloc(1, sizeof(*t));
    t->gw = p->gw;
    snprintf(t->name, sizeof(t->name), "engine.commands.get");
    t->op_req = json_pack("{s:s}", "id", p->id);
    t->fin = poll_fin;
    t->arg = p;
    gw_op_start(p->req, t);
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
    if (p->wait_ms <= 0 || !p->gw->opts.ops || !loom_http_req_loop(req)) {
        reply_accepted(p, NULL);
        pub_free(p);
        return;
    }
    p->deadline_ms = loom_mono_ms() + p->wait_ms;
    p->delay_ms = POLL_FIRST_MS;
    poll_start(p);
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
