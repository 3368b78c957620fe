/*
 * SHA-256 for migration checksums, API token hashes and Idempotency-Key
 * ids: thin wrappers over OpenSSL's libcrypto (EVP), so Loom carries no
 * hand-written hash. loom_sha256_equal compares digests in constant time.
 */
#ifndef LOOM_SHA256_H
#define LOOM_SHA256_H

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#define LOOM_SHA256_LEN 32

/* An incremental hash: init, update..., final (which releases it). */
typedef struct loom_sha256 {
    EVP_MD_CTX *md;
} loom_sha256_t;

static inline void loom_sha256_init(loom_sha256_t *ctx)
{
    ctx->md = EVP_MD_CTX_new();
    if (!ctx->md || EVP_DigestInit_ex(ctx->md, EVP_sha256(), NULL) != 1)
        abort(); /* only when out of memory */
}

static inline void loom_sha256_update(loom_sha256_t *ctx, const void *data, size_t len)
{
    if (len && EVP_DigestUpdate(ctx->md, data, len) != 1)
        abort();
}

static inline void loom_sha256_final(loom_sha256_t *ctx, uint8_t out[LOOM_SHA256_LEN])
{
    unsigned n = 0;
    if (EVP_DigestFinal_ex(ctx->md, out, &n) != 1 || n != LOOM_SHA256_LEN)
        abort();
    EVP_MD_CTX_free(ctx->md);
    ctx->md = NULL;
}

/* One-shot digest. */
static inline void loom_sha256(const void *data, size_t len, uint8_t out[LOOM_SHA256_LEN])
{
    unsigned n = 0;
    if (EVP_Digest(data, len, out, &n, EVP_sha256(), NULL) != 1 || n != LOOM_SHA256_LEN)
        abort();
}

/* One-shot hash as 64 lower-case hex characters plus NUL. */
static inline void loom_sha256_hex(const void *data, size_t len, char out[2 * LOOM_SHA256_LEN + 1])
{
    static const char hex[] = "0123456789abcdef";
    uint8_t d[LOOM_SHA256_LEN];
    loom_sha256(data, len, d);
    for (size_t i = 0; i < LOOM_SHA256_LEN; i++) {
        out[2 * i] = hex[d[i] >> 4];
        out[2 * i + 1] = hex[d[i] & 15];
    }
    out[2 * LOOM_SHA256_LEN] = '\0';
}

/* True when two digests are equal; takes the same time whatever they hold
 * (CRYPTO_memcmp), so a token lookup leaks nothing through timing. */
static inline bool loom_sha256_equal(const uint8_t a[LOOM_SHA256_LEN],
                                     const uint8_t b[LOOM_SHA256_LEN])
{
    return CRYPTO_memcmp(a, b, LOOM_SHA256_LEN) == 0;
}

#endif
