/*
 * Levelled logging, one line per event, as logfmt text or as JSON.
 *
 *   LOOM_INFO("applied batch", "consumer=%s partition=%d offset=%lld", c, p, o);
 *
 * The first argument is the message (PostgreSQL style: lower case, no trailing
 * period); the optional second is a printf format of space-separated key=value
 * fields. A value runs until the next " key=" so it may contain spaces. The
 * macros skip all formatting below the configured level. Every line carries
 * ts, level, node (when set) and msg. Thread-safe; writes to stderr.
 */
#ifndef LOOM_LOG_H
#define LOOM_LOG_H

#include <stdio.h>
#include <stdbool.h>
#include <stddef.h>

typedef enum {
    LOOM_LOG_DEBUG = 0,
    LOOM_LOG_INFO = 1,
    LOOM_LOG_WARN = 2,
    LOOM_LOG_ERROR = 3,
    LOOM_LOG_OFF = 4,
} loom_log_level_t;

typedef enum {
    LOOM_LOG_TEXT = 0,
    LOOM_LOG_JSON = 1,
} loom_log_format_t;

/* Current threshold; read by the macros without a lock (set it at start). */
extern loom_log_level_t loom_log_level;

void loom_log_setup(loom_log_level_t level, loom_log_format_t format);
/* Node id added to every line; copied. NULL clears it. */
void loom_log_set_node(const char *node_id);
/* Redirects output (tests); NULL means stderr. The stream is borrowed. */
void loom_log_set_stream(FILE *stream);

/* Parses "debug|info|warn|error" / "text|json"; returns 0 or LOOM_EINVAL. */
int loom_log_level_parse(const char *s, loom_log_level_t *out);
int loom_log_format_parse(const char *s, loom_log_format_t *out);
const char *loom_log_level_name(loom_log_level_t level);

void loom_log_emit(loom_log_level_t level, const char *msg, const char *fields_fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Formats one line into buf (no newline) without writing it; for tests. */
int loom_log_format_line(char *buf, size_t size, loom_log_format_t format, loom_log_level_t level,
                         const char *msg, const char *fields);

/* Text from outside (Kafka headers and keys, request fields) is checked and
 * escaped with these before it is logged or stored as text. */
/* Length of the valid UTF-8 sequence at s (1 to 4 bytes), or 0 when the
 * bytes there are not one (a NUL byte counts as not one). */
size_t loom_utf8_seq(const char *s, size_t n);
/* True when s[0..n) is valid UTF-8 without a NUL byte. */
bool loom_text_valid(const void *s, size_t n);
/* s[0..n) as valid UTF-8 without NUL, a new string: a byte that starts no
 * valid sequence, or a NUL, becomes the four characters \xNN. Output stops
 * before max bytes (then ends in "..."); max 0 means no limit. */
char *loom_text_escape(const void *s, size_t n, size_t max);

#define LOOM_LOG(level, msg, ...)                          \
    do {                                                   \
        if ((level) >= loom_log_level)                     \
            loom_log_emit((level), (msg), "" __VA_ARGS__); \
    } while (0)

#define LOOM_DEBUG(msg, ...) LOOM_LOG(LOOM_LOG_DEBUG, msg, __VA_ARGS__)
#define LOOM_INFO(msg, ...)  LOOM_LOG(LOOM_LOG_INFO, msg, __VA_ARGS__)
#define LOOM_WARN(msg, ...)  LOOM_LOG(LOOM_LOG_WARN, msg, __VA_ARGS__)
#define LOOM_ERROR(msg, ...) LOOM_LOG(LOOM_LOG_ERROR, msg, __VA_ARGS__)

#endif
