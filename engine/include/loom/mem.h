/*
 * Allocation that never returns NULL: on exhaustion it logs and aborts, as
 * Redis does. Use these instead of malloc so no call site needs an OOM path.
 */
#ifndef LOOM_MEM_H
#define LOOM_MEM_H

#include <stddef.h>

void *loom_xmalloc(size_t size);
void *loom_xcalloc(size_t count, size_t size);
void *loom_xrealloc(void *ptr, size_t size);
char *loom_xstrdup(const char *s);
char *loom_xstrndup(const char *s, size_t n);
/* printf into a new heap string; never NULL. */
char *loom_xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
