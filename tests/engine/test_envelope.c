/*
 * The CloudEvents envelope: decoding Kafka messages in binary and structured
 * content mode (every attribute, Loom's extensions, other extensions, the key),
 * the errors a bad message gets (each naming the attribute at fault), RFC 3339
 * timestamps, and encoding (headers, the JSON event format, new events) with
 * round trips through the decoder.
 *
 * No servers: messages are built by hand (see msg_new).
 */
#include "loom/arena.h"
#include "loom/clock.h"
#include "loom/consumer.h"
#include "loom/envelope.h"
#include "loom/error.h"
#include "loom/uuid.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <librdkafka/rdkafka.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

/* ---- hand-built Kafka messages -------------------------------------------- */

/*
 * librdkafka's rd_kafka_message_t is the first member of its internal
 * rd_kafka_msg_t, whose later members hold the header list that
 * rd_kafka_message_headers() and rd_kafka_message_set_headers() use. A bare
 * rd_kafka_message_t is too small for them, so a message lives in a zeroed
 * buffer with room to spare (test_envelope.hand_built_message_has_room checks
 * where librdkafka keeps the headers). Zeroed flags make it read as a consumed
 * message; no rkt is needed since the decoder never looks at the topic.
 */
#define MSG_BUF_SIZE 1024

typedef union {
    rd_kafka_message_t rkm;
    max_align_t align[MSG_BUF_SIZE / sizeof(max_align_t)];
} msg_buf_t;

/* A new message; value and key are borrowed (NULL for none). */
static rd_kafka_message_t *msg_new(const void *value, size_t len, const char *key)
{
    msg_buf_t *b = calloc(1, sizeof(*b));
    cr_assert_not_null(b);
    b->rkm.payload = (void *)value;
    b->rkm.len = len;
    if (key) {
        b->rkm.key = (void *)key;
        b->rkm.key_len = strlen(key);
    }
    return &b->rkm;
}

/* Adds a header (value of len bytes; len -1 for a string). */
static void msg_hdr_n(rd_kafka_message_t *rkm, const char *name, const void *value, ssize_t len)
{
    rd_kafka_headers_t *hdrs;
    if (rd_kafka_message_headers(rkm, &hdrs) != RD_KAFKA_RESP_ERR_NO_ERROR) {
        hdrs = rd_kafka_headers_new(16);
        rd_kafka_message_set_headers(rkm, hdrs);
    }
    cr_assert_eq(rd_kafka_header_add(hdrs, name, -1, value, len), RD_KAFKA_RESP_ERR_NO_ERROR);
}

static void msg_hdr(rd_kafka_message_t *rkm, const char *name, const char *value)
{
    msg_hdr_n(rkm, name, value, -1);
}

static void msg_free(rd_kafka_message_t *rkm)
{
    rd_kafka_headers_t *hdrs;
    if (rd_kafka_message_detach_headers(rkm, &hdrs) == RD_KAFKA_RESP_ERR_NO_ERROR)
        rd_kafka_headers_destroy(hdrs);
    free(rkm);
}

/* A binary-mode message with the four required attributes. */
static rd_kafka_message_t *msg_binary(const char *value)
{
    rd_kafka_message_t *rkm = msg_new(value, value ? strlen(value) : 0, NULL);
    msg_hdr(rkm, "ce_specversion", "1.0");
    msg_hdr(rkm, "ce_id", "0191b2c4-7e1f-7a3b-9c1d-2e3f4a5b6c7d");
    msg_hdr(rkm, "ce_source", "loom://eu-west-1/node-1");
    msg_hdr(rkm, "ce_type", "messages.put_batch");
    return rkm;
}

/* A structured-mode message (content-type application/cloudevents+json). */
static rd_kafka_message_t *msg_structured(const char *json, const char *key)
{
    rd_kafka_message_t *rkm = msg_new(json, strlen(json), key);
    msg_hdr(rkm, "content-type", "application/cloudevents+json");
    return rkm;
}

/* ---- fixture and helpers ---------------------------------------------------- */

static loom_arena_t arena;

static void setup(void)
{
    loom_arena_init(&arena, 0);
}

static void teardown(void)
{
    loom_arena_release(&arena);
}

TestSuite(envelope, .init = setup, .fini = teardown);

static int decode(rd_kafka_message_t *rkm, loom_ce_t *ce, loom_error_t *err)
{
    loom_error_clear(err);
    int rc = loom_ce_decode(rkm, &arena, ce, err);
    msg_free(rkm);
    return rc;
}

static int decode_json(const char *json, loom_ce_t *ce, loom_error_t *err)
{
    loom_error_clear(err);
    return loom_ce_decode_json(json, strlen(json), &arena, ce, err);
}

/* rc and err say INVALID_ARGUMENT and the message names attr (quoted). */
static void expect_bad(int rc, const loom_error_t *err, const char *attr, const char *what)
{
    cr_assert_eq(rc, LOOM_EINVAL, "%s: decoded (rc %d), expected an error naming \"%s\"", what, rc,
                 attr);
    cr_assert_str_eq(err->code, "INVALID_ARGUMENT", "%s: %s", what, err->message);
    char quoted[128];
    snprintf(quoted, sizeof(quoted), "\"%s\"", attr);
    cr_assert(strstr(err->message, quoted), "%s: message \"%s\" does not name %s", what,
              err->message, quoted);
}

static void expect_data(const loom_ce_t *ce, const void *data, size_t len)
{
    cr_assert_eq(ce->data_len, len, "data is %zu bytes, expected %zu", ce->data_len, len);
    cr_assert_not_null(ce->data);
    cr_assert(memcmp(ce->data, data, len) == 0, "data differs: %.*s", (int)ce->data_len,
              (const char *)ce->data);
}

static const char *ext_get(const loom_ce_t *ce, const char *name)
{
    for (size_t i = 0; i < ce->n_ext; i++)
        if (strcmp(ce->ext[i].name, name) == 0)
            return ce->ext[i].value;
    return NULL;
}

static void str_eq_or_null(const char *a, const char *b, const char *what)
{
    if (!a || !b)
        cr_assert(a == b, "%s: \"%s\" vs \"%s\"", what, a ? a : "(null)", b ? b : "(null)");
    else
        cr_assert_str_eq(a, b, "%s", what);
}

/* Every attribute, extension and the data of a and b are equal. */
static void expect_same_event(const loom_ce_t *a, const loom_ce_t *b)
{
    str_eq_or_null(a->specversion, b->specversion, "specversion");
    str_eq_or_null(a->id, b->id, "id");
    str_eq_or_null(a->source, b->source, "source");
    str_eq_or_null(a->type, b->type, "type");
    str_eq_or_null(a->subject, b->subject, "subject");
    str_eq_or_null(a->time, b->time, "time");
    str_eq_or_null(a->datacontenttype, b->datacontenttype, "datacontenttype");
    str_eq_or_null(a->dataschema, b->dataschema, "dataschema");
    str_eq_or_null(a->rayid, b->rayid, "rayid");
    str_eq_or_null(a->causationid, b->causationid, "causationid");
    str_eq_or_null(a->deadline, b->deadline, "deadline");
    str_eq_or_null(a->traceparent, b->traceparent, "traceparent");
    cr_assert_eq(a->n_ext, b->n_ext);
    for (size_t i = 0; i < a->n_ext; i++) {
        const char *v = ext_get(b, a->ext[i].name);
        cr_assert_not_null(v, "extension %s lost", a->ext[i].name);
        cr_assert_str_eq(v, a->ext[i].value, "extension %s", a->ext[i].name);
    }
    cr_assert_eq(a->data_len, b->data_len);
    if (a->data_len)
        cr_assert(memcmp(a->data, b->data, a->data_len) == 0);
}

#define TRACEPARENT "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

/* ---- the hand-built message itself ------------------------------------------ */

Test(envelope, hand_built_message_has_room)
{
    rd_kafka_message_t *rkm = msg_new("x", 1, NULL);
    rd_kafka_headers_t *hdrs;
    cr_assert_eq(rd_kafka_message_headers(rkm, &hdrs), RD_KAFKA_RESP_ERR__NOENT);
    hdrs = rd_kafka_headers_new(1);
    rd_kafka_message_set_headers(rkm, hdrs);
    /* librdkafka stores the list inside the buffer, past the public struct. */
    size_t at = SIZE_MAX;
    for (size_t off = 0; off + sizeof(hdrs) <= sizeof(msg_buf_t); off += sizeof(void *))
        if (memcmp((char *)rkm + off, &hdrs, sizeof(hdrs)) == 0)
            at = off;
    cr_assert_neq(at, SIZE_MAX, "header list not found in the message buffer");
    cr_assert_geq(at, sizeof(rd_kafka_message_t));
    rd_kafka_headers_t *got;
    cr_assert_eq(rd_kafka_message_headers(rkm, &got), RD_KAFKA_RESP_ERR_NO_ERROR);
    cr_assert_eq(got, hdrs);
    msg_free(rkm);
}

/* ---- binary content mode ------------------------------------------------------ */

Test(envelope, binary_every_attribute_extension_and_key)
{
    const char *value = "{\"text\":\"hello\",\"n\":1}";
    rd_kafka_message_t *rkm = msg_new(value, strlen(value), "stream-42");
    msg_hdr(rkm, "ce_specversion", "1.0");
    msg_hdr(rkm, "ce_id", "0191b2c4-7e1f-7a3b-9c1d-2e3f4a5b6c7d");
    msg_hdr(rkm, "ce_source", "loom://eu-west-1/node-1");
    msg_hdr(rkm, "ce_type", "messages.put_batch");
    msg_hdr(rkm, "ce_time", "2024-02-29T12:00:00.123456Z");
    msg_hdr(rkm, "ce_subject", "channel/7");
    msg_hdr(rkm, "ce_dataschema", "https://example.com/schema/put_batch.json");
    msg_hdr(rkm, "ce_rayid", "0191b2c4-0000-7000-8000-000000000001");
    msg_hdr(rkm, "ce_causationid", "0191b2c4-0000-7000-8000-000000000002");
    msg_hdr(rkm, "ce_deadline", "2024-02-29T12:00:30Z");
    msg_hdr(rkm, "ce_traceparent", TRACEPARENT);
    msg_hdr(rkm, "ce_tenant", "acme");
    msg_hdr(rkm, "ce_partitionkey", "stream-42");
    msg_hdr(rkm, "content-type", "application/json");
    msg_hdr(rkm, "x-other", "not an attribute");
    loom_ce_t ce;
    loom_error_t err;
    cr_assert_eq(decode(rkm, &ce, &err), 0, "%s", err.message);
    cr_assert_str_eq(ce.specversion, "1.0");
    cr_assert_str_eq(ce.id, "0191b2c4-7e1f-7a3b-9c1d-2e3f4a5b6c7d");
    cr_assert_str_eq(ce.source, "loom://eu-west-1/node-1");
    cr_assert_str_eq(ce.type, "messages.put_batch");
    cr_assert_str_eq(ce.time, "2024-02-29T12:00:00.123456Z");
    cr_assert_str_eq(ce.subject, "channel/7");
    cr_assert_str_eq(ce.dataschema, "https://example.com/schema/put_batch.json");
    cr_assert_str_eq(ce.datacontenttype, "application/json");
    cr_assert_str_eq(ce.rayid, "0191b2c4-0000-7000-8000-000000000001");
    cr_assert_str_eq(ce.causationid, "0191b2c4-0000-7000-8000-000000000002");
    cr_assert_str_eq(ce.deadline, "2024-02-29T12:00:30Z");
    cr_assert_str_eq(ce.traceparent, TRACEPARENT);
    cr_assert_eq(ce.n_ext, 2, "Loom's own extensions are not in ext[]");
    cr_assert_str_eq(ext_get(&ce, "tenant"), "acme");
    cr_assert_str_eq(ext_get(&ce, "partitionkey"), "stream-42");
    cr_assert_null(ext_get(&ce, "other"));
    expect_data(&ce, value, strlen(value));
    cr_assert_eq(ce.key_len, 9);
    cr_assert_str_eq(ce.key, "stream-42");
}

Test(envelope, binary_only_required_attributes)
{
    loom_ce_t ce;
    loom_error_t err;
    cr_assert_eq(decode(msg_binary("[1,2,3]"), &ce, &err), 0, "%s", err.message);
    cr_assert_str_eq(ce.type, "messages.put_batch");
    cr_assert_null(ce.time);
    cr_assert_null(ce.subject);
    cr_assert_null(ce.datacontenttype);
    cr_assert_null(ce.dataschema);
    cr_assert_null(ce.rayid);
    cr_assert_null(ce.causationid);
    cr_assert_null(ce.deadline);
    cr_assert_null(ce.traceparent);
    cr_assert_eq(ce.n_ext, 0);
    cr_assert_null(ce.key);
    cr_assert_eq(ce.key_len, 0);
    expect_data(&ce, "[1,2,3]", 7);
}

Test(envelope, binary_content_type_becomes_datacontenttype)
{
    const char *types[] = {"application/json", "text/plain; charset=utf-8",
                           "application/octet-stream"};
    for (size_t i = 0; i < 3; i++) {
        rd_kafka_message_t *rkm = msg_binary("x");
        msg_hdr(rkm, "content-type", types[i]);
        loom_ce_t ce;
        loom_error_t err;
        cr_assert_eq(decode(rkm, &ce, &err), 0, "%s", err.message);
        cr_assert_str_eq(ce.datacontenttype, types[i]);
    }
}

Test(envelope, binary_data_with_any_bytes_and_no_value)
{
    static const unsigned char bytes[] = {0x00, 0xff, 0x7b, 0x0a, 0x80};
    rd_kafka_message_t *rkm = msg_new(bytes, sizeof(bytes), NULL);
    msg_hdr(rkm, "ce_specversion", "1.0");
    msg_hdr(rkm, "ce_id", "1");
    msg_hdr(rkm, "ce_source", "/s");
    msg_hdr(rkm, "ce_type", "t");
    msg_hdr(rkm, "content-type", "application/octet-stream");
    loom_ce_t ce;
    loom_error_t err;
    cr_assert_eq(decode(rkm, &ce, &err), 0, "%s", err.message);
    expect_data(&ce, bytes, sizeof(bytes));

    cr_assert_eq(decode(msg_binary(NULL), &ce, &err), 0, "%s", err.message);
    cr_assert_eq(ce.data_len, 0);
}

Test(envelope, binary_key_keeps_its_length)
{
    /* A key of UTF-8 text: key_len must describe what key points to. */
    static const char key[] = {'a', (char)0xc3, (char)0xa9, 'b'};
    rd_kafka_message_t *rkm = msg_binary("{}");
    rkm->key = (void *)key;
    rkm->key_len = sizeof(key);
    loom_ce_t ce;
    loom_error_t err;
    cr_assert_eq(decode(rkm, &ce, &err), 0, "%s", err.message);
    cr_assert_eq(ce.key_len, 4);
    cr_assert(memcmp(ce.key, key, 4) == 0);
    cr_assert_eq(ce.key[4], '\0');
}

Test(envelope, a_key_that_is_not_text_is_refused_and_the_id_is_kept)
{
    static const char nul_key[] = {'a', '\0', 'b'};
    static const char bad_utf8[] = {'a', (char)0xff, 'b'};
    const struct {
        const char *key;
        size_t len;
    } keys[] = {{nul_key, sizeof(nul_key)}, {bad_utf8, sizeof(bad_utf8)}};
    for (size_t i = 0; i < 2; i++) {
        rd_kafka_message_t *rkm = msg_binary("{}");
        rkm->key = (void *)keys[i].key;
        rkm->key_len = keys[i].len;
        loom_ce_t ce;
        loom_error_t err;
        cr_assert_eq(decode(rkm, &ce, &err), LOOM_EINVAL);
        cr_assert(strstr(err.message, "Kafka key"), "%s", err.message);
        /* Filed under the sender's id all the same. */
        cr_assert_str_eq(ce.id, "0191b2c4-7e1f-7a3b-9c1d-2e3f4a5b6c7d");
        cr_assert_str_eq(ce.type, "messages.put_batch");
    }
    /* Longest key allowed, and one byte more. */
    char *big = malloc(LOOM_CE_ID_MAX + 1);
    memset(big, 'k', LOOM_CE_ID_MAX + 1);
    rd_kafka_message_t *rkm = msg_binary("{}");
    rkm->key = big;
    rkm->key_len = LOOM_CE_ID_MAX;
    loom_ce_t ce;
    loom_error_t err;
    cr_assert_eq(decode(rkm, &ce, &err), 0, "%s", err.message);
    rkm = msg_binary("{}");
    rkm->key = big;
    rkm->key_len = LOOM_CE_ID_MAX + 1;
    cr_assert_eq(decode(rkm, &ce, &err), LOOM_EINVAL);
    cr_assert(strstr(err.message, "longer than 1024"), "%s", err.message);
    free(big);
}

Test(envelope, binary_wins_over_a_json_value)
{
    /* A binary-mode message whose data happens to be a CloudEvent in JSON. */
    rd_kafka_message_t *rkm =
        msg_binary("{\"specversion\":\"1.0\",\"id\":\"other\",\"source\":\"/x\",\"type\":\"x\"}");
    loom_ce_t ce;
    loom_error_t err;
    cr_assert_eq(decode(rkm, &ce, &err), 0, "%s", err.message);
    cr_assert_str_eq(ce.id, "0191b2c4-7e1f-7a3b-9c1d-2e3f4a5b6c7d");
}

/* ---- structured content mode -------------------------------------------------- */

static const char structured_full[] =
    "{\"specversion\":\"1.0\",\"id\":\"e-1\",\"source\":\"https://example.com/app\","
    "\"type\":\"messages.put_batch\",\"time\":\"2024-02-29T14:30:00+02:30\","
    "\"subject\":\"channel/7\",\"datacontenttype\":\"application/json\","
    "\"dataschema\":\"https://example.com/s.json\",\"rayid\":\"ray-1\","
    "\"causationid\":\"cause-1\",\"deadline\":\"2024-02-29T12:00:30Z\","
    "\"traceparent\":\"" TRACEPARENT "\",\"tenant\":\"acme\",\"priority\":42,"
    "\"negative\":-7,\"urgent\":true,\"muted\":false,\"nothing\":null,"
    "\"data\":{\"b\":[1, 2, {\"c\":null}],\"a\":\"x\\u00e9\",\"f\":1.5}}";

Test(envelope, structured_every_attribute_typed_extensions_and_data)
{
    loom_ce_t ce;
    loom_error_t err;
    cr_assert_eq(decode(msg_structured(structured_full, "stream-1"), &ce, &err), 0, "%s",
                 err.message);
    cr_assert_str_eq(ce.specversion, "1.0");
    cr_assert_str_eq(ce.id, "e-1");
    cr_assert_str_eq(ce.source, "https://example.com/app");
    cr_assert_str_eq(ce.type, "messages.put_batch");
    cr_assert_str_eq(ce.time, "2024-02-29T14:30:00+02:30");
    cr_assert_str_eq(ce.subject, "channel/7");
    cr_assert_str_eq(ce.datacontenttype, "application/json");
    cr_assert_str_eq(ce.dataschema, "https://example.com/s.json");
    cr_assert_str_eq(ce.rayid, "ray-1");
    cr_assert_str_eq(ce.causationid, "cause-1");
    cr_assert_str_eq(ce.deadline, "2024-02-29T12:00:30Z");
    cr_assert_str_eq(ce.traceparent, TRACEPARENT);
    cr_assert_eq(ce.n_ext, 5);
    cr_assert_str_eq(ext_get(&ce, "tenant"), "acme");
    cr_assert_str_eq(ext_get(&ce, "priority"), "42");
    cr_assert_str_eq(ext_get(&ce, "negative"), "-7");
    cr_assert_str_eq(ext_get(&ce, "urgent"), "true");
    cr_assert_str_eq(ext_get(&ce, "muted"), "false");
    cr_assert_null(ext_get(&ce, "nothing"), "a null attribute is absent");
    /* data is the JSON value re-serialized (compact, member order kept). */
    const char *want = "{\"b\":[1,2,{\"c\":null}],\"a\":\"x\xc3\xa9\",\"f\":1.5}";
    expect_data(&ce, want, strlen(want));
    cr_assert_str_eq(ce.key, "stream-1");
    cr_assert_eq(ce.key_len, 8);
}

Test(envelope, structured_is_recognised_by_content_type_or_by_shape)
{
    const char *json = "{\"specversion\":\"1.0\",\"id\":\"1\",\"source\":\"/s\",\"type\":\"t\","
                       "\"data\":[true]}";
    const char *cts[] = {"application/cloudevents+json",
                         "application/cloudevents+json; "
                         "charset=UTF-8",
                         "application/cloudevents", NULL};
    for (size_t i = 0; i < 4; i++) {
        rd_kafka_message_t *rkm = msg_new(json, strlen(json), NULL);
        if (cts[i])
            msg_hdr(rkm, "content-type", cts[i]);
        loom_ce_t ce;
        loom_error_t err;
        cr_assert_eq(decode(rkm, &ce, &err), 0, "%s: %s", cts[i] ? cts[i] : "no content-type",
                     err.message);
        cr_assert_str_eq(ce.id, "1");
        expect_data(&ce, "[true]", 6);
    }
}

Test(envelope, structured_data_values_of_every_json_type)
{
    struct {
        const char *member;
        const char *data;
    } cases[] = {
        {"\"data\":\"hi\"", "\"hi\""}, {"\"data\":17", "17"},        {"\"data\":[]", "[]"},
        {"\"data\":false", "false"},   {"\"data\":{}", "{}"},        {"\"data\":-0.25", "-0.25"},
        {"\"data\":\"\"", "\"\""},     {"\"data_base64\":\"\"", ""},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char json[256];
        snprintf(json, sizeof(json),
                 "{\"specversion\":\"1.0\",\"id\":\"1\",\"source\":\"/s\",\"type\":\"t\",%s}",
                 cases[i].member);
        loom_ce_t ce;
        loom_error_t err;
        cr_assert_eq(decode_json(json, &ce, &err), 0, "%s: %s", json, err.message);
        expect_data(&ce, cases[i].data, strlen(cases[i].data));
    }
    loom_ce_t ce;
    loom_error_t err;
    cr_assert_eq(
        decode_json("{\"specversion\":\"1.0\",\"id\":\"1\",\"source\":\"/s\",\"type\":\"t\"}", &ce,
                    &err),
        0, "%s", err.message);
    cr_assert_null(ce.data);
    cr_assert_eq(ce.data_len, 0);
}

Test(envelope, structured_string_data_of_a_non_json_type_is_the_text)
{
    /* JSON event format 3.1: data of a non-JSON datacontenttype is a JSON
     * string whose text is the data, as the same event in binary mode. */
    const char *json =
        "{\"specversion\":\"1.0\",\"id\":\"1\",\"source\":\"/s\",\"type\":\"t\","
        "\"datacontenttype\":\"text/plain; charset=utf-8\",\"data\":\"hello \\\"you\\\"\"}";
    loom_ce_t ce;
    loom_error_t err;
    cr_assert_eq(decode_json(json, &ce, &err), 0, "%s", err.message);
    expect_data(&ce, "hello \"you\"", 11);

    const char *xml = "{\"specversion\":\"1.0\",\"id\":\"1\",\"source\":\"/s\",\"type\":\"t\","
                      "\"datacontenttype\":\"application/xml\",\"data\":\"<a/>\"}";
    cr_assert_eq(decode_json(xml, &ce, &err), 0, "%s", err.message);
    expect_data(&ce, "<a/>", 4);

    /* +json types keep the JSON value. */
    const char *pj = "{\"specversion\":\"1.0\",\"id\":\"1\",\"source\":\"/s\",\"type\":\"t\","
                     "\"datacontenttype\":\"application/vnd.loom+json\",\"data\":\"x\"}";
    cr_assert_eq(decode_json(pj, &ce, &err), 0, "%s", err.message);
    expect_data(&ce, "\"x\"", 3);
}

Test(envelope, structured_data_base64_is_decoded)
{
    struct {
        const char *b64;
        const char *bytes;
        size_t len;
    } cases[] = {
        {"AAEC/w==", "\x00\x01\x02\xff", 4},
        {"AAEC/w", "\x00\x01\x02\xff", 4},
        {"aGVsbG8=", "hello", 5},
        {"aGk=", "hi", 2},
        {"+/+/", "\xfb\xff\xbf", 3},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char json[256];
        snprintf(json, sizeof(json),
                 "{\"specversion\":\"1.0\",\"id\":\"1\",\"source\":\"/s\",\"type\":\"t\","
                 "\"datacontenttype\":\"application/octet-stream\",\"data_base64\":\"%s\"}",
                 cases[i].b64);
        loom_ce_t ce;
        loom_error_t err;
        cr_assert_eq(decode_json(json, &ce, &err), 0, "%s: %s", cases[i].b64, err.message);
        expect_data(&ce, cases[i].bytes, cases[i].len);
    }
}

Test(envelope, structured_data_base64_errors)
{
    const char *bad[] = {"\"data\":{},\"data_base64\":\"aGk=\"", "\"data_base64\":\"a GVs\"",
                         "\"data_base64\":\"aGk=x\"", "\"data_base64\":\"a-_b\"",
                         "\"data_base64\":42"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char json[256];
        snprintf(json, sizeof(json),
                 "{\"specversion\":\"1.0\",\"id\":\"1\",\"source\":\"/s\",\"type\":\"t\",%s}",
                 bad[i]);
        loom_ce_t ce;
        loom_error_t err;
        expect_bad(decode_json(json, &ce, &err), &err, "data_base64", bad[i]);
    }
}

Test(envelope, structured_attribute_types_that_are_refused)
{
    const char *bad[][2] = {
        {"\"id\":1.5", "id"},
        {"\"id\":\"1\",\"subject\":{}", "subject"},
        {"\"id\":\"1\",\"tenant\":[\"a\"]", "tenant"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char json[256];
        snprintf(json, sizeof(json),
                 "{\"specversion\":\"1.0\",\"source\":\"/s\",\"type\":\"t\",%s}", bad[i][0]);
        loom_ce_t ce;
        loom_error_t err;
        expect_bad(decode_json(json, &ce, &err), &err, bad[i][1], bad[i][0]);
    }
    /* jansson refuses \u0000 in a string: no attribute can hold a NUL. */
    loom_ce_t ce;
    loom_error_t err;
    const char *nul = "{\"specversion\":\"1.0\",\"id\":\"1\",\"source\":\"/s\",\"type\":\"t\","
                      "\"subject\":\"a\\u0000b\"}";
    cr_assert_eq(decode_json(nul, &ce, &err), LOOM_EINVAL);
    cr_assert_str_eq(err.code, "INVALID_JSON", "%s", err.message);
}

Test(envelope, structured_invalid_json)
{
    const char *bad[] = {"{not json", "{\"specversion\":\"1.0\",",  "[]", "\"1.0\"",
                         "",          "{\"id\":\"1\",\"id\":\"2\"}"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        rd_kafka_message_t *rkm = msg_structured(bad[i], NULL);
        loom_ce_t ce;
        loom_error_t err;
        int rc = decode(rkm, &ce, &err);
        cr_assert_eq(rc, LOOM_EINVAL, "'%s' decoded", bad[i]);
        cr_assert_str_eq(err.code, "INVALID_JSON", "'%s': %s", bad[i], err.message);
        cr_assert(strstr(err.message, "CloudEvent"), "%s", err.message);
    }
    /* Sniffed as JSON by its first byte, but broken. */
    rd_kafka_message_t *rkm = msg_new("{\"a\":", 5, NULL);
    loom_ce_t ce;
    loom_error_t err;
    cr_assert_eq(decode(rkm, &ce, &err), LOOM_EINVAL);
    cr_assert_str_eq(err.code, "INVALID_JSON");
}

/* ---- errors ------------------------------------------------------------------- */

static const char *required[] = {"specversion", "id", "source", "type"};
static const char *required_value[] = {"1.0", "e-1", "/s", "t"};

Test(envelope, each_missing_required_attribute_is_named)
{
    for (size_t skip = 0; skip < 4; skip++) {
        /* binary mode (with a non-JSON value, so nothing else is tried) */
        rd_kafka_message_t *rkm = msg_new("data", 4, NULL);
        char json[256] = "{";
        for (size_t i = 0; i < 4; i++) {
            if (i == skip)
                continue;
            char name[32];
            snprintf(name, sizeof(name), "ce_%s", required[i]);
            msg_hdr(rkm, name, required_value[i]);
            size_t n = strlen(json);
            snprintf(json + n, sizeof(json) - n, "%s\"%s\":\"%s\"", n > 1 ? "," : "", required[i],
                     required_value[i]);
        }
        strcat(json, "}");
        loom_ce_t ce;
        loom_error_t err;
        expect_bad(decode(rkm, &ce, &err), &err, required[skip], "binary");
        cr_assert(strstr(err.message, "missing"), "%s", err.message);
        /* structured mode */
        expect_bad(decode(msg_structured(json, NULL), &ce, &err), &err, required[skip], json);
        cr_assert(strstr(err.message, "missing"), "%s", err.message);
    }
}

Test(envelope, empty_required_attributes_are_refused)
{
    for (size_t empty = 0; empty < 4; empty++) {
        rd_kafka_message_t *rkm = msg_new("data", 4, NULL);
        char json[256] = "{";
        for (size_t i = 0; i < 4; i++) {
            const char *v = i == empty ? "" : required_value[i];
            char name[32];
            snprintf(name, sizeof(name), "ce_%s", required[i]);
            msg_hdr(rkm, name, v);
            size_t n = strlen(json);
            snprintf(json + n, sizeof(json) - n, "%s\"%s\":\"%s\"", i ? "," : "", required[i], v);
        }
        strcat(json, "}");
        loom_ce_t ce;
        loom_error_t err;
        expect_bad(decode(rkm, &ce, &err), &err, required[empty], "binary");
        expect_bad(decode_json(json, &ce, &err), &err, required[empty], json);
    }
    /* A header with no value at all. */
    rd_kafka_message_t *rkm = msg_new("data", 4, NULL);
    msg_hdr(rkm, "ce_specversion", "1.0");
    msg_hdr(rkm, "ce_id", "1");
    msg_hdr(rkm, "ce_source", "/s");
    msg_hdr_n(rkm, "ce_type", NULL, 0);
    loom_ce_t ce;
    loom_error_t err;
    expect_bad(decode(rkm, &ce, &err), &err, "type", "NULL header value");
    /* Empty optional attributes are refused too. */
    const char *optional[] = {"subject", "datacontenttype", "dataschema"};
    for (size_t i = 0; i < 3; i++) {
        char json[256];
        snprintf(json, sizeof(json),
                 "{\"specversion\":\"1.0\",\"id\":\"1\",\"source\":\"/s\",\"type\":\"t\","
                 "\"%s\":\"\"}",
                 optional[i]);
        expect_bad(decode_json(json, &ce, &err), &err, optional[i], json);
    }
}

Test(envelope, specversion_must_be_1_0)
{
    const char *bad[] = {"0.3", "1", "1.0 ", "1.1", "2.0", "v1.0"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        rd_kafka_message_t *rkm = msg_new("data", 4, NULL);
        msg_hdr(rkm, "ce_specversion", bad[i]);
        msg_hdr(rkm, "ce_id", "1");
        msg_hdr(rkm, "ce_source", "/s");
        msg_hdr(rkm, "ce_type", "t");
        loom_ce_t ce;
        loom_error_t err;
        expect_bad(decode(rkm, &ce, &err), &err, "specversion", bad[i]);
        cr_assert(strstr(err.message, "1.0"), "%s", err.message);
    }
    loom_ce_t ce;
    loom_error_t err;
    expect_bad(decode_json("{\"specversion\":1.0,\"id\":\"1\",\"source\":\"/s\",\"type\":\"t\"}",
                           &ce, &err),
               &err, "specversion", "number");
    expect_bad(
        decode_json("{\"specversion\":1,\"id\":\"1\",\"source\":\"/s\",\"type\":\"t\"}", &ce, &err),
        &err, "specversion", "integer");
}

static const char *bad_times[] = {
    "2023-02-29T00:00:00Z",      /* not a leap year */
    "1900-02-29T00:00:00Z",      /* century, not a leap year */
    "2024-02-30T00:00:00Z",      /* Feb 30 */
    "2024-04-31T00:00:00Z",      /* April has 30 days */
    "2024-13-01T00:00:00Z",      /* month 13 */
    "2024-00-10T00:00:00Z",      /* month 0 */
    "2024-01-00T00:00:00Z",      /* day 0 */
    "2024-01-32T00:00:00Z",      /* day 32 */
    "2024-01-01T24:00:00Z",      /* hour 24 */
    "2024-01-01T23:60:00Z",      /* minute 60 */
    "2024-01-01T23:59:61Z",      /* second 61 */
    "2024-01-01T00:00:00",       /* no offset */
    "2024-01-01T00:00:00.Z",     /* empty fraction */
    "2024-01-01T00:00:00,5Z",    /* comma fraction */
    "2024-01-01T00:00:00+0100",  /* offset without colon */
    "2024-01-01T00:00:00+01",    /* short offset */
    "2024-01-01T00:00:00+0",     /* truncated offset */
    "2024-01-01T00:00:00+",      /* sign only */
    "2024-01-01T00:00:00+1:00",  /* one-digit hour */
    "2024-01-01T00:00:00+24:00", /* offset hour 24 */
    "2024-01-01T00:00:00+01:60", /* offset minute 60 */
    "2024-01-01T00:00:00Zx",     /* trailing junk */
    "2024-01-01T00:00:00Z ",     /* trailing space */
    " 2024-01-01T00:00:00Z",     /* leading space */
    "2024-01-01X00:00:00Z",      /* bad separator */
    "2024/01/01T00:00:00Z",      /* bad date separators */
    "2024-01-01T00-00-00Z",      /* bad time separators */
    "24-01-01T00:00:00Z",        /* two-digit year */
    "2024-1-01T00:00:00Z",       /* one-digit month */
    "2024-01-01T0:00:00Z",       /* one-digit hour */
    "+2024-01-01T00:00:00Z",     /* signed year */
    "2024-01-01",                /* date only */
    "2024-01-01T00:00Z",         /* no seconds */
    "",                          /* empty */
    "yesterday",                 /* words */
    "1709208000",                /* a Unix time */
};
#define N_BAD_TIMES (sizeof(bad_times) / sizeof(bad_times[0]))

Test(envelope, rfc3339_parse_refuses_malformed_timestamps)
{
    for (size_t i = 0; i < N_BAD_TIMES; i++) {
        /* A heap copy of exact size, so a read past the end is caught by ASan. */
        char *s = strdup(bad_times[i]);
        int64_t us = 12345;
        cr_expect_eq(loom_rfc3339_parse(s, &us), LOOM_EINVAL, "\"%s\" parsed as %lld", s,
                     (long long)us);
        free(s);
    }
    int64_t us;
    cr_assert_eq(loom_rfc3339_parse(NULL, &us), LOOM_EINVAL);
}

Test(envelope, malformed_time_and_deadline_are_named)
{
    for (size_t i = 0; i < N_BAD_TIMES; i++) {
        for (int deadline = 0; deadline < 2; deadline++) {
            const char *attr = deadline ? "deadline" : "time";
            char hdr[32];
            snprintf(hdr, sizeof(hdr), "ce_%s", attr);
            rd_kafka_message_t *rkm = msg_binary("{}");
            msg_hdr(rkm, hdr, bad_times[i]);
            loom_ce_t ce;
            loom_error_t err;
            expect_bad(decode(rkm, &ce, &err), &err, attr, bad_times[i]);
            cr_assert(strstr(err.message, "RFC 3339"), "%s", err.message);
        }
    }
    loom_ce_t ce;
    loom_error_t err;
    expect_bad(decode_json("{\"specversion\":\"1.0\",\"id\":\"1\",\"source\":\"/s\",\"type\":\"t\","
                           "\"time\":\"2024-02-30T00:00:00Z\"}",
                           &ce, &err),
               &err, "time", "structured Feb 30");
    expect_bad(decode_json("{\"specversion\":\"1.0\",\"id\":\"1\",\"source\":\"/s\",\"type\":\"t\","
                           "\"deadline\":1709208000}",
                           &ce, &err),
               &err, "deadline", "structured integer deadline");
}

Test(envelope, rfc3339_parse_values)
{
    const int64_t noon = INT64_C(1709208000) * 1000000; /* 2024-02-29T12:00:00Z */
    struct {
        const char *s;
        int64_t us;
    } cases[] = {
        {"1970-01-01T00:00:00Z", 0},
        {"1969-12-31T23:59:59Z", -1000000},
        {"2024-02-29T12:00:00Z", noon},
        {"2024-02-29t12:00:00z", noon},
        {"2024-02-29 12:00:00Z", noon},
        {"2024-02-29T12:00:00+00:00", noon},
        {"2024-02-29T12:00:00-00:00", noon},
        {"2024-02-29T14:30:00+02:30", noon},
        {"2024-02-29T09:00:00-03:00", noon},
        {"2024-03-01T11:59:00+23:59", noon},
        {"2024-02-29T12:00:00.5Z", noon + 500000},
        {"2024-02-29T12:00:00.000001Z", noon + 1},
        {"2024-02-29T12:00:00.123456Z", noon + 123456},
        {"2024-02-29T12:00:00.123456789Z", noon + 123456},
        {"2024-02-29T14:30:00.25+02:30", noon + 250000},
        {"2000-02-29T00:00:00Z", INT64_C(951782400) * 1000000},
        {"2024-01-01T00:30:00+01:00", INT64_C(1704065400) * 1000000},
        {"2016-12-31T23:59:60Z", INT64_C(1483228800) * 1000000}, /* leap second */
        {"1999-12-31T23:59:59Z", INT64_C(946684799) * 1000000},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char *s = strdup(cases[i].s);
        int64_t us = -42;
        cr_assert_eq(loom_rfc3339_parse(s, &us), 0, "\"%s\" refused", s);
        cr_assert_eq(us, cases[i].us, "\"%s\": %lld, expected %lld", s, (long long)us,
                     (long long)cases[i].us);
        free(s);
    }
}

Test(envelope, rfc3339_format_parses_back)
{
    int64_t values[] = {0, 1, 999999, INT64_C(1709208000123456), INT64_C(-1000001)};
    for (size_t i = 0; i < sizeof(values) / sizeof(values[0]); i++) {
        char buf[40];
        loom_rfc3339_format(values[i], buf, sizeof(buf));
        int64_t us;
        cr_assert_eq(loom_rfc3339_parse(buf, &us), 0, "%s", buf);
        cr_assert_eq(us, values[i], "%s", buf);
    }
}

Test(envelope, bad_extension_names)
{
    const char *bad[] = {"Tenant",
                         "TENANT",
                         "tenant-id",
                         "tenant_id",
                         "ten.ant",
                         "ten ant",
                         "abcdefghijklmnopqrstu" /* 21 */,
                         "ä"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        rd_kafka_message_t *rkm = msg_binary("{}");
        char hdr[64];
        snprintf(hdr, sizeof(hdr), "ce_%s", bad[i]);
        msg_hdr(rkm, hdr, "v");
        loom_ce_t ce;
        loom_error_t err;
        expect_bad(decode(rkm, &ce, &err), &err, bad[i], hdr);
        cr_assert(strstr(err.message, "extension name"), "%s", err.message);

        char json[256];
        snprintf(json, sizeof(json),
                 "{\"specversion\":\"1.0\",\"id\":\"1\",\"source\":\"/s\",\"type\":\"t\","
                 "\"%s\":\"v\"}",
                 bad[i]);
        expect_bad(decode_json(json, &ce, &err), &err, bad[i], json);
    }
    /* "ce_" alone names an empty extension. */
    rd_kafka_message_t *rkm = msg_binary("{}");
    msg_hdr(rkm, "ce_", "v");
    loom_ce_t ce;
    loom_error_t err;
    cr_assert_eq(decode(rkm, &ce, &err), LOOM_EINVAL);
    /* 20 characters and digits are fine. */
    rkm = msg_binary("{}");
    msg_hdr(rkm, "ce_abcdefghijklmnopqrst", "v");
    msg_hdr(rkm, "ce_x1", "w");
    cr_assert_eq(decode(rkm, &ce, &err), 0, "%s", err.message);
    cr_assert_str_eq(ext_get(&ce, "abcdefghijklmnopqrst"), "v");
    cr_assert_str_eq(ext_get(&ce, "x1"), "w");
}

Test(envelope, at_most_32_extensions)
{
    for (int extra = 0; extra < 2; extra++) {
        int n = LOOM_CE_MAX_EXTENSIONS + extra;
        rd_kafka_message_t *rkm = msg_binary("{}");
        /* Loom's own extensions do not count towards the limit. */
        msg_hdr(rkm, "ce_rayid", "r");
        msg_hdr(rkm, "ce_causationid", "c");
        msg_hdr(rkm, "ce_traceparent", TRACEPARENT);
        char json[4096] = "{\"specversion\":\"1.0\",\"id\":\"1\",\"source\":\"/s\",\"type\":\"t\"";
        for (int i = 0; i < n; i++) {
            char name[32], value[16];
            snprintf(name, sizeof(name), "ce_ext%d", i);
            snprintf(value, sizeof(value), "v%d", i);
            msg_hdr(rkm, name, value);
            size_t len = strlen(json);
            snprintf(json + len, sizeof(json) - len, ",\"ext%d\":%d", i, i);
        }
        strcat(json, "}");
        loom_ce_t ce;
        loom_error_t err;
        int rc = decode(rkm, &ce, &err);
        int rc2 = decode_json(json, &ce, &err);
        if (extra) {
            cr_assert_eq(rc, LOOM_EINVAL);
            expect_bad(rc2, &err, "ext32", "33 extensions");
            cr_assert(strstr(err.message, "32"), "%s", err.message);
        } else {
            cr_assert_eq(rc, 0);
            cr_assert_eq(rc2, 0, "%s", err.message);
            cr_assert_eq(ce.n_ext, 32);
            cr_assert_str_eq(ext_get(&ce, "ext31"), "31");
        }
    }
    /* A repeated header replaces the value and is not a new extension. */
    rd_kafka_message_t *rkm = msg_binary("{}");
    msg_hdr(rkm, "ce_tenant", "a");
    msg_hdr(rkm, "ce_tenant", "b");
    loom_ce_t ce;
    loom_error_t err;
    cr_assert_eq(decode(rkm, &ce, &err), 0, "%s", err.message);
    cr_assert_eq(ce.n_ext, 1);
    cr_assert_str_eq(ext_get(&ce, "tenant"), "b");
}

Test(envelope, nul_byte_in_a_header)
{
    const char *attrs[] = {"id", "source", "subject", "rayid", "tenant"};
    for (size_t i = 0; i < sizeof(attrs) / sizeof(attrs[0]); i++) {
        rd_kafka_message_t *rkm = msg_binary("{}");
        char name[32];
        snprintf(name, sizeof(name), "ce_%s", attrs[i]);
        msg_hdr_n(rkm, name, "ab\0cd", 5);
        loom_ce_t ce;
        loom_error_t err;
        expect_bad(decode(rkm, &ce, &err), &err, attrs[i], name);
        cr_assert(strstr(err.message, "NUL"), "%s", err.message);
    }
}

Test(envelope, header_longer_than_4096_bytes)
{
    char *v = malloc(4098);
    cr_assert_not_null(v);
    memset(v, 'a', 4097);
    v[4097] = '\0';
    for (int over = 0; over < 2; over++) {
        size_t len = over ? 4097 : 4096;
        rd_kafka_message_t *rkm = msg_binary("{}");
        msg_hdr_n(rkm, "ce_subject", v, (ssize_t)len);
        loom_ce_t ce;
        loom_error_t err;
        int rc = decode(rkm, &ce, &err);
        if (over) {
            expect_bad(rc, &err, "subject", "4097 bytes");
            cr_assert(strstr(err.message, "4096"), "%s", err.message);
        } else {
            cr_assert_eq(rc, 0, "%s", err.message);
            cr_assert_eq(strlen(ce.subject), 4096);
        }
        /* structured mode likewise */
        char *json = malloc(len + 128);
        cr_assert_not_null(json);
        snprintf(json, len + 128,
                 "{\"specversion\":\"1.0\",\"id\":\"1\",\"source\":\"/s\",\"type\":\"t\","
                 "\"subject\":\"%.*s\"}",
                 (int)len, v);
        rc = decode_json(json, &ce, &err);
        free(json);
        if (over)
            expect_bad(rc, &err, "subject", "structured 4097 bytes");
        else
            cr_assert_eq(rc, 0, "%s", err.message);
    }
    free(v);
}

Test(envelope, header_values_that_are_not_utf8_are_refused)
{
    const char *attrs[] = {"id", "type", "source", "rayid", "tenant"};
    const char *bad[] = {"a\xff", "\xc0\xaf", "\xed\xa0\x80", "ab\xe2\x82"};
    for (size_t i = 0; i < sizeof(attrs) / sizeof(attrs[0]); i++) {
        for (size_t k = 0; k < sizeof(bad) / sizeof(bad[0]); k++) {
            rd_kafka_message_t *rkm = msg_binary("{}");
            char name[32];
            snprintf(name, sizeof(name), "ce_%s", attrs[i]);
            msg_hdr(rkm, name, bad[k]);
            loom_ce_t ce;
            loom_error_t err;
            expect_bad(decode(rkm, &ce, &err), &err, attrs[i], name);
            cr_assert(strstr(err.message, "UTF-8"), "%s", err.message);
            /* The id is kept when it is usable by itself. */
            if (strcmp(attrs[i], "id") == 0)
                cr_assert_null(ce.id);
            else
                cr_assert_str_eq(ce.id, "0191b2c4-7e1f-7a3b-9c1d-2e3f4a5b6c7d");
        }
    }
    /* Valid multibyte text passes. */
    rd_kafka_message_t *rkm = msg_binary("{}");
    msg_hdr(rkm, "ce_subject", "caf\xc3\xa9 \xf0\x9f\x98\x80");
    loom_ce_t ce;
    loom_error_t err;
    cr_assert_eq(decode(rkm, &ce, &err), 0, "%s", err.message);
}

Test(envelope, id_of_the_largest_size_allowed_and_one_byte_more)
{
    char *v = malloc(LOOM_CE_ID_MAX + 2);
    memset(v, 'i', LOOM_CE_ID_MAX + 1);
    v[LOOM_CE_ID_MAX + 1] = '\0';
    for (int over = 0; over < 2; over++) {
        rd_kafka_message_t *rkm = msg_binary("{}");
        msg_hdr_n(rkm, "ce_id", v, LOOM_CE_ID_MAX + over);
        loom_ce_t ce;
        loom_error_t err;
        int rc = decode(rkm, &ce, &err);
        if (over) {
            expect_bad(rc, &err, "id", "1025 bytes");
            cr_assert(strstr(err.message, "1024"), "%s", err.message);
            cr_assert_null(ce.id, "an id over the limit is not usable");
        } else {
            cr_assert_eq(rc, 0, "%s", err.message);
            cr_assert_eq(strlen(ce.id), LOOM_CE_ID_MAX);
        }
    }
    free(v);
}

Test(envelope, a_malformed_time_keeps_the_id_to_file_the_rejection_under)
{
    rd_kafka_message_t *rkm = msg_binary("{}");
    msg_hdr(rkm, "ce_time", "yesterday");
    loom_ce_t ce;
    loom_error_t err;
    expect_bad(decode(rkm, &ce, &err), &err, "time", "ce_time");
    cr_assert_str_eq(ce.id, "0191b2c4-7e1f-7a3b-9c1d-2e3f4a5b6c7d");
    rkm = msg_structured("{\"specversion\":\"1.0\",\"id\":\"s-1\",\"source\":\"/s\",\"type\":"
                         "\"t\",\"deadline\":\"soon\"}",
                         NULL);
    expect_bad(decode(rkm, &ce, &err), &err, "deadline", "structured");
    cr_assert_str_eq(ce.id, "s-1");
}

Test(envelope, missing_specversion_is_named_not_a_data_field)
{
    /* A command's data with no CloudEvent around it. */
    const char *v = "{\"msgs\":[{\"id\":\"m\"}]}";
    rd_kafka_message_t *rkm = msg_new(v, strlen(v), NULL);
    loom_ce_t ce;
    loom_error_t err;
    expect_bad(decode(rkm, &ce, &err), &err, "specversion", v);
    cr_assert_null(strstr(err.message, "msgs"), "%s", err.message);
    /* Binary mode without its ce_specversion: the id is still usable. */
    rkm = msg_new(v, strlen(v), NULL);
    msg_hdr(rkm, "ce_id", "b-1");
    msg_hdr(rkm, "ce_type", "t");
    expect_bad(decode(rkm, &ce, &err), &err, "specversion", "binary");
    cr_assert(strstr(err.message, "ce_specversion"), "%s", err.message);
    cr_assert_str_eq(ce.id, "b-1");
}

Test(envelope, messages_that_are_not_cloudevents)
{
    struct {
        const char *value;
        const char *content_type;
        const char *other_header;
    } cases[] = {
        {"hello", NULL, NULL},
        {"", NULL, NULL},
        {NULL, NULL, NULL},
        {"[1,2]", NULL, NULL},
        {" {\"specversion\":\"1.0\"}", NULL, NULL},
        {"hello", "application/json", NULL},
        {"hello", "text/plain", "x-trace"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const char *v = cases[i].value;
        rd_kafka_message_t *rkm = msg_new(v, v ? strlen(v) : 0, "k");
        if (cases[i].content_type)
            msg_hdr(rkm, "content-type", cases[i].content_type);
        if (cases[i].other_header)
            msg_hdr(rkm, cases[i].other_header, "x");
        loom_ce_t ce;
        loom_error_t err;
        expect_bad(decode(rkm, &ce, &err), &err, "specversion", v ? v : "NULL value");
        cr_assert(strstr(err.message, "not a structured CloudEvent"), "%s", err.message);
    }
    /* A JSON object that is not an event. */
    rd_kafka_message_t *rkm = msg_new("{\"hello\":\"world\"}", 17, NULL);
    loom_ce_t ce;
    loom_error_t err;
    expect_bad(decode(rkm, &ce, &err), &err, "specversion", "plain JSON object");
}

/* ---- encoding ------------------------------------------------------------------- */

static loom_ce_t full_event(void)
{
    loom_ce_t ce;
    memset(&ce, 0, sizeof(ce));
    ce.specversion = "1.0";
    ce.id = "0191b2c4-7e1f-7a3b-9c1d-2e3f4a5b6c7d";
    ce.source = "loom://eu-west-1/node-1";
    ce.type = "messages.put_batch";
    ce.time = "2024-02-29T12:00:00.123456Z";
    ce.subject = "channel/7";
    ce.datacontenttype = "application/json";
    ce.dataschema = "https://example.com/s.json";
    ce.rayid = "ray-1";
    ce.causationid = "cause-1";
    ce.deadline = "2024-02-29T12:00:30Z";
    ce.traceparent = TRACEPARENT;
    ce.ext[0] = (loom_ce_ext_t){"tenant", "acme"};
    ce.ext[1] = (loom_ce_ext_t){"priority", "42"};
    ce.n_ext = 2;
    ce.data = "{\"text\":\"hello\",\"n\":[1,2]}";
    ce.data_len = strlen(ce.data);
    return ce;
}

Test(envelope, headers_are_exactly_the_attributes)
{
    loom_ce_t ce = full_event();
    cr_assert_eq(loom_ce_validate(&ce, NULL), 0);
    rd_kafka_headers_t *h = loom_ce_headers(&ce);
    const char *want[][2] = {
        {"ce_specversion", "1.0"},
        {"ce_id", ce.id},
        {"ce_source", ce.source},
        {"ce_type", ce.type},
        {"ce_time", ce.time},
        {"ce_subject", ce.subject},
        {"ce_dataschema", ce.dataschema},
        {"ce_rayid", "ray-1"},
        {"ce_causationid", "cause-1"},
        {"ce_deadline", ce.deadline},
        {"ce_traceparent", TRACEPARENT},
        {"ce_tenant", "acme"},
        {"ce_priority", "42"},
        {"content-type", "application/json"},
    };
    size_t n_want = sizeof(want) / sizeof(want[0]);
    cr_assert_eq(rd_kafka_header_cnt(h), n_want);
    for (size_t i = 0; i < n_want; i++) {
        const char *name;
        const void *val;
        size_t len;
        cr_assert_eq(rd_kafka_header_get_all(h, i, &name, &val, &len), 0);
        cr_assert_str_eq(name, want[i][0]);
        cr_assert_eq(len, strlen(want[i][1]), "%s", name);
        cr_assert(memcmp(val, want[i][1], len) == 0, "%s: %.*s", name, (int)len, (const char *)val);
    }
    const void *val;
    size_t len;
    cr_assert_neq(rd_kafka_header_get_last(h, "ce_datacontenttype", &val, &len), 0,
                  "datacontenttype travels as content-type");
    rd_kafka_headers_destroy(h);

    /* Only what is set, and content-type application/json by default. */
    loom_ce_t min = {.specversion = "1.0", .id = "1", .source = "/s", .type = "t"};
    h = loom_ce_headers(&min);
    cr_assert_eq(rd_kafka_header_cnt(h), 5);
    cr_assert_eq(rd_kafka_header_get_last(h, "content-type", &val, &len), 0);
    cr_assert_eq(len, 16);
    cr_assert(memcmp(val, "application/json", 16) == 0);
    cr_assert_neq(rd_kafka_header_get_last(h, "ce_time", &val, &len), 0);
    rd_kafka_headers_destroy(h);
}

Test(envelope, binary_round_trip)
{
    loom_ce_t ce = full_event();
    static const char key[] = "stream-42";
    for (int variant = 0; variant < 2; variant++) {
        if (variant == 1) {
            /* Non-JSON data with its own content type. */
            ce.datacontenttype = "application/octet-stream";
            ce.data = "\x00\x01\xfe\xff";
            ce.data_len = 4;
        }
        rd_kafka_message_t *rkm = msg_new(ce.data, ce.data_len, key);
        rd_kafka_message_set_headers(rkm, loom_ce_headers(&ce));
        loom_ce_t back;
        loom_error_t err;
        cr_assert_eq(decode(rkm, &back, &err), 0, "%s", err.message);
        expect_same_event(&ce, &back);
        cr_assert_str_eq(back.key, key);
    }
}

Test(envelope, json_round_trip_with_json_data)
{
    loom_ce_t ce = full_event();
    json_t *j = loom_ce_to_json(&ce);
    cr_assert_not_null(j);
    cr_assert(json_is_object(json_object_get(j, "data")));
    cr_assert_null(json_object_get(j, "data_base64"));
    cr_assert_str_eq(json_string_value(json_object_get(j, "specversion")), "1.0");
    cr_assert_str_eq(json_string_value(json_object_get(j, "tenant")), "acme");
    cr_assert_str_eq(json_string_value(json_object_get(j, "rayid")), "ray-1");
    char *text = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    loom_ce_t back;
    loom_error_t err;
    cr_assert_eq(decode_json(text, &back, &err), 0, "%s: %s", text, err.message);
    expect_same_event(&ce, &back);
    /* The same text as a structured Kafka message. */
    cr_assert_eq(decode(msg_structured(text, NULL), &back, &err), 0, "%s", err.message);
    expect_same_event(&ce, &back);
    free(text);
}

Test(envelope, json_round_trip_with_binary_data)
{
    static const unsigned char bytes[] = {0x00, 0x01, 0x02, 0xff, 0xfe, '{', 0x80};
    for (size_t len = 0; len <= sizeof(bytes); len++) {
        loom_ce_t ce = {.specversion = "1.0",
                        .id = "1",
                        .source = "/s",
                        .type = "t",
                        .datacontenttype = "application/octet-stream"};
        ce.data = bytes;
        ce.data_len = len;
        json_t *j = loom_ce_to_json(&ce);
        cr_assert_null(json_object_get(j, "data"), "length %zu", len);
        cr_assert(json_is_string(json_object_get(j, "data_base64")), "length %zu", len);
        char *text = json_dumps(j, JSON_COMPACT);
        json_decref(j);
        loom_ce_t back;
        loom_error_t err;
        cr_assert_eq(decode_json(text, &back, &err), 0, "%s: %s", text, err.message);
        expect_same_event(&ce, &back);
        free(text);
    }
    /* Known base64 text. */
    loom_ce_t ce = {.specversion = "1.0",
                    .id = "1",
                    .source = "/s",
                    .type = "t",
                    .data = "\x00\x01\x02\xff",
                    .data_len = 4};
    json_t *j = loom_ce_to_json(&ce);
    cr_assert_str_eq(json_string_value(json_object_get(j, "data_base64")), "AAEC/w==");
    json_decref(j);
}

Test(envelope, json_of_non_json_content_type_is_never_a_json_value)
{
    /* "123" with text/plain is text, not the number 123 (JSON event format 3.1). */
    const char *texts[] = {"123", "hello", "{\"a\":1}"};
    for (size_t i = 0; i < 3; i++) {
        loom_ce_t ce = {.specversion = "1.0",
                        .id = "1",
                        .source = "/s",
                        .type = "t",
                        .datacontenttype = "text/plain"};
        ce.data = texts[i];
        ce.data_len = strlen(texts[i]);
        json_t *j = loom_ce_to_json(&ce);
        json_t *d = json_object_get(j, "data");
        cr_assert(!d || json_is_string(d), "%s became a JSON value", texts[i]);
        char *text = json_dumps(j, JSON_COMPACT);
        json_decref(j);
        loom_ce_t back;
        loom_error_t err;
        cr_assert_eq(decode_json(text, &back, &err), 0, "%s: %s", text, err.message);
        expect_same_event(&ce, &back);
        free(text);
    }
}

Test(envelope, json_of_a_minimal_event)
{
    loom_ce_t ce = {.specversion = "1.0", .id = "1", .source = "/s", .type = "t"};
    json_t *j = loom_ce_to_json(&ce);
    cr_assert_eq(json_object_size(j), 4, "only the attributes that are set");
    json_decref(j);
}

Test(envelope, init_fills_a_new_event)
{
    int64_t before = loom_now_us();
    loom_ce_t ce;
    loom_ce_init(&ce, &arena, "eu-west-1", "0191b2c4-7e1f-7a3b-9c1d-2e3f4a5b6c7d",
                 "messages.put_batch");
    int64_t after = loom_now_us();
    cr_assert_str_eq(ce.specversion, "1.0");
    cr_assert_str_eq(ce.source, "loom://eu-west-1/0191b2c4-7e1f-7a3b-9c1d-2e3f4a5b6c7d");
    cr_assert_str_eq(ce.type, "messages.put_batch");
    cr_assert_str_eq(ce.datacontenttype, "application/json");
    loom_uuid_t u;
    cr_assert_eq(loom_uuid_parse(ce.id, &u), 0, "id %s", ce.id);
    cr_assert_eq(loom_uuid_version(&u), 7);
    cr_assert_eq(strlen(ce.id), LOOM_UUID_STRLEN);
    int64_t ms = (int64_t)loom_uuid_v7_ms(&u);
    cr_assert(ms >= before / 1000 && ms <= after / 1000, "uuid time %lld", (long long)ms);
    int64_t t;
    cr_assert_eq(loom_rfc3339_parse(ce.time, &t), 0, "time %s", ce.time);
    cr_assert(t >= before && t <= after, "time %s", ce.time);
    cr_assert_eq(ce.time[strlen(ce.time) - 1], 'Z');
    cr_assert_eq(loom_ce_validate(&ce, NULL), 0);
    cr_assert_null(ce.rayid);
    cr_assert_eq(ce.n_ext, 0);

    loom_ce_t other;
    loom_ce_init(&other, &arena, NULL, NULL, "x.y");
    cr_assert_str_eq(other.source, "loom://local/unknown");
    cr_assert_str_neq(other.id, ce.id);
}

/* loom_ce_validate skips parsing the time loom_ce_init wrote, and only that
 * one: a time the caller puts in its place is checked. */
Test(envelope, a_time_set_after_init_is_still_checked)
{
    loom_ce_t ce;
    loom_ce_init(&ce, &arena, "s", "n", "x.y");
    cr_assert_eq(loom_ce_validate(&ce, NULL), 0);
    loom_error_t err;
    ce.time = "yesterday";
    cr_assert_eq(loom_ce_validate(&ce, &err), LOOM_EINVAL);
    cr_assert(strstr(err.message, "\"time\"") != NULL, "%s", err.message);
    ce.time = "2026-02-30T00:00:00Z";
    cr_assert_eq(loom_ce_validate(&ce, &err), LOOM_EINVAL, "no 30 February");
    ce.time = "2026-02-28T00:00:00Z";
    cr_assert_eq(loom_ce_validate(&ce, &err), 0, "%s", err.message);
    /* A copy of an event made by init keeps the time it made. */
    loom_ce_t copy;
    loom_ce_init(&copy, &arena, "s", "n", "x.y");
    loom_ce_t again = copy;
    cr_assert_eq(loom_ce_validate(&again, NULL), 0);
    cr_assert_eq(loom_ce_validate(&(loom_ce_t){.specversion = "1.0",
                                               .id = "1",
                                               .source = "s",
                                               .type = "t",
                                               .time = "nope",
                                               .time_formatted = NULL},
                                  &err),
                 LOOM_EINVAL);
}

Test(envelope, topic_for_command)
{
    char topic[128];
    cr_assert_str_eq(loom_topic_prefix(), "loom");
    /* One topic per service: the type up to its first dot. */
    loom_topic_for_command("messages.put_batch", topic, sizeof(topic));
    cr_assert_str_eq(topic, "loom.cmd.messages");
    loom_topic_for_command("messages.delete_batch", topic, sizeof(topic));
    cr_assert_str_eq(topic, "loom.cmd.messages");
    loom_topic_for_command("registry.put_instance.v2", topic, sizeof(topic));
    cr_assert_str_eq(topic, "loom.cmd.registry");
    loom_topic_for_command("solo", topic, sizeof(topic));
    cr_assert_str_eq(topic, "loom.cmd.solo");
    loom_topic_legacy_for_command("messages.put_batch", topic, sizeof(topic));
    cr_assert_str_eq(topic, "loom.cmd.messages.put_batch");
    char small[12];
    loom_topic_for_command("messages.put_batch", small, sizeof(small));
    cr_assert_str_eq(small, "loom.cmd.me", "truncated, still terminated");
}

Test(envelope, topic_routes_declared_by_a_command_table)
{
    static const loom_command_t cmds[] = {
        {"shop.place_order", NULL, NULL},
        {"shop.restock", NULL, "loom.cmd.shop.inventory"},
        {0},
    };
    const loom_consumer_def_t defs[] = {{.name = "shop.store", .commands = cmds}};
    loom_error_t err;
    loom_topic_routes_clear();
    cr_assert_eq(loom_consumer_routes_register(defs, 1, &err), 0, "%s", err.message);
    char topic[128];
    loom_topic_for_command("shop.restock", topic, sizeof(topic));
    cr_assert_str_eq(topic, "loom.cmd.shop.inventory");
    loom_topic_for_command("shop.place_order", topic, sizeof(topic));
    cr_assert_str_eq(topic, "loom.cmd.shop");
    /* The consumer reads exactly the topics of its table. */
    char topics[4][LOOM_TOPIC_MAX];
    cr_assert_eq(loom_consumer_topics(&defs[0], topics, 4), 2);
    cr_assert_str_eq(topics[0], "loom.cmd.shop");
    cr_assert_str_eq(topics[1], "loom.cmd.shop.inventory");
    /* One type on two topics is refused, naming it. */
    static const loom_command_t clash[] = {{"shop.restock", NULL, "loom.cmd.other"}, {0}};
    const loom_consumer_def_t more[] = {{.name = "other.store", .commands = clash}};
    cr_assert_neq(loom_consumer_routes_register(more, 1, &err), 0);
    cr_assert(strstr(err.message, "shop.restock"), "%s", err.message);
    loom_topic_routes_clear();
}

Test(envelope, topic_prefix)
{
    char topic[128];
    loom_topic_prefix_set("staging");
    cr_assert_str_eq(loom_topic_prefix(), "staging");
    loom_topic_for_command("messages.put_batch", topic, sizeof(topic));
    cr_assert_str_eq(topic, "staging.cmd.messages");
    loom_topic_map("loom.evt.messages.batch_put", topic, sizeof(topic));
    cr_assert_str_eq(topic, "staging.evt.messages.batch_put");
    loom_topic_map("other.topic", topic, sizeof(topic));
    cr_assert_str_eq(topic, "other.topic");
    loom_topic_prefix_set("");
    cr_assert_str_eq(loom_topic_prefix(), "loom");
    loom_topic_prefix_set("staging");
    loom_topic_prefix_set(NULL);
    loom_topic_map("loom.cmd.x", topic, sizeof(topic));
    cr_assert_str_eq(topic, "loom.cmd.x");
}
