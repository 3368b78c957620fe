/*
 * A bump allocator for per-request and per-message memory.
 *
 * Everything allocated while handling one request or one message comes from
 * one arena and is freed at once by loom_arena_reset() or loom_arena_release().
 * Allocations are aligned for any type. An arena is not thread-safe: one owner.
 */
#ifndef LOOM_ARENA_H
#define LOOM_ARENA_H

#include <stddef.h>

typedef struct loom_arena_chunk loom_arena_chunk_t;

typedef struct loom_arena {
    loom_arena_chunk_t *head; /* current chunk; older ones follow */
    size_t chunk_size;        /* default size of a new chunk */
    size_t used_total;        /* bytes handed out since the last reset */
} loom_arena_t;

/* Initialises an embedded arena; chunk_size 0 picks 8 KiB. Allocates nothing yet. */
void loom_arena_init(loom_arena_t *arena, size_t chunk_size);
/* Frees every chunk. The arena may be initialised again. */
void loom_arena_release(loom_arena_t *arena);
/* Forgets every allocation but keeps the first chunk for reuse. */
void loom_arena_reset(loom_arena_t *arena);

/* Returns size bytes aligned for any type; never NULL (aborts on OOM). */
void *loom_arena_alloc(loom_arena_t *arena, size_t size);
void *loom_arena_calloc(loom_arena_t *arena, size_t count, size_t size);
char *loom_arena_strdup(loom_arena_t *arena, const char *s);
char *loom_arena_strndup(loom_arena_t *arena, const char *s, size_t n);
char *loom_arena_sprintf(loom_arena_t *arena, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#endif
