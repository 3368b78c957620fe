/*
 * keyq.h: one partition's commands between fetch and offset commit, tracked
 * by key (docs/architecture.md, "Order within a partition").
 *
 * Commands of one key are applied in offset order, one batch at a time;
 * commands of other keys do not wait for them. The queue hands out batches
 * of commands whose key is free (kq_take), hears how each ended (kq_done,
 * kq_retry, kq_return) and says which offset may be committed: the lowest
 * one not yet finished (kq_release). A key that failed is held until its
 * backoff is over, and only its own later commands wait.
 *
 * Items are named by their offset. Not thread-safe: the consumer's thread
 * owns the queue; apply threads only carry offsets and messages.
 */
#ifndef LOOM_KEYQ_H
#define LOOM_KEYQ_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct kq_item {
    void *msg; /* the caller's (an rd_kafka_message_t) */
    int64_t offset;
    int32_t key;           /* index in keys; -1: no key, ordered against nothing */
    uint8_t state;         /* pending, in flight, done */
    bool alone;            /* failed before: taken only in a batch of its own */
    int attempts;          /* failed attempts so far */
    int64_t first_fail_ms; /* mono ms of the first failure; 0: none */
} kq_item_t;

typedef struct kq_key {
    char *bytes;
    size_t len;
    uint64_t hash;
    int32_t next;       /* chain in its bucket, or the free list */
    int inflight;       /* items of this key in flight */
    int open;           /* items of this key not done */
    int pending;        /* items of this key pending */
    int64_t held_until; /* mono ms; 0: not held */
    uint64_t blocked;   /* scan generation in which an earlier item blocked it */
    uint64_t taken;     /* scan generation in which an item of it was taken */
} kq_key_t;

typedef struct keyq {
    kq_item_t *items; /* ring: items[(head + i) % cap], offsets ascending */
    size_t head, n, cap;
    kq_key_t *keys;
    size_t n_keys, cap_keys;
    int32_t *buckets;
    size_t n_buckets;
    int32_t free_keys;
    int keys_inflight;    /* distinct keys with something in flight */
    size_t n_inflight;    /* items in flight */
    int keys_pending;     /* distinct keys with something pending */
    size_t nokey_pending; /* pending items without a key */
    int64_t pending_from; /* no item below this offset is pending */
    uint64_t scan;        /* generation of kq_take scans */
    int64_t next_offset;  /* offset after the last item pushed; -1: none */
} keyq_t;

void kq_init(keyq_t *q);
/* Frees the queue; free_msg (may be NULL) is called for every message held. */
void kq_free(keyq_t *q, void (*free_msg)(void *));

/* Appends a message; offsets must grow. key may be NULL (len 0). */
void kq_push(keyq_t *q, void *msg, int64_t offset, const void *key, size_t len);

/*
 * Marks in flight and writes to out (offsets and messages) up to max
 * pending items, in offset order, whose key has nothing in flight, is not
 * held at `now`, and has no earlier pending item; a batch holds at most
 * max_keys distinct keys more than are in flight already (a per-partition
 * bound on keys in flight). An item that failed before is taken alone.
 * Returns how many were taken.
 */
size_t kq_take(keyq_t *q, int64_t now, size_t max, int max_keys, int64_t *offsets, void **msgs);

/* The item at offset; NULL when the queue has none. */
kq_item_t *kq_find(keyq_t *q, int64_t offset);
/* The item in flight at offset finished (applied, rejected, parked...). */
void kq_done(keyq_t *q, int64_t offset);
/* It failed: back to pending, taken alone from now on; its key is held until
 * held_until (mono ms). */
void kq_retry(keyq_t *q, int64_t offset, int64_t now, int64_t held_until);
/* It was not tried (another item of its batch failed): back to pending. */
void kq_return(keyq_t *q, int64_t offset);

/* Drops finished items from the front (free_msg called on each) and returns
 * the offset to commit: the lowest one not finished, or the one after the
 * last pushed; -1 when nothing was pushed. */
int64_t kq_release(keyq_t *q, void (*free_msg)(void *));

/* Items tracked (not yet released). */
static inline size_t kq_count(const keyq_t *q)
{
    return q->n;
}
/* Keys held at now, and the earliest time one is free again (0: none). */
int kq_held(const keyq_t *q, int64_t now, int64_t *next_free);

#endif
