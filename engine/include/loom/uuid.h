/*
 * UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then random bits, so ids sort
 * by creation time and index well. Within one thread ids are strictly
 * increasing: the 12-bit rand_a field counts within a millisecond. Ids of
 * different threads and processes differ in 62 random bits (from getrandom).
 */
#ifndef LOOM_UUID_H
#define LOOM_UUID_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define LOOM_UUID_STRLEN 36

typedef struct loom_uuid {
    uint8_t b[16];
} loom_uuid_t;

/* Thread-safe, lock-free; safe across fork. */
void loom_uuid_v7(loom_uuid_t *out);
/* Random (version 4) UUID. */
void loom_uuid_v4(loom_uuid_t *out);
/* Writes the canonical lower-case 36-char form plus NUL into out[37]. */
void loom_uuid_format(const loom_uuid_t *u, char out[LOOM_UUID_STRLEN + 1]);
/* Convenience: a new v7 id, formatted. */
void loom_uuid_v7_string(char out[LOOM_UUID_STRLEN + 1]);
/* Parses the canonical form (either case); returns 0 or LOOM_EINVAL. */
int loom_uuid_parse(const char *s, loom_uuid_t *out);
bool loom_uuid_is_valid(const char *s);
/* Version nibble (7 for v7) and the Unix-ms timestamp of a v7 id. */
int loom_uuid_version(const loom_uuid_t *u);
uint64_t loom_uuid_v7_ms(const loom_uuid_t *u);
/* Fills buf with cryptographically random bytes (getrandom). */
void loom_random_bytes(void *buf, size_t len);

#endif
