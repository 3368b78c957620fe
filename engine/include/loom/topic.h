/*
 * Topics: where a command travels (docs/architecture.md, "Topics and order").
 *
 * Kafka orders messages only within one partition of one topic, so every
 * command that can touch one entity travels on one topic under one key. The
 * unit is the service, not the command type: a command of type
 * "registry.put_instance" goes to "<prefix>.cmd.registry" (the part of the
 * type before its first dot names the service), keyed by the instance id,
 * and `ce_type` picks the handler. A service may declare another topic for a
 * command of an independent aggregate (loom_command_t.topic); the worker
 * registers those routes at start so publishers in the same process use
 * them too.
 */
#ifndef LOOM_TOPIC_H
#define LOOM_TOPIC_H

#include <stdbool.h>
#include <stddef.h>

/* Room for a topic name (Kafka allows 249 characters). */
#define LOOM_TOPIC_MAX 256

/* Sets the prefix (LOOM_TOPIC_PREFIX; default "loom"). Call at start. */
void loom_topic_prefix_set(const char *prefix);
const char *loom_topic_prefix(void);

/* A topic as code declares it ("loom.cmd.x", "loom.evt.y") under the
 * configured prefix ("staging.cmd.x"); other names are kept as they are. */
void loom_topic_map(const char *declared, char *out, size_t size);

/*
 * The topic of a command type: the route a service declared for it (see
 * loom_topic_route_add), else "<prefix>.cmd.<service>" where the service is
 * the type up to its first dot ("registry.put_instance" -> "loom.cmd.registry";
 * a type without a dot is its own service).
 */
void loom_topic_for_command(const char *type, char *out, size_t size);

/* The topic an earlier Loom (before topics per service) used for a command
 * type: "<prefix>.cmd.<type>". Workers drain such topics when they exist. */
void loom_topic_legacy_for_command(const char *type, char *out, size_t size);

/*
 * Declares that commands of `type` travel on `topic` (as code declares it,
 * "loom.cmd.registry.definitions"; mapped under the prefix when used).
 * Both strings are borrowed and must outlive the process's use of them.
 * Returns false when the table is full or the type already has another
 * route. Called once at start, before threads publish.
 */
bool loom_topic_route_add(const char *type, const char *topic);
/* Forgets every declared route (tests). */
void loom_topic_routes_clear(void);

#endif
