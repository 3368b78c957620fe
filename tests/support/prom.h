/*
 * prom.h: a strict parser of the Prometheus text exposition format 0.0.4, for
 * tests that check what the metrics registry renders, and a second opinion
 * from the reference implementation (Python's prometheus_client).
 */
#ifndef LOOM_TEST_PROM_H
#define LOOM_TEST_PROM_H

#include <stdbool.h>
#include <stddef.h>

typedef struct prom_sample {
    char *key; /* name{label="value",...} as rendered (escapes kept), or just name */
    double value;
} prom_sample_t;

typedef struct prom_doc {
    prom_sample_t *samples;
    size_t n;
    int families;
} prom_doc_t;

/* Parses text, checking the grammar and the rules of the format: HELP and
 * TYPE at most once per family and before its samples, samples of a family
 * together, names and label names well formed, label values properly escaped,
 * values that are numbers, histograms with cumulative buckets ending in
 * le="+Inf" equal to _count. Returns 0, or -1 with "line N: why" in errbuf. */
int prom_parse(const char *text, prom_doc_t *doc, char *errbuf, size_t errlen);
/* The value of the sample with this exact key; found says whether it exists. */
double prom_get(const prom_doc_t *doc, const char *key, bool *found);
void prom_free(prom_doc_t *doc);
/* One sample of what GET /metrics on 127.0.0.1:port renders, checked by
 * prom_parse (0 when the sample is absent). */
double prom_scrape(int port, const char *key);

/* Parses text with prometheus_client.parser.text_string_to_metric_families
 * (Debian's python3-prometheus-client) and writes its summary,
 * "families=N samples=M", or the Python error, to out. Returns true when
 * Python parsed it. */
bool prom_python_parse(const char *text, char *out, size_t size);

#endif
