/*
 * The per-key queue of a partition (engine/src/keyq.c): what may be applied
 * at once, what waits for its key, and which offset may be committed.
 */
#include "../../engine/src/keyq.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

static void push(keyq_t *q, int64_t offset, const char *key)
{
    kq_push(q, NULL, offset, key, key ? strlen(key) : 0);
}

static size_t take(keyq_t *q, int64_t now, size_t max, int max_keys, int64_t *out)
{
    void *msgs[64];
    return kq_take(q, now, max, max_keys, out, msgs);
}

Test(keyq, one_keys_commands_wait_for_each_other_and_others_do_not)
{
    keyq_t q;
    kq_init(&q);
    push(&q, 10, "a");
    push(&q, 11, "b");
    push(&q, 12, "a");
    push(&q, 13, "c");
    int64_t o[8];
    /* One batch may hold two commands of one key, in order. */
    cr_assert_eq(take(&q, 0, 8, 0, o), 4);
    cr_assert_eq(o[0], 10);
    cr_assert_eq(o[2], 12);
    kq_done(&q, 10);
    kq_done(&q, 11);
    kq_done(&q, 12);
    kq_done(&q, 13);
    cr_assert_eq(kq_release(&q, NULL), 14);
    cr_assert_eq(kq_count(&q), 0);

    /* A key in flight in one batch holds its later commands out of the next. */
    push(&q, 14, "a");
    cr_assert_eq(take(&q, 0, 1, 0, o), 1);
    push(&q, 15, "a");
    push(&q, 16, "b");
    cr_assert_eq(take(&q, 0, 8, 0, o), 1);
    cr_assert_eq(o[0], 16);
    cr_assert_eq(kq_release(&q, NULL), 14, "the lowest unfinished offset");
    kq_done(&q, 16);
    cr_assert_eq(kq_release(&q, NULL), 14, "16 is done, but 14 is not");
    kq_done(&q, 14);
    cr_assert_eq(kq_release(&q, NULL), 15);
    cr_assert_eq(take(&q, 0, 8, 0, o), 1);
    cr_assert_eq(o[0], 15);
    kq_done(&q, 15);
    cr_assert_eq(kq_release(&q, NULL), 17);
    kq_free(&q, NULL);
}

Test(keyq, a_failing_key_holds_only_its_own_commands)
{
    keyq_t q;
    kq_init(&q);
    for (int i = 0; i < 10; i++)
        push(&q, i, i % 2 ? "bad" : i % 4 == 0 ? "x" : "y");
    int64_t o[16];
    size_t n = take(&q, 0, 16, 0, o);
    cr_assert_eq(n, 10);
    /* 1 (key bad) fails: 3, 5, 7, 9 were taken in the same batch and go back. */
    for (size_t i = 0; i < n; i++) {
        if (o[i] == 1)
            kq_retry(&q, 1, 100, 1000);
        else if (o[i] % 2)
            kq_return(&q, o[i]);
        else
            kq_done(&q, o[i]);
    }
    cr_assert_eq(kq_release(&q, NULL), 1);
    int64_t next = 0;
    cr_assert_eq(kq_held(&q, 500, &next), 1);
    cr_assert_eq(next, 1000);
    /* Other keys flow while "bad" is held. */
    push(&q, 10, "x");
    push(&q, 11, "bad");
    push(&q, 12, "z");
    n = take(&q, 500, 16, 0, o);
    cr_assert_eq(n, 2);
    cr_assert_eq(o[0], 10);
    cr_assert_eq(o[1], 12);
    kq_done(&q, 10);
    kq_done(&q, 12);
    cr_assert_eq(take(&q, 500, 16, 0, o), 0, "bad is held until 1000");
    /* After the backoff the failed command goes first, alone. */
    cr_assert_eq(take(&q, 1000, 16, 0, o), 1);
    cr_assert_eq(o[0], 1);
    cr_assert_eq(kq_find(&q, 1)->attempts, 1);
    kq_done(&q, 1);
    cr_assert_eq(kq_held(&q, 1000, NULL), 0);
    /* Then the rest of the key, in order. */
    n = take(&q, 1000, 16, 0, o);
    cr_assert_eq(n, 5);
    int64_t want[] = {3, 5, 7, 9, 11};
    for (size_t i = 0; i < n; i++)
        cr_assert_eq(o[i], want[i]);
    for (size_t i = 0; i < n; i++)
        kq_done(&q, o[i]);
    cr_assert_eq(kq_release(&q, NULL), 13);
    kq_free(&q, NULL);
}

Test(keyq, keys_in_flight_are_bounded)
{
    keyq_t q;
    kq_init(&q);
    char k[16];
    for (int i = 0; i < 10; i++) {
        snprintf(k, sizeof(k), "k%d", i);
        push(&q, i, k);
    }
    int64_t o[16];
    cr_assert_eq(take(&q, 0, 16, 4, o), 4);
    cr_assert_eq(take(&q, 0, 16, 4, o), 0, "four keys in flight already");
    kq_done(&q, 0);
    cr_assert_eq(take(&q, 0, 16, 4, o), 1);
    cr_assert_eq(o[0], 4);
    kq_free(&q, NULL);
}

Test(keyq, many_keys_reuse_their_records)
{
    keyq_t q;
    kq_init(&q);
    char k[32];
    int64_t o[64];
    for (int round = 0; round < 100; round++) {
        for (int i = 0; i < 50; i++) {
            snprintf(k, sizeof(k), "key-%d-%d", round, i);
            push(&q, round * 50 + i, k);
        }
        size_t n = take(&q, 0, 64, 0, o);
        cr_assert_eq(n, 50);
        for (size_t i = 0; i < n; i++)
            kq_done(&q, o[i]);
        cr_assert_eq(kq_release(&q, NULL), (round + 1) * 50);
    }
    cr_assert_leq(q.n_keys, 64, "%zu key records for 50 keys at a time", q.n_keys);
    kq_free(&q, NULL);
}
