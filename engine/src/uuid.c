/*
 * uuid.c: UUIDv7 generation (RFC 9562, method 1: a 12-bit counter in rand_a
 * keeps ids strictly increasing within a millisecond in each thread).
 */
#include "loom/uuid.h"
#include "loom/clock.h"
#include "loom/error.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
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

/*
 * Each thread keeps its own state, so making an id takes no lock and, most
 * of the time, no system call:
 *   - the last millisecond and counter: ids strictly increase within the
 *     thread (ids of different threads in the same millisecond differ in
 *     their random bits, and their counters start at random values);
 *   - a buffer of bytes from getrandom (cryptographic, like one getrandom per
 *     id was), refilled when used up: ids stay unpredictable to a client
 *     that sees some of them.
 * A forked child must not repeat its parent's bytes: fork bumps a generation
 * and a thread whose state is of an older generation starts afresh.
 */
#define V7_POOL 640 /* 64 ids per getrandom */

typedef struct v7_state {
    unsigned generation;
    uint64_t last_ms;
    uint16_t counter;
    size_t used; /* bytes of pool consumed */
    uint8_t pool[V7_POOL];
} v7_state_t;

static _Atomic unsigned v7_generation = 1;
static pthread_once_t v7_once = PTHREAD_ONCE_INIT;
static __thread v7_state_t v7;

static void v7_after_fork(void)
{
    atomic_fetch_add(&v7_generation, 1);
}

static void v7_register_fork(void)
{
    pthread_atfork(NULL, NULL, v7_after_fork);
}

static const uint8_t *v7_random(size_t n)
{
    if (v7.used + n > V7_POOL) {
        loom_random_bytes(v7.pool, V7_POOL);
        v7.used = 0;
    }
    const uint8_t *p = v7.pool + v7.used;
    v7.used += n;
    return p;
}

void loom_uuid_v7(loom_uuid_t *out)
{
    unsigned gen = atomic_load_explicit(&v7_generation, memory_order_relaxed);
    if (v7.generation != gen) {
        pthread_once(&v7_once, v7_register_fork);
        gen = atomic_load_explicit(&v7_generation, memory_order_relaxed);
        v7.generation = gen;
        v7.last_ms = 0;
        v7.used = V7_POOL; /* refill before the first use */
    }
    const uint8_t *rnd = v7_random(10);

    uint64_t ms = (uint64_t)loom_now_ms();
    if (ms > v7.last_ms) {
        v7.last_ms = ms;
        v7.counter = (uint16_t)(((rnd[0] << 8) | rnd[1]) & 0x01ff); /* leave room to count */
    } else {
        /* Same millisecond or clock stepped back: count on from the last id. */
        ms = v7.last_ms;
        if (++v7.counter > 0x0fff) {
            v7.last_ms = ++ms; /* counter exhausted: borrow the next millisecond */
            v7.counter = 0;
        }
    }
    uint16_t counter = v7.counter;

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
