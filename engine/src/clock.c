/*
 * clock.c: clocks, durations, RFC 3339 and backoff.
 */
#include "loom/clock.h"
#include "loom/error.h"
#include "loom/uuid.h"

#include <ctype.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

int64_t loom_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int64_t loom_now_ms(void)
{
    return loom_now_us() / 1000;
}

int64_t loom_mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int64_t loom_mono_ms(void)
{
    return loom_mono_ns() / 1000000;
}

#if defined(__x86_64__)
#include <pthread.h>
#include <x86intrin.h>

/* The counter is trusted only where the kernel trusts it: its clock source is
 * the TSC (it checked that the counter is invariant and in step across CPUs,
 * and would have switched away otherwise). */
static bool tsc_usable;
static pthread_once_t tsc_once = PTHREAD_ONCE_INIT;

static void tsc_check(void)
{
    FILE *f = fopen("/sys/devices/system/clocksource/clocksource0/current_clocksource", "r");
    if (!f)
        return;
    char name[32] = "";
    if (fgets(name, sizeof(name), f))
        tsc_usable = strcmp(name, "tsc\n") == 0;
    fclose(f);
}

#define ANCHOR_NS    100000000 /* re-anchor to the system clock this often */
#define CALIBRATE_NS 5000000   /* first scale: over at least this long */

/* Per thread, so the hot path takes no lock and shares no cache line. */
static __thread struct {
    uint64_t tsc0;  /* counter at the anchor */
    int64_t ns0;    /* loom_mono_ns() at the anchor */
    uint64_t span;  /* ticks after which to re-anchor (0: not calibrated yet) */
    uint64_t mult;  /* nanoseconds per tick << 32 */
    uint64_t width; /* ticks the anchor's clock_gettime() took */
    uint64_t best;  /* fewest ticks a clock_gettime() took on this thread */
    int64_t last;   /* last value returned: never go back */
} fc;

/* A system clock read that took width ticks was not preempted: it was not
 * much slower than the fastest read seen on this thread. */
static bool width_good(uint64_t width)
{
    return width <= 2 * fc.best + 64;
}

/* Reads the counter on both sides of loom_mono_ns(); the pair is good when
 * the read was not preempted (width_good). */
static bool anchor_read(uint64_t *tsc, int64_t *ns, uint64_t *width)
{
    uint64_t t1 = __rdtsc();
    *ns = loom_mono_ns();
    uint64_t t2 = __rdtsc();
    *width = t2 - t1;
    if (!fc.best || *width < fc.best)
        fc.best = *width;
    *tsc = t1 + *width / 2;
    return t2 >= t1 && width_good(*width);
}

/* Not calibrated yet, or due to re-anchor: read the system clock, and take the
 * read as the new anchor (with a new scale from the span since the old one)
 * when neither read was preempted. */
static int64_t fast_slow_path(void)
{
    uint64_t tsc, width;
    int64_t ns;
    if (!anchor_read(&tsc, &ns, &width))
        return ns; /* try again on the next call */
    bool old_good = fc.ns0 && width_good(fc.width);
    if (old_good && ns - fc.ns0 >= CALIBRATE_NS && tsc > fc.tsc0) {
        fc.mult = (uint64_t)(((unsigned __int128)(ns - fc.ns0) << 32) / (tsc - fc.tsc0));
        fc.span = fc.mult ? (uint64_t)(((unsigned __int128)ANCHOR_NS << 32) / fc.mult) : 0;
    } else if (old_good && !fc.span) {
        return ns; /* calibrating: keep the first anchor until the span is long enough */
    }
    fc.tsc0 = tsc, fc.ns0 = ns, fc.width = width;
    return ns;
}

int64_t loom_mono_fast_ns(void)
{
    pthread_once(&tsc_once, tsc_check);
    if (!tsc_usable)
        return loom_mono_ns();
    uint64_t d = __rdtsc() - fc.tsc0;
    int64_t ns;
    if (fc.span && d < fc.span)
        ns = fc.ns0 + (int64_t)(((unsigned __int128)d * fc.mult) >> 32);
    else
        ns = fast_slow_path();
    if (ns < fc.last)
        ns = fc.last;
    fc.last = ns;
    return ns;
}
#else
int64_t loom_mono_fast_ns(void)
{
    return loom_mono_ns();
}
#endif

static const struct {
    const char *unit;
    int64_t ns;
} units[] = {
    /* longest first so "ms" is not read as "m" */
    {"ns", 1},
    {"us", 1000},
    {"ms", 1000000},
    {"s", 1000000000LL},
    {"m", 60LL * 1000000000LL},
    {"h", 3600LL * 1000000000LL},
    {"d", 86400LL * 1000000000LL},
};

int loom_duration_parse_ms(const char *s, int64_t *out_ms)
{
    if (!s || !*s)
        return LOOM_EINVAL;
    if (strcmp(s, "0") == 0) {
        *out_ms = 0;
        return 0;
    }
    __int128 total_ns = 0;
    const char *p = s;
    while (*p) {
        if (!isdigit((unsigned char)*p))
            return LOOM_EINVAL;
        __int128 n = 0;
        while (isdigit((unsigned char)*p)) {
            n = n * 10 + (*p - '0');
            if (n > (__int128)INT64_MAX)
                return LOOM_EINVAL;
            p++;
        }
        size_t best = 0;
        int64_t mult = 0;
        for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
            size_t ul = strlen(units[i].unit);
            if (ul > best && strncmp(p, units[i].unit, ul) == 0 && !isalpha((unsigned char)p[ul])) {
                best = ul;
                mult = units[i].ns;
            }
        }
        if (best == 0)
            return LOOM_EINVAL;
        p += best;
        total_ns += n * mult;
        if (total_ns > (__int128)INT64_MAX * 1000000)
            return LOOM_EINVAL;
    }
    if (total_ns % 1000000 != 0)
        return LOOM_EINVAL;
    *out_ms = (int64_t)(total_ns / 1000000);
    return 0;
}

void loom_duration_format(int64_t ms, char *buf, size_t size)
{
    if (ms == 0) {
        snprintf(buf, size, "0s");
        return;
    }
    int64_t h = ms / 3600000, m = ms / 60000 % 60, s = ms / 1000 % 60, r = ms % 1000;
    size_t off = 0;
    buf[0] = '\0';
#define PUT(fmt, v)                                                                     \
    do {                                                                                \
        int n_ = snprintf(buf + off, off < size ? size - off : 0, fmt, (long long)(v)); \
        if (n_ > 0)                                                                     \
            off += (size_t)n_;                                                          \
    } while (0)
    if (h)
        PUT("%lldh", h);
    if (m)
        PUT("%lldm", m);
    if (s)
        PUT("%llds", s);
    if (r)
        PUT("%lldms", r);
#undef PUT
}

void loom_rfc3339_format(int64_t unix_us, char *buf, size_t size)
{
    time_t secs = (time_t)(unix_us / 1000000);
    int64_t frac = unix_us % 1000000;
    if (frac < 0) {
        frac += 1000000;
        secs -= 1;
    }
    /* Every envelope carries the time: each thread keeps the text of the
     * last second it formatted ("YYYY-MM-DDTHH:MM:SS.", 20 bytes) and writes
     * only the microseconds by hand while the second lasts. */
    static __thread time_t cached_secs = -1;
    static __thread char cached[32];
    static __thread int cached_len;
    if (secs != cached_secs) {
        struct tm tm;
        gmtime_r(&secs, &tm);
        int n =
            snprintf(cached, sizeof(cached), "%04d-%02d-%02dT%02d:%02d:%02d.", tm.tm_year + 1900,
                     tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
        cached_len = n > 0 && n < (int)sizeof(cached) ? n : 0;
        cached_secs = cached_len ? secs : -1;
    }
    if (!cached_len || size < (size_t)cached_len + 8) {
        struct tm tm;
        gmtime_r(&secs, &tm);
        snprintf(buf, size, "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ", tm.tm_year + 1900, tm.tm_mon + 1,
                 tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)frac);
        return;
    }
    memcpy(buf, cached, (size_t)cached_len);
    char *p = buf + cached_len;
    for (int i = 5; i >= 0; i--) {
        p[i] = (char)('0' + frac % 10);
        frac /= 10;
    }
    p[6] = 'Z';
    p[7] = '\0';
}

void loom_rfc3339_format_seconds(int64_t unix_s, char *buf, size_t size)
{
    time_t secs = (time_t)unix_s;
    struct tm tm;
    gmtime_r(&secs, &tm);
    snprintf(buf, size, "%04d-%02d-%02dT%02d:%02d:%02dZ", tm.tm_year + 1900, tm.tm_mon + 1,
             tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
}

void loom_sleep_ms(int64_t ms)
{
    if (ms <= 0)
        return;
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

int64_t loom_backoff_ms(int attempt, int64_t base_ms, int64_t cap_ms)
{
    if (base_ms < 1)
        base_ms = 1;
    if (cap_ms < base_ms)
        cap_ms = base_ms;
    int64_t ceiling = base_ms;
    for (int i = 0; i < attempt && ceiling < cap_ms; i++)
        ceiling *= 2;
    if (ceiling > cap_ms)
        ceiling = cap_ms;
    int64_t floor_ms = ceiling / 2;
    uint64_t r;
    loom_random_bytes(&r, sizeof(r));
    return floor_ms + (int64_t)(r % (uint64_t)(ceiling - floor_ms + 1));
}

void loom_timespec_in(int64_t ms, struct timespec *ts)
{
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}
