/*
 * metrics.c: the metrics registry and its Prometheus text rendering.
 *
 * A registry is a list of families; a family owns its series in creation
 * order plus an open-addressing index keyed by a hash of the label values.
 * Each family has its own mutex: updates of different families never contend,
 * and an update is a lock, a hash probe and an addition. Series are never
 * removed, so label values must come from small, bounded sets (op names,
 * result codes, topics), never from user input.
 */
#include "loom/metrics.h"
#include "loom/error.h"
#include "loom/log.h"
#include "loom/mem.h"

#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

const double loom_metrics_default_buckets[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                               0.5,   1,    2.5,   5,    10};
const size_t loom_metrics_default_nbuckets =
    sizeof(loom_metrics_default_buckets) / sizeof(loom_metrics_default_buckets[0]);

typedef struct series {
    char **values; /* one owned string per label */
    uint64_t hash;
    double value;      /* counter, gauge */
    uint64_t *buckets; /* histogram: per-bucket (not cumulative) counts, +Inf last */
    double sum;        /* histogram */
} series_t;

struct loom_metrics_family {
    loom_metrics_type_t type;
    char *name;
    char *help;
    char *labels[LOOM_METRICS_MAX_LABELS];
    size_t n_labels;
    double *bounds; /* histogram upper bounds, without +Inf */
    size_t n_bounds;
    pthread_mutex_t mu;
    series_t **series; /* creation order */
    size_t n_series, cap_series;
    series_t **index; /* open addressing; size index_cap (power of two) */
    size_t index_cap;
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
    free(s->buckets);
    free(s);
}

static void family_free(loom_metrics_family_t *f)
{
    for (size_t i = 0; i < f->n_series; i++)
        series_free(f->series[i], f->n_labels);
    free(f->series);
    free(f->index);
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
    loom_metrics_family_t *f = loom_xcalloc(1, sizeof(*f));
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
    if (n_labels == 0) {
        pthread_mutex_lock(&f->mu);
        series_get(f, NULL);
        pthread_mutex_unlock(&f->mu);
    }
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

/* ---- series lookup (family mutex held) --------------------------------------- */

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

static void index_insert(series_t **index, size_t cap, series_t *s)
{
    size_t i = (size_t)s->hash & (cap - 1);
    while (index[i])
        i = (i + 1) & (cap - 1);
    index[i] = s;
}

static series_t *series_get(loom_metrics_family_t *f, const char *const *values)
{
    uint64_t hash = values_hash(f, values);
    if (f->index_cap) {
        for (size_t i = (size_t)hash & (f->index_cap - 1); f->index[i];
             i = (i + 1) & (f->index_cap - 1))
            if (series_matches(f, f->index[i], hash, values))
                return f->index[i];
    }
    series_t *s = loom_xcalloc(1, sizeof(*s));
    s->hash = hash;
    s->values = loom_xcalloc(f->n_labels ? f->n_labels : 1, sizeof(char *));
    for (size_t i = 0; i < f->n_labels; i++)
        s->values[i] = loom_xstrdup(value_at(values, i));
    if (f->type == LOOM_METRICS_HISTOGRAM)
        s->buckets = loom_xcalloc(f->n_bounds + 1, sizeof(uint64_t));
    if (f->n_series == f->cap_series) {
        f->cap_series = f->cap_series ? f->cap_series * 2 : 8;
        f->series = loom_xrealloc(f->series, f->cap_series * sizeof(*f->series));
    }
    f->series[f->n_series++] = s;
    /* Keep the index at most half full. */
    if (f->n_series * 2 > f->index_cap) {
        size_t cap = f->index_cap ? f->index_cap * 2 : 16;
        while (f->n_series * 2 > cap)
            cap *= 2;
        series_t **index = loom_xcalloc(cap, sizeof(*index));
        for (size_t i = 0; i < f->n_series; i++)
            index_insert(index, cap, f->series[i]);
        free(f->index);
        f->index = index;
        f->index_cap = cap;
    } else {
        index_insert(f->index, f->index_cap, s);
    }
    return s;
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
    pthread_mutex_lock(&f->mu);
    series_t *s = series_get(f, values);
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
        s->buckets[lo]++;
        s->sum += v;
    } else if (set) {
        s->value = v;
    } else {
        s->value += v;
    }
    pthread_mutex_unlock(&f->mu);
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
    double v = 0;
    pthread_mutex_lock(&fam->mu);
    uint64_t hash = values_hash(fam, values);
    for (size_t i = 0; i < fam->n_series; i++) {
        series_t *s = fam->series[i];
        if (!series_matches(fam, s, hash, values))
            continue;
        if (fam->type == LOOM_METRICS_HISTOGRAM) {
            uint64_t n = 0;
            for (size_t b = 0; b <= fam->n_bounds; b++)
                n += s->buckets[b];
            v = (double)n;
        } else {
            v = s->value;
        }
        break;
    }
    pthread_mutex_unlock(&fam->mu);
    return v;
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
    pthread_mutex_lock(&f->mu);
    for (size_t i = 0; i < f->n_series; i++) {
        series_t *s = f->series[i];
        if (f->type != LOOM_METRICS_HISTOGRAM) {
            format_number(num, sizeof(num), s->value);
            fputs(f->name, out);
            write_labels(out, f, s, NULL);
            fprintf(out, " %s\n", num);
            continue;
        }
        /* _count is the +Inf bucket, so the two always agree. */
        uint64_t cumulative = 0;
        for (size_t b = 0; b <= f->n_bounds; b++) {
            cumulative += s->buckets[b];
            if (b < f->n_bounds)
                format_number(le, sizeof(le), f->bounds[b]);
            else
                snprintf(le, sizeof(le), "+Inf");
            fprintf(out, "%s_bucket", f->name);
            write_labels(out, f, s, le);
            fprintf(out, " %llu\n", (unsigned long long)cumulative);
        }
        format_number(num, sizeof(num), s->sum);
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
