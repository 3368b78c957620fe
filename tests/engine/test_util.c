/* UUIDv7, arena, durations, RFC 3339, backoff and SHA-256. */
#include "loom/arena.h"
#include "loom/clock.h"
#include "loom/error.h"
#include "loom/sha256.h"
#include "loom/uuid.h"

#include <criterion/criterion.h>
#include <pthread.h>
#include <stdalign.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

Test(uuid, v7_has_version_variant_and_current_time)
{
    loom_uuid_t u;
    int64_t before = loom_now_ms();
    loom_uuid_v7(&u);
    int64_t after = loom_now_ms();
    cr_assert_eq(loom_uuid_version(&u), 7);
    cr_assert_eq(u.b[8] & 0xc0, 0x80, "RFC 9562 variant");
    cr_assert_geq((int64_t)loom_uuid_v7_ms(&u), before);
    cr_assert_leq((int64_t)loom_uuid_v7_ms(&u), after + 1);
}

Test(uuid, v7_strictly_increases_within_a_thread)
{
    char prev[37], cur[37];
    loom_uuid_v7_string(prev);
    for (int i = 0; i < 100000; i++) {
        loom_uuid_v7_string(cur);
        cr_assert_gt(strcmp(cur, prev), 0, "%s after %s", cur, prev);
        memcpy(prev, cur, sizeof(cur));
    }
}

/* The child of a fork must not repeat the ids its parent makes next (each
 * thread keeps a buffer of random bytes, which fork copies). */
Test(uuid, v7_differs_between_parent_and_forked_child)
{
    char first[37];
    loom_uuid_v7_string(first); /* fills this thread's buffer before the fork */
    int fds[2];
    cr_assert_eq(pipe(fds), 0);
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        char ids[50][37];
        for (int i = 0; i < 50; i++)
            loom_uuid_v7_string(ids[i]);
        ssize_t n = write(fds[1], ids, sizeof(ids));
        _exit(n == (ssize_t)sizeof(ids) ? 0 : 1);
    }
    char mine[50][37], theirs[50][37];
    for (int i = 0; i < 50; i++)
        loom_uuid_v7_string(mine[i]);
    size_t got = 0;
    while (got < sizeof(theirs)) {
        ssize_t n = read(fds[0], (char *)theirs + got, sizeof(theirs) - got);
        cr_assert_gt(n, 0, "the child wrote no ids");
        got += (size_t)n;
    }
    int status;
    waitpid(pid, &status, 0);
    close(fds[0]);
    close(fds[1]);
    for (int i = 0; i < 50; i++)
        for (int j = 0; j < 50; j++)
            cr_assert_neq(memcmp(mine[i] + 19, theirs[j] + 19, 17), 0,
                          "parent and child share random bits: %s and %s", mine[i], theirs[j]);
}

static void *make_ids(void *arg)
{
    char(*ids)[37] = arg;
    for (int i = 0; i < 20000; i++)
        loom_uuid_v7_string(ids[i]);
    return NULL;
}

static int cmp_ids(const void *a, const void *b)
{
    return strcmp(a, b);
}

Test(uuid, v7_is_unique_across_threads)
{
    static char ids[4 * 20000][37];
    pthread_t t[4];
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, make_ids, ids[i * 20000]);
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    qsort(ids, 4 * 20000, 37, cmp_ids);
    for (int i = 1; i < 4 * 20000; i++)
        cr_assert_neq(strcmp(ids[i - 1], ids[i]), 0, "duplicate %s", ids[i]);
}

Test(uuid, format_and_parse_round_trip)
{
    loom_uuid_t u, v;
    char s[37];
    loom_uuid_v4(&u);
    cr_assert_eq(loom_uuid_version(&u), 4);
    loom_uuid_format(&u, s);
    cr_assert_eq(strlen(s), 36);
    cr_assert_eq(loom_uuid_parse(s, &v), 0);
    cr_assert_eq(memcmp(&u, &v, sizeof(u)), 0);
    cr_assert(loom_uuid_is_valid("0191B2C4-7E1F-7A3B-9C1D-2E3F4A5B6C7D"));
    cr_assert_not(loom_uuid_is_valid("0191b2c4-7e1f-7a3b-9c1d-2e3f4a5b6c7"));
    cr_assert_not(loom_uuid_is_valid("0191b2c4x7e1f-7a3b-9c1d-2e3f4a5b6c7d"));
    cr_assert_not(loom_uuid_is_valid("0191b2c4-7e1f-7a3b-9c1d-2e3f4a5b6c7g"));
    cr_assert_not(loom_uuid_is_valid(""));
}

Test(arena, allocations_are_aligned_and_survive_until_reset)
{
    loom_arena_t a;
    loom_arena_init(&a, 256);
    char *ptrs[100];
    for (int i = 0; i < 100; i++) {
        ptrs[i] = loom_arena_sprintf(&a, "item-%d", i);
        void *p = loom_arena_alloc(&a, (size_t)(i % 13) + 1);
        cr_assert_eq((uintptr_t)p % alignof(max_align_t), 0);
    }
    for (int i = 0; i < 100; i++) {
        char want[16];
        snprintf(want, sizeof(want), "item-%d", i);
        cr_assert_str_eq(ptrs[i], want);
    }
    /* Larger than a chunk: its own chunk, the rest keeps working. */
    char *big = loom_arena_alloc(&a, 100000);
    memset(big, 7, 100000);
    char *after = loom_arena_strdup(&a, "after");
    cr_assert_str_eq(after, "after");
    cr_assert_str_eq(loom_arena_strndup(&a, "abcdef", 3), "abc");
    int *z = loom_arena_calloc(&a, 10, sizeof(int));
    for (int i = 0; i < 10; i++)
        cr_assert_eq(z[i], 0);
    cr_assert_gt(a.used_total, 100000);
    loom_arena_reset(&a);
    cr_assert_eq(a.used_total, 0);
    cr_assert_str_eq(loom_arena_strdup(&a, "again"), "again");
    loom_arena_release(&a);
}

Test(clock, durations_parse)
{
    struct {
        const char *s;
        int64_t ms;
    } good[] = {{"0", 0},           {"250ms", 250},      {"5s", 5000},
                {"1h30m", 5400000}, {"168h", 604800000}, {"2d", 172800000},
                {"1500us", -1}};
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        int64_t ms = 0;
        int rc = loom_duration_parse_ms(good[i].s, &ms);
        if (good[i].ms < 0) {
            cr_assert_neq(rc, 0, "%s has a sub-millisecond part", good[i].s);
            continue;
        }
        cr_assert_eq(rc, 0, "%s", good[i].s);
        cr_assert_eq(ms, good[i].ms, "%s", good[i].s);
    }
    const char *bad[] = {"",    "5", "s", "5 s", "-5s", "5x", "1h-5m", "99999999999999999999h",
                         "5sec"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        int64_t ms;
        cr_assert_neq(loom_duration_parse_ms(bad[i], &ms), 0, "%s parsed", bad[i]);
    }
    char buf[32];
    loom_duration_format(5400250, buf, sizeof(buf));
    cr_assert_str_eq(buf, "1h30m250ms");
    loom_duration_format(0, buf, sizeof(buf));
    cr_assert_str_eq(buf, "0s");
}

Test(clock, rfc3339)
{
    char buf[40];
    loom_rfc3339_format(1700000000123456LL, buf, sizeof(buf));
    cr_assert_str_eq(buf, "2023-11-14T22:13:20.123456Z");
    loom_rfc3339_format_seconds(1700000000LL, buf, sizeof(buf));
    cr_assert_str_eq(buf, "2023-11-14T22:13:20Z");
    /* The second's text is cached per thread: same second, next second,
     * back again, before 1970 and a buffer too small for the fast path. */
    loom_rfc3339_format(1700000000000007LL, buf, sizeof(buf));
    cr_assert_str_eq(buf, "2023-11-14T22:13:20.000007Z");
    loom_rfc3339_format(1700000001999999LL, buf, sizeof(buf));
    cr_assert_str_eq(buf, "2023-11-14T22:13:21.999999Z");
    loom_rfc3339_format(1700000000123456LL, buf, sizeof(buf));
    cr_assert_str_eq(buf, "2023-11-14T22:13:20.123456Z");
    loom_rfc3339_format(-1LL, buf, sizeof(buf));
    cr_assert_str_eq(buf, "1969-12-31T23:59:59.999999Z");
    char small[12];
    loom_rfc3339_format(1700000000123456LL, small, sizeof(small));
    cr_assert_str_eq(small, "2023-11-14T");
}

Test(clock, backoff_grows_with_jitter_and_stays_capped)
{
    for (int attempt = 0; attempt < 40; attempt++) {
        for (int k = 0; k < 50; k++) {
            int64_t d = loom_backoff_ms(attempt, 10, 1000);
            int64_t ceiling = attempt >= 7 ? 1000 : 10LL << attempt;
            if (ceiling > 1000)
                ceiling = 1000;
            cr_assert_geq(d, ceiling / 2, "attempt %d: %lld", attempt, (long long)d);
            cr_assert_leq(d, ceiling, "attempt %d: %lld", attempt, (long long)d);
        }
    }
}

/* Brackets loom_mono_fast_ns() between two loom_mono_ns() reads, about every
 * 2 ms for 0.6 s (so it calibrates and re-anchors several times). A slow or
 * preempted thread only widens the bracket; the slack is the drift allowed. */
static void *fast_clock_checks(void *arg)
{
    int *bad = arg;
    const int64_t slack = 200000; /* 200 us */
    int64_t prev = 0, end = loom_mono_ns() + 600000000;
    while (loom_mono_ns() < end) {
        for (int i = 0; i < 1000; i++) {
            int64_t a = loom_mono_ns();
            int64_t f = loom_mono_fast_ns();
            int64_t b = loom_mono_ns();
            if (f < a - slack || f > b + slack || f < prev)
                (*bad)++;
            prev = f;
        }
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

Test(clock, fast_monotonic_clock_stays_with_the_system_clock)
{
    pthread_t th[4];
    int bad[4] = {0};
    for (int i = 0; i < 4; i++)
        cr_assert_eq(pthread_create(&th[i], NULL, fast_clock_checks, &bad[i]), 0);
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        cr_expect_eq(bad[i], 0, "thread %d: %d reads outside the system clock's bracket", i,
                     bad[i]);
    }
}

Test(sha256, known_vectors)
{
    char hex[65];
    loom_sha256_hex("", 0, hex);
    cr_assert_str_eq(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    loom_sha256_hex("abc", 3, hex);
    cr_assert_str_eq(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    const char *two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    loom_sha256_hex(two, strlen(two), hex);
    cr_assert_str_eq(hex, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    loom_sha256_t ctx;
    uint8_t d[32];
    loom_sha256_init(&ctx);
    char block[1000];
    memset(block, 'a', sizeof(block));
    for (int i = 0; i < 1000; i++)
        loom_sha256_update(&ctx, block, sizeof(block));
    loom_sha256_final(&ctx, d);
    cr_assert_eq(d[0], 0xcd);
    cr_assert_eq(d[1], 0xc7);
    cr_assert_eq(d[31], 0xd0); /* cdc76e5c...2c3e046d0 for a million 'a' */
}

Test(sha256, libcrypto_one_shot_and_constant_time_equal)
{
    uint8_t a[LOOM_SHA256_LEN], b[LOOM_SHA256_LEN], c[LOOM_SHA256_LEN];
    unsigned n = 0;
    loom_sha256("token", 5, a);
    cr_assert_eq(EVP_Digest("token", 5, b, &n, EVP_sha256(), NULL), 1);
    cr_assert_eq(n, LOOM_SHA256_LEN);
    cr_assert(loom_sha256_equal(a, b));
    loom_sha256("tokem", 5, c);
    cr_assert_not(loom_sha256_equal(a, c));
    c[0] = a[0];
    memcpy(c, a, LOOM_SHA256_LEN - 1); /* equal but for the last byte */
    cr_assert_not(loom_sha256_equal(a, c));
}
