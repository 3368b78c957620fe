/*
 * The message envelope: CloudEvents 1.0 on Kafka.
 *
 * Loom publishes in binary content mode: attributes as `ce_*` headers, the
 * data as the message value (JSON, `content-type: application/json`), the key
 * the stream/entity id. It reads binary mode and structured mode (the whole
 * event as JSON, `content-type: application/cloudevents+json`), so anything
 * that speaks the Kafka protocol binding of CloudEvents can publish to Loom.
 *
 * Decoding is strict: a missing or malformed required attribute is an error
 * that names the attribute. Strings of a decoded event point into the arena
 * given to the decoder (or into the Kafka message) and live as long as both.
 */
#ifndef LOOM_ENVELOPE_H
#define LOOM_ENVELOPE_H

#include "loom/arena.h"
#include "loom/error.h"

#include "loom/topic.h"

#include <jansson.h>
#include <librdkafka/rdkafka.h>
#include <stddef.h>
#include <stdint.h>

#define LOOM_CE_MAX_EXTENSIONS 32

/* Longest ce_id and Kafka key accepted, in bytes: an id is indexed (with its
 * consumer, and alone) in loom_commands, and a btree index row holds at most
 * 2704 bytes, so an id stays well below that. Other attributes: 4096. */
#define LOOM_CE_ID_MAX 1024
/* Longest id loom_ce_check_json() accepts for an event a service stores
 * (the messages service's ids). */
#define LOOM_CE_JSON_ID_MAX 256
#define LOOM_STR_(x)        #x
#define LOOM_STR(x)         LOOM_STR_(x)

/* The extension the gateway adds to a command it publishes: the HTTP request
 * as a JSON object {"method", "path", "route", "principal", "at"}, kept in
 * loom_commands.request for the console's story (at most this many bytes). */
#define LOOM_CE_EXT_REQUEST "loomrequest"
#define LOOM_CE_REQUEST_MAX 1024

typedef struct loom_ce_ext {
    const char *name;  /* [a-z0-9]{1,20} */
    const char *value; /* as text */
} loom_ce_ext_t;

typedef struct loom_ce {
    /* required */
    const char *id;
    const char *source;
    const char *specversion; /* "1.0" */
    const char *type;
    /* optional (NULL when absent) */
    const char *subject;
    const char *time; /* RFC 3339 */
    const char *datacontenttype;
    const char *dataschema;
    /* Loom's extensions (NULL when absent) */
    const char *rayid;
    const char *causationid;
    const char *deadline; /* RFC 3339 */
    const char *traceparent;
    /* other extensions */
    loom_ce_ext_t ext[LOOM_CE_MAX_EXTENSIONS];
    size_t n_ext;
    /* data: the bytes of the value (binary mode) or of `data` re-serialized /
     * `data_base64` decoded (structured mode) */
    const void *data;
    size_t data_len;
    /* Kafka key, when read from Kafka */
    const char *key;
    size_t key_len;
    /* The time loom_ce_init() formatted: loom_ce_validate() does not parse
     * it again while `time` still points at it. */
    const char *time_formatted;
} loom_ce_t;

/* Decodes a Kafka message in binary or structured mode. Returns 0, or
 * LOOM_EINVAL with err (INVALID_ARGUMENT) naming the attribute. Attribute
 * values and the key must be UTF-8 text without NUL bytes; the id and the
 * key at most LOOM_CE_ID_MAX bytes. On failure ce holds only what is usable
 * by itself (id, type, source; each NULL when not), so the rejection can be
 * filed under the sender's id. */
int loom_ce_decode(const rd_kafka_message_t *rkm, loom_arena_t *arena, loom_ce_t *ce,
                   loom_error_t *err);

/* Decodes a CloudEvent in the JSON event format (structured mode) from text. */
int loom_ce_decode_json(const char *json, size_t len, loom_arena_t *arena, loom_ce_t *ce,
                        loom_error_t *err);

/* Checks the attributes of ce (also of one built by hand). */
int loom_ce_validate(const loom_ce_t *ce, loom_error_t *err);

/* Builds the binary-mode headers of ce (new; caller destroys or hands them
 * to rd_kafka_producev, which takes them on success). */
rd_kafka_headers_t *loom_ce_headers(const loom_ce_t *ce);

/* The event in the JSON event format (new reference). Data of a JSON
 * content type (absent, application/json, text/json, +json) that parses
 * becomes `data`; anything else becomes `data_base64`. */
json_t *loom_ce_to_json(const loom_ce_t *ce);

/* Fills id (a new UUIDv7 in the arena), specversion, source
 * ("loom://SITE/NODE") and time (now) of a new event of `type`. */
void loom_ce_init(loom_ce_t *ce, loom_arena_t *arena, const char *site, const char *node,
                  const char *type);

/*
 * Checks a CloudEvent in the JSON event format (an object) as a service that
 * stores events must: required id (string of 1 to 256 bytes), source and
 * type (non-empty strings), specversion "1.0"; optional subject, time (RFC
 * 3339), datacontenttype, dataschema (strings); extension attributes named
 * [a-z0-9]{1,20} with string, integer or boolean values; `data` any JSON value
 * or `data_base64` valid base64, not both. On failure err's message starts
 * with the attribute (`"time": ...`) and *field points at its name.
 */
int loom_ce_check_json(const json_t *obj, const char **field, loom_error_t *err);

/* Parses an RFC 3339 timestamp to Unix microseconds; 0 or LOOM_EINVAL. */
int loom_rfc3339_parse(const char *s, int64_t *unix_us);

#endif
