/*
 * keyq.c: a partition's commands tracked by key (keyq.h).
 *
 * The items are a ring in offset order; the keys a chained hash table whose
 * records are reused through a free list once a key has nothing open, so the
 * memory follows the commands tracked, not every key ever seen.
 */
#include "keyq.h"
#include "loom/mem.h"

#include <stdlib.h>
#include <string.h>

enum { KQ_PENDING, KQ_INFLIGHT, KQ_DONE };

void kq_init(keyq_t *q)
{
    memset(q, 0, sizeof(*q));
    q->free_keys = -1;
    q->next_offset = -1;
    q->pending_from = -1;
}

static kq_item_t *at(const keyq_t *q, size_t i)
{
    return &q->items[(q->head + i) % q->cap];
}

void kq_free(keyq_t *q, void (*free_msg)(void *))
{
    for (size_t i = 0; i < q->n; i++)
        if (free_msg && at(q, i)->msg)
            free_msg(at(q, i)->msg);
    for (size_t k = 0; k < q->n_keys; k++)
        free(q->keys[k].bytes);
    free(q->items);
    free(q->keys);
    free(q->buckets);
    kq_init(q);
}

static uint64_t hash_of(const void *key, size_t len)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (size_t i = 0; i < len; i++) {
        h ^= ((const unsigned char *)key)[i];
        h *= 1099511628211ULL;
    }
    return h;
}

static void rehash(keyq_t *q, size_t n_buckets)
{
    free(q->buckets);
    q->buckets = loom_xmalloc(n_buckets * sizeof(*q->buckets));
    for (size_t b = 0; b < n_buckets; b++)
        q->buckets[b] = -1;
    q->n_buckets = n_buckets;
    for (size_t k = 0; k < q->n_keys; k++) {
        kq_key_t *key = &q->keys[k];
        if (key->open == 0)
            continue; /* on the free list */
        size_t b = key->hash & (n_buckets - 1);
        key->next = q->buckets[b];
        q->buckets[b] = (int32_t)k;
    }
}

/* The key record for bytes, made when new; its open count is raised. */
static int32_t key_ref(keyq_t *q, const void *bytes, size_t len)
{
    uint64_t h = hash_of(bytes, len);
    if (q->n_buckets) {
        for (int32_t k = q->buckets[h & (q->n_buckets - 1)]; k >= 0; k = q->keys[k].next) {
            kq_key_t *key = &q->keys[k];
            if (key->hash == h && key->len == len && memcmp(key->bytes, bytes, len) == 0) {
                key->open++;
                return k;
            }
        }
    }
    int32_t k;
    if (q->free_keys >= 0) {
        k = q->free_keys;
        q->free_keys = q->keys[k].next;
        free(q->keys[k].bytes);
    } else {
        if (q->n_keys == q->cap_keys) {
            q->cap_keys = q->cap_keys ? 2 * q->cap_keys : 64;
            q->keys = loom_xrealloc(q->keys, q->cap_keys * sizeof(*q->keys));
        }
        k = (int32_t)q->n_keys++;
    }
    kq_key_t *key = &q->keys[k];
    memset(key, 0, sizeof(*key));
    key->bytes = loom_xmalloc(len ? len : 1);
    memcpy(key->bytes, bytes, len);
    key->len = len;
    key->hash = h;
    key->open = 1;
    if (q->n_keys > q->n_buckets) {
        rehash(q, q->n_buckets ? 2 * q->n_buckets : 64);
    } else {
        size_t b = h & (q->n_buckets - 1);
        key->next = q->buckets[b];
        q->buckets[b] = k;
    }
    return k;
}

/* Lowers the key's open count; a key with nothing open is freed. */
static void key_unref(keyq_t *q, int32_t k)
{
    if (k < 0)
        return;
    kq_key_t *key = &q->keys[k];
    if (--key->open > 0)
        return;
    size_t b = key->hash & (q->n_buckets - 1);
    for (int32_t *p = &q->buckets[b]; *p >= 0; p = &q->keys[*p].next)
        if (*p == k) {
            *p = key->next;
            break;
        }
    free(key->bytes);
    key->bytes = NULL;
    key->next = q->free_keys;
    q->free_keys = k;
}

/* An item becomes pending, or stops being pending. */
static void pending_add(keyq_t *q, const kq_item_t *it)
{
    if (it->key < 0)
        q->nokey_pending++;
    else if (q->keys[it->key].pending++ == 0)
        q->keys_pending++;
    if (it->offset < q->pending_from)
        q->pending_from = it->offset;
}

static void pending_sub(keyq_t *q, const kq_item_t *it)
{
    if (it->key < 0)
        q->nokey_pending--;
    else if (--q->keys[it->key].pending == 0)
        q->keys_pending--;
}

void kq_push(keyq_t *q, void *msg, int64_t offset, const void *key, size_t len)
{
    if (q->n == q->cap) {
        size_t cap = q->cap ? 2 * q->cap : 64;
        kq_item_t *items = loom_xmalloc(cap * sizeof(*items));
        for (size_t i = 0; i < q->n; i++)
            items[i] = *at(q, i);
        free(q->items);
        q->items = items;
        q->cap = cap;
        q->head = 0;
    }
    kq_item_t *it = at(q, q->n++);
    memset(it, 0, sizeof(*it));
    it->msg = msg;
    it->offset = offset;
    it->key = key ? key_ref(q, key, len) : -1;
    it->state = KQ_PENDING;
    if (q->nokey_pending == 0 && q->keys_pending == 0)
        q->pending_from = offset; /* nothing before it is pending */
    pending_add(q, it);
    q->next_offset = offset + 1;
}

/* The index of the first item at or above offset (q->n: none). */
static size_t index_from(const keyq_t *q, int64_t offset)
{
    size_t lo = 0, hi = q->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (at(q, mid)->offset < offset)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

kq_item_t *kq_find(keyq_t *q, int64_t offset)
{
    size_t i = index_from(q, offset);
    return i < q->n && at(q, i)->offset == offset ? at(q, i) : NULL;
}

/*
 * The scan starts at the first item that may be pending (pending_from): what
 * is in flight or done at the front is not read again at each call. It stops
 * as soon as nothing more can be taken: every key with pending items is
 * blocked (in flight for another batch, held, or behind an item that
 * waits). Under load every key of a partition is often in flight, and a
 * scan of the whole queue then found nothing, at every call.
 */
size_t kq_take(keyq_t *q, int64_t now, size_t max, int max_keys, int64_t *offsets, void **msgs)
{
    size_t n = 0;
    int new_keys = 0, blocked = 0;
    uint64_t scan = ++q->scan;
    int64_t first_left = -1; /* the first pending item seen and left */
    size_t i = index_from(q, q->pending_from);
    for (; i < q->n && n < max; i++) {
        kq_item_t *it = at(q, i);
        if (it->state != KQ_PENDING)
            continue;
        kq_key_t *key = it->key >= 0 ? &q->keys[it->key] : NULL;
        if (key) {
            bool ours = key->taken == scan; /* its earlier items are in this batch */
            bool wait = key->blocked == scan || key->held_until > now ||
                        (key->inflight > 0 && !ours) || (it->alone && n > 0);
            if (wait) {
                /* Its later items wait behind it. */
                if (first_left < 0)
                    first_left = it->offset;
                if (key->blocked != scan) {
                    key->blocked = scan;
                    blocked++;
                }
                if (q->nokey_pending == 0 && blocked >= q->keys_pending) {
                    i++;
                    break; /* every key with something pending waits */
                }
                continue;
            }
            if (!ours && key->inflight == 0) {
                if (max_keys > 0 && q->keys_inflight + new_keys >= max_keys)
                    break;
                new_keys++;
            }
            key->taken = scan;
            key->inflight++;
        } else if (it->alone && n > 0) {
            if (first_left < 0)
                first_left = it->offset;
            continue;
        }
        it->state = KQ_INFLIGHT;
        pending_sub(q, it);
        q->n_inflight++;
        offsets[n] = it->offset;
        msgs[n] = it->msg;
        n++;
        if (it->alone) {
            i++;
            break;
        }
    }
    q->keys_inflight += new_keys;
    /* What was not read may be pending: the next scan starts there at the
     * latest. */
    int64_t stop = i < q->n ? at(q, i)->offset : q->next_offset;
    q->pending_from = first_left >= 0 && first_left < stop ? first_left : stop;
    return n;
}

/* Takes an item out of flight; the key's count follows. */
static kq_item_t *land(keyq_t *q, int64_t offset)
{
    kq_item_t *it = kq_find(q, offset);
    if (!it || it->state != KQ_INFLIGHT)
        return NULL;
    q->n_inflight--;
    if (it->key >= 0) {
        kq_key_t *key = &q->keys[it->key];
        if (--key->inflight == 0)
            q->keys_inflight--;
    }
    return it;
}

void kq_done(keyq_t *q, int64_t offset)
{
    kq_item_t *it = land(q, offset);
    if (!it)
        return;
    it->state = KQ_DONE;
    if (it->key >= 0)
        q->keys[it->key].held_until = 0;
    key_unref(q, it->key);
    it->key = -1;
}

void kq_retry(keyq_t *q, int64_t offset, int64_t now, int64_t held_until)
{
    kq_item_t *it = land(q, offset);
    if (!it)
        return;
    it->state = KQ_PENDING;
    pending_add(q, it);
    it->alone = true;
    it->attempts++;
    if (!it->first_fail_ms)
        it->first_fail_ms = now ? now : 1;
    if (it->key >= 0)
        q->keys[it->key].held_until = held_until;
}

void kq_return(keyq_t *q, int64_t offset)
{
    kq_item_t *it = land(q, offset);
    if (it) {
        it->state = KQ_PENDING;
        pending_add(q, it);
    }
}

int64_t kq_release(keyq_t *q, void (*free_msg)(void *))
{
    while (q->n > 0 && at(q, 0)->state == KQ_DONE) {
        kq_item_t *it = at(q, 0);
        if (free_msg && it->msg)
            free_msg(it->msg);
        q->head = (q->head + 1) % q->cap;
        q->n--;
    }
    if (q->n > 0)
        return at(q, 0)->offset;
    return q->next_offset;
}

int kq_held(const keyq_t *q, int64_t now, int64_t *next_free)
{
    int held = 0;
    int64_t first = 0;
    for (size_t k = 0; k < q->n_keys; k++) {
        const kq_key_t *key = &q->keys[k];
        if (key->open > 0 && key->held_until > now) {
            held++;
            if (!first || key->held_until < first)
                first = key->held_until;
        }
    }
    if (next_free)
        *next_free = first;
    return held;
}
