/*
 * The README's configuration table and the variables the loom binary knows
 * (engine and services, as `loom config` prints them) must name the same
 * variables: a variable cannot be added without its row, nor a row outlive
 * its variable.
 */
#include "support.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_VARS 256

static size_t readme_vars(char names[][64])
{
    FILE *f = fopen(LOOM_TEST_README, "r");
    cr_assert_not_null(f, "cannot read %s", LOOM_TEST_README);
    char line[4096];
    size_t n = 0;
    while (fgets(line, sizeof(line), f) && n < MAX_VARS) {
        /* rows look like: | `LOOM_NAME` | default | meaning | */
        if (strncmp(line, "| `LOOM_", 8) != 0)
            continue;
        size_t len = strcspn(line + 3, "`");
        if (memchr(line + 3, '<', len)) /* LOOM_KAFKA_<PROPERTY>: the pass-through */
            continue;
        snprintf(names[n++], 64, "%.*s", (int)len, line + 3);
    }
    fclose(f);
    return n;
}

static size_t binary_vars(char names[][64])
{
    const char *argv[] = {loom_test_bin(), "config", NULL};
    const char *env[] = {NULL};
    char *out, *err;
    cr_assert_eq(loom_test_run(argv, env, &out, &err), 0, "%s", err);
    size_t n = 0;
    for (char *line = strtok(out, "\n"); line && n < MAX_VARS; line = strtok(NULL, "\n"))
        if (strncmp(line, "LOOM_", 5) == 0)
            snprintf(names[n++], 64, "%.*s", (int)strcspn(line, "="), line);
    free(out);
    free(err);
    return n;
}

static bool contains(char names[][64], size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(names[i], name) == 0)
            return true;
    return false;
}

Test(config_doc, readme_table_and_binary_name_the_same_variables)
{
    static char doc[MAX_VARS][64], bin[MAX_VARS][64];
    unsetenv("LOOM_DATABASE_URL");
    size_t nd = readme_vars(doc), nb = binary_vars(bin);
    cr_assert_gt(nb, 10);
    for (size_t i = 0; i < nb; i++)
        cr_expect(contains(doc, nd, bin[i]), "%s has no row in the README configuration table",
                  bin[i]);
    for (size_t i = 0; i < nd; i++)
        cr_expect(contains(bin, nb, doc[i]), "the README documents %s, which loom does not know",
                  doc[i]);
}
