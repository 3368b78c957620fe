/*
 * Interoperability of the CloudEvents envelope with the official CloudEvents
 * Python SDK (PyPI `cloudevents`, pinned in scripts/setup, installed in the
 * project's .venv): Kafka messages the SDK makes decode in Loom, and Kafka
 * messages Loom makes are read back by the SDK as the same events.
 *
 * tests/interop/cloudevents_sdk.py does the SDK's half: `write DIR` leaves the
 * SDK's messages in DIR/sdk_vectors.json, `check DIR` reads Loom's messages
 * from DIR/loom_vectors.json and exits non-zero naming every mismatch. No
 * servers: messages are built by hand, as in tests/engine/test_envelope.c.
 */
#include "loom/arena.h"
#include "loom/envelope.h"
#include "loom/error.h"
#include "support.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <librdkafka/rdkafka.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef LOOM_TEST_INTEROP_PYTHON
#error "LOOM_TEST_INTEROP_PYTHON (the venv's python) must be defined"
#endif
#ifndef LOOM_TEST_INTEROP_SCRIPT
#error "LOOM_TEST_INTEROP_SCRIPT (tests/interop/cloudevents_sdk.py) must be defined"
#endif

#define TRACEPARENT "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

/* ---- hand-built Kafka messages (see tests/engine/test_envelope.c) ---------- */

/* rd_kafka_message_t heads librdkafka's larger internal message, whose later
 * members hold the headers: give it room. */
typedef union {
    rd_kafka_message_t rkm;
    max_align_t align[1024 / sizeof(max_align_t)];
} msg_buf_t;

static rd_kafka_message_t *msg_new(const void *value, size_t len, const void *key, size_t key_len)
{
    msg_buf_t *b = calloc(1, sizeof(*b));
    cr_assert_not_null(b);
    b->rkm.payload = (void *)value;
    b->rkm.len = len;
    b->rkm.key = (void *)key;
    b->rkm.key_len = key_len;
    return &b->rkm;
}

static void msg_free(rd_kafka_message_t *rkm)
{
    rd_kafka_headers_t *hdrs;
    if (rd_kafka_message_detach_headers(rkm, &hdrs) == RD_KAFKA_RESP_ERR_NO_ERROR)
        rd_kafka_headers_destroy(hdrs);
    free(rkm);
}

/* ---- helpers -------------------------------------------------------------------- */

static loom_arena_t arena;
static char dir[64];

static void setup(void)
{
    loom_arena_init(&arena, 0);
    snprintf(dir, sizeof(dir), "/tmp/loom-interop-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
}

static void teardown(void)
{
    const char *files[] = {"sdk_vectors.json", "loom_vectors.json"};
    for (size_t i = 0; i < 2; i++) {
        char path[128];
        snprintf(path, sizeof(path), "%s/%s", dir, files[i]);
        unlink(path);
    }
    rmdir(dir);
    loom_arena_release(&arena);
}

TestSuite(interop, .init = setup, .fini = teardown, .timeout = 120);

/* Runs the SDK script with `cmd`; returns its exit status, output in *out and *err. */
static int run_sdk(const char *cmd, char **out, char **err)
{
    if (access(LOOM_TEST_INTEROP_PYTHON, X_OK) != 0)
        cr_assert_fail("the CloudEvents SDK venv is missing: %s is not there; run ./scripts/setup "
                       "(it creates .venv with the pinned `cloudevents` package)",
                       LOOM_TEST_INTEROP_PYTHON);
    const char *argv[] = {LOOM_TEST_INTEROP_PYTHON, LOOM_TEST_INTEROP_SCRIPT, cmd, dir, NULL};
    return loom_test_run(argv, NULL, out, err);
}

/* Hex text to new bytes in the arena (NULL for JSON null). */
static unsigned char *unhex(json_t *j, size_t *len)
{
    if (json_is_null(j)) {
        *len = 0;
        return NULL;
    }
    cr_assert(json_is_string(j));
    const char *s = json_string_value(j);
    size_t n = strlen(s);
    cr_assert_eq(n % 2, 0);
    unsigned char *b = loom_arena_alloc(&arena, n / 2 + 1);
    for (size_t i = 0; i < n / 2; i++) {
        unsigned v;
        cr_assert_eq(sscanf(s + 2 * i, "%2x", &v), 1, "bad hex %s", s);
        b[i] = (unsigned char)v;
    }
    b[n / 2] = '\0';
    *len = n / 2;
    return b;
}

static json_t *hex(const void *data, size_t len)
{
    if (!data)
        return json_null();
    char *s = loom_arena_alloc(&arena, 2 * len + 1);
    for (size_t i = 0; i < len; i++)
        snprintf(s + 2 * i, 3, "%02x", ((const unsigned char *)data)[i]);
    s[2 * len] = '\0';
    return json_string(s);
}

/* The Kafka message of a vector (new; msg_free it). */
static rd_kafka_message_t *vector_msg(json_t *vec)
{
    size_t len, key_len;
    unsigned char *value = unhex(json_object_get(vec, "value"), &len);
    unsigned char *key = unhex(json_object_get(vec, "key"), &key_len);
    rd_kafka_message_t *rkm = msg_new(value, len, key, key_len);
    rd_kafka_headers_t *hdrs = rd_kafka_headers_new(16);
    size_t i;
    json_t *h;
    json_array_foreach(json_object_get(vec, "headers"), i, h)
    {
        size_t n;
        unsigned char *v = unhex(json_array_get(h, 1), &n);
        rd_kafka_header_add(hdrs, json_string_value(json_array_get(h, 0)), -1, v, (ssize_t)n);
    }
    rd_kafka_message_set_headers(rkm, hdrs);
    return rkm;
}

static json_t *sdk_vectors(void)
{
    char *out, *err;
    int rc = run_sdk("write", &out, &err);
    cr_assert_eq(rc, 0, "cloudevents_sdk.py write failed (%d):\n%s%s", rc, out, err);
    free(out);
    free(err);
    char path[128];
    snprintf(path, sizeof(path), "%s/sdk_vectors.json", dir);
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    cr_assert_not_null(root, "%s: %s", path, jerr.text);
    return root;
}

/* Decodes the SDK's vector `name` (it must be there). */
static void decode_sdk(json_t *root, const char *name, loom_ce_t *ce)
{
    size_t i;
    json_t *vec;
    json_array_foreach(json_object_get(root, "vectors"), i, vec)
    {
        if (strcmp(json_string_value(json_object_get(vec, "name")), name) != 0)
            continue;
        rd_kafka_message_t *rkm = vector_msg(vec);
        loom_error_t err;
        loom_error_clear(&err);
        int rc = loom_ce_decode(rkm, &arena, ce, &err);
        msg_free(rkm);
        cr_assert_eq(rc, 0, "%s: Loom refused the SDK's message: %s", name, err.message);
        return;
    }
    cr_assert_fail("the SDK wrote no vector %s", name);
}

static const char *ext_get(const loom_ce_t *ce, const char *name)
{
    for (size_t i = 0; i < ce->n_ext; i++)
        if (strcmp(ce->ext[i].name, name) == 0)
            return ce->ext[i].value;
    return NULL;
}

static void expect_json_data(const loom_ce_t *ce, const char *want)
{
    json_t *got = json_loadb(ce->data, ce->data_len, JSON_DECODE_ANY, NULL);
    json_t *w = json_loads(want, JSON_DECODE_ANY, NULL);
    cr_assert_not_null(got, "data is not JSON: %.*s", (int)ce->data_len, (const char *)ce->data);
    cr_assert(json_equal(got, w), "data %.*s, expected %s", (int)ce->data_len,
              (const char *)ce->data, want);
    json_decref(got);
    json_decref(w);
}

static void expect_bytes(const loom_ce_t *ce, const void *want, size_t len)
{
    cr_assert_eq(ce->data_len, len, "data is %zu bytes, expected %zu", ce->data_len, len);
    cr_assert(memcmp(ce->data, want, len) == 0);
}

static const char full_data[] = "{\"text\":\"hello\",\"n\":[1,2],\"nested\":{\"ok\":true}}";
static const unsigned char sdk_bytes[] = {0x00, 0x01, 0x02, 0xfe, 0xff, 0x7b, 0x80};

/* The attributes of cloudevents_sdk.py's FULL event. */
static void expect_full(const loom_ce_t *ce, const char *id, bool with_content_type)
{
    cr_assert_str_eq(ce->specversion, "1.0");
    cr_assert_str_eq(ce->id, id);
    cr_assert_str_eq(ce->source, "https://example.com/app");
    cr_assert_str_eq(ce->type, "messages.put_batch");
    cr_assert_str_eq(ce->subject, "channel/7");
    if (with_content_type)
        cr_assert_str_eq(ce->datacontenttype, "application/json");
    cr_assert_str_eq(ce->dataschema, "https://example.com/s.json");
    cr_assert_str_eq(ce->rayid, "0191b2c4-0000-7000-8000-000000000001");
    cr_assert_str_eq(ce->causationid, "0191b2c4-0000-7000-8000-000000000002");
    cr_assert_str_eq(ce->deadline, "2024-02-29T12:00:30Z");
    cr_assert_str_eq(ce->traceparent, TRACEPARENT);
    cr_assert_not_null(ext_get(ce, "tenant"));
    cr_assert_str_eq(ext_get(ce, "tenant"), "acme");
    int64_t us;
    cr_assert_not_null(ce->time);
    cr_assert_eq(loom_rfc3339_parse(ce->time, &us), 0, "time %s", ce->time);
    cr_assert_eq(us, INT64_C(1709208000123456), "time %s", ce->time);
    cr_assert_str_eq(ce->key, "stream-42");
    cr_assert_eq(ce->key_len, 9);
    expect_json_data(ce, full_data);
}

/* ---- the SDK's messages, decoded by Loom ------------------------------------------ */

Test(interop, sdk_messages_decode_in_loom)
{
    json_t *root = sdk_vectors();
    loom_ce_t ce;

    decode_sdk(root, "core_binary_full", &ce);
    expect_full(&ce, "sdk-1", true);
    cr_assert_str_eq(ext_get(&ce, "partitionkey"), "stream-42");
    cr_assert_eq(ce.n_ext, 2);

    decode_sdk(root, "core_structured_full", &ce);
    expect_full(&ce, "sdk-1", true);
    cr_assert_str_eq(ext_get(&ce, "partitionkey"), "stream-42");
    cr_assert_eq(ce.n_ext, 2);

    const char *modes[] = {"binary", "structured"};
    for (size_t m = 0; m < 2; m++) {
        char name[64];
        snprintf(name, sizeof(name), "core_%s_bytes", modes[m]);
        decode_sdk(root, name, &ce);
        cr_assert_str_eq(ce.id, "sdk-2");
        cr_assert_str_eq(ce.type, "blob.put");
        cr_assert_str_eq(ce.datacontenttype, "application/octet-stream");
        cr_assert_null(ce.key);
        expect_bytes(&ce, sdk_bytes, sizeof(sdk_bytes));

        snprintf(name, sizeof(name), "core_%s_text", modes[m]);
        decode_sdk(root, name, &ce);
        cr_assert_str_eq(ce.id, "sdk-3");
        cr_assert_str_eq(ce.datacontenttype, "text/plain; charset=utf-8");
        expect_bytes(&ce, "hello \"you\"", 11);
    }

    decode_sdk(root, "core_binary_minimal", &ce);
    cr_assert_str_eq(ce.id, "sdk-4");
    cr_assert_str_eq(ce.source, "/sdk");
    cr_assert_str_eq(ce.type, "ping");
    cr_assert_str_eq(ce.specversion, "1.0");
    cr_assert_null(ce.subject);
    cr_assert_null(ce.datacontenttype);
    cr_assert_eq(ce.n_ext, 0);
    cr_assert_eq(ce.data_len, 0);

    /* The 1.x API: no ce_partitionkey header, the key alone. */
    decode_sdk(root, "v1_binary_full", &ce);
    expect_full(&ce, "sdk-v1", true);
    cr_assert_eq(ce.n_ext, 1);
    /* Its to_structured labels the message application/json (not
     * application/cloudevents+json) and moves datacontenttype out of the JSON
     * into that header; Loom recognises the event by its shape and reads every
     * attribute the JSON holds. */
    decode_sdk(root, "v1_structured_full", &ce);
    expect_full(&ce, "sdk-v1", false);
    json_decref(root);
}

/* ---- Loom's messages, read by the SDK ---------------------------------------------- */

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
    ce.data = full_data;
    ce.data_len = strlen(full_data);
    return ce;
}

/* What the SDK must read: every attribute of ce as text, and the data: the
 * JSON value for a JSON datacontenttype, else the very bytes. */
static json_t *expect_of(const loom_ce_t *ce)
{
    json_t *attrs = loom_ce_to_json(ce);
    json_object_del(attrs, "data");
    json_object_del(attrs, "data_base64");
    json_t *exp = json_object();
    json_object_set_new(exp, "attributes", attrs);
    const char *ct = ce->datacontenttype;
    json_t *data = NULL;
    if (ce->data && (!ct || strncmp(ct, "application/json", 16) == 0))
        data = json_loadb(ce->data, ce->data_len, JSON_DECODE_ANY, NULL);
    if (data)
        json_object_set_new(exp, "data_json", data);
    else if (ce->data)
        json_object_set_new(exp, "data_hex", hex(ce->data, ce->data_len));
    return exp;
}

/* Adds ce as a Kafka message in binary or structured mode to vectors. */
static void add_vector(json_t *vectors, const char *name, const loom_ce_t *ce, const char *key,
                       bool structured)
{
    json_t *vec = json_object();
    json_object_set_new(vec, "name", json_string(name));
    json_object_set_new(vec, "mode", json_string(structured ? "structured" : "binary"));
    json_t *headers = json_array();
    const void *value;
    size_t len;
    char *text = NULL;
    if (structured) {
        json_t *j = loom_ce_to_json(ce);
        text = json_dumps(j, JSON_COMPACT);
        json_decref(j);
        value = text;
        len = strlen(text);
        json_array_append_new(
            headers, json_pack("[s o]", "content-type", hex("application/cloudevents+json", 28)));
    } else {
        rd_kafka_headers_t *h = loom_ce_headers(ce);
        const char *hn;
        const void *hv;
        size_t hl;
        for (size_t i = 0; rd_kafka_header_get_all(h, i, &hn, &hv, &hl) == 0; i++)
            json_array_append_new(headers, json_pack("[s o]", hn, hex(hv, hl)));
        rd_kafka_headers_destroy(h);
        value = ce->data;
        len = ce->data_len;
    }
    json_object_set_new(vec, "headers", headers);
    json_object_set_new(vec, "key", key ? hex(key, strlen(key)) : json_null());
    json_object_set_new(vec, "value", hex(value ? value : "", value ? len : 0));
    json_object_set_new(vec, "expect", expect_of(ce));
    json_array_append_new(vectors, vec);
    free(text);
}

static void write_loom_vectors(json_t *vectors)
{
    char path[128];
    snprintf(path, sizeof(path), "%s/loom_vectors.json", dir);
    json_t *root = json_pack("{s o}", "vectors", vectors);
    cr_assert_eq(json_dump_file(root, path, JSON_INDENT(1)), 0, "could not write %s", path);
    json_decref(root);
}

Test(interop, loom_messages_read_by_sdk)
{
    json_t *vectors = json_array();
    loom_ce_t full = full_event();
    add_vector(vectors, "binary_full", &full, "stream-42", false);
    add_vector(vectors, "structured_full", &full, "stream-42", true);

    static const unsigned char bytes[] = {0x00, 0x01, 0x02, 0xfe, 0xff, 0x7b, 0x80};
    loom_ce_t blob = {.specversion = "1.0",
                      .id = "blob-1",
                      .source = "loom://local/n",
                      .type = "blob.put",
                      .time = "2024-02-29T14:30:00.5+02:30",
                      .datacontenttype = "application/octet-stream",
                      .data = bytes,
                      .data_len = sizeof(bytes)};
    /* (Times are given: both SDK APIs invent one for an event without.) */
    add_vector(vectors, "binary_bytes", &blob, NULL, false);
    add_vector(vectors, "structured_bytes", &blob, NULL, true);

    loom_ce_t text = {.specversion = "1.0",
                      .id = "text-1",
                      .source = "loom://local/n",
                      .type = "note.put",
                      .time = "2024-02-29t12:00:00z",
                      .datacontenttype = "text/plain; charset=utf-8",
                      .data = "123",
                      .data_len = 3};
    add_vector(vectors, "binary_text", &text, NULL, false);
    add_vector(vectors, "structured_text", &text, NULL, true);

    /* A new event as Loom makes them (UUIDv7 id, time now, loom:// source). */
    loom_ce_t fresh;
    loom_ce_init(&fresh, &arena, "eu-west-1", "node-7", "messages.put_batch");
    fresh.rayid = "ray-2";
    fresh.data = "[{\"channel\":\"c\",\"body\":\"hi\"}]";
    fresh.data_len = strlen(fresh.data);
    add_vector(vectors, "binary_new", &fresh, "c", false);
    add_vector(vectors, "structured_new", &fresh, "c", true);

    write_loom_vectors(vectors);
    char *out, *err;
    int rc = run_sdk("check", &out, &err);
    cr_assert_eq(rc, 0, "the CloudEvents SDK does not read Loom's messages as sent:\n%s%s", out,
                 err);
    cr_assert(strstr(out, "checked 8 vectors"), "%s", out);
    free(out);
    free(err);
}

Test(interop, sdk_check_notices_a_mismatch)
{
    /* The checker is not vacuous: an expectation that differs is reported. */
    json_t *vectors = json_array();
    loom_ce_t full = full_event();
    add_vector(vectors, "binary_full", &full, "stream-42", false);
    json_t *attrs =
        json_object_get(json_object_get(json_array_get(vectors, 0), "expect"), "attributes");
    json_object_set_new(attrs, "subject", json_string("channel/8"));
    write_loom_vectors(vectors);
    char *out, *err;
    int rc = run_sdk("check", &out, &err);
    cr_assert_eq(rc, 1, "exit %d:\n%s%s", rc, out, err);
    cr_assert(strstr(err, "subject"), "%s", err);
    cr_assert(strstr(err, "channel/8"), "%s", err);
    free(out);
    free(err);
}
