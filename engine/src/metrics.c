/*
 * metrics.c: the metrics registry and its Prometheus text rendering.
 *
 * A registry is a list of families; a family owns its series in creation
 * order plus an open-addressing index keyed by a hash of the label values.
 * Series are never removed, so label values must come from small, bounded
 * sets (op names, result codes, topics), never from user input.
 *
 * Counters and histograms are sharded per thread: each thread that updates a
 * series adds into its own cell of that series, with plain (relaxed atomic)
 * loads and stores, and rendering sums the cells. The index is read without
 * a lock (inserts publish with release stores; a grown index replaces the old
 * one, which is kept until the family is freed), so the usual update -- a
 * series that exists -- takes no mutex and touches no shared cache line.
 * Creating a series takes the family's mutex. Gauges (set wins) keep one
 * value under that mutex. Threads get a cell slot on their first update and
 * give it back when they exit; past LOOM_METRICS_SHARDS live threads, the
 * rest share one cell updated with atomic read-modify-writes.
 */
#include "loom/metrics.h"
#include "loom/error.h"
#include "loom/log.h"
#include "loom/mem.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

const double loom_metrics_default_buckets[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                               0.5,   1,    2.5,   5,    10};
const size_t loom_metrics_default_nbuckets =
    sizeof(loom_metrics_default_buckets) / sizeof(loom_metrics_default_buckets[0]);

/* Thread slots with a cell of their own; one more, shared, for the rest. */
#define LOOM_METRICS_SHARDS 64
#define SHARED_SLOT         LOOM_METRICS_SHARDS

/* One thread's part of a counter or histogram series. Only the slot's owner
 * writes it (except the shared cell); rendering reads it concurrently. */
typedef struct cell {
    _Atomic double value;       /* counter; histogram: the sum */
    _Atomic uint64_t buckets[]; /* histogram: per-bucket (not cumulative) counts, +Inf last */
} cell_t;

typedef struct series {
    char **values; /* one owned string per label */
    uint64_t hash;
    double value;                                     /* gauge, under the family mutex */
    _Atomic(cell_t *) cells[LOOM_METRICS_SHARDS + 1]; /* counter, histogram; by thread slot */
} series_t;

/* An open-addressing index of series, at most half full. */
typedef struct index {
    size_t cap;            /* a power of two */
    struct index *retired; /* the smaller index this one replaced */
    _Atomic(series_t *) slots[];
} index_t;

struct loom_metrics_family {
    loom_metrics_type_t type;
    uint64_t uid; /* unique over the process' life: tells a family from a freed one */
    char *name;
    char *help;
    char *labels[LOOM_METRICS_MAX_LABELS];
    size_t n_labels;
    double *bounds; /* histogram upper bounds, without +Inf */
    size_t n_bounds;
    pthread_mutex_t mu; /* guards series creation and gauge values */
    series_t **series;  /* creation order */
    size_t n_series, cap_series;
    _Atomic(index_t *) index; /* read without the mutex */
    loom_metrics_family_t *next;
};

struct loom_metrics {
    pthread_mutex_t mu; /* guards the family list */
    loom_metrics_family_t *head, *tail;
};

static const char *type_name(loom_metrics_type_t type)
{
    switch (type) {
    case LOOM_METRICS_COUNTER:
        return "counter";
    case LOOM_METRICS_GAUGE:
        return "gauge";
    case LOOM_METRICS_HISTOGRAM:
        return "histogram";
    }
    return "untyped";
}

/* ---- registry ------------------------------------------------------------- */

loom_metrics_t *loom_metrics_new(void)
{
    loom_metrics_t *reg = loom_xcalloc(1, sizeof(*reg));
    pthread_mutex_init(&reg->mu, NULL);
    return reg;
}

static void series_free(series_t *s, size_t n_labels)
{
    for (size_t i = 0; i < n_labels; i++)
        free(s->values[i]);
    free(s->values);
    for (size_t i = 0; i <= LOOM_METRICS_SHARDS; i++)
        free(atomic_load_explicit(&s->cells[i], memory_order_acquire));
    free(s);
}

static void family_free(loom_metrics_family_t *f)
{
    for (size_t i = 0; i < f->n_series; i++)
        series_free(f->series[i], f->n_labels);
    free(f->series);
    index_t *idx = atomic_load_explicit(&f->index, memory_order_acquire);
    while (idx) {
        index_t *older = idx->retired;
        free(idx);
        idx = older;
    }
    for (size_t i = 0; i < f->n_labels; i++)
        free(f->labels[i]);
    free(f->bounds);
    free(f->name);
    free(f->help);
    pthread_mutex_destroy(&f->mu);
    free(f);
}

void loom_metrics_free(loom_metrics_t *reg)
{
    if (!reg)
        return;
    loom_metrics_family_t *f = reg->head;
    while (f) {
        loom_metrics_family_t *next = f->next;
        family_free(f);
        f = next;
    }
    pthread_mutex_destroy(&reg->mu);
    free(reg);
}

static bool valid_metric_name(const char *s)
{
    if (!s || !*s)
        return false;
    for (size_t i = 0; s[i]; i++) {
        char c = s[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':' ||
                  (i > 0 && c >= '0' && c <= '9');
        if (!ok)
            return false;
    }
    return true;
}

static bool valid_label_name(const char *s, loom_metrics_type_t type)
{
    if (!s || !*s || strncmp(s, "__", 2) == 0)
        return false;
    if (type == LOOM_METRICS_HISTOGRAM && strcmp(s, "le") == 0)
        return false;
    for (size_t i = 0; s[i]; i++) {
        char c = s[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
                  (i > 0 && c >= '0' && c <= '9');
        if (!ok)
            return false;
    }
    return true;
}

static bool same_definition(const loom_metrics_family_t *f, loom_metrics_type_t type,
                            const char *const *labels, size_t n_labels, const double *bounds,
                            size_t n_bounds)
{
    if (f->type != type || f->n_labels != n_labels)
        return false;
    for (size_t i = 0; i < n_labels; i++)
        if (strcmp(f->labels[i], labels[i]) != 0)
            return false;
    if (type != LOOM_METRICS_HISTOGRAM)
        return true;
    if (f->n_bounds != n_bounds)
        return false;
    for (size_t i = 0; i < n_bounds; i++)
        if (f->bounds[i] != bounds[i])
            return false;
    return true;
}

static series_t *series_get(loom_metrics_family_t *f, const char *const *values);

loom_metrics_family_t *loom_metrics_register(loom_metrics_t *reg, loom_metrics_type_t type,
                                             const char *name, const char *help,
                                             const char *const *labels, const double *buckets,
                                             size_t n_buckets)
{
    if (!reg || !valid_metric_name(name) || type > LOOM_METRICS_HISTOGRAM) {
        LOOM_WARN("could not register metric: invalid name or type", "name=%s",
                  name ? name : "(null)");
        return NULL;
    }
    size_t n_labels = 0;
    while (labels && labels[n_labels]) {
        if (n_labels == LOOM_METRICS_MAX_LABELS || !valid_label_name(labels[n_labels], type)) {
            LOOM_WARN("could not register metric: invalid label name or too many labels",
                      "name=%s label=%s", name, labels[n_labels]);
            return NULL;
        }
        for (size_t j = 0; j < n_labels; j++) {
            if (strcmp(labels[j], labels[n_labels]) == 0) {
                LOOM_WARN("could not register metric: duplicate label name", "name=%s label=%s",
                          name, labels[j]);
                return NULL;
            }
        }
        n_labels++;
    }
    if (type == LOOM_METRICS_HISTOGRAM && !buckets) {
        buckets = loom_metrics_default_buckets;
        n_buckets = loom_metrics_default_nbuckets;
    }
    if (type == LOOM_METRICS_HISTOGRAM) {
        bool ok = n_buckets >= 1 && n_buckets <= LOOM_METRICS_MAX_BUCKETS;
        for (size_t i = 0; ok && i < n_buckets; i++)
            ok = isfinite(buckets[i]) && (i == 0 || buckets[i] > buckets[i - 1]);
        if (!ok) {
            LOOM_WARN("could not register metric: buckets must be 1 to 32 finite, increasing "
                      "bounds",
                      "name=%s", name);
            return NULL;
        }
    } else {
        n_buckets = 0;
    }

    pthread_mutex_lock(&reg->mu);
    for (loom_metrics_family_t *f = reg->head; f; f = f->next) {
        if (strcmp(f->name, name) != 0)
            continue;
        bool same = same_definition(f, type, labels, n_labels, buckets, n_buckets);
        pthread_mutex_unlock(&reg->mu);
        if (!same)
            LOOM_WARN("could not register metric: registered already with another type, labels "
                      "or buckets",
                      "name=%s", name);
        return same ? f : NULL;
    }
    static _Atomic uint64_t next_uid = 1;
    loom_metrics_family_t *f = loom_xcalloc(1, sizeof(*f));
    f->uid = atomic_fetch_add(&next_uid, 1);
    f->type = type;
    f->name = loom_xstrdup(name);
    f->help = loom_xstrdup(help ? help : "");
    for (size_t i = 0; i < n_labels; i++)
        f->labels[i] = loom_xstrdup(labels[i]);
    f->n_labels = n_labels;
    if (n_buckets) {
        f->bounds = loom_xmalloc(n_buckets * sizeof(double));
        memcpy(f->bounds, buckets, n_buckets * sizeof(double));
        f->n_bounds = n_buckets;
    }
    pthread_mutex_init(&f->mu, NULL);
    if (reg->tail)
        reg->tail->next = f;
    else
        reg->head = f;
    reg->tail = f;
    pthread_mutex_unlock(&reg->mu);

    /* A family without labels has exactly one series: show it from the start. */
    if (n_labels == 0)
        series_get(f, NULL);
    return f;
}

loom_metrics_family_t *loom_metrics_counter(loom_metrics_t *reg, const char *name, const char *help,
                                            const char *const *labels)
{
    return loom_metrics_register(reg, LOOM_METRICS_COUNTER, name, help, labels, NULL, 0);
}

loom_metrics_family_t *loom_metrics_gauge(loom_metrics_t *reg, const char *name, const char *help,
                                          const char *const *labels)
{
    return loom_metrics_register(reg, LOOM_METRICS_GAUGE, name, help, labels, NULL, 0);
}

loom_metrics_family_t *loom_metrics_histogram(loom_metrics_t *reg, const char *name,
                                              const char *help, const char *const *labels,
                                              const double *buckets, size_t n_buckets)
{
    return loom_metrics_register(reg, LOOM_METRICS_HISTOGRAM, name, help, labels, buckets,
                                 n_buckets);
}

/* ---- thread slots ------------------------------------------------------------- */

static pthread_mutex_t slot_mu = PTHREAD_MUTEX_INITIALIZER;
static bool slot_taken[LOOM_METRICS_SHARDS];
static pthread_key_t slot_key;
static pthread_once_t slot_once = PTHREAD_ONCE_INIT;
static __thread int my_slot = -1; /* -1: none yet */

/* A thread that exits gives its slot back; the next owner adds on to the
 * same cells (the mutex orders the two owners' writes). */
static void slot_release(void *arg)
{
    int slot = (int)(intptr_t)arg - 1;
    pthread_mutex_lock(&slot_mu);
    slot_taken[slot] = false;
    pthread_mutex_unlock(&slot_mu);
}

static void slot_key_create(void)
{
    if (pthread_key_create(&slot_key, slot_release) != 0)
        slot_key = (pthread_key_t)-1;
}

static int slot_acquire(void)
{
    pthread_once(&slot_once, slot_key_create);
    int slot = SHARED_SLOT;
    pthread_mutex_lock(&slot_mu);
    for (int i = 0; i < LOOM_METRICS_SHARDS && slot == SHARED_SLOT; i++) {
        if (!slot_taken[i]) {
            slot_taken[i] = true;
            slot = i;
        }
    }
    pthread_mutex_unlock(&slot_mu);
    if (slot != SHARED_SLOT && (slot_key == (pthread_key_t)-1 ||
                                pthread_setspecific(slot_key, (void *)(intptr_t)(slot + 1)) != 0)) {
        /* No way to give it back at exit: keep the slot taken for good and
         * use the shared cell, so no two threads ever own one cell. */
        slot = SHARED_SLOT;
    }
    my_slot = slot;
    return slot;
}

static inline int thread_slot(void)
{
    return my_slot >= 0 ? my_slot : slot_acquire();
}

/* ---- series lookup ------------------------------------------------------------- */

static const char *value_at(const char *const *values, size_t i)
{
    return values && values[i] ? values[i] : "";
}

static uint64_t values_hash(const loom_metrics_family_t *f, const char *const *values)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (size_t i = 0; i < f->n_labels; i++) {
        for (const unsigned char *p = (const unsigned char *)value_at(values, i); *p; p++)
            h = (h ^ *p) * 1099511628211ULL;
        h = (h ^ 0xff) * 1099511628211ULL; /* separator: ("a","b") != ("ab","") */
    }
    return h;
}

static bool series_matches(const loom_metrics_family_t *f, const series_t *s, uint64_t hash,
                           const char *const *values)
{
    if (s->hash != hash)
        return false;
    for (size_t i = 0; i < f->n_labels; i++)
        if (strcmp(s->values[i], value_at(values, i)) != 0)
            return false;
    return true;
}

/* The series with these values, or NULL; safe without the mutex. A series
 * being created meanwhile may be missed, which series_get settles. */
static series_t *series_find(const loom_metrics_family_t *f, uint64_t hash,
                             const char *const *values)
{
    index_t *idx = atomic_load_explicit(&f->index, memory_order_acquire);
    if (!idx)
        return NULL;
    for (size_t i = (size_t)hash & (idx->cap - 1);; i = (i + 1) & (idx->cap - 1)) {
        series_t *s = atomic_load_explicit(&idx->slots[i], memory_order_acquire);
        if (!s)
            return NULL;
        if (series_matches(f, s, hash, values))
            return s;
    }
}

static void index_insert(index_t *idx, series_t *s)
{
    size_t i = (size_t)s->hash & (idx->cap - 1);
    while (atomic_load_explicit(&idx->slots[i], memory_order_relaxed))
        i = (i + 1) & (idx->cap - 1);
    atomic_store_explicit(&idx->slots[i], s, memory_order_release);
}

/* Finds or creates the series; the family mutex must be held. */
static series_t *series_get_locked(loom_metrics_family_t *f, uint64_t hash,
                                   const char *const *values)
{
    series_t *s = series_find(f, hash, values);
    if (s)
        return s;
    s = loom_xcalloc(1, sizeof(*s));
    s->hash = hash;
    s->values = loom_xcalloc(f->n_labels ? f->n_labels : 1, sizeof(char *));
    for (size_t i = 0; i < f->n_labels; i++)
        s->values[i] = loom_xstrdup(value_at(values, i));
    if (f->n_series == f->cap_series) {
        f->cap_series = f->cap_series ? f->cap_series * 2 : 8;
        f->series = loom_xrealloc(f->series, f->cap_series * sizeof(*f->series));
    }
    f->series[f->n_series++] = s;
    /* Keep the index at most half full. A grown index is published whole;
     * readers may still be probing the old one, so it is kept. */
    index_t *idx = atomic_load_explicit(&f->index, memory_order_relaxed);
    if (!idx || f->n_series * 2 > idx->cap) {
        size_t cap = idx ? idx->cap * 2 : 16;
        while (f->n_series * 2 > cap)
            cap *= 2;
        index_t *grown = loom_xcalloc(1, sizeof(*grown) + cap * sizeof(grown->slots[0]));
        grown->cap = cap;
        grown->retired = idx;
        for (size_t i = 0; i < f->n_series; i++)
            index_insert(grown, f->series[i]);
        atomic_store_explicit(&f->index, grown, memory_order_release);
    } else {
        index_insert(idx, s);
    }
    return s;
}

/*
 * Each thread remembers the series it updated last, by family and by the
 * address of the first label value (callers pass the same string each time:
 * an op's name, a topic): a hit is checked by comparing the label values,
 * which is cheaper than hashing them. The uid check makes an entry of a
 * freed family that left its address to a new one a miss.
 */
#define TCACHE_SIZE 64

typedef struct tcache_entry {
    const loom_metrics_family_t *fam;
    uint64_t uid;
    const char *first; /* values[0] as passed */
    series_t *series;
} tcache_entry_t;

static __thread tcache_entry_t tcache[TCACHE_SIZE];

static tcache_entry_t *tcache_slot(const loom_metrics_family_t *f, const char *first)
{
    uintptr_t h = ((uintptr_t)f >> 4) * 31 + ((uintptr_t)first >> 3);
    return &tcache[(h ^ (h >> 7)) & (TCACHE_SIZE - 1)];
}

static series_t *series_get(loom_metrics_family_t *f, const char *const *values)
{
    const char *first = values && f->n_labels ? values[0] : NULL;
    tcache_entry_t *t = tcache_slot(f, first);
    if (t->fam == f && t->uid == f->uid && t->first == first) {
        series_t *s = t->series;
        bool same = true;
        for (size_t i = 0; i < f->n_labels && same; i++)
            same = strcmp(s->values[i], value_at(values, i)) == 0;
        if (same)
            return s;
    }
    uint64_t hash = values_hash(f, values);
    series_t *s = series_find(f, hash, values);
    if (!s) {
        pthread_mutex_lock(&f->mu);
        s = series_get_locked(f, hash, values);
        pthread_mutex_unlock(&f->mu);
    }
    *t = (tcache_entry_t){.fam = f, .uid = f->uid, .first = first, .series = s};
    return s;
}

/* This thread's cell of a counter or histogram series. */
static cell_t *cell_get(const loom_metrics_family_t *f, series_t *s, int slot)
{
    cell_t *c = atomic_load_explicit(&s->cells[slot], memory_order_acquire);
    if (c)
        return c;
    size_t nb = f->type == LOOM_METRICS_HISTOGRAM ? f->n_bounds + 1 : 0;
    c = loom_xcalloc(1, sizeof(*c) + nb * sizeof(c->buckets[0]));
    if (slot != SHARED_SLOT) {
        atomic_store_explicit(&s->cells[slot], c, memory_order_release);
        return c;
    }
    /* The shared cell may be created by two threads at once: one wins. */
    cell_t *expected = NULL;
    if (!atomic_compare_exchange_strong_explicit(&s->cells[slot], &expected, c,
                                                 memory_order_acq_rel, memory_order_acquire)) {
        free(c);
        c = expected;
    }
    return c;
}

static void cell_add_double(_Atomic double *p, double v, bool shared)
{
    if (!shared) {
        atomic_store_explicit(p, atomic_load_explicit(p, memory_order_relaxed) + v,
                              memory_order_relaxed);
        return;
    }
    double old = atomic_load_explicit(p, memory_order_relaxed);
    while (!atomic_compare_exchange_weak_explicit(p, &old, old + v, memory_order_relaxed,
                                                  memory_order_relaxed))
        ;
}

static void cell_add_count(_Atomic uint64_t *p, bool shared)
{
    if (shared)
        atomic_fetch_add_explicit(p, 1, memory_order_relaxed);
    else
        atomic_store_explicit(p, atomic_load_explicit(p, memory_order_relaxed) + 1,
                              memory_order_relaxed);
}

/* Sums of a series' cells: the counter's value or the histogram's sum, and
 * (histogram) per-bucket counts into buckets. */
static double cells_sum(const loom_metrics_family_t *f, series_t *s, uint64_t *buckets)
{
    double v = 0;
    size_t nb = f->type == LOOM_METRICS_HISTOGRAM ? f->n_bounds + 1 : 0;
    for (size_t b = 0; b < nb; b++)
        buckets[b] = 0;
    for (size_t i = 0; i <= LOOM_METRICS_SHARDS; i++) {
        cell_t *c = atomic_load_explicit(&s->cells[i], memory_order_acquire);
        if (!c)
            continue;
        v += atomic_load_explicit(&c->value, memory_order_relaxed);
        for (size_t b = 0; b < nb; b++)
            buckets[b] += atomic_load_explicit(&c->buckets[b], memory_order_relaxed);
    }
    return v;
}

/* ---- updates ------------------------------------------------------------------ */

static void update(loom_metrics_family_t *f, loom_metrics_type_t type, const char *const *values,
                   double v, bool set)
{
    if (!f)
        return;
    if (f->type != type) {
        LOOM_WARN("metric updated as the wrong type", "name=%s type=%s", f->name,
                  type_name(f->type));
        return;
    }
    series_t *s = series_get(f, values);
    if (type == LOOM_METRICS_GAUGE) {
        pthread_mutex_lock(&f->mu);
        s->value = set ? v : s->value + v;
        pthread_mutex_unlock(&f->mu);
        return;
    }
    int slot = thread_slot();
    bool shared = slot == SHARED_SLOT;
    cell_t *c = cell_get(f, s, slot);
    if (type == LOOM_METRICS_HISTOGRAM) {
        /* First bucket whose upper bound is >= v (le is inclusive); NaN goes to +Inf. */
        size_t lo = 0, hi = f->n_bounds;
        while (lo < hi) {
            size_t mid = (lo + hi) / 2;
            if (v <= f->bounds[mid])
                hi = mid;
            else
                lo = mid + 1;
        }
        cell_add_count(&c->buckets[lo], shared);
    }
    cell_add_double(&c->value, v, shared);
}

void loom_metrics_counter_inc(loom_metrics_family_t *fam, const char *const *values)
{
    update(fam, LOOM_METRICS_COUNTER, values, 1, false);
}

void loom_metrics_counter_add(loom_metrics_family_t *fam, const char *const *values, double v)
{
    if (!(v >= 0))
        return;
    update(fam, LOOM_METRICS_COUNTER, values, v, false);
}

void loom_metrics_gauge_set(loom_metrics_family_t *fam, const char *const *values, double v)
{
    update(fam, LOOM_METRICS_GAUGE, values, v, true);
}

void loom_metrics_gauge_add(loom_metrics_family_t *fam, const char *const *values, double v)
{
    update(fam, LOOM_METRICS_GAUGE, values, v, false);
}

void loom_metrics_histogram_observe(loom_metrics_family_t *fam, const char *const *values, double v)
{
    update(fam, LOOM_METRICS_HISTOGRAM, values, v, false);
}

double loom_metrics_value(loom_metrics_family_t *fam, const char *const *values)
{
    if (!fam)
        return 0;
    series_t *s = series_find(fam, values_hash(fam, values), values);
    if (!s)
        return 0;
    if (fam->type == LOOM_METRICS_GAUGE) {
        pthread_mutex_lock(&fam->mu);
        double v = s->value;
        pthread_mutex_unlock(&fam->mu);
        return v;
    }
    uint64_t buckets[LOOM_METRICS_MAX_BUCKETS + 1];
    double v = cells_sum(fam, s, buckets);
    if (fam->type != LOOM_METRICS_HISTOGRAM)
        return v;
    uint64_t n = 0;
    for (size_t b = 0; b <= fam->n_bounds; b++)
        n += buckets[b];
    return (double)n;
}

/* ---- rendering ------------------------------------------------------------------ */

/* Shortest text that reads back as the same double; Prometheus spellings for
 * the special values. */
static void format_number(char *buf, size_t size, double v)
{
    if (isnan(v)) {
        snprintf(buf, size, "NaN");
    } else if (isinf(v)) {
        snprintf(buf, size, v > 0 ? "+Inf" : "-Inf");
    } else if (v == 0) {
        snprintf(buf, size, "0");
    } else if (v < 1e15 && v > -1e15 && (double)(long long)v == v) {
        snprintf(buf, size, "%lld", (long long)v);
    } else {
        snprintf(buf, size, "%.15g", v);
        if (strtod(buf, NULL) != v)
            snprintf(buf, size, "%.17g", v);
    }
}

/* HELP text escapes backslash and newline; label values also escape '"'. */
static void write_escaped(FILE *out, const char *s, bool quote)
{
    for (; *s; s++) {
        if (*s == '\\')
            fputs("\\\\", out);
        else if (*s == '\n')
            fputs("\\n", out);
        else if (quote && *s == '"')
            fputs("\\\"", out);
        else
            fputc(*s, out);
    }
}

static void write_labels(FILE *out, const loom_metrics_family_t *f, const series_t *s,
                         const char *le)
{
    if (f->n_labels == 0 && !le)
        return;
    fputc('{', out);
    for (size_t i = 0; i < f->n_labels; i++) {
        fprintf(out, "%s%s=\"", i ? "," : "", f->labels[i]);
        write_escaped(out, s->values[i], true);
        fputc('"', out);
    }
    if (le)
        fprintf(out, "%sle=\"%s\"", f->n_labels ? "," : "", le);
    fputc('}', out);
}

static void render_family(FILE *out, loom_metrics_family_t *f)
{
    fprintf(out, "# HELP %s ", f->name);
    write_escaped(out, f->help, false);
    fprintf(out, "\n# TYPE %s %s\n", f->name, type_name(f->type));
    char num[64], le[64];
    uint64_t buckets[LOOM_METRICS_MAX_BUCKETS + 1];
    pthread_mutex_lock(&f->mu);
    for (size_t i = 0; i < f->n_series; i++) {
        series_t *s = f->series[i];
        double value = f->type == LOOM_METRICS_GAUGE ? s->value : cells_sum(f, s, buckets);
        if (f->type != LOOM_METRICS_HISTOGRAM) {
            format_number(num, sizeof(num), value);
            fputs(f->name, out);
            write_labels(out, f, s, NULL);
            fprintf(out, " %s\n", num);
            continue;
        }
        /* _count is the +Inf bucket, so the two always agree. */
        uint64_t cumulative = 0;
        for (size_t b = 0; b <= f->n_bounds; b++) {
            cumulative += buckets[b];
            if (b < f->n_bounds)
                format_number(le, sizeof(le), f->bounds[b]);
            else
                snprintf(le, sizeof(le), "+Inf");
            fprintf(out, "%s_bucket", f->name);
            write_labels(out, f, s, le);
            fprintf(out, " %llu\n", (unsigned long long)cumulative);
        }
        format_number(num, sizeof(num), value);
        fprintf(out, "%s_sum", f->name);
        write_labels(out, f, s, NULL);
        fprintf(out, " %s\n", num);
        fprintf(out, "%s_count", f->name);
        write_labels(out, f, s, NULL);
        fprintf(out, " %llu\n", (unsigned long long)cumulative);
    }
    pthread_mutex_unlock(&f->mu);
}

int loom_metrics_render(loom_metrics_t *reg, FILE *out)
{
    if (!reg || !out)
        return LOOM_EINVAL;
    /* Families are only ever appended: walk the list without holding reg->mu
     * across the output, reading each next pointer under it. */
    pthread_mutex_lock(&reg->mu);
    loom_metrics_family_t *f = reg->head;
    pthread_mutex_unlock(&reg->mu);
    while (f) {
        render_family(out, f);
        pthread_mutex_lock(&reg->mu);
        f = f->next;
        pthread_mutex_unlock(&reg->mu);
    }
    return ferror(out) ? LOOM_EIO : 0;
}

char *loom_metrics_render_string(loom_metrics_t *reg, size_t *len)
{
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    if (!f) {
        LOOM_ERROR("could not open a memory stream", "error=out of memory");
        abort();
    }
    loom_metrics_render(reg, f);
    fclose(f);
    if (len)
        *len = n;
    return buf;
}
