/*
 * Kafka producer for Loom messages (librdkafka).
 *
 * Idempotent (enable.idempotence=true, acks=all), so retries inside
 * librdkafka never duplicate or reorder a partition's messages. Every send
 * reports its delivery exactly once, through a callback or a future, from a
 * background thread. A full local queue is reported at once as QUEUE_FULL so
 * callers can answer 503 instead of blocking.
 */
#ifndef LOOM_BUS_H
#define LOOM_BUS_H

#include "loom/config.h"
#include "loom/envelope.h"
#include "loom/error.h"

#include <librdkafka/rdkafka.h>
#include <stdbool.h>
#include <stdint.h>

typedef struct loom_producer loom_producer_t;

/* Largest message Loom produces (and the max.message.bytes of the topics it
 * creates): a batch of 1000 messages or 4 MiB fits with its envelope. */
#define LOOM_KAFKA_MESSAGE_MAX "10485760"

/* Called once per successfully queued message, on the producer's delivery
 * thread. err is NULL when the broker acknowledged the message. */
typedef void (*loom_delivery_cb)(void *opaque, const loom_error_t *err, int32_t partition,
                                 int64_t offset);

/* A librdkafka configuration with bootstrap.servers and every
 * LOOM_KAFKA_<PROPERTY> of cfg (cfg may be NULL). NULL with errbuf filled on
 * a refused property. The caller owns the result. */
rd_kafka_conf_t *loom_kafka_conf_new(const char *brokers, const loom_config_t *cfg, char *errbuf,
                                     size_t errlen);
/* True when cfg sets librdkafka property `key` (LOOM_KAFKA_<PROPERTY>): Loom's
 * own defaults give way to it. */
bool loom_kafka_user_set(const loom_config_t *cfg, const char *key);

typedef struct loom_producer_opts {
    const char *brokers;        /* bootstrap servers (required) */
    const loom_config_t *cfg;   /* LOOM_KAFKA_* pass-through; may be NULL */
    int queue_max_messages;     /* local queue bound; 0: 100000 */
    int linger_ms;              /* 0: 5 */
    int64_t flush_timeout_ms;   /* flush on free; 0: 30000 */
    int64_t message_timeout_ms; /* a message not acknowledged by then fails (librdkafka's
                                 * message.timeout.ms); 0: librdkafka's default, 300000 */
} loom_producer_opts_t;

int loom_producer_new(const loom_producer_opts_t *opts, loom_producer_t **out, loom_error_t *err);
/* Flushes (up to flush_timeout_ms), stops the delivery thread, destroys. */
void loom_producer_free(loom_producer_t *p);

/*
 * Queues ce (binary mode) for topic with key (may be NULL). On success cb
 * runs exactly once later; on failure (QUEUE_FULL, BROKER_UNAVAILABLE,
 * INVALID_ARGUMENT) this returns a negative code and cb never runs.
 * Thread-safe.
 */
int loom_producer_send(loom_producer_t *p, const char *topic, const char *key, size_t key_len,
                       const loom_ce_t *ce, loom_delivery_cb cb, void *opaque, loom_error_t *err);
/* Same with ready-made headers (taken on success) and value. */
int loom_producer_send_raw(loom_producer_t *p, const char *topic, const char *key, size_t key_len,
                           rd_kafka_headers_t *hdrs, const void *value, size_t len,
                           loom_delivery_cb cb, void *opaque, loom_error_t *err);

/* Waits until everything queued is delivered or failed; LOOM_ETIMEDOUT if not. */
int loom_producer_flush(loom_producer_t *p, int64_t timeout_ms);
/* Messages queued and not yet reported. */
int loom_producer_in_flight(loom_producer_t *p);
rd_kafka_t *loom_producer_handle(loom_producer_t *p);

/* A future for one delivery: init, pass loom_delivery_future_cb and the
 * future as opaque, then wait. */
typedef struct loom_delivery {
    int done;
    loom_error_t err; /* err.code NULL on success */
    int32_t partition;
    int64_t offset;
    void *impl; /* mutex + cond */
} loom_delivery_t;

void loom_delivery_init(loom_delivery_t *d);
void loom_delivery_release(loom_delivery_t *d);
void loom_delivery_future_cb(void *opaque, const loom_error_t *err, int32_t partition,
                             int64_t offset);
/* 0 when acknowledged, the delivery error, or LOOM_ETIMEDOUT. */
int loom_delivery_wait(loom_delivery_t *d, int64_t timeout_ms, loom_error_t *err);

/* Kafka headers from a JSON object of string values ({"ce_id": "..."}), as
 * the outbox and loom_commands keep them (new; other value types skipped). */
rd_kafka_headers_t *loom_kafka_headers_from_json(const char *text);

/* Maps a librdkafka error to Loom's catalogue (retriable flag from librdkafka). */
int loom_kafka_error(rd_kafka_resp_err_t kerr, const char *what, loom_error_t *err);

/* Creates the topics that do not exist yet (admin API), each with
 * `partitions` partitions, LOOM_KAFKA_REPLICATION_FACTOR replicas and
 * LOOM_KAFKA_MIN_INSYNC_REPLICAS (the broker's defaults when 0 or cfg is
 * NULL). */
int loom_kafka_create_topics(const char *brokers, const loom_config_t *cfg,
                             const char *const *topics, size_t n, int partitions, int *created,
                             loom_error_t *err);

#endif
