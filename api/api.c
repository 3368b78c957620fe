/*
 * api.c: the route table: every service's routes in one array. Add a line
 * to `groups` for each new service file.
 */
#include "api.h"
#include "loom/mem.h"

#include <pthread.h>
#include <string.h>

typedef struct group {
    const loom_route_t *routes;
    const size_t *n;
} group_t;

static const group_t groups[] = {
    {api_engine_routes, &api_engine_n_routes},
    {api_messages_routes, &api_messages_n_routes},
    {api_registry_routes, &api_registry_n_routes},
};

static loom_route_t *all;
static size_t n_all;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void build(void)
{
    for (size_t g = 0; g < sizeof(groups) / sizeof(groups[0]); g++)
        n_all += *groups[g].n;
    all = loom_xcalloc(n_all ? n_all : 1, sizeof(*all));
    size_t k = 0;
    for (size_t g = 0; g < sizeof(groups) / sizeof(groups[0]); g++) {
        memcpy(all + k, groups[g].routes, *groups[g].n * sizeof(*all));
        k += *groups[g].n;
    }
}

const loom_route_t *loom_app_routes(size_t *n)
{
    pthread_once(&once, build);
    if (n)
        *n = n_all;
    return all;
}
