/*
 * SHA-256 (FIPS 180-4), used for migration checksums and API token hashes.
 */
#ifndef LOOM_SHA256_H
#define LOOM_SHA256_H

#include <stddef.h>
#include <stdint.h>

#define LOOM_SHA256_LEN 32

typedef struct loom_sha256 {
    uint32_t state[8];
    uint64_t length; /* bytes processed */
    uint8_t buf[64];
    size_t buflen;
} loom_sha256_t;

void loom_sha256_init(loom_sha256_t *ctx);
void loom_sha256_update(loom_sha256_t *ctx, const void *data, size_t len);
void loom_sha256_final(loom_sha256_t *ctx, uint8_t out[LOOM_SHA256_LEN]);
/* One-shot hash as 64 lower-case hex characters plus NUL. */
void loom_sha256_hex(const void *data, size_t len, char out[2 * LOOM_SHA256_LEN + 1]);

#endif
