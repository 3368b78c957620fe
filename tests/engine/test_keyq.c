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

/*
 * kq_take against a model: the rule as the header states it, applied by a
 * plain scan of every item at each call. Random pushes, takes, and outcomes
 * (done, retried with a hold, returned) over a few keys and key-less items:
 * every take must hand out exactly what the model does, so that where the
 * queue's scan starts and where it stops early changes nothing.
 */
enum { M_PENDING, M_INFLIGHT, M_DONE };

typedef struct model_item {
    int64_t offset;
    int key; /* -1: none */
    int state;
    bool alone;
} model_item_t;

typedef struct model {
    model_item_t items[4096];
    size_t n;
    int64_t held_until[8];
} model_t;

static size_t model_take(model_t *m, int64_t now, size_t max, int max_keys, int64_t *out)
{
    bool blocked[8] = {0}, taken[8] = {0};
    int inflight[8] = {0}, keys_inflight = 0, new_keys = 0;
    for (size_t i = 0; i < m->n; i++)
        if (m->items[i].state == M_INFLIGHT && m->items[i].key >= 0)
            inflight[m->items[i].key]++;
    for (int k = 0; k < 8; k++)
        keys_inflight += inflight[k] > 0;
    size_t n = 0;
    for (size_t i = 0; i < m->n && n < max; i++) {
        model_item_t *it = &m->items[i];
        if (it->state != M_PENDING)
            continue;
        int k = it->key;
        if (k >= 0) {
            bool ours = taken[k];
            if (blocked[k] || m->held_until[k] > now || (inflight[k] > 0 && !ours) ||
                (it->alone && n > 0)) {
                blocked[k] = true;
                continue;
            }
            if (!ours && inflight[k] == 0) {
                if (max_keys > 0 && keys_inflight + new_keys >= max_keys)
                    break;
                new_keys++;
            }
            taken[k] = true;
            inflight[k]++;
        } else if (it->alone && n > 0) {
            continue;
        }
        it->state = M_INFLIGHT;
        out[n++] = it->offset;
        if (it->alone)
            break;
    }
    return n;
}

static model_item_t *model_find(model_t *m, int64_t offset)
{
    for (size_t i = 0; i < m->n; i++)
        if (m->items[i].offset == offset)
            return &m->items[i];
    return NULL;
}

Test(keyq, takes_what_a_plain_scan_of_every_item_takes)
{
    static const char *const names[] = {"k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7"};
    unsigned seed = 12345;
    for (int round = 0; round < 20; round++) {
        keyq_t q;
        kq_init(&q);
        static model_t m;
        memset(&m, 0, sizeof(m));
        int64_t next = 100, now = 1000;
        int n_keys = 1 + round % 8;
        int64_t flight[4096];
        size_t n_flight = 0;
        for (int step = 0; step < 3000; step++) {
            int op = rand_r(&seed) % 10;
            if (op < 4 && m.n < 4000) { /* push one or a few */
                int burst = 1 + rand_r(&seed) % 5;
                for (int b = 0; b < burst; b++) {
                    int k = rand_r(&seed) % 10 == 0 ? -1 : rand_r(&seed) % n_keys;
                    push(&q, next, k < 0 ? NULL : names[k]);
                    m.items[m.n++] = (model_item_t){next, k, M_PENDING, false};
                    next += 1 + rand_r(&seed) % 3; /* offsets may have gaps */
                }
            } else if (op < 7) { /* take */
                size_t max = 1 + (size_t)(rand_r(&seed) % 12);
                int max_keys = rand_r(&seed) % 3 == 0 ? 1 + rand_r(&seed) % 4 : 0;
                int64_t want[64], got[64];
                size_t nw = model_take(&m, now, max, max_keys, want);
                size_t ng = take(&q, now, max, max_keys, got);
                cr_assert_eq(ng, nw, "round %d step %d: took %zu, the model %zu", round, step, ng,
                             nw);
                for (size_t i = 0; i < ng; i++) {
                    cr_assert_eq(got[i], want[i], "round %d step %d: item %zu", round, step, i);
                    flight[n_flight++] = got[i];
                }
            } else if (n_flight > 0) { /* an outcome for one in flight */
                size_t j = (size_t)rand_r(&seed) % n_flight;
                int64_t off = flight[j];
                flight[j] = flight[--n_flight];
                model_item_t *it = model_find(&m, off);
                int what = rand_r(&seed) % 6;
                if (what < 4) {
                    kq_done(&q, off);
                    it->state = M_DONE;
                    if (it->key >= 0)
                        m.held_until[it->key] = 0;
                } else if (what == 4) {
                    int64_t until = now + rand_r(&seed) % 50;
                    kq_retry(&q, off, now, until);
                    it->state = M_PENDING;
                    it->alone = true;
                    if (it->key >= 0)
                        m.held_until[it->key] = until;
                } else {
                    kq_return(&q, off);
                    it->state = M_PENDING;
                }
            }
            now += rand_r(&seed) % 10;
            if (rand_r(&seed) % 20 == 0) { /* release the finished front */
                kq_release(&q, NULL);
                size_t drop = 0;
                while (drop < m.n && m.items[drop].state == M_DONE)
                    drop++;
                memmove(m.items, m.items + drop, (m.n - drop) * sizeof(m.items[0]));
                m.n -= drop;
                cr_assert_eq(kq_count(&q), m.n);
            }
        }
        kq_free(&q, NULL);
    }
}
