/*
 * Metrics: a registry of counters, gauges and histograms with labels, rendered
 * in the Prometheus text exposition format 0.0.4 (what `GET /metrics` serves).
 *
 *   loom_metrics_t *reg = loom_metrics_new();
 *   const char *labels[] = {"op", "result", NULL};
 *   loom_metrics_family_t *calls =
 *       loom_metrics_counter(reg, "loom_op_calls_total", "Op calls by op and result.", labels);
 *   loom_metrics_counter_inc(calls, (const char *[]){"engine.nodes.list", "ok"});
 *   loom_metrics_render(reg, stdout);
 *
 * A family is a metric name with its help text, type and label names; a series
 * is one combination of label values, created on first use. One registry per
 * process is the rule: ops, consumers and the HTTP gateway register their
 * families in the same one. Registering a family that exists with the same
 * type and labels returns the existing one, so modules need not coordinate.
 *
 * Thread-safety: everything is thread-safe. Counters and histograms are kept
 * per thread and summed when rendered, so updating a series that exists takes
 * no lock: a hash of the label values, a lookup and an addition into the
 * thread's own cell. Creating a series and setting a gauge lock the family;
 * rendering locks one family at a time.
 */
#ifndef LOOM_METRICS_H
#define LOOM_METRICS_H

#include <stddef.h>
#include <stdio.h>

typedef struct loom_metrics loom_metrics_t;
typedef struct loom_metrics_family loom_metrics_family_t;

typedef enum {
    LOOM_METRICS_COUNTER,
    LOOM_METRICS_GAUGE,
    LOOM_METRICS_HISTOGRAM,
} loom_metrics_type_t;

/* Most label names a family may have. */
#define LOOM_METRICS_MAX_LABELS 8
/* Most buckets a histogram may have (+Inf is implicit and not counted). */
#define LOOM_METRICS_MAX_BUCKETS 32

/* Prometheus' default latency buckets, in seconds. */
extern const double loom_metrics_default_buckets[];
extern const size_t loom_metrics_default_nbuckets;

/* A new, empty registry (never NULL). */
loom_metrics_t *loom_metrics_new(void);
/* Frees the registry and every family in it; NULL is a no-op. */
void loom_metrics_free(loom_metrics_t *reg);

/*
 * Registers a family, or returns the one of that name when type, label names
 * and buckets match. name must match [a-zA-Z_:][a-zA-Z0-9_:]*, label names
 * [a-zA-Z_][a-zA-Z0-9_]* (not starting with "__", and not "le" for a
 * histogram). labels is a NULL-terminated array (NULL for none); name, help,
 * labels and buckets are copied. buckets are upper bounds in increasing order
 * (NULL: the default ones); +Inf is added. Returns a family owned by the
 * registry, or NULL (with a warning logged) when an argument is invalid or a
 * family of that name exists with another definition.
 */
loom_metrics_family_t *loom_metrics_register(loom_metrics_t *reg, loom_metrics_type_t type,
                                             const char *name, const char *help,
                                             const char *const *labels, const double *buckets,
                                             size_t n_buckets);
loom_metrics_family_t *loom_metrics_counter(loom_metrics_t *reg, const char *name, const char *help,
                                            const char *const *labels);
loom_metrics_family_t *loom_metrics_gauge(loom_metrics_t *reg, const char *name, const char *help,
                                          const char *const *labels);
loom_metrics_family_t *loom_metrics_histogram(loom_metrics_t *reg, const char *name,
                                              const char *help, const char *const *labels,
                                              const double *buckets, size_t n_buckets);

/*
 * Updates the series with these label values (an array with one entry per
 * label name, in order; NULL entries count as ""; values may be NULL for a
 * family without labels). The series is created on first use. A NULL family
 * is a no-op, so callers may skip metrics by not registering them.
 * Counters only go up: a negative or NaN amount is ignored.
 */
void loom_metrics_counter_inc(loom_metrics_family_t *fam, const char *const *values);
void loom_metrics_counter_add(loom_metrics_family_t *fam, const char *const *values, double v);
void loom_metrics_gauge_set(loom_metrics_family_t *fam, const char *const *values, double v);
void loom_metrics_gauge_add(loom_metrics_family_t *fam, const char *const *values, double v);
void loom_metrics_histogram_observe(loom_metrics_family_t *fam, const char *const *values,
                                    double v);

/* The current value of a counter or gauge series, or the observation count of
 * a histogram series; 0 when the series does not exist. For tests and
 * health checks. */
double loom_metrics_value(loom_metrics_family_t *fam, const char *const *values);

/*
 * Writes every family in registration order, series in creation order, as
 * Prometheus text format 0.0.4: "# HELP" and "# TYPE" lines, escaped label
 * values, histograms as cumulative _bucket{le="..."} lines ending with
 * le="+Inf", then _sum and _count. Returns 0 or LOOM_EIO when writing failed.
 */
int loom_metrics_render(loom_metrics_t *reg, FILE *out);
/* Same into a new heap string (caller frees); *len gets its length when len
 * is not NULL. Never NULL. */
char *loom_metrics_render_string(loom_metrics_t *reg, size_t *len);

/* The Content-Type of the rendered text. */
#define LOOM_METRICS_CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"

#endif
