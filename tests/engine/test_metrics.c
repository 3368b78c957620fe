/*
 * Metrics registry: counters, gauges and histograms with labels; the text it
 * renders is checked line by line against the exposition format (a strict
 * parser of our own and Python's prometheus_client) and must count exactly
 * what was recorded, also under concurrent updates, when threads exit and
 * when there are more threads than per-thread cells.
 */
#include "loom/error.h"
#include "loom/metrics.h"
#include "prom.h"

#include <criterion/criterion.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

static prom_doc_t parse_or_fail(const char *text)
{
    prom_doc_t doc;
    char errbuf[512];
    cr_assert_eq(prom_parse(text, &doc, errbuf, sizeof(errbuf)), 0, "%s\n---\n%s", errbuf, text);
    return doc;
}

static double sample(const prom_doc_t *doc, const char *key)
{
    bool found = false;
    double v = prom_get(doc, key, &found);
    cr_assert(found, "no sample %s", key);
    return v;
}

Test(metrics, counters_gauges_histograms_render_as_prometheus_text)
{
    loom_metrics_t *reg = loom_metrics_new();
    const char *op_result[] = {"op", "result", NULL};
    loom_metrics_family_t *calls =
        loom_metrics_counter(reg, "loom_test_calls_total", "Calls by op and result.", op_result);
    loom_metrics_family_t *inflight =
        loom_metrics_gauge(reg, "loom_test_inflight", "Calls running now.", NULL);
    const double buckets[] = {0.01, 0.1, 1};
    const char *op[] = {"op", NULL};
    loom_metrics_family_t *dur =
        loom_metrics_histogram(reg, "loom_test_duration_seconds", "Latency.", op, buckets, 3);
    cr_assert(calls && inflight && dur);

    for (int i = 0; i < 3; i++)
        loom_metrics_counter_inc(calls, (const char *[]){"a.b", "ok"});
    loom_metrics_counter_add(calls, (const char *[]){"a.b", "NOT_FOUND"}, 2);
    loom_metrics_counter_add(calls, (const char *[]){"a.b", "ok"}, -5); /* ignored */
    loom_metrics_gauge_set(inflight, NULL, 7);
    loom_metrics_gauge_add(inflight, NULL, -2.5);
    loom_metrics_histogram_observe(dur, (const char *[]){"a.b"}, 0.005);
    loom_metrics_histogram_observe(dur, (const char *[]){"a.b"}, 0.01); /* le is inclusive */
    loom_metrics_histogram_observe(dur, (const char *[]){"a.b"}, 0.5);
    loom_metrics_histogram_observe(dur, (const char *[]){"a.b"}, 30);

    char *text = loom_metrics_render_string(reg, NULL);
    prom_doc_t doc = parse_or_fail(text);
    cr_assert_eq(doc.families, 3);
    cr_assert(strstr(text, "# HELP loom_test_calls_total Calls by op and result.\n"
                           "# TYPE loom_test_calls_total counter\n"),
              "%s", text);
    cr_assert(strstr(text, "# TYPE loom_test_duration_seconds histogram\n"), "%s", text);
    cr_assert_eq(sample(&doc, "loom_test_calls_total{op=\"a.b\",result=\"ok\"}"), 3);
    cr_assert_eq(sample(&doc, "loom_test_calls_total{op=\"a.b\",result=\"NOT_FOUND\"}"), 2);
    cr_assert_eq(sample(&doc, "loom_test_inflight"), 4.5);
    cr_assert_eq(sample(&doc, "loom_test_duration_seconds_bucket{op=\"a.b\",le=\"0.01\"}"), 2);
    cr_assert_eq(sample(&doc, "loom_test_duration_seconds_bucket{op=\"a.b\",le=\"0.1\"}"), 2);
    cr_assert_eq(sample(&doc, "loom_test_duration_seconds_bucket{op=\"a.b\",le=\"1\"}"), 3);
    cr_assert_eq(sample(&doc, "loom_test_duration_seconds_bucket{op=\"a.b\",le=\"+Inf\"}"), 4);
    cr_assert_eq(sample(&doc, "loom_test_duration_seconds_count{op=\"a.b\"}"), 4);
    cr_assert_float_eq(sample(&doc, "loom_test_duration_seconds_sum{op=\"a.b\"}"), 30.515, 1e-9);
    cr_assert_eq(loom_metrics_value(calls, (const char *[]){"a.b", "ok"}), 3);
    cr_assert_eq(loom_metrics_value(dur, (const char *[]){"a.b"}), 4);

    char py[2048];
    cr_assert(prom_python_parse(text, py, sizeof(py)),
              "prometheus_client could not parse the text (install python3-prometheus-client; "
              "./scripts/setup does): %s\n---\n%s",
              py, text);
    cr_assert_str_eq(py, "families=3 samples=9", "%s", text);
    prom_doc_t again = parse_or_fail(text);
    cr_assert_eq(again.n, 9);
    prom_free(&again);
    prom_free(&doc);
    free(text);
    loom_metrics_free(reg);
}

Test(metrics, label_values_and_help_are_escaped)
{
    loom_metrics_t *reg = loom_metrics_new();
    const char *l[] = {"path", NULL};
    loom_metrics_family_t *f =
        loom_metrics_counter(reg, "loom_test_odd_total", "Help with \\ and\nnewline.", l);
    loom_metrics_counter_inc(f, (const char *[]){"a\"b\\c\nd"});
    loom_metrics_counter_inc(f, (const char *[]){NULL}); /* NULL counts as "" */
    char *text = loom_metrics_render_string(reg, NULL);
    cr_assert(strstr(text, "# HELP loom_test_odd_total Help with \\\\ and\\nnewline.\n"), "%s",
              text);
    cr_assert(strstr(text, "loom_test_odd_total{path=\"a\\\"b\\\\c\\nd\"} 1\n"), "%s", text);
    cr_assert(strstr(text, "loom_test_odd_total{path=\"\"} 1\n"), "%s", text);
    prom_doc_t doc = parse_or_fail(text);
    prom_free(&doc);
    char py[2048];
    cr_assert(prom_python_parse(text, py, sizeof(py)), "%s\n---\n%s", py, text);
    free(text);
    loom_metrics_free(reg);
}

Test(metrics, numbers_use_prometheus_spellings)
{
    loom_metrics_t *reg = loom_metrics_new();
    loom_metrics_family_t *g = loom_metrics_gauge(reg, "loom_test_g", "G.", NULL);
    const char *l[] = {"k", NULL};
    loom_metrics_family_t *h = loom_metrics_gauge(reg, "loom_test_h", "H.", l);
    loom_metrics_gauge_set(g, NULL, 0.1);
    loom_metrics_gauge_set(h, (const char *[]){"inf"}, INFINITY);
    loom_metrics_gauge_set(h, (const char *[]){"ninf"}, -INFINITY);
    loom_metrics_gauge_set(h, (const char *[]){"nan"}, NAN);
    loom_metrics_gauge_set(h, (const char *[]){"big"}, 12345678901234.0);
    loom_metrics_gauge_set(h, (const char *[]){"tiny"}, 1e-300);
    char *text = loom_metrics_render_string(reg, NULL);
    cr_assert(strstr(text, "loom_test_g 0.1\n"), "%s", text);
    cr_assert(strstr(text, "loom_test_h{k=\"inf\"} +Inf\n"), "%s", text);
    cr_assert(strstr(text, "loom_test_h{k=\"ninf\"} -Inf\n"), "%s", text);
    cr_assert(strstr(text, "loom_test_h{k=\"nan\"} NaN\n"), "%s", text);
    cr_assert(strstr(text, "loom_test_h{k=\"big\"} 12345678901234\n"), "%s", text);
    cr_assert(strstr(text, "loom_test_h{k=\"tiny\"} 1e-300\n"), "%s", text);
    prom_doc_t doc = parse_or_fail(text);
    prom_free(&doc);
    free(text);
    loom_metrics_free(reg);
}

Test(metrics, registration_is_idempotent_and_rejects_conflicts)
{
    loom_metrics_t *reg = loom_metrics_new();
    const char *l[] = {"op", NULL};
    const char *other[] = {"topic", NULL};
    loom_metrics_family_t *a = loom_metrics_counter(reg, "loom_test_total", "A.", l);
    cr_assert_not_null(a);
    cr_assert_eq(loom_metrics_counter(reg, "loom_test_total", "A again.", l), a);
    cr_assert_null(loom_metrics_gauge(reg, "loom_test_total", "A.", l), "another type");
    cr_assert_null(loom_metrics_counter(reg, "loom_test_total", "A.", other), "other labels");
    cr_assert_null(loom_metrics_counter(reg, "9starts_with_digit", "x", NULL));
    cr_assert_null(loom_metrics_counter(reg, "has-dash", "x", NULL));
    cr_assert_null(loom_metrics_counter(reg, "ok_name", "x", (const char *[]){"__x", NULL}));
    cr_assert_null(loom_metrics_counter(reg, "ok_name", "x", (const char *[]){"a", "a", NULL}));
    cr_assert_null(
        loom_metrics_histogram(reg, "ok_name", "x", (const char *[]){"le", NULL}, NULL, 0));
    const double bad[] = {1, 0.5};
    cr_assert_null(loom_metrics_histogram(reg, "ok_name", "x", NULL, bad, 2));
    loom_metrics_family_t *d =
        loom_metrics_histogram(reg, "loom_test_default_seconds", "D.", NULL, NULL, 0);
    cr_assert_not_null(d);
    /* Updating a NULL family (registration failed) is harmless. */
    loom_metrics_counter_inc(NULL, NULL);
    char *text = loom_metrics_render_string(reg, NULL);
    /* An unlabelled histogram shows all its default buckets at zero from the start. */
    cr_assert(strstr(text, "loom_test_default_seconds_bucket{le=\"0.005\"} 0\n"), "%s", text);
    cr_assert(strstr(text, "loom_test_default_seconds_count 0\n"), "%s", text);
    prom_doc_t doc = parse_or_fail(text);
    prom_free(&doc);
    free(text);
    loom_metrics_free(reg);
}

#define THREADS    4
#define PER_THREAD 50000

static void *hammer(void *arg)
{
    loom_metrics_family_t **fams = arg;
    char op[16];
    for (int i = 0; i < PER_THREAD; i++) {
        snprintf(op, sizeof(op), "op%d", i % 20);
        loom_metrics_counter_inc(fams[0], (const char *[]){op});
        loom_metrics_histogram_observe(fams[1], (const char *[]){op}, (i % 7) * 0.01);
    }
    return NULL;
}

Test(metrics, concurrent_updates_lose_nothing)
{
    loom_metrics_t *reg = loom_metrics_new();
    const char *l[] = {"op", NULL};
    loom_metrics_family_t *fams[2] = {
        loom_metrics_counter(reg, "loom_test_hammer_total", "H.", l),
        loom_metrics_histogram(reg, "loom_test_hammer_seconds", "H.", l, NULL, 0)};
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++)
        pthread_create(&t[i], NULL, hammer, fams);
    /* Render while the threads write: every snapshot must parse. */
    for (int i = 0; i < 20; i++) {
        char *text = loom_metrics_render_string(reg, NULL);
        prom_doc_t doc = parse_or_fail(text);
        prom_free(&doc);
        free(text);
    }
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
    double total = 0, observed = 0;
    for (int i = 0; i < 20; i++) {
        char op[16];
        snprintf(op, sizeof(op), "op%d", i);
        total += loom_metrics_value(fams[0], (const char *[]){op});
        observed += loom_metrics_value(fams[1], (const char *[]){op});
    }
    cr_assert_eq(total, THREADS * PER_THREAD);
    cr_assert_eq(observed, THREADS * PER_THREAD);
    loom_metrics_free(reg);
}

/* Counts are kept per thread and summed when rendered: a thread that exits
 * gives its cell to the next one, and past the number of cells the rest
 * share one. 150 threads, up to 100 alive at once, in three waves. */
static pthread_barrier_t wave_end;

static void *count_some(void *arg)
{
    loom_metrics_family_t **fams = arg;
    for (int i = 0; i < 1000; i++) {
        loom_metrics_counter_add(fams[0], (const char *[]){"x"}, 0.5);
        loom_metrics_histogram_observe(fams[1], (const char *[]){"x"}, (i % 3) * 0.5);
    }
    /* Every thread of the wave holds its cell until all have counted. */
    pthread_barrier_wait(&wave_end);
    return NULL;
}

Test(metrics, counts_survive_thread_exits_and_more_threads_than_cells)
{
    loom_metrics_t *reg = loom_metrics_new();
    const char *l[] = {"op", NULL};
    const double b[] = {0.25, 0.75};
    loom_metrics_family_t *fams[2] = {
        loom_metrics_counter(reg, "loom_test_waves_total", "W.", l),
        loom_metrics_histogram(reg, "loom_test_waves_seconds", "W.", l, b, 2)};
    const int waves[] = {100, 20, 30};
    int total = 0;
    for (int w = 0; w < 3; w++) {
        pthread_t t[100];
        pthread_barrier_init(&wave_end, NULL, (unsigned)waves[w]);
        for (int i = 0; i < waves[w]; i++)
            cr_assert_eq(pthread_create(&t[i], NULL, count_some, fams), 0);
        for (int i = 0; i < waves[w]; i++)
            pthread_join(t[i], NULL);
        pthread_barrier_destroy(&wave_end);
        total += waves[w];
        cr_assert_eq(loom_metrics_value(fams[0], (const char *[]){"x"}), total * 500.0);
        cr_assert_eq(loom_metrics_value(fams[1], (const char *[]){"x"}), total * 1000.0);
    }
    char *text = loom_metrics_render_string(reg, NULL);
    prom_doc_t doc = parse_or_fail(text);
    /* 1000 observations per thread: 334 of 0, 333 of 0.5, 333 of 1. */
    cr_assert_eq(sample(&doc, "loom_test_waves_seconds_bucket{op=\"x\",le=\"0.25\"}"), 150 * 334);
    cr_assert_eq(sample(&doc, "loom_test_waves_seconds_bucket{op=\"x\",le=\"0.75\"}"), 150 * 667);
    cr_assert_eq(sample(&doc, "loom_test_waves_seconds_bucket{op=\"x\",le=\"+Inf\"}"), 150 * 1000);
    cr_assert_eq(sample(&doc, "loom_test_waves_seconds_sum{op=\"x\"}"), 150 * 499.5);
    cr_assert_eq(sample(&doc, "loom_test_waves_total{op=\"x\"}"), 150 * 500);
    prom_free(&doc);
    free(text);
    loom_metrics_free(reg);
}

Test(metrics, render_to_a_stream)
{
    loom_metrics_t *reg = loom_metrics_new();
    loom_metrics_counter_inc(loom_metrics_counter(reg, "loom_test_one_total", "One.", NULL), NULL);
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    cr_assert_eq(loom_metrics_render(reg, f), 0);
    fclose(f);
    cr_assert_str_eq(buf, "# HELP loom_test_one_total One.\n# TYPE loom_test_one_total counter\n"
                          "loom_test_one_total 1\n");
    free(buf);
    cr_assert_eq(loom_metrics_render(NULL, stdout), LOOM_EINVAL);
    loom_metrics_free(reg);
}
