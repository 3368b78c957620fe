/* The gateway's adaptive bound on ?wait requests (gateway_limit.c), driven
 * with made-up times: no clock, no sleeps. */
#include "../../engine/src/gateway_int.h"

#include <criterion/criterion.h>

#define MS 1000000LL

/* n requests end, spread over one window, each while `held` were held (0:
 * as many as the bound, a gateway that is full): the first n_slow took
 * slow_ms, the others held_ms. Returns the bound after the last. */
static int window_held(gw_wait_limit_t *l, int64_t *now, int n, int64_t held_ms, int n_slow,
                       int64_t slow_ms, int held)
{
    int limit = 0;
    for (int i = 0; i < n; i++) {
        *now += GW_WAIT_WINDOW_MS * MS / n + 1;
        int h = held > 0 ? held : atomic_load(&l->now);
        limit = gw_wait_limit_done(l, (i < n_slow ? slow_ms : held_ms) * MS, *now, h, h);
    }
    return limit;
}

static int window_mixed(gw_wait_limit_t *l, int64_t *now, int n, int64_t held_ms, int n_slow,
                        int64_t slow_ms)
{
    return window_held(l, now, n, held_ms, n_slow, slow_ms, 0);
}

/* n requests that each took held_ms end, spread over one window, the
 * gateway full. */
static int window(gw_wait_limit_t *l, int64_t *now, int n, int64_t held_ms)
{
    return window_mixed(l, now, n, held_ms, 0, 0);
}

Test(wait_limit, slow_waits_bring_the_bound_down_to_its_floor_and_fast_ones_back_up)
{
    gw_wait_limit_t l;
    gw_wait_limit_init(&l, 128, 16, 50);
    int64_t now = 1000 * MS;
    cr_assert_eq(window(&l, &now, 10, 20), 128, "fast waits keep the bound at its maximum");
    /* a window ends with the first request after it: the first slow window
     * closes the fast one */
    int last = window(&l, &now, 10, 200);
    for (int w = 0; w < 5; w++) {
        int b = window(&l, &now, 10, 200);
        cr_assert_lt(b, last, "window %d of slow waits: %d, before %d", w, b, last);
        last = b;
    }
    for (int w = 0; w < 100; w++)
        last = window(&l, &now, 10, 200);
    cr_assert_eq(last, 16, "slow waits stop at the floor, not at zero");
    cr_assert_eq(atomic_load(&l.now), 16, "admissions read the same bound");
    for (int w = 0; w < 100; w++)
        last = window(&l, &now, 10, 10);
    cr_assert_eq(last, 128, "fast waits bring it back to LOOM_API_MAX_WAITERS and no higher");
    gw_wait_limit_destroy(&l);
}

Test(wait_limit, settles_where_the_waits_meet_the_target)
{
    /* A gateway in front of workers that apply 1,000 commands a second,
     * offered more: a wait takes about bound / 1000 s (Little's law). */
    gw_wait_limit_t l;
    gw_wait_limit_init(&l, 1000, 16, 50);
    int64_t now = 1000 * MS;
    int b = 1000;
    int lo = 1000, hi = 0;
    for (int w = 0; w < 400; w++) {
        b = window(&l, &now, 20, b); /* held ms = bound / 1000 per ms */
        if (w >= 300) {
            lo = b < lo ? b : lo;
            hi = b > hi ? b : hi;
        }
    }
    cr_assert_geq(lo, 35, "the bound stays near 50 waits (lowest %d)", lo);
    cr_assert_leq(hi, 60, "the bound stays near 50 waits (highest %d)", hi);
    gw_wait_limit_destroy(&l);
}

Test(wait_limit, off_or_too_few_requests_leave_the_bound_alone)
{
    gw_wait_limit_t off;
    gw_wait_limit_init(&off, 128, 16, 0);
    int64_t now = 1000 * MS;
    for (int w = 0; w < 50; w++)
        cr_assert_eq(window(&off, &now, 10, 10000), 128);
    gw_wait_limit_destroy(&off);

    gw_wait_limit_t l;
    gw_wait_limit_init(&l, 128, 16, 50);
    now = 1000 * MS;
    /* three slow waits, however long apart: too few to judge by */
    cr_assert_eq(window(&l, &now, 1, 10000), 128);
    now += 10000 * MS;
    cr_assert_eq(window(&l, &now, 2, 10000), 128);
    /* a bound below the floor: the floor is the bound */
    gw_wait_limit_t small;
    gw_wait_limit_init(&small, 4, 16, 50);
    for (int w = 0; w < 20; w++)
        cr_assert_eq(window(&small, &now, 10, 10000), 4);
    gw_wait_limit_destroy(&small);
    gw_wait_limit_destroy(&l);
}

Test(wait_limit, one_slow_wait_in_ten_is_allowed_two_are_not)
{
    gw_wait_limit_t l;
    gw_wait_limit_init(&l, 128, 16, 50);
    int64_t now = 1000 * MS;
    int b = 128;
    for (int w = 0; w < 10; w++) /* 1 of 10 at 500 ms: the bound stays */
        b = window_mixed(&l, &now, 10, 10, 1, 500);
    cr_assert_eq(b, 128);
    for (int w = 0; w < 10; w++) /* 2 of 10: it comes down */
        b = window_mixed(&l, &now, 10, 10, 2, 500);
    cr_assert_lt(b, 64, "bound %d", b);
    gw_wait_limit_destroy(&l);
}

Test(wait_limit, slow_waits_with_few_held_do_not_bring_the_bound_down)
{
    /* A busy machine answers 400 requests a second, each in 80 ms: some 32
     * held at once. Refusing would not make them faster. */
    gw_wait_limit_t l;
    gw_wait_limit_init(&l, 128, 16, 50);
    int64_t now = 1000 * MS;
    int b = 128;
    for (int w = 0; w < 100; w++)
        b = window_held(&l, &now, 40, 80, 0, 0, 32);
    cr_assert_eq(b, 128, "slow waits with a quarter of the bound held: %d", b);
    /* The same waits with the bound full: it comes down. */
    for (int w = 0; w < 8; w++)
        b = window(&l, &now, 40, 80);
    cr_assert_lt(b, 64, "slow waits with the bound full bring it down: %d", b);
    cr_assert_gt(b, 16);
    gw_wait_limit_destroy(&l);
}

Test(wait_limit, a_machine_slow_when_unloaded_is_judged_by_its_own_unloaded_wait)
{
    gw_wait_limit_t l;
    gw_wait_limit_init(&l, 128, 16, 50);
    int64_t now = 1000 * MS;
    cr_assert_eq(gw_wait_limit_judge(&l), 50 * MS);
    /* Waits that ended with two held but had 40 beside them meanwhile say
     * nothing of the unloaded wait. */
    for (int i = 0; i < 50; i++) {
        now += GW_WAIT_WINDOW_MS * MS / 10 + 1;
        gw_wait_limit_done(&l, 40 * MS, now, 2, 40);
    }
    cr_assert_eq(gw_wait_limit_judge(&l), 50 * MS);
    /* Unloaded (two held), a wait takes 40 ms here: the target is 50 ms,
     * waits at three times that are what the machine does under load. */
    for (int w = 0; w < 5; w++)
        window_held(&l, &now, 10, 40, 0, 0, 2);
    cr_assert_eq(gw_wait_limit_judge(&l), 120 * MS);
    int b = 128;
    for (int w = 0; w < 50; w++)
        b = window(&l, &now, 40, 100);
    cr_assert_eq(b, 128, "100 ms waits with the bound full are not slow against 120 ms: %d", b);
    for (int w = 0; w < 5; w++)
        b = window(&l, &now, 40, 200);
    cr_assert_lt(b, 128, "200 ms waits with the bound full are: %d", b);
    /* Waits with many held never move the base, however long they take:
     * it is the quickest light wait of the last windows that had one, so a
     * steady load that leaves no light wait keeps it rather than letting it
     * expire (the bound would then be judged by the target alone, too
     * strict for this machine, and stay low). */
    for (int w = 0; w < 2 * GW_WAIT_BASE_WINDOWS; w++)
        window(&l, &now, 40, 300);
    cr_assert_eq(gw_wait_limit_judge(&l), 120 * MS, "judge %lld ns",
                 (long long)gw_wait_limit_judge(&l));
    /* A fast machine: the quickest light wait is 5 ms, three times that is
     * under the target, which stays. */
    for (int w = 0; w < 5; w++)
        window_held(&l, &now, 10, 5, 0, 0, 1);
    cr_assert_eq(gw_wait_limit_judge(&l), 50 * MS);
    gw_wait_limit_destroy(&l);
}
