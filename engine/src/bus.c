/*
 * bus.c: the idempotent Kafka producer, delivery futures, topic creation.
 *
 * Delivery reports come as events on the producer's main queue, and one
 * thread of ours serves that queue, a batch of reports per event: callers
 * never poll, and the reports of a partition are read in the order
 * librdkafka made them (rd_kafka_flush() does not serve events, so a flush
 * from another thread cannot take a batch out of turn). Each queued message
 * carries a small record with the caller's callback, from a free list.
 */
#include "loom/bus.h"
#include "loom/clock.h"
#include "loom/log.h"
#include "loom/mem.h"

#include <pthread.h>
#include <stdio.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

typedef struct acked {
    char *topic;
    int32_t partition;
    int64_t offset;
} acked_t;

typedef struct delivery_rec {
    loom_delivery_cb cb;
    void *opaque;
    struct delivery_rec *next; /* on a free list */
} delivery_rec_t;

struct loom_producer {
    rd_kafka_t *rk;
    rd_kafka_queue_t *events; /* the main queue: delivery reports, errors */
    pthread_t thread;
    atomic_int stop;
    atomic_int in_flight;
    int64_t flush_timeout_ms;
    /* The highest offset acknowledged per partition: a second
     * acknowledgement at or below it is not trusted (ack_trusted). Only the
     * delivery thread touches it. */
    acked_t *acked;
    size_t n_acked, cap_acked;
    /* Delivery records the delivery thread is done with (pool_mu); senders
     * take them back instead of allocating one per message. */
    pthread_mutex_t pool_mu;
    delivery_rec_t *pool;
    size_t n_pool;
};

/* Records kept for reuse beyond the ones in flight. */
#define POOL_MAX 65536

int loom_kafka_error(rd_kafka_resp_err_t kerr, const char *what, loom_error_t *err)
{
    switch (kerr) {
    case RD_KAFKA_RESP_ERR__QUEUE_FULL:
        return loom_error_set(err, LOOM_CODE_QUEUE_FULL, "could not %s: local queue full", what);
    case RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC:
    case RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART:
    case RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE:
        /* The producer's or the topic's limit: sending again cannot help. */
        return loom_error_set(err, LOOM_CODE_PAYLOAD_TOO_LARGE, "could not %s: %s", what,
                              rd_kafka_err2str(kerr));
    case RD_KAFKA_RESP_ERR__INVALID_ARG:
    case RD_KAFKA_RESP_ERR_TOPIC_EXCEPTION:
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "could not %s: %s", what,
                              rd_kafka_err2str(kerr));
    default:
        return loom_error_set(err, LOOM_CODE_BROKER_UNAVAILABLE, "could not %s: %s", what,
                              rd_kafka_err2str(kerr));
    }
}

rd_kafka_headers_t *loom_kafka_headers_from_json(const char *text)
{
    json_t *o = json_loads(text ? text : "", 0, NULL);
    rd_kafka_headers_t *h = rd_kafka_headers_new(12);
    const char *name;
    json_t *v;
    json_object_foreach(o, name, v)
    {
        if (json_is_string(v))
            rd_kafka_header_add(h, name, -1, json_string_value(v), (ssize_t)json_string_length(v));
        else if (json_is_null(v))
            rd_kafka_header_add(h, name, -1, NULL, 0);
        else if (json_is_string(json_object_get(v, "hex"))) {
            /* Bytes that are not text, as the consumer recorded them. */
            const char *hex = json_string_value(json_object_get(v, "hex"));
            size_t n = strlen(hex) / 2;
            unsigned char *buf = malloc(n + 1);
            if (!buf)
                abort();
            for (size_t i = 0; i < n; i++) {
                unsigned hi = 0, lo = 0;
                sscanf(hex + 2 * i, "%1x%1x", &hi, &lo);
                buf[i] = (unsigned char)(hi << 4 | lo);
            }
            rd_kafka_header_add(h, name, -1, buf, (ssize_t)n);
            free(buf);
        }
    }
    json_decref(o);
    return h;
}

rd_kafka_conf_t *loom_kafka_conf_new(const char *brokers, const loom_config_t *cfg, char *errbuf,
                                     size_t errlen)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    if (rd_kafka_conf_set(conf, "bootstrap.servers", brokers, errbuf, errlen) != RD_KAFKA_CONF_OK)
        goto fail;
    rd_kafka_conf_set(conf, "log_level", "4", NULL, 0); /* warnings and worse */
    /* Small requests go out at once rather than waiting for the previous
     * one's TCP acknowledgement: a write's 202 waits for the broker. */
    rd_kafka_conf_set(conf, "socket.nagle.disable", "true", NULL, 0);
    if (cfg) {
        rd_kafka_conf_set(conf, "client.id", cfg->node_id, NULL, 0);
        for (size_t i = 0; i < cfg->n_kafka_props; i++)
            if (rd_kafka_conf_set(conf, cfg->kafka_props[i].key, cfg->kafka_props[i].value, errbuf,
                                  errlen) != RD_KAFKA_CONF_OK)
                goto fail;
    }
    return conf;
fail:
    rd_kafka_conf_destroy(conf);
    return NULL;
}

bool loom_kafka_user_set(const loom_config_t *cfg, const char *key)
{
    for (size_t i = 0; cfg && i < cfg->n_kafka_props; i++)
        if (strcmp(cfg->kafka_props[i].key, key) == 0)
            return true;
    return false;
}

/* The record of a partition's highest acknowledged offset (made at offset
 * -1 the first time). */
static acked_t *acked_entry(loom_producer_t *p, const rd_kafka_message_t *rkm)
{
    const char *topic = rd_kafka_topic_name(rkm->rkt);
    for (size_t i = 0; i < p->n_acked; i++)
        if (p->acked[i].partition == rkm->partition && strcmp(p->acked[i].topic, topic) == 0)
            return &p->acked[i];
    if (p->n_acked == p->cap_acked) {
        p->cap_acked = p->cap_acked ? 2 * p->cap_acked : 16;
        p->acked = loom_xrealloc(p->acked, p->cap_acked * sizeof(*p->acked));
    }
    acked_t *a = &p->acked[p->n_acked++];
    *a = (acked_t){.topic = loom_xstrdup(topic), .partition = rkm->partition, .offset = -1};
    return a;
}

/* True when a successful delivery report names an offset above every
 * offset this producer was acknowledged at in that partition (and records
 * it in a, the partition's record). A topic deleted and made again starts
 * at 0: the first report then fails once and the partition's record starts
 * over. */
static bool ack_trusted(acked_t *a, const rd_kafka_message_t *rkm)
{
    if (rkm->offset < 0 || rd_kafka_message_status(rkm) != RD_KAFKA_MSG_STATUS_PERSISTED)
        return false;
    bool ok = rkm->offset > a->offset;
    a->offset = rkm->offset;
    return ok;
}

/* One delivery report. *a caches the partition record of the previous
 * report of the same event: the reports of an event are one partition's. */
static void delivered(loom_producer_t *p, const rd_kafka_message_t *rkm, acked_t **a)
{
    delivery_rec_t *rec = rkm->_private;
    if (rec) {
        loom_error_t err;
        if (rkm->err) {
            loom_kafka_error(rkm->err, "deliver message", &err);
            rec->cb(rec->opaque, &err, rkm->partition, rkm->offset);
        } else {
            if (!*a || (*a)->partition != rkm->partition ||
                strcmp((*a)->topic, rd_kafka_topic_name(rkm->rkt)) != 0)
                *a = acked_entry(p, rkm);
            if (!ack_trusted(*a, rkm)) {
                /* With acks=all the broker names the offset it stored the
                 * message at, and one producer's messages to a partition get
                 * increasing offsets. A success without an offset, or at an
                 * offset already acknowledged, is a message the broker took
                 * for a duplicate of another (an idempotence sequence mix-up
                 * of older librdkafka releases; seen in a chaos run: two
                 * writes acknowledged, one record in the partition). The
                 * caller retries; the consumers' dedup by id absorbs a copy
                 * that did land. */
                LOOM_WARN("Kafka acknowledged a message at no new offset; treating it as not "
                          "delivered",
                          "topic=%s partition=%d offset=%lld status=%d",
                          rd_kafka_topic_name(rkm->rkt), (int)rkm->partition,
                          (long long)rkm->offset, (int)rd_kafka_message_status(rkm));
                loom_error_set(&err, LOOM_CODE_BROKER_UNAVAILABLE,
                               "Kafka did not confirm a new offset for the message; send it "
                               "again");
                err.retriable = true;
                rec->cb(rec->opaque, &err, rkm->partition, rkm->offset);
            } else {
                rec->cb(rec->opaque, NULL, rkm->partition, rkm->offset);
            }
        }
    }
    atomic_fetch_sub(&p->in_flight, 1);
}

static delivery_rec_t *rec_get(loom_producer_t *p)
{
    pthread_mutex_lock(&p->pool_mu);
    delivery_rec_t *rec = p->pool;
    if (rec) {
        p->pool = rec->next;
        p->n_pool--;
    }
    pthread_mutex_unlock(&p->pool_mu);
    return rec ? rec : loom_xmalloc(sizeof(*rec));
}

/* Gives back a chain of n records (first..last), freeing them past POOL_MAX. */
static void rec_put(loom_producer_t *p, delivery_rec_t *first, delivery_rec_t *last, size_t n)
{
    if (!first)
        return;
    pthread_mutex_lock(&p->pool_mu);
    bool keep = p->n_pool + n <= POOL_MAX;
    if (keep) {
        last->next = p->pool;
        p->pool = first;
        p->n_pool += n;
    }
    pthread_mutex_unlock(&p->pool_mu);
    while (!keep && first) {
        delivery_rec_t *next = first->next;
        free(first);
        first = next;
    }
}

static void serve_event(loom_producer_t *p, rd_kafka_event_t *ev)
{
    switch (rd_kafka_event_type(ev)) {
    case RD_KAFKA_EVENT_DR: {
        const rd_kafka_message_t *rkm;
        acked_t *a = NULL;
        delivery_rec_t *first = NULL, *last = NULL;
        size_t n = 0;
        while ((rkm = rd_kafka_event_message_next(ev))) {
            delivered(p, rkm, &a);
            delivery_rec_t *rec = rkm->_private;
            if (rec) {
                rec->next = first;
                first = rec;
                last = last ? last : rec;
                n++;
            }
        }
        rec_put(p, first, last, n);
        break;
    }
    case RD_KAFKA_EVENT_ERROR:
        /* What librdkafka would have logged without an error callback. */
        LOOM_WARN("Kafka producer error", "error=\"%s\" fatal=%d", rd_kafka_event_error_string(ev),
                  rd_kafka_event_error_is_fatal(ev));
        break;
    case RD_KAFKA_EVENT_OAUTHBEARER_TOKEN_REFRESH:
        /* Only the unsecured test tokens (sasl.oauthbearer.config) come as
         * an event: librdkafka makes them from rd_kafka_poll(), which this
         * producer does not call (OIDC tokens are refreshed by librdkafka
         * itself). */
        LOOM_WARN("Kafka asks for an OAUTHBEARER token refresh, which Loom's producer does not do",
                  "mechanism=%s", "OAUTHBEARER");
        break;
    default:
        break;
    }
    rd_kafka_event_destroy(ev);
}

static void *poll_thread(void *arg)
{
    loom_producer_t *p = arg;
    while (!atomic_load(&p->stop)) {
        rd_kafka_event_t *ev = rd_kafka_queue_poll(p->events, 100);
        if (ev)
            serve_event(p, ev);
    }
    return NULL;
}

int loom_producer_new(const loom_producer_opts_t *opts, loom_producer_t **out, loom_error_t *err)
{
    if (!opts || !opts->brokers)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "no Kafka brokers given");
    char errbuf[512], num[32];
    rd_kafka_conf_t *conf = loom_kafka_conf_new(opts->brokers, opts->cfg, errbuf, sizeof(errbuf));
    if (!conf)
        return loom_error_set(err, LOOM_CODE_CONFIG_INVALID, "could not configure Kafka: %s",
                              errbuf);
    loom_producer_t *p = loom_xcalloc(1, sizeof(*p));
    pthread_mutex_init(&p->pool_mu, NULL);
    p->flush_timeout_ms = opts->flush_timeout_ms > 0 ? opts->flush_timeout_ms : 30000;
    snprintf(num, sizeof(num), "%d",
             opts->queue_max_messages > 0 ? opts->queue_max_messages : 100000);
    /* Loom's defaults; a LOOM_KAFKA_<PROPERTY> of the same name wins, except
     * the two that make the producer safe. */
    const char *kv[][2] = {
        {"enable.idempotence", "true"},
        {"acks", "all"},
        {"queue.buffering.max.messages", num},
        {"compression.codec", "lz4"},
        {"message.max.bytes", LOOM_KAFKA_MESSAGE_MAX},
    };
    for (size_t i = 0; i < sizeof(kv) / sizeof(kv[0]); i++) {
        if (i >= 2 && loom_kafka_user_set(opts->cfg, kv[i][0]))
            continue;
        if (rd_kafka_conf_set(conf, kv[i][0], kv[i][1], errbuf, sizeof(errbuf)) !=
            RD_KAFKA_CONF_OK) {
            rd_kafka_conf_destroy(conf);
            free(p);
            return loom_error_set(err, LOOM_CODE_CONFIG_INVALID, "could not configure Kafka: %s",
                                  errbuf);
        }
    }
    snprintf(num, sizeof(num), "%d", opts->linger_ms > 0 ? opts->linger_ms : 5);
    if (!loom_kafka_user_set(opts->cfg, "linger.ms"))
        rd_kafka_conf_set(conf, "linger.ms", num, NULL, 0);
    if (opts->message_timeout_ms > 0 && !loom_kafka_user_set(opts->cfg, "message.timeout.ms")) {
        snprintf(num, sizeof(num), "%lld", (long long)opts->message_timeout_ms);
        rd_kafka_conf_set(conf, "message.timeout.ms", num, NULL, 0);
    }
    /* Reports as events, served by the delivery thread alone. */
    rd_kafka_conf_set_events(conf, RD_KAFKA_EVENT_DR | RD_KAFKA_EVENT_ERROR);
    rd_kafka_conf_set_opaque(conf, p);
    p->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errbuf, sizeof(errbuf));
    if (!p->rk) {
        rd_kafka_conf_destroy(conf);
        pthread_mutex_destroy(&p->pool_mu);
        free(p);
        return loom_error_set(err, LOOM_CODE_CONFIG_INVALID, "could not create a producer: %s",
                              errbuf);
    }
    p->events = rd_kafka_queue_get_main(p->rk);
    if (pthread_create(&p->thread, NULL, poll_thread, p) != 0) {
        rd_kafka_queue_destroy(p->events);
        rd_kafka_destroy(p->rk);
        pthread_mutex_destroy(&p->pool_mu);
        free(p);
        return loom_error_set(err, LOOM_CODE_INTERNAL, "could not start the delivery thread");
    }
    *out = p;
    return 0;
}

int loom_producer_flush(loom_producer_t *p, int64_t timeout_ms)
{
    int64_t end = loom_mono_ms() + timeout_ms;
    /* With reports as events rd_kafka_flush only waits (the delivery thread
     * serves them); then wait for our callbacks to have run. */
    rd_kafka_resp_err_t e = rd_kafka_flush(p->rk, (int)timeout_ms);
    while (atomic_load(&p->in_flight) > 0 && loom_mono_ms() < end)
        loom_sleep_ms(5);
    return e == RD_KAFKA_RESP_ERR_NO_ERROR && atomic_load(&p->in_flight) == 0 ? 0 : LOOM_ETIMEDOUT;
}

void loom_producer_free(loom_producer_t *p)
{
    if (!p)
        return;
    if (loom_producer_flush(p, p->flush_timeout_ms) != 0)
        LOOM_WARN("producer closed with undelivered messages", "count=%d",
                  atomic_load(&p->in_flight));
    atomic_store(&p->stop, 1);
    pthread_join(p->thread, NULL);
    /* Reports that came after the thread's last poll. */
    rd_kafka_event_t *ev;
    while ((ev = rd_kafka_queue_poll(p->events, 0)))
        serve_event(p, ev);
    rd_kafka_queue_destroy(p->events);
    rd_kafka_destroy(p->rk);
    for (size_t i = 0; i < p->n_acked; i++)
        free(p->acked[i].topic);
    free(p->acked);
    while (p->pool) {
        delivery_rec_t *next = p->pool->next;
        free(p->pool);
        p->pool = next;
    }
    pthread_mutex_destroy(&p->pool_mu);
    free(p);
}

int loom_producer_in_flight(loom_producer_t *p)
{
    return atomic_load(&p->in_flight);
}

rd_kafka_t *loom_producer_handle(loom_producer_t *p)
{
    return p->rk;
}

int loom_producer_send_raw(loom_producer_t *p, const char *topic, const char *key, size_t key_len,
                           rd_kafka_headers_t *hdrs, const void *value, size_t len,
                           loom_delivery_cb cb, void *opaque, loom_error_t *err)
{
    delivery_rec_t *rec = NULL;
    if (cb) {
        rec = rec_get(p);
        rec->cb = cb;
        rec->opaque = opaque;
    }
    atomic_fetch_add(&p->in_flight, 1);
    rd_kafka_resp_err_t e = rd_kafka_producev(
        p->rk, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_KEY(key, key ? key_len : 0),
        RD_KAFKA_V_VALUE((void *)value, len), RD_KAFKA_V_HEADERS(hdrs),
        RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_OPAQUE(rec), RD_KAFKA_V_END);
    if (e != RD_KAFKA_RESP_ERR_NO_ERROR) {
        atomic_fetch_sub(&p->in_flight, 1);
        rec_put(p, rec, rec, rec ? 1 : 0);
        return loom_kafka_error(e, "queue message", err);
    }
    return 0;
}

int loom_producer_send(loom_producer_t *p, const char *topic, const char *key, size_t key_len,
                       const loom_ce_t *ce, loom_delivery_cb cb, void *opaque, loom_error_t *err)
{
    int rc = loom_ce_validate(ce, err);
    if (rc != 0)
        return rc;
    rd_kafka_headers_t *hdrs = loom_ce_headers(ce);
    rc = loom_producer_send_raw(p, topic, key, key_len, hdrs, ce->data, ce->data_len, cb, opaque,
                                err);
    if (rc != 0)
        rd_kafka_headers_destroy(hdrs);
    return rc;
}

/* ---- futures ----------------------------------------------------------------- */

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cond;
} future_impl_t;

void loom_delivery_init(loom_delivery_t *d)
{
    memset(d, 0, sizeof(*d));
    future_impl_t *f = loom_xmalloc(sizeof(*f));
    pthread_mutex_init(&f->mu, NULL);
    pthread_cond_init(&f->cond, NULL);
    d->impl = f;
}

void loom_delivery_release(loom_delivery_t *d)
{
    future_impl_t *f = d->impl;
    if (!f)
        return;
    pthread_mutex_destroy(&f->mu);
    pthread_cond_destroy(&f->cond);
    free(f);
    d->impl = NULL;
}

void loom_delivery_future_cb(void *opaque, const loom_error_t *err, int32_t partition,
                             int64_t offset)
{
    loom_delivery_t *d = opaque;
    future_impl_t *f = d->impl;
    pthread_mutex_lock(&f->mu);
    if (err)
        d->err = *err;
    else
        loom_error_clear(&d->err);
    d->partition = partition;
    d->offset = offset;
    d->done = 1;
    pthread_cond_broadcast(&f->cond);
    pthread_mutex_unlock(&f->mu);
}

int loom_delivery_wait(loom_delivery_t *d, int64_t timeout_ms, loom_error_t *err)
{
    future_impl_t *f = d->impl;
    struct timespec until;
    loom_timespec_in(timeout_ms, &until);
    pthread_mutex_lock(&f->mu);
    while (!d->done)
        if (pthread_cond_timedwait(&f->cond, &f->mu, &until) != 0)
            break;
    int done = d->done;
    pthread_mutex_unlock(&f->mu);
    if (!done)
        return loom_error_set(err, LOOM_CODE_DEADLINE_EXCEEDED, "no delivery report within %lld ms",
                              (long long)timeout_ms);
    if (d->err.code) {
        if (err)
            *err = d->err;
        return loom_error_class_errno(d->err.cls);
    }
    return 0;
}

/* ---- topics ------------------------------------------------------------------ */

int loom_kafka_create_topics(const char *brokers, const loom_config_t *cfg,
                             const char *const *topics, size_t n, int partitions, int *created,
                             loom_error_t *err)
{
    char errbuf[512];
    *created = 0;
    if (n == 0)
        return 0;
    rd_kafka_conf_t *conf = loom_kafka_conf_new(brokers, cfg, errbuf, sizeof(errbuf));
    if (!conf)
        return loom_error_set(err, LOOM_CODE_CONFIG_INVALID, "could not configure Kafka: %s",
                              errbuf);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errbuf, sizeof(errbuf));
    if (!rk) {
        rd_kafka_conf_destroy(conf);
        return loom_error_set(err, LOOM_CODE_CONFIG_INVALID, "could not create a client: %s",
                              errbuf);
    }
    /* Replication: LOOM_KAFKA_REPLICATION_FACTOR and _MIN_INSYNC_REPLICAS,
     * 0 (or no configuration) leaving the broker's defaults. */
    const loom_config_value_t *rfv =
        cfg ? loom_config_get(cfg, "LOOM_KAFKA_REPLICATION_FACTOR") : NULL;
    const loom_config_value_t *isr =
        cfg ? loom_config_get(cfg, "LOOM_KAFKA_MIN_INSYNC_REPLICAS") : NULL;
    char isr_text[16];
    snprintf(isr_text, sizeof(isr_text), "%lld", isr ? (long long)isr->num : 0LL);
    rd_kafka_NewTopic_t **nt = loom_xcalloc(n, sizeof(*nt));
    for (size_t i = 0; i < n; i++) {
        nt[i] =
            rd_kafka_NewTopic_new(topics[i], partitions, rfv && rfv->num > 0 ? (int)rfv->num : -1,
                                  errbuf, sizeof(errbuf));
        if (!nt[i]) {
            for (size_t k = 0; k < i; k++)
                rd_kafka_NewTopic_destroy(nt[k]);
            free(nt);
            rd_kafka_destroy(rk);
            return loom_error_set(err, LOOM_CODE_CONFIG_INVALID, "could not create topic %s: %s",
                                  topics[i], errbuf);
        }
        /* A batch of messages can be a few MiB: let the topic take it. */
        rd_kafka_NewTopic_set_config(nt[i], "max.message.bytes", LOOM_KAFKA_MESSAGE_MAX);
        if (isr && isr->num > 0)
            rd_kafka_NewTopic_set_config(nt[i], "min.insync.replicas", isr_text);
    }
    rd_kafka_queue_t *q = rd_kafka_queue_new(rk);
    rd_kafka_AdminOptions_t *ao = rd_kafka_AdminOptions_new(rk, RD_KAFKA_ADMIN_OP_CREATETOPICS);
    rd_kafka_AdminOptions_set_operation_timeout(ao, 15000, errbuf, sizeof(errbuf));
    rd_kafka_AdminOptions_set_request_timeout(ao, 15000, errbuf, sizeof(errbuf));
    rd_kafka_CreateTopics(rk, nt, n, ao, q);
    rd_kafka_event_t *ev = rd_kafka_queue_poll(q, 30000);
    int rc = 0;
    if (!ev) {
        rc = loom_error_set(err, LOOM_CODE_BROKER_UNAVAILABLE,
                            "could not create topics: no answer from %s within 30 s", brokers);
    } else if (rd_kafka_event_error(ev)) {
        rc = loom_error_set(err, LOOM_CODE_BROKER_UNAVAILABLE, "could not create topics: %s",
                            rd_kafka_event_error_string(ev));
    } else {
        size_t cnt = 0;
        const rd_kafka_topic_result_t **res =
            rd_kafka_CreateTopics_result_topics(rd_kafka_event_CreateTopics_result(ev), &cnt);
        for (size_t i = 0; i < cnt; i++) {
            rd_kafka_resp_err_t te = rd_kafka_topic_result_error(res[i]);
            if (te == RD_KAFKA_RESP_ERR_NO_ERROR)
                (*created)++;
            else if (te != RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS && rc == 0)
                rc = loom_error_set(err, LOOM_CODE_BROKER_UNAVAILABLE,
                                    "could not create topic \"%s\": %s",
                                    rd_kafka_topic_result_name(res[i]),
                                    rd_kafka_topic_result_error_string(res[i])
                                        ? rd_kafka_topic_result_error_string(res[i])
                                        : rd_kafka_err2str(te));
        }
    }
    if (ev)
        rd_kafka_event_destroy(ev);
    rd_kafka_AdminOptions_destroy(ao);
    rd_kafka_queue_destroy(q);
    for (size_t i = 0; i < n; i++)
        rd_kafka_NewTopic_destroy(nt[i]);
    free(nt);
    rd_kafka_destroy(rk);
    return rc;
}
