/*
 * registry.h: the write side of the registry service (README.md, "HTTP API").
 *
 * Commands (topic loom.cmd.registry; Kafka key = the definition or instance id,
 * so one entity's commands are applied in the order they were published):
 *   registry.put_definition     {"definition": {...}, "caller", "admin"?}
 *                                                               -> {"id", "definition"}
 *   registry.delete_definition  {"id", "caller", "admin"?}      -> {"id", "deleted": true}
 *   registry.put_instance       {"url", "deployment_id"?, "node_url"?, "tags"?,
 *                                "id"?, "caller", "admin"?}     -> the instance
 *   registry.delete_instance    {"id", "caller", "admin"?}      -> {"id", "deleted": true}
 *   registry.instance_status    {"id", "status", "checked_at", "details"?, "connect_ms"?}
 *                                                               -> {"id", "status", "applied"}
 *   registry.instance_heartbeats {"ids": [...], "at"}           -> {"updated": N}
 *
 * "caller" is the slug of whoever asks (the gateway puts the token's) and
 * "admin" whether it holds registry:admin: the first registration of a url
 * (the first put of a definition id) fixes its slug, and only that slug or
 * an admin may register it again or delete it (INSTANCE_OWNED_BY_OTHER,
 * DEFINITION_OWNED_BY_OTHER otherwise). Whoever can publish to the
 * command topics is trusted to say who the caller is, as with every Loom
 * command. Events (stream registry.definition-<id> / registry.instance-<id>):
 * registry.definition_put, registry.definition_deleted,
 * registry.instance_registered, registry.instance_deleted,
 * registry.instance_status_changed, registry.instances_heartbeat.
 *
 * The health probe (probe.c, probe_job.c) is a periodic job: it connects to
 * every instance's host:port and publishes registry.instance_status for each
 * instance whose status changed, and one registry.instance_heartbeats per
 * page of instances found healthy again.
 */
#ifndef LOOM_CONSUMERS_REGISTRY_H
#define LOOM_CONSUMERS_REGISTRY_H

#include "loom/service.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

/* store.c: the command table of the consumer registry.store. */
extern const loom_command_t registry_commands[];

/* ---- probe.c: TCP health probes on a libuv loop of their own ------------------------ */

typedef struct registry_probe {
    const char *host; /* borrowed: an IP address or a name to resolve */
    int port;
    /* Results. status is "healthy", "degraded", "unreachable" or
     * "not_probed" (outside the allow-list; details says why) (static
     * strings), or NULL when the probe could not run for a local reason (no
     * file descriptors left): such an instance keeps its status. */
    const char *status;
    int64_t connect_ms; /* how long the connection took; -1 when none was made */
    char details[128];  /* why not healthy ("connection refused", ...); "" when healthy */
} registry_probe_t;

/*
 * The probe allow-list (LOOM_REGISTRY_PROBE_ALLOW): a comma-separated list
 * of CIDR blocks ("10.0.0.0/8", "fd12::/16", or one address) and host-name
 * suffixes ("svc.cluster.local" matches that name and every name ending in
 * ".svc.cluster.local"); "*" allows every address. It is checked on the
 * address a probe would connect to, after name resolution: an address is
 * allowed when it lies in one of the blocks, or when the instance's host
 * is a name that matches one of the suffixes. 169.254.0.0/16 (link-local,
 * where clouds serve instance metadata) and fd00:ec2::254 are refused
 * whatever the list says, also as IPv4-mapped IPv6 addresses.
 */
typedef struct registry_probe_allow registry_probe_allow_t;

/* The default: loopback and the private networks. */
#define REGISTRY_PROBE_ALLOW_DEFAULT \
    "127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7"

/* Parses text into *out (free with registry_probe_allow_free); fails with
 * CONFIG_INVALID naming the entry. */
int registry_probe_allow_parse(const char *text, registry_probe_allow_t **out, loom_error_t *err);
void registry_probe_allow_free(registry_probe_allow_t *allow);
/* The check of the LOOM_REGISTRY_PROBE_ALLOW config variable. */
bool registry_probe_allow_valid(const char *text, char *allowed, size_t size);
/* NULL when host (as registered) may be probed at addr; else why not (a
 * static string). allow NULL allows everything but the always-refused. */
const char *registry_probe_allow_check(const registry_probe_allow_t *allow, const char *host,
                                       const struct sockaddr *addr);

typedef struct registry_probe_opts {
    int64_t timeout_ms;                  /* resolve + connect; 0: 3000. Past it: unreachable */
    int64_t degraded_ms;                 /* a connection slower than this is degraded; 0: 1000 */
    int max_in_flight;                   /* probes at once (one socket each); 0: 256 */
    const registry_probe_allow_t *allow; /* borrowed; NULL: allow all but the
                                          * always-refused addresses */
    int peak_in_flight;                  /* out: the most probes that ran at once */
} registry_probe_opts_t;

#define REGISTRY_PROBE_TIMEOUT_MS    3000
#define REGISTRY_PROBE_DEGRADED_MS   1000
#define REGISTRY_PROBE_MAX_IN_FLIGHT 256

/*
 * Probes every entry of probes: resolves the host (IP literals at once,
 * names on libuv's thread pool), checks the address against the allow-list
 * (outside it -> not_probed, no connection attempted), opens a TCP
 * connection with a timer for the timeout, and classifies: no connection
 * (refused, unroutable, timed out, unresolvable) -> unreachable; connected
 * in more than degraded_ms -> degraded; else healthy. Runs a libuv loop of its own on the calling
 * thread until every probe is done, with at most max_in_flight sockets open; it never blocks on one
 * probe. Returns 0, or a negative code with err when the loop could not be set up. opts may be
 * NULL.
 */
int registry_probe_run(registry_probe_t *probes, size_t n, registry_probe_opts_t *opts,
                       loom_error_t *err);

/* ---- probe_job.c ------------------------------------------------------------------- */

/* The periodic job "registry.probe". */
int registry_probe_job(loom_job_ctx_t *ctx, loom_error_t *err);

/* service.c: the whole service, registered in cmd/loom/main.c. */
extern const loom_service_t loom_registry_service;

#endif
