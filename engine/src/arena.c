/*
 * arena.c: chunked bump allocation. A request that needs more than a chunk gets
 * a dedicated chunk of its own size, so large payloads do not waste space.
 */
#include "loom/arena.h"
#include "loom/mem.h"

#include <stdalign.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

struct loom_arena_chunk {
    loom_arena_chunk_t *next;
    size_t size; /* usable bytes in data */
    size_t used;
    alignas(max_align_t) unsigned char data[];
};

#define ALIGN_UP(n) (((n) + alignof(max_align_t) - 1) & ~(alignof(max_align_t) - 1))

void loom_arena_init(loom_arena_t *arena, size_t chunk_size)
{
    arena->head = NULL;
    arena->chunk_size = chunk_size ? chunk_size : 8192;
    arena->used_total = 0;
}

void loom_arena_release(loom_arena_t *arena)
{
    loom_arena_chunk_t *c = arena->head;
    while (c) {
        loom_arena_chunk_t *next = c->next;
        free(c);
        c = next;
    }
    arena->head = NULL;
    arena->used_total = 0;
}

void loom_arena_reset(loom_arena_t *arena)
{
    if (!arena->head)
        return;
    /* Keep the oldest chunk of the default size (the last in the list). */
    loom_arena_chunk_t *c = arena->head, *keep = NULL;
    while (c) {
        loom_arena_chunk_t *next = c->next;
        if (!next && c->size == arena->chunk_size)
            keep = c;
        else
            free(c);
        c = next;
    }
    if (keep) {
        keep->used = 0;
        keep->next = NULL;
    }
    arena->head = keep;
    arena->used_total = 0;
}

void *loom_arena_alloc(loom_arena_t *arena, size_t size)
{
    size = ALIGN_UP(size ? size : 1);
    loom_arena_chunk_t *c = arena->head;
    if (!c || c->size - c->used < size) {
        size_t csize = size > arena->chunk_size ? size : arena->chunk_size;
        loom_arena_chunk_t *n = loom_xmalloc(sizeof(*n) + csize);
        n->size = csize;
        n->used = 0;
        if (c && csize > arena->chunk_size) {
            /* Oversized: link it behind the head so the head keeps filling. */
            n->next = c->next;
            c->next = n;
        } else {
            n->next = c;
            arena->head = n;
        }
        c = n;
    }
    void *p = c->data + c->used;
    c->used += size;
    arena->used_total += size;
    return p;
}

void *loom_arena_calloc(loom_arena_t *arena, size_t count, size_t size)
{
    if (size && count > SIZE_MAX / size)
        abort();
    void *p = loom_arena_alloc(arena, count * size);
    memset(p, 0, count * size);
    return p;
}

char *loom_arena_strndup(loom_arena_t *arena, const char *s, size_t n)
{
    size_t len = strnlen(s, n);
    char *p = loom_arena_alloc(arena, len + 1);
    memcpy(p, s, len);
    p[len] = '\0';
    return p;
}

char *loom_arena_strdup(loom_arena_t *arena, const char *s)
{
    return loom_arena_strndup(arena, s, strlen(s));
}

char *loom_arena_sprintf(loom_arena_t *arena, const char *fmt, ...)
{
    va_list ap, ap2;
    va_start(ap, fmt);
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    char *p = loom_arena_alloc(arena, (size_t)n + 1);
    vsnprintf(p, (size_t)n + 1, fmt, ap2);
    va_end(ap2);
    return p;
}
