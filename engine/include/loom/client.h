/*
 * libloom-client: publish commands to Loom and call its ops, from any C
 * program (docs/client.md).
 *
 *   loom_client_opts_t o = {.brokers = "localhost:9092", .site = "shop", .node = "web-1"};
 *   loom_client_t *c;
 *   char errbuf[512];
 *   if (loom_client_new(&o, &c, errbuf, sizeof(errbuf)) != 0) { ... }
 *   loom_client_result_t r;
 *   if (loom_client_publish_wait(c, "orders.place", "order-1", "{\"qty\":2}", 10000, &r) == 0)
 *       printf("%s -> partition %d offset %lld\n", r.id, r.partition, (long long)r.offset);
 *   loom_client_free(c);
 *
 * A command is a CloudEvent 1.0 in Kafka binary content mode (ce_* headers,
 * the JSON data as the value, the key as the Kafka key) on the topic
 * "<prefix>.cmd.<service>" (the type up to its first dot), sent by an idempotent producer
 * (acks=all). Its delivery is reported once the broker acknowledged it, or failed.
 *
 * Thread-safe: one client may be shared by threads. Callbacks run on the
 * client's delivery thread; they must not block long nor free the client.
 *
 * Functions return 0 or a negative LOOM_CLIENT_E* code; the error structs
 * say more (a stable code such as "BROKER_UNAVAILABLE", a message, and
 * whether a retry may succeed).
 */
#ifndef LOOM_CLIENT_H
#define LOOM_CLIENT_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LOOM_CLIENT_ID_LEN 36 /* a command id (UUIDv7), without the NUL */

enum {
    LOOM_CLIENT_OK = 0,
    LOOM_CLIENT_EINVAL = -1,       /* a bad argument, option, JSON or URL */
    LOOM_CLIENT_EQUEUEFULL = -2,   /* the local queue is full: retry later */
    LOOM_CLIENT_EUNAVAILABLE = -3, /* broker or gateway cannot be reached / did not ack */
    LOOM_CLIENT_ETIMEDOUT = -4,    /* gave up waiting (the message may still be delivered) */
    LOOM_CLIENT_EOP = -5,          /* the gateway answered an op call with an error */
    LOOM_CLIENT_EINTERNAL = -6,    /* anything else */
};

typedef struct loom_client_error {
    int rc;            /* the LOOM_CLIENT_E* code, 0 when no error */
    char code[48];     /* stable code: "BROKER_UNAVAILABLE", "OP_NOT_FOUND", ... ("" if none) */
    char message[512]; /* what happened, for people */
    bool retriable;    /* a later retry may succeed */
    int http_status;   /* op calls: the gateway's status (0: no answer) */
} loom_client_error_t;

/* A librdkafka property ("sasl.mechanisms" = "PLAIN"). */
typedef struct loom_client_prop {
    const char *key;
    const char *value;
} loom_client_prop_t;

typedef struct loom_client_opts {
    const char *brokers;             /* bootstrap servers; required to publish */
    const loom_client_prop_t *props; /* extra librdkafka properties; may be NULL. They win
                                      * over the client's defaults, except
                                      * enable.idempotence and acks. */
    size_t n_props;
    const char *topic_prefix;   /* NULL: "loom" -> "loom.cmd.<service>" */
    const char *site;           /* ce_source "loom://SITE/NODE"; NULL: "local" */
    const char *node;           /* NULL: the host name */
    int64_t message_timeout_ms; /* a command not acknowledged by then fails; 0: 30000 */
    int queue_max_messages;     /* local queue bound; 0: 100000 */
    int64_t flush_timeout_ms;   /* flush on free; 0: 30000 */
    const char *gateway_url;    /* ops: "http://host:port[/prefix]"; NULL: no ops */
    const char *gateway_token;  /* ops: bearer token; may be NULL */
    int64_t op_timeout_ms;      /* ops: deadline of one call; 0: 30000 */
} loom_client_opts_t;

typedef struct loom_client loom_client_t;

/* The result of one publish. */
typedef struct loom_client_result {
    char id[LOOM_CLIENT_ID_LEN + 1]; /* the command id (ce_id) */
    char topic[256];
    int32_t partition;         /* -1 when not delivered */
    int64_t offset;            /* -1 when not delivered */
    loom_client_error_t error; /* error.rc == 0 when the broker acknowledged */
} loom_client_result_t;

/* Called exactly once per queued command, on the client's delivery thread.
 * res is borrowed for the call. */
typedef void (*loom_client_delivery_cb)(void *opaque, const loom_client_result_t *res);

/* The library's version, "MAJOR.MINOR.PATCH". */
const char *loom_client_version(void);

/* Creates a client (connects lazily). Returns 0, or LOOM_CLIENT_EINVAL with
 * errbuf (may be NULL) saying why. With no brokers, only ops can be called. */
int loom_client_new(const loom_client_opts_t *opts, loom_client_t **out, char *errbuf,
                    size_t errlen);
/* Flushes (up to flush_timeout_ms), then frees. NULL is fine. */
void loom_client_free(loom_client_t *c);

/*
 * Queues the command `type` (e.g. "orders.place") with Kafka key `key` (may
 * be NULL) and `json` (JSON text, any value; NULL means {}) for the topic
 * "<prefix>.cmd.<service>" (the type up to its first dot). On success returns 0, writes the command
 * id to id_out (LOOM_CLIENT_ID_LEN + 1 bytes; may be NULL), and cb (may be NULL) runs once later
 * with the delivery result. On failure returns a negative code, fills err (may be NULL), and cb
 * never runs.
 */
int loom_client_publish(loom_client_t *c, const char *type, const char *key, const char *json,
                        loom_client_delivery_cb cb, void *opaque, char *id_out,
                        loom_client_error_t *err);
/* Same with data as a jansson value (borrowed; NULL means {}). */
int loom_client_publish_json(loom_client_t *c, const char *type, const char *key,
                             const json_t *data, loom_client_delivery_cb cb, void *opaque,
                             char *id_out, loom_client_error_t *err);

/* Publishes and waits up to timeout_ms (<= 0: message_timeout_ms + 5 s) for
 * the broker. Returns 0 when acknowledged (res has id, topic, partition and
 * offset), or a negative code with res->error filled; res->id is set
 * whenever the command got that far. */
int loom_client_publish_wait(loom_client_t *c, const char *type, const char *key, const char *json,
                             int64_t timeout_ms, loom_client_result_t *res);
int loom_client_publish_json_wait(loom_client_t *c, const char *type, const char *key,
                                  const json_t *data, int64_t timeout_ms,
                                  loom_client_result_t *res);

/* Waits until every queued command is delivered or failed (its callback has
 * run). 0, or LOOM_CLIENT_ETIMEDOUT. */
int loom_client_flush(loom_client_t *c, int64_t timeout_ms);
/* Commands queued whose callback has not run yet. */
int loom_client_in_flight(loom_client_t *c);

/*
 * Calls the op `name` on the gateway: POST {gateway_url}/v1/ops/{name} with
 * req (borrowed; NULL means {}) and the gateway token. On success returns 0
 * and sets *res to the result (new reference; json_decref it). When the op
 * fails, returns LOOM_CLIENT_EOP with err's code, message and http_status
 * from the gateway's answer; other failures (EINVAL, EUNAVAILABLE,
 * ETIMEDOUT, EINTERNAL) mean the gateway did not answer properly.
 */
int loom_client_op(loom_client_t *c, const char *name, const json_t *req, json_t **res,
                   loom_client_error_t *err);

#ifdef __cplusplus
}
#endif

#endif
