/*
 * cli_new.c: `loom new service NAME`: writes a new service, in a project of
 * its own built against an installed Loom, from the files of
 * engine/templates/service/ (embedded by engine/templates/CMakeLists.txt):
 * its table, a command, an op, two routes, the descriptor, main.c with the
 * service registered, CMakeLists.txt and a test with the test kit.
 */
#include "cli.h"
#include "loom/version.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

typedef struct loom_template_file {
    const char *path, *text;
} loom_template_file_t;
extern const loom_template_file_t loom_service_template[];

static bool valid_name(const char *name)
{
    size_t n = strlen(name);
    if (n == 0 || n > 40 || !islower((unsigned char)name[0]))
        return false;
    for (size_t i = 0; i < n; i++)
        if (!islower((unsigned char)name[i]) && !isdigit((unsigned char)name[i]) && name[i] != '_')
            return false;
    return strcmp(name, "engine") != 0 && strcmp(name, "loom") != 0;
}

/* text with @name@, @NAME@ and @version@ replaced (new string). */
static char *expand(const char *text, const char *name)
{
    char upper[64];
    size_t k = 0;
    for (; name[k] && k < sizeof(upper) - 1; k++)
        upper[k] = (char)toupper((unsigned char)name[k]);
    upper[k] = '\0';
    char version[32];
    snprintf(version, sizeof(version), "%d.%d", LOOM_VERSION_MAJOR, LOOM_VERSION_MINOR);
    const struct {
        const char *from, *to;
    } subst[] = {{"@name@", name}, {"@NAME@", upper}, {"@version@", version}};
    size_t cap = strlen(text) * 2 + 64, len = 0;
    char *out = malloc(cap);
    if (!out)
        return NULL;
    for (const char *p = text; *p;) {
        size_t s = 0;
        while (s < LOOM_COUNT(subst) && strncmp(p, subst[s].from, strlen(subst[s].from)) != 0)
            s++;
        const char *piece = s < LOOM_COUNT(subst) ? subst[s].to : p;
        size_t plen = s < LOOM_COUNT(subst) ? strlen(piece) : 1;
        if (len + plen + 1 > cap) {
            cap = (len + plen + 1) * 2;
            char *grown = realloc(out, cap);
            if (!grown) {
                free(out);
                return NULL;
            }
            out = grown;
        }
        memcpy(out + len, piece, plen);
        len += plen;
        p += s < LOOM_COUNT(subst) ? strlen(subst[s].from) : 1;
    }
    out[len] = '\0';
    return out;
}

static int make_dirs(const char *path)
{
    char buf[1024];
    snprintf(buf, sizeof(buf), "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST)
            return -1;
        *p = '/';
    }
    return mkdir(buf, 0755) != 0 && errno != EEXIST ? -1 : 0;
}

static int write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "wx"); /* never over a file that is there */
    if (!f)
        return -1;
    size_t n = strlen(text);
    int rc = fwrite(text, 1, n, f) == n ? 0 : -1;
    if (fclose(f) != 0)
        rc = -1;
    return rc;
}

static int cmd_new(cli_ctx_t *ctx, int argc, char **argv)
{
    (void)ctx;
    const char *kind = NULL, *name = NULL, *dir = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--dir") == 0) {
            if (++i >= argc)
                return cli_usage_error("new", "--dir needs a directory");
            dir = argv[i];
        } else if (argv[i][0] == '-') {
            return cli_usage_error("new", "unknown option '%s'", argv[i]);
        } else if (!kind) {
            kind = argv[i];
        } else if (!name) {
            name = argv[i];
        } else {
            return cli_usage_error("new", "unexpected argument '%s'", argv[i]);
        }
    }
    if (!kind || strcmp(kind, "service") != 0)
        return cli_usage_error("new", "what to make: 'service NAME'");
    if (!name)
        return cli_usage_error("new", "a service needs a NAME");
    if (!valid_name(name))
        return cli_usage_error("new",
                               "invalid service name '%s': [a-z][a-z0-9_]*, at most 40 "
                               "characters, not 'engine' or 'loom'",
                               name);
    if (!dir)
        dir = name;
    struct stat st;
    if (stat(dir, &st) == 0)
        return cli_fail("new", "%s exists: choose another --dir", dir);
    for (const loom_template_file_t *t = loom_service_template; t->path; t++) {
        char *rel = expand(t->path, name);
        char *text = expand(t->text, name);
        if (!rel || !text) {
            free(rel);
            free(text);
            return cli_fail("new", "out of memory");
        }
        size_t rl = strlen(rel);
        if (rl > 3 && strcmp(rel + rl - 3, ".in") == 0)
            rel[rl - 3] = '\0';
        char path[1200], parent[1200];
        snprintf(path, sizeof(path), "%s/%s", dir, rel);
        snprintf(parent, sizeof(parent), "%s", path);
        *strrchr(parent, '/') = '\0';
        int rc = make_dirs(parent) == 0 ? write_file(path, text) : -1;
        int e = errno;
        free(rel);
        free(text);
        if (rc != 0)
            return cli_fail("new", "could not write %s: %s", path, strerror(e));
        printf("  wrote %s\n", path);
    }
    printf("The service %s is in %s: its table, a command, an op, two routes, the\n"
           "descriptor, main.c with the service registered, and a test with the test kit.\n"
           "Build and test it against an installed Loom (docs/writing-a-service.md):\n"
           "  cmake -S %s -B %s/build -DCMAKE_PREFIX_PATH=/where/loom/is/installed\n"
           "  cmake --build %s/build && (cd %s/build && ctest --output-on-failure)\n",
           name, dir, dir, dir, dir, dir);
    return LOOM_EXIT_OK;
}

const cli_command_t cli_new_command = {
    "new", "write the files of a new service",
    "usage: loom new service NAME [--dir DIR]\n"
    "\n"
    "Writes a new service NAME into DIR (default ./NAME), as a project of its own\n"
    "that builds against an installed Loom (find_package(Loom)): its table\n"
    "(migrations/1000_NAME.up.sql), the command NAME.put, the op NAME.items.get,\n"
    "the routes POST /v1/NAME/items and GET /v1/NAME/items/{id}, the descriptor\n"
    "(service.c), main.c with the service registered, CMakeLists.txt and a test\n"
    "with the test kit (test_NAME.c). NAME is [a-z][a-z0-9_]*. DIR must not\n"
    "exist. docs/writing-a-service.md explains each part.\n",
    false, cmd_new};
