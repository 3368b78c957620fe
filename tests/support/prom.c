/*
 * prom.c: see prom.h. Written from the format's specification
 * (prometheus.io/docs/instrumenting/exposition_formats), independent of the
 * registry's renderer, so the two check each other.
 */
#include "prom.h"
#include "http_client.h"
#include "loom/mem.h"

#include <criterion/criterion.h>

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define PROM_MAX_LABELS 16

typedef struct family {
    char name[256];
    char type[16];
    bool help, typed, has_samples, closed;
} family_t;

static int fail(char *errbuf, size_t errlen, int line, const char *fmt, ...)
{
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    snprintf(errbuf, errlen, "line %d: %s", line, msg);
    return -1;
}

static bool is_name_char(char c, bool first, bool colon)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (colon && c == ':') ||
           (!first && c >= '0' && c <= '9');
}

/* Reads a metric (colon true) or label name at *p; returns its length. */
static size_t read_name(const char **p, bool colon, char *out, size_t size)
{
    size_t n = 0;
    while (is_name_char((*p)[n], n == 0, colon))
        n++;
    if (n && n < size) {
        memcpy(out, *p, n);
        out[n] = '\0';
    }
    *p += n;
    return n < size ? n : 0;
}

static bool parse_value(const char *s, double *v)
{
    if (strcmp(s, "NaN") == 0) {
        *v = NAN;
        return true;
    }
    if (strcmp(s, "+Inf") == 0 || strcmp(s, "Inf") == 0) {
        *v = INFINITY;
        return true;
    }
    if (strcmp(s, "-Inf") == 0) {
        *v = -INFINITY;
        return true;
    }
    char *end = NULL;
    errno = 0;
    *v = strtod(s, &end);
    return end != s && *end == '\0' && errno == 0 && !isnan(*v) && !isinf(*v);
}

static family_t *find_family(family_t *fams, int n, const char *name)
{
    for (int i = 0; i < n; i++)
        if (strcmp(fams[i].name, name) == 0)
            return &fams[i];
    return NULL;
}

/* The family a sample name belongs to (histogram suffixes stripped when the
 * base is a declared histogram). */
static family_t *family_of(family_t *fams, int n, const char *sample, const char **suffix)
{
    static const char *const sfx[] = {"_bucket", "_sum", "_count"};
    *suffix = "";
    for (size_t i = 0; i < 3; i++) {
        size_t sl = strlen(sfx[i]), nl = strlen(sample);
        if (nl > sl && strcmp(sample + nl - sl, sfx[i]) == 0) {
            char base[256];
            snprintf(base, sizeof(base), "%.*s", (int)(nl - sl), sample);
            family_t *f = find_family(fams, n, base);
            if (f && strcmp(f->type, "histogram") == 0) {
                *suffix = sfx[i];
                return f;
            }
        }
    }
    return find_family(fams, n, sample);
}

int prom_parse(const char *text, prom_doc_t *doc, char *errbuf, size_t errlen)
{
    memset(doc, 0, sizeof(*doc));
    family_t fams[256];
    int nf = 0;
    family_t *current = NULL;
    /* Histogram bookkeeping for the series being read. */
    char hist_series[2048] = "";
    double last_bucket = -1, inf_bucket = -1, last_le = -INFINITY;
    int lineno = 0;
    const char *p = text;
    if (*text && text[strlen(text) - 1] != '\n')
        return fail(errbuf, errlen, 0, "text does not end with a newline");
    while (*p) {
        lineno++;
        const char *eol = strchr(p, '\n');
        char line[4096];
        size_t ll = (size_t)(eol - p);
        if (ll >= sizeof(line))
            return fail(errbuf, errlen, lineno, "line too long");
        memcpy(line, p, ll);
        line[ll] = '\0';
        p = eol + 1;
        if (ll == 0)
            continue;
        if (line[0] == '#') {
            char kind[8], name[256];
            if (sscanf(line, "# %7s %255s", kind, name) != 2 ||
                (strcmp(kind, "HELP") != 0 && strcmp(kind, "TYPE") != 0))
                continue; /* a plain comment */
            const char *q = name;
            char tmp[256];
            if (read_name(&q, true, tmp, sizeof(tmp)) == 0 || *q)
                return fail(errbuf, errlen, lineno, "bad metric name \"%s\"", name);
            family_t *f = find_family(fams, nf, name);
            if (!f) {
                if (nf == 256)
                    return fail(errbuf, errlen, lineno, "too many families");
                f = &fams[nf++];
                memset(f, 0, sizeof(*f));
                snprintf(f->name, sizeof(f->name), "%s", name);
            }
            if (f->has_samples)
                return fail(errbuf, errlen, lineno, "%s for %s after its samples", kind, name);
            if (strcmp(kind, "HELP") == 0) {
                if (f->help)
                    return fail(errbuf, errlen, lineno, "second HELP for %s", name);
                f->help = true;
                const char *h = line + 7 + strlen(name);
                if (*h && *h != ' ')
                    return fail(errbuf, errlen, lineno, "HELP without a space");
                for (h = *h ? h + 1 : h; *h; h++)
                    if (*h == '\\' && h[1] != '\\' && h[1] != 'n')
                        return fail(errbuf, errlen, lineno, "bad escape in HELP");
                    else if (*h == '\\')
                        h++;
            } else {
                if (f->typed)
                    return fail(errbuf, errlen, lineno, "second TYPE for %s", name);
                f->typed = true;
                const char *t = line + 7 + strlen(name);
                if (*t != ' ')
                    return fail(errbuf, errlen, lineno, "TYPE without a type");
                t++;
                if (strcmp(t, "counter") && strcmp(t, "gauge") && strcmp(t, "histogram") &&
                    strcmp(t, "summary") && strcmp(t, "untyped"))
                    return fail(errbuf, errlen, lineno, "unknown type \"%s\"", t);
                snprintf(f->type, sizeof(f->type), "%s", t);
            }
            continue;
        }

        /* A sample: name [{labels}] value [timestamp] */
        const char *q = line;
        char name[256];
        if (read_name(&q, true, name, sizeof(name)) == 0)
            return fail(errbuf, errlen, lineno, "sample without a metric name");
        char key[4096];
        size_t kl = (size_t)snprintf(key, sizeof(key), "%s", name);
        char series_labels[2048] = ""; /* labels without le, for histogram grouping */
        size_t sl = 0;
        double le = NAN;
        bool has_le = false;
        if (*q == '{') {
            q++;
            key[kl++] = '{';
            bool first = true;
            char seen[PROM_MAX_LABELS][64];
            int nseen = 0;
            while (*q != '}') {
                if (!first) {
                    if (*q != ',')
                        return fail(errbuf, errlen, lineno, "expected ',' between labels");
                    q++;
                    key[kl++] = ',';
                }
                first = false;
                char lname[64];
                if (read_name(&q, false, lname, sizeof(lname)) == 0)
                    return fail(errbuf, errlen, lineno, "bad label name");
                for (int i = 0; i < nseen; i++)
                    if (strcmp(seen[i], lname) == 0)
                        return fail(errbuf, errlen, lineno, "label %s twice", lname);
                if (nseen < PROM_MAX_LABELS)
                    snprintf(seen[nseen++], 64, "%s", lname);
                if (q[0] != '=' || q[1] != '"')
                    return fail(errbuf, errlen, lineno, "expected =\" after label %s", lname);
                q += 2;
                const char *vstart = q;
                char value[1024];
                size_t vl = 0;
                while (*q != '"') {
                    if (!*q)
                        return fail(errbuf, errlen, lineno, "unterminated label value");
                    if (*q == '\\') {
                        if (q[1] != '\\' && q[1] != '"' && q[1] != 'n')
                            return fail(errbuf, errlen, lineno, "bad escape in label value");
                        value[vl++] = q[1] == 'n' ? '\n' : q[1];
                        q += 2;
                    } else {
                        value[vl++] = *q++;
                    }
                    if (vl >= sizeof(value) - 1)
                        return fail(errbuf, errlen, lineno, "label value too long");
                }
                value[vl] = '\0';
                kl += (size_t)snprintf(key + kl, sizeof(key) - kl, "%s=\"%.*s\"", lname,
                                       (int)(q - vstart), vstart);
                q++;
                if (strcmp(lname, "le") == 0) {
                    has_le = true;
                    if (!parse_value(value, &le))
                        return fail(errbuf, errlen, lineno, "le=\"%s\" is not a number", value);
                } else {
                    sl += (size_t)snprintf(series_labels + sl, sizeof(series_labels) - sl, "%s=%s,",
                                           lname, value);
                }
            }
            q++;
            key[kl++] = '}';
            key[kl] = '\0';
        }
        if (*q != ' ')
            return fail(errbuf, errlen, lineno, "expected a space before the value");
        q++;
        char vtext[64];
        size_t vn = strcspn(q, " ");
        if (vn == 0 || vn >= sizeof(vtext))
            return fail(errbuf, errlen, lineno, "missing value");
        snprintf(vtext, sizeof(vtext), "%.*s", (int)vn, q);
        double v;
        if (!parse_value(vtext, &v))
            return fail(errbuf, errlen, lineno, "value \"%s\" is not a number", vtext);
        q += vn;
        if (*q == ' ') {
            char *end;
            q++;
            strtoll(q, &end, 10);
            if (end == q || *end)
                return fail(errbuf, errlen, lineno, "bad timestamp");
        } else if (*q) {
            return fail(errbuf, errlen, lineno, "trailing text");
        }

        const char *suffix;
        family_t *f = family_of(fams, nf, name, &suffix);
        if (!f) {
            if (nf == 256)
                return fail(errbuf, errlen, lineno, "too many families");
            f = &fams[nf++];
            memset(f, 0, sizeof(*f));
            snprintf(f->name, sizeof(f->name), "%s", name);
            snprintf(f->type, sizeof(f->type), "untyped");
        }
        if (f->closed)
            return fail(errbuf, errlen, lineno, "samples of %s are not together", f->name);
        if (current && current != f)
            current->closed = true;
        current = f;
        f->has_samples = true;
        if (strcmp(f->type, "counter") == 0 && (v < 0 || isnan(v)))
            return fail(errbuf, errlen, lineno, "counter %s is negative", name);
        if (strcmp(f->type, "histogram") == 0) {
            if (!*suffix)
                return fail(errbuf, errlen, lineno, "histogram sample %s without a suffix", name);
            if (strcmp(suffix, "_bucket") == 0) {
                if (!has_le)
                    return fail(errbuf, errlen, lineno, "bucket without le");
                if (strcmp(hist_series, series_labels) != 0 || last_bucket < 0) {
                    snprintf(hist_series, sizeof(hist_series), "%s", series_labels);
                    last_bucket = -1;
                    last_le = -INFINITY;
                    inf_bucket = -1;
                }
                if (le <= last_le)
                    return fail(errbuf, errlen, lineno, "buckets not in increasing le order");
                if (v < last_bucket)
                    return fail(errbuf, errlen, lineno, "buckets not cumulative");
                last_le = le;
                last_bucket = v;
                if (isinf(le))
                    inf_bucket = v;
            } else if (has_le) {
                return fail(errbuf, errlen, lineno, "le on %s", name);
            } else if (strcmp(suffix, "_count") == 0) {
                if (strcmp(hist_series, series_labels) != 0 || inf_bucket < 0)
                    return fail(errbuf, errlen, lineno, "_count without a le=\"+Inf\" bucket");
                if (v != inf_bucket)
                    return fail(errbuf, errlen, lineno, "_count %g != +Inf bucket %g", v,
                                inf_bucket);
                last_bucket = -1;
            }
        }
        doc->samples = loom_xrealloc(doc->samples, (doc->n + 1) * sizeof(*doc->samples));
        doc->samples[doc->n].key = loom_xstrdup(key);
        doc->samples[doc->n].value = v;
        doc->n++;
    }
    doc->families = nf;
    return 0;
}

double prom_get(const prom_doc_t *doc, const char *key, bool *found)
{
    for (size_t i = 0; i < doc->n; i++) {
        if (strcmp(doc->samples[i].key, key) == 0) {
            if (found)
                *found = true;
            return doc->samples[i].value;
        }
    }
    if (found)
        *found = false;
    return 0;
}

void prom_free(prom_doc_t *doc)
{
    for (size_t i = 0; i < doc->n; i++)
        free(doc->samples[i].key);
    free(doc->samples);
    memset(doc, 0, sizeof(*doc));
}

bool prom_python_parse(const char *text, char *out, size_t size)
{
    char path[] = "/tmp/loom-prom-XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0) {
        snprintf(out, size, "mkstemp: %s", strerror(errno));
        return false;
    }
    FILE *f = fdopen(fd, "w");
    fputs(text, f);
    fclose(f);
    char cmd[2048];
    snprintf(cmd, sizeof(cmd),
             "%s -c 'import sys\n"
             "from prometheus_client.parser import text_string_to_metric_families as p\n"
             "fams = list(p(open(sys.argv[1]).read()))\n"
             "print(\"families=%%d samples=%%d\" %% (len(fams), sum(len(f.samples) for f in "
             "fams)))' %s 2>&1",
             LOOM_TEST_PYTHON3, path);
    FILE *pipe = popen(cmd, "r");
    size_t n = pipe ? fread(out, 1, size - 1, pipe) : 0;
    out[n] = '\0';
    int status = pipe ? pclose(pipe) : -1;
    unlink(path);
    bool ok = status == 0 && strncmp(out, "families=", 9) == 0;
    if (ok)
        out[strcspn(out, "\n")] = '\0';
    return ok;
}

double prom_scrape(int port, const char *key)
{
    loom_test_http_res_t r;
    loom_test_http(port, "GET", "/metrics", NULL, NULL, NULL, &r);
    cr_assert_eq(r.status, 200);
    prom_doc_t doc;
    char why[200];
    cr_assert_eq(prom_parse(r.body, &doc, why, sizeof(why)), 0, "%s", why);
    bool found = false;
    double v = prom_get(&doc, key, &found);
    prom_free(&doc);
    loom_test_http_res_free(&r);
    return found ? v : 0;
}
