/*
 * docs/errors.md is the catalogue of every error code a user can see. This
 * test compares it both ways with the engine's codes (LOOM_ERROR_CODE_MAP)
 * and with every code the built loom binary knows (`loom op --errors`, which
 * adds the catalogues services hand over in loom_app_t): a code cannot be
 * added, changed or removed without its row, and the doc lists nothing that
 * does not exist. The class table of the doc must match the class map too.
 */
#include "support.h"
#include "loom/error.h"
#include "loom/mem.h"

#include <criterion/criterion.h>
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct row {
    char code[64], cls[32], retriable[8];
    int http, exit;
    char meaning[512];
} row_t;

typedef struct doc {
    row_t codes[256];
    size_t n_codes;
    row_t classes[32];
    size_t n_classes;
} doc_t;

static char *read_file(const char *path)
{
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f, "could not open %s", path);
    char *buf = NULL;
    size_t len = 0;
    char chunk[4096];
    size_t n;
    while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0) {
        buf = loom_xrealloc(buf, len + n + 1);
        memcpy(buf + len, chunk, n);
        len += n;
        buf[len] = '\0';
    }
    fclose(f);
    return buf;
}

/* Splits "| a | b | c |" into trimmed cells; returns the count. */
static int cells(const char *line, char out[][512], int max)
{
    if (line[0] != '|')
        return 0;
    int n = 0;
    const char *p = line + 1;
    while (*p && n < max) {
        const char *bar = strchr(p, '|');
        if (!bar)
            break;
        const char *s = p, *e = bar;
        while (s < e && *s == ' ')
            s++;
        while (e > s && e[-1] == ' ')
            e--;
        snprintf(out[n++], 512, "%.*s", (int)(e - s), s);
        p = bar + 1;
    }
    return n;
}

static void parse_doc(doc_t *d)
{
    memset(d, 0, sizeof(*d));
    char *text = read_file(LOOM_TEST_ERRORS_DOC);
    const char *section = "";
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        if (strncmp(line, "## ", 3) == 0) {
            section = strcmp(line, "## Codes") == 0     ? "codes"
                      : strcmp(line, "## Classes") == 0 ? "classes"
                                                        : "";
            continue;
        }
        char c[8][512];
        int n = cells(line, c, 8);
        if (n == 0 || strcmp(c[0], "class") == 0 || strcmp(c[0], "code") == 0 ||
            strncmp(c[0], "---", 3) == 0)
            continue;
        if (strcmp(section, "codes") == 0) {
            cr_assert_eq(n, 6, "a code row needs 6 cells: %s", line);
            size_t len = strlen(c[0]);
            cr_assert(len > 2 && c[0][0] == '`' && c[0][len - 1] == '`',
                      "write the code as `CODE`: %s", line);
            row_t *r = &d->codes[d->n_codes++];
            snprintf(r->code, sizeof(r->code), "%.*s", (int)(len - 2), c[0] + 1);
            snprintf(r->cls, sizeof(r->cls), "%s", c[1]);
            r->http = atoi(c[2]);
            r->exit = atoi(c[3]);
            snprintf(r->retriable, sizeof(r->retriable), "%s", c[4]);
            snprintf(r->meaning, sizeof(r->meaning), "%s", c[5]);
        } else if (strcmp(section, "classes") == 0) {
            cr_assert_eq(n, 3, "a class row needs 3 cells: %s", line);
            row_t *r = &d->classes[d->n_classes++];
            snprintf(r->cls, sizeof(r->cls), "%s", c[0]);
            r->http = atoi(c[1]);
            r->exit = atoi(c[2]);
        }
    }
    free(text);
    cr_assert_gt(d->n_codes, 0, "no code rows found under \"## Codes\"");
}

static const row_t *find_row(const doc_t *d, const char *code)
{
    const row_t *found = NULL;
    for (size_t i = 0; i < d->n_codes; i++) {
        if (strcmp(d->codes[i].code, code) == 0) {
            cr_assert_null(found, "%s has two rows in docs/errors.md", code);
            found = &d->codes[i];
        }
    }
    return found;
}

static void expect_row(const doc_t *d, const char *code, const char *cls, int http, int exit,
                       const char *retriable, const char *meaning)
{
    const row_t *r = find_row(d, code);
    cr_expect_not_null(r, "%s is missing from docs/errors.md", code);
    if (!r)
        return;
    cr_expect_str_eq(r->cls, cls, "%s: class", code);
    cr_expect_eq(r->http, http, "%s: HTTP status", code);
    cr_expect_eq(r->exit, exit, "%s: exit status", code);
    cr_expect_str_eq(r->retriable, retriable, "%s: retriable", code);
    cr_expect_str_eq(r->meaning, meaning, "%s: meaning", code);
}

static bool upper_snake(const char *s)
{
    if (!isupper((unsigned char)s[0]))
        return false;
    for (; *s; s++)
        if (!isupper((unsigned char)*s) && !isdigit((unsigned char)*s) && *s != '_')
            return false;
    return true;
}

Test(errors_doc, every_engine_code_has_its_row)
{
    doc_t *d = loom_xcalloc(1, sizeof(*d));
    parse_doc(d);
    for (size_t i = 0; i < LOOM_CODE__COUNT; i++) {
        const loom_error_code_t *c = &loom_error_codes[i];
        cr_expect(upper_snake(c->name), "%s is not UPPER_SNAKE", c->name);
        expect_row(d, c->name, loom_error_class_name(c->cls), loom_error_class_http_status(c->cls),
                   loom_error_class_exit_status(c->cls), c->retriable ? "yes" : "no", c->summary);
    }
    free(d);
}

Test(errors_doc, the_doc_and_the_binary_list_the_same_codes)
{
    doc_t *d = loom_xcalloc(1, sizeof(*d));
    parse_doc(d);
    const char *argv[] = {loom_test_bin(), "op", "--errors", NULL};
    char *out, *err;
    cr_assert_eq(loom_test_run(argv, NULL, &out, &err), 0, "%s", err);
    char listed[256][64];
    size_t n = 0;
    for (char *line = strtok(out, "\n"); line; line = strtok(NULL, "\n")) {
        if (strncmp(line, "CODE ", 5) == 0)
            continue;
        char code[64], cls[32], retriable[8];
        int http, exit, off = 0;
        cr_assert_eq(
            sscanf(line, "%63s %31s %d %d %7s %n", code, cls, &http, &exit, retriable, &off), 5,
            "unexpected line: %s", line);
        for (size_t i = 0; i < n; i++)
            cr_assert_str_neq(listed[i], code, "%s is defined twice", code);
        snprintf(listed[n++], sizeof(listed[0]), "%s", code);
        cr_expect(upper_snake(code), "%s is not UPPER_SNAKE", code);
        expect_row(d, code, cls, http, exit, retriable, line + off);
    }
    cr_assert_geq(n, LOOM_CODE__COUNT);
    for (size_t i = 0; i < d->n_codes; i++) {
        bool known = false;
        for (size_t j = 0; j < n && !known; j++)
            known = strcmp(listed[j], d->codes[i].code) == 0;
        cr_expect(known, "docs/errors.md lists %s, which no catalogue defines", d->codes[i].code);
    }
    free(out);
    free(err);
    free(d);
}

Test(errors_doc, the_class_table_matches_the_class_map)
{
    doc_t *d = loom_xcalloc(1, sizeof(*d));
    parse_doc(d);
    cr_assert_eq(d->n_classes, LOOM_ERR__CLASS_COUNT - 1, "one row per class except none");
    for (int c = LOOM_ERR_BAD_REQUEST; c < LOOM_ERR__CLASS_COUNT; c++) {
        bool found = false;
        for (size_t i = 0; i < d->n_classes; i++) {
            if (strcmp(d->classes[i].cls, loom_error_class_name((loom_error_class_t)c)) != 0)
                continue;
            found = true;
            cr_expect_eq(d->classes[i].http, loom_error_class_http_status((loom_error_class_t)c));
            cr_expect_eq(d->classes[i].exit, loom_error_class_exit_status((loom_error_class_t)c));
        }
        cr_expect(found, "class %s has no row", loom_error_class_name((loom_error_class_t)c));
    }
    free(d);
}
