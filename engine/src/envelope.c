/*
 * envelope.c: CloudEvents 1.0 on Kafka, binary and structured content modes.
 *
 * Binary mode: every attribute is a `ce_<name>` header, the value is the data.
 * Structured mode: the value is the whole event as JSON. A message is read as
 * structured when its content-type says application/cloudevents(+json), or
 * when it has no ce_specversion header and its value is a JSON object with a
 * "specversion" member.
 */
#include "loom/envelope.h"
#include "loom/clock.h"
#include "loom/log.h"
#include "loom/uuid.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#define ATTR_MAX 4096 /* longest attribute value accepted */

/* ---- RFC 3339 ---------------------------------------------------------- */

static int digits(const char *s, int n)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (!isdigit((unsigned char)s[i]))
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v;
}

int loom_rfc3339_parse(const char *s, int64_t *unix_us)
{
    /* YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM|-HH:MM) */
    if (!s || strlen(s) < 20)
        return LOOM_EINVAL;
    int y = digits(s, 4), mo = digits(s + 5, 2), d = digits(s + 8, 2);
    int h = digits(s + 11, 2), mi = digits(s + 14, 2), sec = digits(s + 17, 2);
    if (y < 0 || mo < 1 || mo > 12 || d < 1 || d > 31 || h < 0 || h > 23 || mi < 0 || mi > 59 ||
        sec < 0 || sec > 60 || s[4] != '-' || s[7] != '-' ||
        (s[10] != 'T' && s[10] != 't' && s[10] != ' ') || s[13] != ':' || s[16] != ':')
        return LOOM_EINVAL;
    const char *p = s + 19;
    int64_t frac_us = 0;
    if (*p == '.') {
        p++;
        int n = 0;
        int64_t scale = 100000;
        while (isdigit((unsigned char)*p)) {
            if (n < 6)
                frac_us += (*p - '0') * scale;
            scale /= 10;
            n++;
            p++;
        }
        if (n == 0)
            return LOOM_EINVAL;
    }
    int offset_min = 0;
    if (*p == 'Z' || *p == 'z') {
        p++;
    } else if (*p == '+' || *p == '-') {
        /* In this order: a truncated offset must not be read past its end. */
        int oh = digits(p + 1, 2);
        if (oh < 0 || p[3] != ':')
            return LOOM_EINVAL;
        int om = digits(p + 4, 2);
        if (om < 0 || oh > 23 || om > 59)
            return LOOM_EINVAL;
        offset_min = (oh * 60 + om) * (*p == '-' ? -1 : 1);
        p += 6;
    } else {
        return LOOM_EINVAL;
    }
    if (*p)
        return LOOM_EINVAL;
    static const int mdays[] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (d > mdays[mo - 1] || (mo == 2 && d == 29 && !leap))
        return LOOM_EINVAL;
    struct tm tm = {.tm_year = y - 1900,
                    .tm_mon = mo - 1,
                    .tm_mday = d,
                    .tm_hour = h,
                    .tm_min = mi,
                    .tm_sec = sec};
    time_t t = timegm(&tm);
    *unix_us = ((int64_t)t - (int64_t)offset_min * 60) * 1000000 + frac_us;
    return 0;
}

/* Whether a datacontenttype declares JSON: absent, application/json, text/json
 * or a +json suffix, parameters aside. The JSON event format keeps such data
 * as a JSON value, and other data as a string or as data_base64 (section 3.1). */
static bool is_json_type(const char *ct)
{
    if (!ct)
        return true;
    size_t n = strcspn(ct, ";");
    while (n > 0 && isspace((unsigned char)ct[n - 1]))
        n--;
    if ((n == 16 && strncasecmp(ct, "application/json", n) == 0) ||
        (n == 9 && strncasecmp(ct, "text/json", n) == 0))
        return true;
    return n > 5 && strncasecmp(ct + n - 5, "+json", 5) == 0;
}

/* ---- validation -------------------------------------------------------- */

static bool ext_name_ok(const char *n)
{
    size_t len = strlen(n);
    if (len < 1 || len > 20)
        return false;
    for (size_t i = 0; i < len; i++)
        if (!islower((unsigned char)n[i]) && !isdigit((unsigned char)n[i]))
            return false;
    return true;
}

static int bad(loom_error_t *err, const char *attr, const char *why)
{
    return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "CloudEvent attribute \"%s\" %s", attr,
                          why);
}

int loom_ce_validate(const loom_ce_t *ce, loom_error_t *err)
{
    if (!ce->specversion)
        return bad(err, "specversion", "is missing");
    if (strcmp(ce->specversion, "1.0") != 0)
        return bad(err, "specversion", "must be \"1.0\"");
    if (!ce->id)
        return bad(err, "id", "is missing");
    if (!*ce->id)
        return bad(err, "id", "must not be empty");
    if (strlen(ce->id) > LOOM_CE_ID_MAX)
        return bad(err, "id", "is longer than " LOOM_STR(LOOM_CE_ID_MAX) " bytes");
    if (!ce->source)
        return bad(err, "source", "is missing");
    if (!*ce->source)
        return bad(err, "source", "must not be empty");
    if (!ce->type)
        return bad(err, "type", "is missing");
    if (!*ce->type)
        return bad(err, "type", "must not be empty");
    int64_t us;
    /* A time loom_ce_init() wrote is RFC 3339 by construction. */
    if (ce->time && ce->time != ce->time_formatted && loom_rfc3339_parse(ce->time, &us) != 0)
        return bad(err, "time", "is not an RFC 3339 timestamp");
    if (ce->deadline && loom_rfc3339_parse(ce->deadline, &us) != 0)
        return bad(err, "deadline", "is not an RFC 3339 timestamp");
    if (ce->subject && !*ce->subject)
        return bad(err, "subject", "must not be empty");
    if (ce->datacontenttype && !*ce->datacontenttype)
        return bad(err, "datacontenttype", "must not be empty");
    if (ce->dataschema && !*ce->dataschema)
        return bad(err, "dataschema", "must not be empty");
    for (size_t i = 0; i < ce->n_ext; i++)
        if (!ext_name_ok(ce->ext[i].name))
            return bad(err, ce->ext[i].name, "is not a valid extension name ([a-z0-9]{1,20})");
    return 0;
}

/* ---- attribute table ----------------------------------------------------- */

/* Known attributes by name: returns the slot to fill, or NULL. */
static const char **known_slot(loom_ce_t *ce, const char *name)
{
    if (strcmp(name, "id") == 0)
        return &ce->id;
    if (strcmp(name, "source") == 0)
        return &ce->source;
    if (strcmp(name, "specversion") == 0)
        return &ce->specversion;
    if (strcmp(name, "type") == 0)
        return &ce->type;
    if (strcmp(name, "subject") == 0)
        return &ce->subject;
    if (strcmp(name, "time") == 0)
        return &ce->time;
    if (strcmp(name, "datacontenttype") == 0)
        return &ce->datacontenttype;
    if (strcmp(name, "dataschema") == 0)
        return &ce->dataschema;
    if (strcmp(name, "rayid") == 0)
        return &ce->rayid;
    if (strcmp(name, "causationid") == 0)
        return &ce->causationid;
    if (strcmp(name, "deadline") == 0)
        return &ce->deadline;
    if (strcmp(name, "traceparent") == 0)
        return &ce->traceparent;
    return NULL;
}

static int set_attr(loom_ce_t *ce, const char *name, const char *value, loom_error_t *err)
{
    const char **slot = known_slot(ce, name);
    if (slot) {
        *slot = value;
        return 0;
    }
    if (!ext_name_ok(name))
        return bad(err, name, "is not a valid extension name ([a-z0-9]{1,20})");
    for (size_t i = 0; i < ce->n_ext; i++) {
        if (strcmp(ce->ext[i].name, name) == 0) {
            ce->ext[i].value = value;
            return 0;
        }
    }
    if (ce->n_ext == LOOM_CE_MAX_EXTENSIONS)
        return bad(err, name, "is one extension too many (at most 32)");
    ce->ext[ce->n_ext].name = name;
    ce->ext[ce->n_ext].value = value;
    ce->n_ext++;
    return 0;
}

/* ---- decoding ------------------------------------------------------------ */

static bool has_ce_headers(rd_kafka_headers_t *hdrs)
{
    const void *v;
    size_t n;
    return hdrs && rd_kafka_header_get_last(hdrs, "ce_specversion", &v, &n) == 0;
}

static const char *content_type(rd_kafka_headers_t *hdrs, loom_arena_t *arena)
{
    const void *v;
    size_t n;
    if (!hdrs)
        return NULL;
    if (rd_kafka_header_get_last(hdrs, "content-type", &v, &n) != 0 &&
        rd_kafka_header_get_last(hdrs, "content_type", &v, &n) != 0)
        return NULL;
    return loom_arena_strndup(arena, v ? v : "", v ? n : 0);
}

static int decode_binary(const rd_kafka_message_t *rkm, rd_kafka_headers_t *hdrs,
                         loom_arena_t *arena, loom_ce_t *ce, loom_error_t *err)
{
    const char *name;
    const void *val;
    size_t len;
    for (size_t i = 0; rd_kafka_header_get_all(hdrs, i, &name, &val, &len) == 0; i++) {
        if (strncmp(name, "ce_", 3) != 0)
            continue;
        if (len > ATTR_MAX)
            return bad(err, name + 3, "is longer than 4096 bytes");
        if (val && memchr(val, '\0', len))
            return bad(err, name + 3, "holds a NUL byte");
        if (val && !loom_text_valid(val, len))
            return bad(err, name + 3, "is not valid UTF-8");
        const char *v = loom_arena_strndup(arena, val ? val : "", val ? len : 0);
        int rc = set_attr(ce, loom_arena_strdup(arena, name + 3), v, err);
        if (rc != 0)
            return rc;
    }
    ce->datacontenttype = ce->datacontenttype ? ce->datacontenttype : content_type(hdrs, arena);
    ce->data = rkm->payload;
    ce->data_len = rkm->len;
    return loom_ce_validate(ce, err);
}

/* Decodes base64 (standard alphabet, padding optional) into the arena. */
static int base64_decode(const char *s, loom_arena_t *arena, const void **out, size_t *outlen)
{
    size_t n = strlen(s);
    unsigned char *buf = loom_arena_alloc(arena, n / 4 * 3 + 3);
    size_t k = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        int v;
        if (c >= 'A' && c <= 'Z')
            v = c - 'A';
        else if (c >= 'a' && c <= 'z')
            v = c - 'a' + 26;
        else if (c >= '0' && c <= '9')
            v = c - '0' + 52;
        else if (c == '+')
            v = 62;
        else if (c == '/')
            v = 63;
        else if (c == '=') {
            for (size_t j = i; j < n; j++)
                if (s[j] != '=')
                    return LOOM_EINVAL;
            break;
        } else
            return LOOM_EINVAL;
        acc = acc << 6 | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            buf[k++] = (unsigned char)(acc >> bits);
        }
    }
    *out = buf;
    *outlen = k;
    return 0;
}

static int decode_object(json_t *obj, loom_arena_t *arena, loom_ce_t *ce, loom_error_t *err)
{
    const char *name;
    json_t *v;
    json_object_foreach(obj, name, v)
    {
        if (strcmp(name, "data") == 0 || strcmp(name, "data_base64") == 0)
            continue;
        const char *text;
        char num[64];
        if (json_is_string(v)) {
            text = json_string_value(v);
            if (strlen(text) != json_string_length(v))
                return bad(err, name, "holds a NUL character");
        } else if (json_is_integer(v)) {
            snprintf(num, sizeof(num), "%" JSON_INTEGER_FORMAT, json_integer_value(v));
            text = num;
        } else if (json_is_boolean(v)) {
            text = json_is_true(v) ? "true" : "false";
        } else if (json_is_null(v)) {
            continue; /* absent */
        } else {
            return bad(err, name, "must be a string, an integer or a boolean");
        }
        if (strlen(text) > ATTR_MAX)
            return bad(err, name, "is longer than 4096 bytes");
        int rc = set_attr(ce, loom_arena_strdup(arena, name), loom_arena_strdup(arena, text), err);
        if (rc != 0)
            return rc;
    }
    json_t *data = json_object_get(obj, "data");
    json_t *b64 = json_object_get(obj, "data_base64");
    if (data && b64)
        return bad(err, "data_base64", "must not appear together with \"data\"");
    if (b64) {
        if (!json_is_string(b64) ||
            base64_decode(json_string_value(b64), arena, &ce->data, &ce->data_len) != 0)
            return bad(err, "data_base64", "is not valid base64");
    } else if (data && json_is_string(data) && !is_json_type(ce->datacontenttype)) {
        /* Text of a non-JSON type: the string is the data, as in binary mode. */
        ce->data_len = json_string_length(data);
        char *text = loom_arena_alloc(arena, ce->data_len + 1);
        memcpy(text, json_string_value(data), ce->data_len + 1);
        ce->data = text;
    } else if (data) {
        char *text = json_dumps(data, JSON_COMPACT | JSON_ENCODE_ANY);
        if (!text)
            return bad(err, "data", "could not be encoded");
        ce->data_len = strlen(text);
        ce->data = loom_arena_strndup(arena, text, ce->data_len);
        free(text);
    }
    return loom_ce_validate(ce, err);
}

int loom_ce_decode_json(const char *json, size_t len, loom_arena_t *arena, loom_ce_t *ce,
                        loom_error_t *err)
{
    memset(ce, 0, sizeof(*ce));
    json_error_t jerr;
    json_t *obj = json_loadb(json, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!obj || !json_is_object(obj)) {
        json_decref(obj);
        return loom_error_set(err, LOOM_CODE_INVALID_JSON,
                              "CloudEvent is not a JSON object: %s (line %d, column %d)",
                              obj ? "not an object" : jerr.text, jerr.line, jerr.column);
    }
    int rc = decode_object(obj, arena, ce, err);
    json_decref(obj);
    return rc;
}

/* Whether the message has any ce_ header (a binary-mode event, perhaps
 * without its ce_specversion). */
static bool has_any_ce_header(rd_kafka_headers_t *hdrs)
{
    const char *name;
    const void *val;
    size_t len;
    for (size_t i = 0; hdrs && rd_kafka_header_get_all(hdrs, i, &name, &val, &len) == 0; i++)
        if (strncmp(name, "ce_", 3) == 0)
            return true;
    return false;
}

/* An attribute value good enough to file a rejected message under: UTF-8
 * text without NUL, 1 to max bytes. NULL otherwise. */
static const char *usable(const void *v, size_t n, size_t max, loom_arena_t *arena)
{
    if (!v || n == 0 || n > max || !loom_text_valid(v, n))
        return NULL;
    return loom_arena_strndup(arena, v, n);
}

/* After a failed decode: the id and type of the message when they are usable
 * by themselves, so a rejection is filed under the sender's id. */
static void salvage(const rd_kafka_message_t *rkm, rd_kafka_headers_t *hdrs, json_t *obj,
                    loom_arena_t *arena, loom_ce_t *ce)
{
    memset(ce, 0, sizeof(*ce));
    const char *names[] = {"id", "type", "source"};
    const char **slots[] = {&ce->id, &ce->type, &ce->source};
    size_t max[] = {LOOM_CE_ID_MAX, ATTR_MAX, ATTR_MAX};
    for (size_t i = 0; i < 3; i++) {
        char hname[16];
        const void *v;
        size_t n;
        snprintf(hname, sizeof(hname), "ce_%s", names[i]);
        if (obj) {
            json_t *j = json_object_get(obj, names[i]);
            if (json_is_string(j))
                *slots[i] = usable(json_string_value(j), json_string_length(j), max[i], arena);
        } else if (hdrs && rd_kafka_header_get_last(hdrs, hname, &v, &n) == 0) {
            *slots[i] = usable(v, n, max[i], arena);
        }
    }
    (void)rkm;
}

int loom_ce_decode(const rd_kafka_message_t *rkm, loom_arena_t *arena, loom_ce_t *ce,
                   loom_error_t *err)
{
    memset(ce, 0, sizeof(*ce));
    rd_kafka_headers_t *hdrs = NULL;
    if (rd_kafka_message_headers(rkm, &hdrs) != RD_KAFKA_RESP_ERR_NO_ERROR)
        hdrs = NULL;
    int rc;
    json_t *obj = NULL;
    const char *ct = content_type(hdrs, arena);
    bool structured = ct && strncmp(ct, "application/cloudevents", 23) == 0;
    if (!structured && has_ce_headers(hdrs)) {
        rc = decode_binary(rkm, hdrs, arena, ce, err);
    } else if (!structured && has_any_ce_header(hdrs)) {
        rc = bad(err, "specversion",
                 "is missing: the message has ce_ headers (binary mode) but no ce_specversion");
    } else {
        /* Structured mode: said by the content type, or a JSON object value
         * with a "specversion" member. */
        json_error_t jerr;
        bool tried = rkm->len > 0 && (structured || ((const char *)rkm->payload)[0] == '{');
        if (tried)
            obj = json_loadb(rkm->payload, rkm->len, JSON_REJECT_DUPLICATES, &jerr);
        if (obj && json_is_object(obj) && (structured || json_object_get(obj, "specversion")))
            rc = decode_object(obj, arena, ce, err);
        else if (!structured && tried && !obj)
            rc = loom_error_set(err, LOOM_CODE_INVALID_JSON,
                                "the message has no ce_specversion header, and its value is not a "
                                "structured CloudEvent: %s (line %d, column %d)",
                                jerr.text, jerr.line, jerr.column);
        else if (structured)
            rc = loom_error_set(err, LOOM_CODE_INVALID_JSON,
                                "CloudEvent is not a JSON object: %s (line %d, column %d)",
                                obj || !tried ? "not an object" : jerr.text, tried ? jerr.line : 0,
                                tried ? jerr.column : 0);
        else
            rc = bad(err, "specversion",
                     "is missing: the message has no ce_specversion header and its value is not "
                     "a structured CloudEvent (a JSON object with \"specversion\")");
    }
    if (rc == 0 && rkm->key) {
        if (rkm->key_len > LOOM_CE_ID_MAX)
            rc = loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                                "the Kafka key is longer than " LOOM_STR(LOOM_CE_ID_MAX) " bytes");
        else if (!loom_text_valid(rkm->key, rkm->key_len))
            rc = loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                                "the Kafka key is not UTF-8 text without NUL bytes");
    }
    if (rc == 0 && rkm->key) {
        char *key = loom_arena_alloc(arena, rkm->key_len + 1);
        memcpy(key, rkm->key, rkm->key_len);
        key[rkm->key_len] = '\0';
        ce->key = key;
        ce->key_len = rkm->key_len;
    }
    if (rc != 0)
        salvage(rkm, hdrs, obj && json_is_object(obj) ? obj : NULL, arena, ce);
    json_decref(obj);
    return rc;
}

/* ---- encoding ------------------------------------------------------------ */

rd_kafka_headers_t *loom_ce_headers(const loom_ce_t *ce)
{
    rd_kafka_headers_t *h = rd_kafka_headers_new(12 + ce->n_ext);
#define NAME(s) s, (ssize_t)(sizeof(s) - 1)
    struct {
        const char *name;
        ssize_t name_len;
        const char *value;
    } attrs[] = {
        {NAME("ce_specversion"), ce->specversion},
        {NAME("ce_id"), ce->id},
        {NAME("ce_source"), ce->source},
        {NAME("ce_type"), ce->type},
        {NAME("ce_time"), ce->time},
        {NAME("ce_subject"), ce->subject},
        {NAME("ce_dataschema"), ce->dataschema},
        {NAME("ce_rayid"), ce->rayid},
        {NAME("ce_causationid"), ce->causationid},
        {NAME("ce_deadline"), ce->deadline},
        {NAME("ce_traceparent"), ce->traceparent},
    };
    for (size_t i = 0; i < sizeof(attrs) / sizeof(attrs[0]); i++)
        if (attrs[i].value)
            rd_kafka_header_add(h, attrs[i].name, attrs[i].name_len, attrs[i].value, -1);
    for (size_t i = 0; i < ce->n_ext; i++) {
        char name[32];
        snprintf(name, sizeof(name), "ce_%s", ce->ext[i].name);
        rd_kafka_header_add(h, name, -1, ce->ext[i].value, -1);
    }
    /* The binding maps datacontenttype to the content-type header. */
    rd_kafka_header_add(h, NAME("content-type"),
                        ce->datacontenttype ? ce->datacontenttype : "application/json", -1);
#undef NAME
    return h;
}

static char *base64_encode(const void *data, size_t len)
{
    static const char tbl[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const unsigned char *p = data;
    char *out = malloc(((len + 2) / 3) * 4 + 1);
    if (!out)
        abort();
    size_t k = 0;
    for (size_t i = 0; i < len; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16;
        if (i + 1 < len)
            v |= (uint32_t)p[i + 1] << 8;
        if (i + 2 < len)
            v |= p[i + 2];
        out[k++] = tbl[v >> 18 & 63];
        out[k++] = tbl[v >> 12 & 63];
        out[k++] = i + 1 < len ? tbl[v >> 6 & 63] : '=';
        out[k++] = i + 2 < len ? tbl[v & 63] : '=';
    }
    out[k] = '\0';
    return out;
}

json_t *loom_ce_to_json(const loom_ce_t *ce)
{
    json_t *o = json_object();
    struct {
        const char *name;
        const char *value;
    } attrs[] = {
        {"specversion", ce->specversion},
        {"id", ce->id},
        {"source", ce->source},
        {"type", ce->type},
        {"time", ce->time},
        {"subject", ce->subject},
        {"datacontenttype", ce->datacontenttype},
        {"dataschema", ce->dataschema},
        {"rayid", ce->rayid},
        {"causationid", ce->causationid},
        {"deadline", ce->deadline},
        {"traceparent", ce->traceparent},
    };
    for (size_t i = 0; i < sizeof(attrs) / sizeof(attrs[0]); i++)
        if (attrs[i].value)
            json_object_set_new(o, attrs[i].name, json_string(attrs[i].value));
    for (size_t i = 0; i < ce->n_ext; i++)
        json_object_set_new(o, ce->ext[i].name, json_string(ce->ext[i].value));
    if (ce->data) {
        json_t *d = is_json_type(ce->datacontenttype)
                        ? json_loadb(ce->data, ce->data_len, JSON_DECODE_ANY, NULL)
                        : NULL;
        if (d) {
            json_object_set_new(o, "data", d);
        } else {
            char *b = base64_encode(ce->data, ce->data_len);
            json_object_set_new(o, "data_base64", json_string(b));
            free(b);
        }
    }
    return o;
}

void loom_ce_init(loom_ce_t *ce, loom_arena_t *arena, const char *site, const char *node,
                  const char *type)
{
    memset(ce, 0, sizeof(*ce));
    char *id = loom_arena_alloc(arena, LOOM_UUID_STRLEN + 1);
    loom_uuid_v7_string(id);
    char *ts = loom_arena_alloc(arena, 40);
    loom_rfc3339_format(loom_now_us(), ts, 40);
    ce->id = id;
    ce->time = ts;
    ce->time_formatted = ts;
    ce->specversion = "1.0";
    /* "loom://SITE/NODE", put together by hand: this runs once per message. */
    site = site ? site : "local";
    node = node ? node : "unknown";
    size_t ls = strlen(site), ln = strlen(node);
    char *src = loom_arena_alloc(arena, 7 + ls + 1 + ln + 1);
    memcpy(src, "loom://", 7);
    memcpy(src + 7, site, ls);
    src[7 + ls] = '/';
    memcpy(src + 8 + ls, node, ln + 1);
    ce->source = src;
    ce->type = type ? loom_arena_strdup(arena, type) : NULL;
    ce->datacontenttype = "application/json";
}

/* ---- the JSON event format, as a service stores it ------------------------ */

static int field_error(loom_error_t *err, const char **field, const char *name, const char *why)
{
    if (field)
        *field = name;
    return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "\"%s\": %s", name, why);
}

static bool is_base64(const char *s)
{
    size_t n = strlen(s), pad = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '=') {
            pad++;
            continue;
        }
        if (pad || !(isalnum((unsigned char)c) || c == '+' || c == '/'))
            return false;
    }
    return pad <= 2 && (pad == 0 || n % 4 == 0);
}

int loom_ce_check_json(const json_t *obj, const char **field, loom_error_t *err)
{
    if (!json_is_object(obj))
        return field_error(err, field, "", "a message must be a JSON object");
    static const char *const required[] = {"id", "source", "specversion", "type"};
    for (size_t i = 0; i < 4; i++) {
        json_t *v = json_object_get(obj, required[i]);
        if (!v)
            return field_error(err, field, required[i], "is required");
        if (!json_is_string(v) || json_string_length(v) == 0)
            return field_error(err, field, required[i], "must be a non-empty string");
    }
    if (json_string_length(json_object_get(obj, "id")) > LOOM_CE_JSON_ID_MAX)
        return field_error(err, field, "id",
                           "must be at most " LOOM_STR(LOOM_CE_JSON_ID_MAX) " bytes");
    if (strcmp(json_string_value(json_object_get(obj, "specversion")), "1.0") != 0)
        return field_error(err, field, "specversion", "must be \"1.0\"");
    static const char *const optional[] = {"subject", "time", "datacontenttype", "dataschema"};
    for (size_t i = 0; i < 4; i++) {
        json_t *v = json_object_get(obj, optional[i]);
        if (v && (!json_is_string(v) || json_string_length(v) == 0))
            return field_error(err, field, optional[i], "must be a non-empty string");
    }
    json_t *t = json_object_get(obj, "time");
    int64_t us;
    if (t && loom_rfc3339_parse(json_string_value(t), &us) != 0)
        return field_error(err, field, "time", "must be an RFC 3339 timestamp");
    json_t *data = json_object_get(obj, "data"), *b64 = json_object_get(obj, "data_base64");
    if (data && b64)
        return field_error(err, field, "data_base64", "must not appear together with \"data\"");
    if (b64 && (!json_is_string(b64) || !is_base64(json_string_value(b64))))
        return field_error(err, field, "data_base64", "must be a base64 string");
    const char *name;
    json_t *v;
    json_object_foreach((json_t *)obj, name, v)
    {
        if (strcmp(name, "data") == 0 || strcmp(name, "data_base64") == 0 ||
            strcmp(name, "id") == 0 || strcmp(name, "source") == 0 ||
            strcmp(name, "specversion") == 0 || strcmp(name, "type") == 0 ||
            strcmp(name, "subject") == 0 || strcmp(name, "time") == 0 ||
            strcmp(name, "datacontenttype") == 0 || strcmp(name, "dataschema") == 0)
            continue;
        if (!ext_name_ok(name))
            return field_error(err, field, name, "is not a valid attribute name ([a-z0-9]{1,20})");
        if (!json_is_string(v) && !json_is_integer(v) && !json_is_boolean(v))
            return field_error(err, field, name,
                               "an extension attribute must be a string, an integer or a boolean");
    }
    return 0;
}
