/*
 * uuid.c: UUIDv7 generation (RFC 9562, method 1: a 12-bit counter in rand_a
 * keeps ids strictly increasing within a millisecond in this process).
 */
#include "loom/uuid.h"
#include "loom/clock.h"
#include "loom/error.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

void loom_random_bytes(void *buf, size_t len)
{
    unsigned char *p = buf;
    while (len > 0) {
        ssize_t n = getrandom(p, len, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            abort(); /* no entropy source: nothing sane to do */
        }
        p += n;
        len -= (size_t)n;
    }
}

static pthread_mutex_t v7_mu = PTHREAD_MUTEX_INITIALIZER;
static uint64_t v7_last_ms;
static uint16_t v7_counter;

void loom_uuid_v7(loom_uuid_t *out)
{
    uint8_t rnd[10];
    loom_random_bytes(rnd, sizeof(rnd));

    pthread_mutex_lock(&v7_mu);
    uint64_t ms = (uint64_t)loom_now_ms();
    if (ms > v7_last_ms) {
        v7_last_ms = ms;
        v7_counter = (uint16_t)(((rnd[0] << 8) | rnd[1]) & 0x01ff); /* leave room to count */
    } else {
        /* Same millisecond or clock stepped back: count on from the last id. */
        ms = v7_last_ms;
        if (++v7_counter > 0x0fff) {
            v7_last_ms = ++ms; /* counter exhausted: borrow the next millisecond */
            v7_counter = 0;
        }
    }
    uint16_t counter = v7_counter;
    pthread_mutex_unlock(&v7_mu);

    out->b[0] = (uint8_t)(ms >> 40);
    out->b[1] = (uint8_t)(ms >> 32);
    out->b[2] = (uint8_t)(ms >> 24);
    out->b[3] = (uint8_t)(ms >> 16);
    out->b[4] = (uint8_t)(ms >> 8);
    out->b[5] = (uint8_t)ms;
    out->b[6] = (uint8_t)(0x70 | ((counter >> 8) & 0x0f));
    out->b[7] = (uint8_t)(counter & 0xff);
    memcpy(&out->b[8], &rnd[2], 8);
    out->b[8] = (uint8_t)(0x80 | (out->b[8] & 0x3f));
}

void loom_uuid_v4(loom_uuid_t *out)
{
    loom_random_bytes(out->b, sizeof(out->b));
    out->b[6] = (uint8_t)(0x40 | (out->b[6] & 0x0f));
    out->b[8] = (uint8_t)(0x80 | (out->b[8] & 0x3f));
}

void loom_uuid_format(const loom_uuid_t *u, char out[LOOM_UUID_STRLEN + 1])
{
    static const char hex[] = "0123456789abcdef";
    char *p = out;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            *p++ = '-';
        *p++ = hex[u->b[i] >> 4];
        *p++ = hex[u->b[i] & 15];
    }
    *p = '\0';
}

void loom_uuid_v7_string(char out[LOOM_UUID_STRLEN + 1])
{
    loom_uuid_t u;
    loom_uuid_v7(&u);
    loom_uuid_format(&u, out);
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int loom_uuid_parse(const char *s, loom_uuid_t *out)
{
    if (!s || strlen(s) != LOOM_UUID_STRLEN)
        return LOOM_EINVAL;
    int j = 0;
    for (int i = 0; i < LOOM_UUID_STRLEN;) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (s[i] != '-')
                return LOOM_EINVAL;
            i++;
            continue;
        }
        int hi = hexval(s[i]), lo = hexval(s[i + 1]);
        if (hi < 0 || lo < 0)
            return LOOM_EINVAL;
        if (out)
            out->b[j] = (uint8_t)(hi << 4 | lo);
        j++;
        i += 2;
    }
    return 0;
}

bool loom_uuid_is_valid(const char *s)
{
    return loom_uuid_parse(s, NULL) == 0;
}

int loom_uuid_version(const loom_uuid_t *u)
{
    return u->b[6] >> 4;
}

uint64_t loom_uuid_v7_ms(const loom_uuid_t *u)
{
    uint64_t ms = 0;
    for (int i = 0; i < 6; i++)
        ms = ms << 8 | u->b[i];
    return ms;
}
