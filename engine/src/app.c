/*
 * app.c: an application's tables, gathered from its services (loom/app.h).
 */
#include "loom/app.h"
#include "loom/mem.h"
#include "loom/version.h"

#include <stdlib.h>
#include <string.h>

typedef struct built {
    loom_migration_t *migrations;
    loom_config_var_t *config_vars;
    const loom_op_t **ops;
    loom_error_catalogue_t *catalogues;
    loom_consumer_def_t *consumers;
    loom_periodic_def_t *jobs;
    loom_projection_t *projections;
    loom_route_t *routes;
    loom_task_def_t *tasks;
    loom_oneshot_def_t *oneshots;
} built_t;

/* Appends n elements of size sz from src to *dst (which holds *count). */
static void append(void *dst_ptr, size_t *count, const void *src, size_t n, size_t sz)
{
    void **dst = dst_ptr;
    if (n == 0)
        return;
    *dst = loom_xrealloc(*dst, (*count + n) * sz);
    memcpy((char *)*dst + *count * sz, src, n * sz);
    *count += n;
}

/* Appends the entries of table src, which ends with an entry whose `field`
 * is NULL (an empty field: the entry itself), to dst holding n. */
#define APPEND_TABLE(dst, n, src, field)                   \
    do {                                                   \
        size_t len_ = 0;                                   \
        while ((src) && (src)[len_] field)                 \
            len_++;                                        \
        append(&(dst), &(n), (src), len_, sizeof(*(dst))); \
    } while (0)

static int by_version(const void *a, const void *b)
{
    const loom_migration_t *x = a, *y = b;
    return (x->version > y->version) - (x->version < y->version);
}

void loom_app_release(loom_app_t *app)
{
    built_t *b = app->built;
    if (!b)
        return;
    free(b->migrations);
    free(b->config_vars);
    free(b->ops);
    free(b->catalogues);
    free(b->consumers);
    free(b->jobs);
    free(b->projections);
    free(b->routes);
    free(b->tasks);
    free(b->oneshots);
    free(b);
    app->built = NULL;
}

int loom_app_build(loom_app_t *app, loom_error_t *err)
{
    loom_app_release(app);
    built_t *b = loom_xcalloc(1, sizeof(*b));
    size_t n_mig = 0, n_cfg = 0, n_ops = 0, n_cat = 0, n_cons = 0, n_jobs = 0, n_proj = 0,
           n_routes = 0, n_tasks = 0, n_oneshots = 0;
    int rc = 0;
    for (size_t i = 0; i <= app->n_services && rc == 0; i++) {
        const loom_service_t *s = i == 0 ? &loom_engine_service : app->services[i - 1];
        if (!s || !s->name || !*s->name) {
            rc = loom_error_set(err, LOOM_CODE_CONFIG_INVALID, "service %zu has no name", i);
            break;
        }
        for (size_t k = 0; k < i; k++) {
            const loom_service_t *o = k == 0 ? &loom_engine_service : app->services[k - 1];
            if (strcmp(o->name, s->name) == 0)
                rc = loom_error_set(err, LOOM_CODE_CONFIG_INVALID,
                                    "service \"%s\" is registered twice", s->name);
        }
        if (s->migrations)
            append(&b->migrations, &n_mig, s->migrations->items, s->migrations->count,
                   sizeof(*b->migrations));
        APPEND_TABLE(b->config_vars, n_cfg, s->config_vars, .name);
        APPEND_TABLE(b->ops, n_ops, s->ops, );
        APPEND_TABLE(b->consumers, n_cons, s->consumers, .name);
        APPEND_TABLE(b->jobs, n_jobs, s->jobs, .name);
        APPEND_TABLE(b->projections, n_proj, s->projections, .name);
        APPEND_TABLE(b->routes, n_routes, s->routes, .method);
        APPEND_TABLE(b->tasks, n_tasks, s->tasks, .name);
        APPEND_TABLE(b->oneshots, n_oneshots, s->oneshots, .name);
        if (s->errors)
            append(&b->catalogues, &n_cat, s->errors, 1, sizeof(*b->catalogues));
    }
    if (n_mig > 1)
        qsort(b->migrations, n_mig, sizeof(*b->migrations), by_version);
    for (size_t i = 1; i < n_mig && rc == 0; i++)
        if (b->migrations[i].version == b->migrations[i - 1].version)
            rc = loom_error_set(err, LOOM_CODE_CONFIG_INVALID,
                                "migrations %04d_%s and %04d_%s share a version",
                                b->migrations[i - 1].version, b->migrations[i - 1].name,
                                b->migrations[i].version, b->migrations[i].name);
    for (size_t i = 0; i < n_tasks && rc == 0; i++)
        for (size_t k = 0; k < i && rc == 0; k++)
            if (strcmp(b->tasks[i].name, b->tasks[k].name) == 0)
                rc = loom_error_set(err, LOOM_CODE_CONFIG_INVALID,
                                    "headless task \"%s\" is registered twice", b->tasks[i].name);
    for (size_t i = 0; i < n_oneshots && rc == 0; i++)
        for (size_t k = 0; k < i && rc == 0; k++)
            if (strcmp(b->oneshots[i].name, b->oneshots[k].name) == 0)
                rc = loom_error_set(err, LOOM_CODE_CONFIG_INVALID,
                                    "oneshot job \"%s\" is registered twice", b->oneshots[i].name);
    app->built = b;
    app->migrations = (loom_migration_set_t){b->migrations, n_mig};
    app->config_vars = b->config_vars;
    app->n_config_vars = n_cfg;
    app->ops = b->ops;
    app->n_ops = n_ops;
    app->error_catalogues = b->catalogues;
    app->n_error_catalogues = n_cat;
    app->consumers = b->consumers;
    app->n_consumers = n_cons;
    app->jobs = b->jobs;
    app->n_jobs = n_jobs;
    app->projections = b->projections;
    app->n_projections = n_proj;
    app->routes = b->routes;
    app->n_routes = n_routes;
    app->tasks = b->tasks;
    app->n_tasks = n_tasks;
    app->oneshots = b->oneshots;
    app->n_oneshots = n_oneshots;
    if (rc == 0) {
        loom_topic_routes_clear();
        rc = loom_consumer_routes_register(b->consumers, n_cons, err);
    }
    return rc;
}

const char *loom_version(void)
{
    return LOOM_VERSION;
}
