/*
 * log.c: one line per event on stderr, as logfmt text or JSON.
 *
 * Fields arrive as a formatted "k1=v1 k2=v2" string; a value runs until the
 * next " key=" token, so values may hold spaces. Lines are built in a local
 * buffer and written with one fwrite under the stream lock, so lines from
 * different threads never interleave.
 */
#include "loom/log.h"
#include "loom/clock.h"
#include "loom/error.h"

#include <ctype.h>
#include <pthread.h>
#include <stdlib.h>
#include <stdarg.h>
#include <stdbool.h>
#include <string.h>

#define LOG_LINE_MAX 8192

loom_log_level_t loom_log_level = LOOM_LOG_INFO;
static loom_log_format_t log_format = LOOM_LOG_TEXT;
static FILE *log_stream;
static char log_node[64];
static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;

static const char *const level_names[] = {"debug", "info", "warn", "error", "off"};

void loom_log_setup(loom_log_level_t level, loom_log_format_t format)
{
    loom_log_level = level;
    log_format = format;
}

void loom_log_set_node(const char *node_id)
{
    pthread_mutex_lock(&log_mu);
    snprintf(log_node, sizeof(log_node), "%s", node_id ? node_id : "");
    pthread_mutex_unlock(&log_mu);
}

void loom_log_set_stream(FILE *stream)
{
    log_stream = stream;
}

const char *loom_log_level_name(loom_log_level_t level)
{
    return (unsigned)level <= LOOM_LOG_OFF ? level_names[level] : "info";
}

int loom_log_level_parse(const char *s, loom_log_level_t *out)
{
    for (int i = 0; i <= LOOM_LOG_OFF; i++) {
        if (strcmp(s, level_names[i]) == 0) {
            *out = (loom_log_level_t)i;
            return 0;
        }
    }
    return LOOM_EINVAL;
}

int loom_log_format_parse(const char *s, loom_log_format_t *out)
{
    if (strcmp(s, "text") == 0)
        *out = LOOM_LOG_TEXT;
    else if (strcmp(s, "json") == 0)
        *out = LOOM_LOG_JSON;
    else
        return LOOM_EINVAL;
    return 0;
}

/* Bytes kept free at the end of a line for closing quotes, "..." and "}". */
#define SB_CLOSE_ROOM 16

/* A small bounded string builder; output is truncated, never overflows. */
typedef struct {
    char *p;
    size_t len, cap;
} sbuf_t;

static void sb_putc(sbuf_t *sb, char c)
{
    if (sb->len + 1 < sb->cap)
        sb->p[sb->len++] = c;
    sb->p[sb->len < sb->cap ? sb->len : sb->cap - 1] = '\0';
}

static void sb_putn(sbuf_t *sb, const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        sb_putc(sb, s[i]);
}

static void sb_puts(sbuf_t *sb, const char *s)
{
    sb_putn(sb, s, strlen(s));
}

size_t loom_utf8_seq(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    if (n == 0 || u[0] == 0)
        return 0;
    if (u[0] < 0x80)
        return 1;
    size_t len;
    unsigned lo = 0x80, hi = 0xbf; /* range of the second byte */
    if (u[0] >= 0xc2 && u[0] <= 0xdf)
        len = 2;
    else if (u[0] >= 0xe0 && u[0] <= 0xef) {
        len = 3;
        if (u[0] == 0xe0)
            lo = 0xa0; /* no overlong forms */
        else if (u[0] == 0xed)
            hi = 0x9f; /* no surrogates */
    } else if (u[0] >= 0xf0 && u[0] <= 0xf4) {
        len = 4;
        if (u[0] == 0xf0)
            lo = 0x90;
        else if (u[0] == 0xf4)
            hi = 0x8f; /* at most U+10FFFF */
    } else
        return 0;
    if (n < len || u[1] < lo || u[1] > hi)
        return 0;
    for (size_t i = 2; i < len; i++)
        if (u[i] < 0x80 || u[i] > 0xbf)
            return 0;
    return len;
}

bool loom_text_valid(const void *s, size_t n)
{
    const char *p = s;
    for (size_t i = 0; i < n;) {
        size_t k = loom_utf8_seq(p + i, n - i);
        if (k == 0)
            return false;
        i += k;
    }
    return true;
}

char *loom_text_escape(const void *s, size_t n, size_t max)
{
    static const char hex[] = "0123456789abcdef";
    const char *p = s ? s : "";
    if (max > 0 && max < 8)
        max = 8;
    size_t cap = 4 * n + 4;
    if (max > 0 && cap > max + 4)
        cap = max + 4;
    char *out = malloc(cap);
    if (!out)
        abort();
    size_t len = 0;
    for (size_t i = 0; i < n;) {
        size_t k = loom_utf8_seq(p + i, n - i);
        size_t need = k ? k : 4;
        if (max > 0 && len + need > max - 3) {
            memcpy(out + len, "...", 3);
            len += 3;
            break;
        }
        if (k) {
            memcpy(out + len, p + i, k);
            len += k;
            i += k;
        } else {
            unsigned char c = (unsigned char)p[i++];
            out[len++] = '\\';
            out[len++] = 'x';
            out[len++] = hex[c >> 4];
            out[len++] = hex[c & 15];
        }
    }
    out[len] = '\0';
    return out;
}

/* A JSON string: control characters as \u00NN, and a byte that starts no
 * valid UTF-8 sequence as the text \\xNN, so the line stays valid JSON
 * whatever bytes a value holds. */
static void sb_json_str(sbuf_t *sb, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    sb_putc(sb, '"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        /* Room is kept to close the string and the line, so a value cut at
         * the end of the buffer still leaves valid JSON. */
        if (sb->len + SB_CLOSE_ROOM >= sb->cap) {
            sb_puts(sb, "...");
            break;
        }
        if (c == '"' || c == '\\') {
            sb_putc(sb, '\\');
            sb_putc(sb, (char)c);
        } else if (c == '\n') {
            sb_puts(sb, "\\n");
        } else if (c == '\t') {
            sb_puts(sb, "\\t");
        } else if (c < 0x20 || c == 0x7f) {
            sb_puts(sb, "\\u00");
            sb_putc(sb, hex[c >> 4]);
            sb_putc(sb, hex[c & 15]);
        } else if (c < 0x80) {
            sb_putc(sb, (char)c);
        } else {
            size_t k = loom_utf8_seq(s + i, n - i);
            if (k == 0) {
                sb_puts(sb, "\\\\x");
                sb_putc(sb, hex[c >> 4]);
                sb_putc(sb, hex[c & 15]);
                continue;
            }
            sb_putn(sb, s + i, k);
            i += k - 1;
        }
    }
    sb_putc(sb, '"');
}

/* logfmt: bare when safe, otherwise quoted with escapes. */
static void sb_text_value(sbuf_t *sb, const char *s, size_t n)
{
    bool bare = n > 0;
    for (size_t i = 0; i < n && bare; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c <= ' ' || c >= 0x7f || c == '"' || c == '=' || c == '\\')
            bare = false;
    }
    if (bare)
        sb_putn(sb, s, n);
    else
        sb_json_str(sb, s, n);
}

/* True when s points at "key=" with key made of [a-z0-9_.]. */
static size_t key_len_at(const char *s)
{
    size_t i = 0;
    while (islower((unsigned char)s[i]) || isdigit((unsigned char)s[i]) || s[i] == '_' ||
           s[i] == '.')
        i++;
    return (i > 0 && s[i] == '=') ? i : 0;
}

static void add_field(sbuf_t *sb, loom_log_format_t format, const char *k, size_t kn, const char *v,
                      size_t vn)
{
    if (format == LOOM_LOG_JSON) {
        sb_putc(sb, ',');
        sb_json_str(sb, k, kn);
        sb_putc(sb, ':');
        sb_json_str(sb, v, vn);
    } else {
        sb_putc(sb, ' ');
        sb_putn(sb, k, kn);
        sb_putc(sb, '=');
        sb_text_value(sb, v, vn);
    }
}

int loom_log_format_line(char *buf, size_t size, loom_log_format_t format, loom_log_level_t level,
                         const char *msg, const char *fields)
{
    sbuf_t sb = {buf, 0, size};
    char ts[40];
    loom_rfc3339_format(loom_now_us(), ts, sizeof(ts));
    if (size == 0)
        return 0;
    buf[0] = '\0';
    if (format == LOOM_LOG_JSON) {
        sb_puts(&sb, "{\"ts\":\"");
        sb_puts(&sb, ts);
        sb_puts(&sb, "\",\"level\":\"");
        sb_puts(&sb, loom_log_level_name(level));
        sb_puts(&sb, "\"");
        if (log_node[0])
            add_field(&sb, format, "node", 4, log_node, strlen(log_node));
        add_field(&sb, format, "msg", 3, msg, strlen(msg));
    } else {
        sb_puts(&sb, "ts=");
        sb_puts(&sb, ts);
        sb_puts(&sb, " level=");
        sb_puts(&sb, loom_log_level_name(level));
        if (log_node[0])
            add_field(&sb, format, "node", 4, log_node, strlen(log_node));
        add_field(&sb, format, "msg", 3, msg, strlen(msg));
    }
    /* Split "k1=v1 k2=v two k3=v3" into pairs. */
    const char *p = fields ? fields : "";
    while (*p == ' ')
        p++;
    while (*p && sb.len + 2 * SB_CLOSE_ROOM < size) {
        size_t kn = key_len_at(p);
        if (kn == 0) { /* not a key=value field: keep it as free text */
            add_field(&sb, format, "detail", 6, p, strlen(p));
            break;
        }
        const char *v = p + kn + 1;
        const char *end = v;
        while (*end) {
            if (*end == ' ' && key_len_at(end + 1) > 0)
                break;
            end++;
        }
        add_field(&sb, format, p, kn, v, (size_t)(end - v));
        p = *end ? end + 1 : end;
    }
    if (format == LOOM_LOG_JSON)
        sb_putc(&sb, '}');
    return (int)sb.len;
}

void loom_log_emit(loom_log_level_t level, const char *msg, const char *fields_fmt, ...)
{
    char fields[LOG_LINE_MAX / 2];
    char line[LOG_LINE_MAX];
    va_list ap;
    va_start(ap, fields_fmt);
    vsnprintf(fields, sizeof(fields), fields_fmt, ap);
    va_end(ap);

    pthread_mutex_lock(&log_mu);
    int n = loom_log_format_line(line, sizeof(line) - 1, log_format, level, msg, fields);
    line[n++] = '\n';
    FILE *out = log_stream ? log_stream : stderr;
    fwrite(line, 1, (size_t)n, out);
    fflush(out);
    pthread_mutex_unlock(&log_mu);
}
