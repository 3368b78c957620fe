/*
 * topic.c: which topic a command travels on (loom/topic.h).
 */
#include "loom/topic.h"

#include <stdio.h>
#include <string.h>

/* Set once at start (LOOM_TOPIC_PREFIX), read everywhere after. */
static char topic_prefix[64] = "loom";

/* Routes declared by services' command tables, set at start. */
#define ROUTES_MAX 512
static struct {
    const char *type, *topic;
} routes[ROUTES_MAX];
static size_t n_routes;

void loom_topic_prefix_set(const char *prefix)
{
    snprintf(topic_prefix, sizeof(topic_prefix), "%s", prefix && *prefix ? prefix : "loom");
}

const char *loom_topic_prefix(void)
{
    return topic_prefix;
}

void loom_topic_map(const char *declared, char *out, size_t size)
{
    if (strncmp(declared, "loom.", 5) == 0)
        snprintf(out, size, "%s.%s", topic_prefix, declared + 5);
    else
        snprintf(out, size, "%s", declared);
}

void loom_topic_for_command(const char *type, char *out, size_t size)
{
    for (size_t i = 0; i < n_routes; i++)
        if (strcmp(routes[i].type, type) == 0) {
            loom_topic_map(routes[i].topic, out, size);
            return;
        }
    size_t service = strcspn(type, ".");
    snprintf(out, size, "%s.cmd.%.*s", topic_prefix, (int)service, type);
}

void loom_topic_legacy_for_command(const char *type, char *out, size_t size)
{
    snprintf(out, size, "%s.cmd.%s", topic_prefix, type);
}

bool loom_topic_route_add(const char *type, const char *topic)
{
    for (size_t i = 0; i < n_routes; i++)
        if (strcmp(routes[i].type, type) == 0)
            return strcmp(routes[i].topic, topic) == 0;
    if (n_routes == ROUTES_MAX)
        return false;
    routes[n_routes].type = type;
    routes[n_routes].topic = topic;
    n_routes++;
    return true;
}

void loom_topic_routes_clear(void)
{
    n_routes = 0;
}
