/*
 * client.c: libloom-client, a thin layer over the engine's envelope, producer
 * and op-over-HTTP code (engine/src/{envelope,bus,op_http}.c).
 *
 * Each publish carries a small heap record shared by the caller (when it
 * waits) and the delivery callback; a reference count decides who frees it,
 * so a wait that times out never leaves the callback a dangling pointer.
 */
#include "loom/client.h"
#include "loom/arena.h"
#include "loom/bus.h"
#include "loom/clock.h"
#include "loom/config.h"
#include "loom/envelope.h"
#include "loom/mem.h"
#include "loom/op.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef LOOM_CLIENT_VERSION
#define LOOM_CLIENT_VERSION "0.0.0"
#endif

#define DEFAULT_MESSAGE_TIMEOUT_MS 30000
#define DEFAULT_OP_TIMEOUT_MS      30000

struct loom_client {
    loom_producer_t *producer; /* NULL without brokers */
    char prefix[64];
    char site[64];
    char node[128];
    char *gateway_url;
    char *gateway_token;
    int64_t message_timeout_ms;
    int64_t op_timeout_ms;
    atomic_int in_flight; /* publishes whose record is alive on the callback's side */
};

/* ---- errors -------------------------------------------------------------------------- */

static int rc_of(const loom_error_t *e)
{
    if (!e->code)
        return LOOM_CLIENT_EINTERNAL;
    if (loom_error_is(e, LOOM_CODE_QUEUE_FULL))
        return LOOM_CLIENT_EQUEUEFULL;
    if (loom_error_is(e, LOOM_CODE_DEADLINE_EXCEEDED))
        return LOOM_CLIENT_ETIMEDOUT;
    switch (e->cls) {
    case LOOM_ERR_BAD_REQUEST:
    case LOOM_ERR_TOO_LARGE:
        return LOOM_CLIENT_EINVAL;
    case LOOM_ERR_UNAVAILABLE:
        return LOOM_CLIENT_EUNAVAILABLE;
    case LOOM_ERR_TIMEOUT:
        return LOOM_CLIENT_ETIMEDOUT;
    default:
        return loom_error_is(e, LOOM_CODE_CONFIG_INVALID) ? LOOM_CLIENT_EINVAL
                                                          : LOOM_CLIENT_EINTERNAL;
    }
}

/* Copies an engine error into a client error; returns its rc. */
static int from_engine(loom_client_error_t *out, const loom_error_t *e)
{
    int rc = rc_of(e);
    if (out) {
        memset(out, 0, sizeof(*out));
        out->rc = rc;
        snprintf(out->code, sizeof(out->code), "%s", e->code ? e->code : "INTERNAL");
        snprintf(out->message, sizeof(out->message), "%s", e->message);
        out->retriable = e->retriable;
    }
    return rc;
}

__attribute__((format(printf, 4, 5))) static int fail(loom_client_error_t *out, int rc,
                                                      const char *code, const char *fmt, ...)
{
    if (out) {
        memset(out, 0, sizeof(*out));
        out->rc = rc;
        snprintf(out->code, sizeof(out->code), "%s", code);
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(out->message, sizeof(out->message), fmt, ap);
        va_end(ap);
        out->retriable = rc == LOOM_CLIENT_EQUEUEFULL || rc == LOOM_CLIENT_EUNAVAILABLE ||
                         rc == LOOM_CLIENT_ETIMEDOUT;
    }
    return rc;
}

static void clear(loom_client_error_t *e)
{
    if (e)
        memset(e, 0, sizeof(*e));
}

/* ---- life cycle ---------------------------------------------------------------------- */

const char *loom_client_version(void)
{
    return LOOM_CLIENT_VERSION;
}

__attribute__((format(printf, 3, 4))) static int new_fail(char *errbuf, size_t errlen,
                                                          const char *fmt, ...)
{
    if (errbuf && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(errbuf, errlen, fmt, ap);
        va_end(ap);
    }
    return LOOM_CLIENT_EINVAL;
}

int loom_client_new(const loom_client_opts_t *opts, loom_client_t **out, char *errbuf,
                    size_t errlen)
{
    if (errbuf && errlen)
        errbuf[0] = '\0';
    if (!opts || !out)
        return new_fail(errbuf, errlen, "%s", "no options given");
    *out = NULL;
    if ((!opts->brokers || !*opts->brokers) && !opts->gateway_url)
        return new_fail(errbuf, errlen, "%s", "neither brokers nor a gateway URL given");
    if (opts->topic_prefix && (!*opts->topic_prefix || strlen(opts->topic_prefix) > 60 ||
                               strchr(opts->topic_prefix, '/')))
        return new_fail(errbuf, errlen, "invalid topic prefix \"%.100s\"", opts->topic_prefix);
    if (opts->n_props && !opts->props)
        return new_fail(errbuf, errlen, "%s", "n_props is set but props is NULL");
    for (size_t i = 0; i < opts->n_props; i++)
        if (!opts->props[i].key || !opts->props[i].value)
            return new_fail(errbuf, errlen, "%s", "a Kafka property without key or value");

    loom_client_t *c = loom_xcalloc(1, sizeof(*c));
    snprintf(c->prefix, sizeof(c->prefix), "%s", opts->topic_prefix ? opts->topic_prefix : "loom");
    snprintf(c->site, sizeof(c->site), "%s", opts->site && *opts->site ? opts->site : "local");
    if (opts->node && *opts->node) {
        snprintf(c->node, sizeof(c->node), "%s", opts->node);
    } else if (gethostname(c->node, sizeof(c->node)) != 0 || !c->node[0]) {
        snprintf(c->node, sizeof(c->node), "unknown");
    }
    c->node[sizeof(c->node) - 1] = '\0';
    c->message_timeout_ms =
        opts->message_timeout_ms > 0 ? opts->message_timeout_ms : DEFAULT_MESSAGE_TIMEOUT_MS;
    c->op_timeout_ms = opts->op_timeout_ms > 0 ? opts->op_timeout_ms : DEFAULT_OP_TIMEOUT_MS;
    if (opts->gateway_url)
        c->gateway_url = loom_xstrdup(opts->gateway_url);
    if (opts->gateway_token)
        c->gateway_token = loom_xstrdup(opts->gateway_token);

    if (opts->brokers && *opts->brokers) {
        /* The engine's producer reads pass-through properties from a config. */
        loom_config_t cfg;
        memset(&cfg, 0, sizeof(cfg));
        snprintf(cfg.node_id, sizeof(cfg.node_id), "%s", c->node);
        loom_config_kafka_prop_t *props =
            opts->n_props ? loom_xcalloc(opts->n_props, sizeof(*props)) : NULL;
        for (size_t i = 0; i < opts->n_props; i++) {
            props[i].key = (char *)opts->props[i].key;
            props[i].value = (char *)opts->props[i].value;
        }
        cfg.kafka_props = props;
        cfg.n_kafka_props = opts->n_props;
        loom_producer_opts_t po = {.brokers = opts->brokers,
                                   .cfg = &cfg,
                                   .queue_max_messages = opts->queue_max_messages,
                                   .flush_timeout_ms = opts->flush_timeout_ms,
                                   .message_timeout_ms = c->message_timeout_ms};
        loom_error_t err;
        int rc = loom_producer_new(&po, &c->producer, &err);
        free(props);
        if (rc != 0) {
            if (errbuf && errlen)
                snprintf(errbuf, errlen, "%s", err.message);
            loom_client_free(c);
            return LOOM_CLIENT_EINVAL;
        }
    }
    *out = c;
    return 0;
}

void loom_client_free(loom_client_t *c)
{
    if (!c)
        return;
    loom_producer_free(c->producer); /* flushes: every callback has run after this */
    free(c->gateway_url);
    free(c->gateway_token);
    free(c);
}

int loom_client_flush(loom_client_t *c, int64_t timeout_ms)
{
    if (!c || !c->producer)
        return 0;
    int64_t end = loom_mono_ms() + timeout_ms;
    int rc = loom_producer_flush(c->producer, timeout_ms);
    while (atomic_load(&c->in_flight) > 0 && loom_mono_ms() < end)
        loom_sleep_ms(2);
    return rc == 0 && atomic_load(&c->in_flight) == 0 ? 0 : LOOM_CLIENT_ETIMEDOUT;
}

int loom_client_in_flight(loom_client_t *c)
{
    return c ? atomic_load(&c->in_flight) : 0;
}

/* ---- publishing ---------------------------------------------------------------------- */

typedef struct pub {
    loom_client_t *client;
    loom_client_delivery_cb cb;
    void *opaque;
    atomic_int refs;
    pthread_mutex_t mu;
    pthread_cond_t cond;
    bool done;
    loom_client_result_t res;
} pub_t;

static void pub_unref(pub_t *p)
{
    if (atomic_fetch_sub(&p->refs, 1) == 1) {
        pthread_mutex_destroy(&p->mu);
        pthread_cond_destroy(&p->cond);
        free(p);
    }
}

static void on_delivery(void *opaque, const loom_error_t *err, int32_t partition, int64_t offset)
{
    pub_t *p = opaque;
    loom_client_t *c = p->client;
    pthread_mutex_lock(&p->mu);
    if (err) {
        from_engine(&p->res.error, err);
        p->res.partition = -1;
        p->res.offset = -1;
    } else {
        p->res.partition = partition;
        p->res.offset = offset;
    }
    p->done = true;
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->mu);
    if (p->cb)
        p->cb(p->opaque, &p->res);
    pub_unref(p);
    atomic_fetch_sub(&c->in_flight, 1);
}

/* Queues a command whose data is JSON text; refs: the callback's one, plus
 * the caller's when waiter. Returns 0 or a negative code (p freed then). */
static int publish_text(loom_client_t *c, const char *type, const char *key, const char *json,
                        pub_t *p, char *id_out, loom_client_error_t *err)
{
    loom_client_result_t *res = &p->res;
    /* The service's topic: the type up to its first dot (loom/topic.h). */
    snprintf(res->topic, sizeof(res->topic), "%s.cmd.%.*s", c->prefix, (int)strcspn(type, "."),
             type);
    loom_arena_t a;
    loom_arena_init(&a, 0);
    loom_ce_t ce;
    loom_ce_init(&ce, &a, c->site, c->node, type);
    snprintf(res->id, sizeof(res->id), "%s", ce.id);
    if (id_out) /* before sending: p may be gone as soon as it is queued */
        snprintf(id_out, LOOM_CLIENT_ID_LEN + 1, "%s", ce.id);
    ce.data = json;
    ce.data_len = strlen(json);
    loom_error_t e;
    atomic_fetch_add(&c->in_flight, 1);
    int rc = loom_producer_send(c->producer, res->topic, key, key ? strlen(key) : 0, &ce,
                                on_delivery, p, &e);
    loom_arena_release(&a);
    if (rc != 0) {
        atomic_fetch_sub(&c->in_flight, 1);
        return from_engine(err, &e);
    }
    return 0;
}

static bool type_ok(const char *type)
{
    if (!type || !*type || strlen(type) > 200)
        return false;
    for (const char *s = type; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              *s == '.' || *s == '_' || *s == '-'))
            return false;
    return true;
}

/* Checks the arguments; on success *text is JSON text to send (new). */
static int prepare(loom_client_t *c, const char *type, const char *json, const json_t *data,
                   bool have_data, char **text, loom_client_error_t *err)
{
    *text = NULL;
    if (!c)
        return fail(err, LOOM_CLIENT_EINVAL, "INVALID_ARGUMENT", "no client");
    if (!c->producer)
        return fail(err, LOOM_CLIENT_EINVAL, "INVALID_ARGUMENT",
                    "the client has no brokers: it cannot publish");
    if (!type_ok(type))
        return fail(err, LOOM_CLIENT_EINVAL, "INVALID_ARGUMENT",
                    "invalid command type \"%.200s\": expected [A-Za-z0-9._-]{1,200}",
                    type ? type : "(null)");
    if (have_data) {
        *text = data ? json_dumps(data, JSON_COMPACT | JSON_ENCODE_ANY) : strdup("{}");
        if (!*text)
            return fail(err, LOOM_CLIENT_EINVAL, "INVALID_JSON", "the data could not be encoded");
        return 0;
    }
    if (!json) {
        *text = strdup("{}");
        return 0;
    }
    json_error_t jerr;
    json_t *v = json_loads(json, JSON_DECODE_ANY, &jerr);
    if (!v)
        return fail(err, LOOM_CLIENT_EINVAL, "INVALID_JSON",
                    "the data is not valid JSON: %s (line %d, column %d)", jerr.text, jerr.line,
                    jerr.column);
    json_decref(v);
    *text = strdup(json);
    return 0;
}

static pub_t *pub_new(loom_client_t *c, loom_client_delivery_cb cb, void *opaque, int refs)
{
    pub_t *p = loom_xcalloc(1, sizeof(*p));
    p->client = c;
    p->cb = cb;
    p->opaque = opaque;
    atomic_init(&p->refs, refs);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cond, NULL);
    p->res.partition = -1;
    p->res.offset = -1;
    return p;
}

static void pub_free_unsent(pub_t *p)
{
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cond);
    free(p);
}

static int publish_async(loom_client_t *c, const char *type, const char *key, const char *json,
                         const json_t *data, bool have_data, loom_client_delivery_cb cb,
                         void *opaque, char *id_out, loom_client_error_t *err)
{
    clear(err);
    char *text;
    int rc = prepare(c, type, json, data, have_data, &text, err);
    if (rc != 0)
        return rc;
    pub_t *p = pub_new(c, cb, opaque, 1);
    rc = publish_text(c, type, key, text, p, id_out, err);
    free(text);
    if (rc != 0) {
        pub_free_unsent(p);
        return rc;
    }
    return 0;
}

int loom_client_publish(loom_client_t *c, const char *type, const char *key, const char *json,
                        loom_client_delivery_cb cb, void *opaque, char *id_out,
                        loom_client_error_t *err)
{
    return publish_async(c, type, key, json, NULL, false, cb, opaque, id_out, err);
}

int loom_client_publish_json(loom_client_t *c, const char *type, const char *key,
                             const json_t *data, loom_client_delivery_cb cb, void *opaque,
                             char *id_out, loom_client_error_t *err)
{
    return publish_async(c, type, key, NULL, data, true, cb, opaque, id_out, err);
}

static int publish_wait(loom_client_t *c, const char *type, const char *key, const char *json,
                        const json_t *data, bool have_data, int64_t timeout_ms,
                        loom_client_result_t *res)
{
    loom_client_result_t local;
    if (!res)
        res = &local;
    memset(res, 0, sizeof(*res));
    res->partition = -1;
    res->offset = -1;
    char *text;
    int rc = prepare(c, type, json, data, have_data, &text, &res->error);
    if (rc != 0)
        return rc;
    pub_t *p = pub_new(c, NULL, NULL, 2);
    rc = publish_text(c, type, key, text, p, NULL, &res->error);
    free(text);
    if (rc != 0) {
        snprintf(res->id, sizeof(res->id), "%s", p->res.id);
        snprintf(res->topic, sizeof(res->topic), "%s", p->res.topic);
        pub_free_unsent(p);
        return rc;
    }
    if (timeout_ms <= 0)
        timeout_ms = c->message_timeout_ms + 5000;
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += timeout_ms / 1000;
    until.tv_nsec += (timeout_ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&p->mu);
    while (!p->done)
        if (pthread_cond_timedwait(&p->cond, &p->mu, &until) != 0)
            break;
    bool done = p->done;
    loom_client_result_t copy = p->res;
    pthread_mutex_unlock(&p->mu);
    pub_unref(p);
    *res = copy;
    if (!done) {
        return fail(&res->error, LOOM_CLIENT_ETIMEDOUT, "DEADLINE_EXCEEDED",
                    "command %s was not acknowledged within %lld ms (it may still be delivered)",
                    copy.id, (long long)timeout_ms);
    }
    return res->error.rc;
}

int loom_client_publish_wait(loom_client_t *c, const char *type, const char *key, const char *json,
                             int64_t timeout_ms, loom_client_result_t *res)
{
    return publish_wait(c, type, key, json, NULL, false, timeout_ms, res);
}

int loom_client_publish_json_wait(loom_client_t *c, const char *type, const char *key,
                                  const json_t *data, int64_t timeout_ms, loom_client_result_t *res)
{
    return publish_wait(c, type, key, NULL, data, true, timeout_ms, res);
}

/* ---- ops ----------------------------------------------------------------------------- */

int loom_client_op(loom_client_t *c, const char *name, const json_t *req, json_t **res,
                   loom_client_error_t *err)
{
    clear(err);
    if (res)
        *res = NULL;
    if (!c || !res)
        return fail(err, LOOM_CLIENT_EINVAL, "INVALID_ARGUMENT", "no client or no result pointer");
    if (!c->gateway_url)
        return fail(err, LOOM_CLIENT_EINVAL, "INVALID_ARGUMENT",
                    "the client has no gateway URL: it cannot call ops");
    if (!name || !loom_op_name_valid(name))
        return fail(err, LOOM_CLIENT_EINVAL, "INVALID_ARGUMENT", "invalid op name \"%.200s\"",
                    name ? name : "(null)");
    if (req && !json_is_object(req))
        return fail(err, LOOM_CLIENT_EINVAL, "INVALID_JSON", "an op request must be a JSON object");
    loom_op_ctx_t ctx;
    memset(&ctx, 0, sizeof(ctx));
    ctx.deadline_mono_ms = loom_mono_ms() + c->op_timeout_ms;
    int status = 0;
    json_t *body = NULL;
    loom_error_t e;
    int rc =
        loom_op_call_http(c->gateway_url, c->gateway_token, &ctx, name, req, &status, &body, &e);
    if (rc != 0)
        return from_engine(err, &e);
    if (status >= 200 && status < 300 && body) {
        *res = body;
        return 0;
    }
    json_t *je = json_object_get(body, "error");
    const char *code = json_string_value(json_object_get(je, "code"));
    const char *msg = json_string_value(json_object_get(je, "message"));
    rc = fail(err, LOOM_CLIENT_EOP, code ? code : "GATEWAY_BAD_RESPONSE", "%s",
              msg ? msg : "the gateway answered with an error and no description");
    if (err) {
        err->http_status = status;
        err->retriable = status == 429 || status == 503 || status == 504;
    }
    json_decref(body);
    return rc;
}
