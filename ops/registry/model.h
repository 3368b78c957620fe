/*
 * model.h: the data model of the registry service (README.md, "HTTP API"),
 * shared by its three layers: api/registry.c checks requests with it (a bad
 * field answers 400 before anything is published), consumers/registry/
 * checks every command again (a command may come from anything that can
 * publish to Kafka, not only the gateway), and the ops and the consumer turn
 * instance rows into the same JSON shape.
 *
 * model.c implements it, in a library of its own (loom_registry_model,
 * ops/CMakeLists.txt) that loom_ops, loom_consumers and loom_api each link:
 * none of those libraries depends on another. Requests and commands are
 * checked against field tables (registry_field_t): each field says its key,
 * kind, limits and flags, and one function walks a table. Every check fills
 * err with INVALID_ARGUMENT and a message that starts with the field's path,
 * e.g. `definition.image.internal_ports[0]: must be 1-65535`.
 *
 * Instance ids are derived from the url ("inst-" + 24 hex digits of its
 * SHA-256): a url has one id forever, so the route, a retried command and a
 * re-registration all agree on it without a lookup, and two first
 * registrations of one url racing each other cannot make two ids.
 */
#ifndef LOOM_OPS_REGISTRY_MODEL_H
#define LOOM_OPS_REGISTRY_MODEL_H

#include "loom/error.h"

#include <jansson.h>
#include <libpq-fe.h>
#include <stdbool.h>
#include <stddef.h>

/* ---- limits and names ------------------------------------------------------------- */

#define REGISTRY_ID_MAX          64   /* definition ids */
#define REGISTRY_URL_MAX         2048 /* every url field */
#define REGISTRY_TEXT_MAX        512  /* names, versions, paths */
#define REGISTRY_LIST_MAX        64   /* ports, api specs, clients, tags, metadata */
#define REGISTRY_ENVARS_MAX      256
#define REGISTRY_ENVAR_KEY_MAX   256
#define REGISTRY_ENVAR_VALUE_MAX 32768
#define REGISTRY_METADATA_MAX    1024 /* one api spec metadata value */
#define REGISTRY_SHORT_MAX       64   /* languages, protocol types, versions of api specs */
#define REGISTRY_TAG_MAX         128
#define REGISTRY_DEPLOYMENT_MAX  128
#define REGISTRY_HOST_MAX        253
#define REGISTRY_CALLER_MAX      256 /* the caller's slug in commands */
#define REGISTRY_DETAILS_MAX     1024
#define REGISTRY_LIST_LIMIT_MAX  500 /* instances per page */
#define REGISTRY_LIST_LIMIT_DEF  100
#define REGISTRY_INSTANCE_ID_LEN 29 /* "inst-" + 24 hex digits */

/* The scope that lets a caller act on every slug's definitions and instances. */
#define REGISTRY_SCOPE_ADMIN "registry:admin"

/* Instance statuses, as stored and shown (NULL-terminated). */
extern const char *const registry_statuses[];

/* ---- error codes (the catalogue is ops/registry/errors.c) ---------------------------- */

enum {
    REGISTRY_ERR_DEFINITION_NOT_FOUND,
    REGISTRY_ERR_INSTANCE_NOT_FOUND,
    REGISTRY_ERR_INSTANCE_OWNED_BY_OTHER,
    REGISTRY_ERR_NODE_NOT_FOUND,
    REGISTRY_ERR_DEFINITION_OWNED_BY_OTHER,
    REGISTRY_ERR__COUNT
};

extern const loom_error_code_t registry_error_codes[REGISTRY_ERR__COUNT];

/* ---- field tables ---------------------------------------------------------------------- */

typedef enum registry_kind {
    REGISTRY_TEXT,   /* a string of 1..max bytes (0..max with REGISTRY_EMPTY_OK) without
                      * control characters (nor spaces with REGISTRY_NO_SPACE) */
    REGISTRY_BYTES,  /* a string of at most max bytes, any characters */
    REGISTRY_PORT,   /* an integer 1-65535 */
    REGISTRY_BOOL,   /* true or false */
    REGISTRY_OBJECT, /* an object with the members of .fields (others refused) */
    REGISTRY_MAP,    /* an object of at most max members, each an .items */
    REGISTRY_LIST,   /* an array of at most max entries, each an .items */
} registry_kind_t;

/* registry_field_t.flags */
enum {
    REGISTRY_REQUIRED = 1u << 0, /* absent (or null) is an error */
    REGISTRY_NO_SPACE = 1u << 1, /* TEXT: no spaces either */
    REGISTRY_EMPTY_OK = 1u << 2, /* TEXT: "" is allowed */
};

/* One field. A table is an array of them ended by one with key NULL. */
typedef struct registry_field {
    const char *key;
    registry_kind_t kind;
    unsigned flags;
    size_t max;                          /* TEXT, BYTES: bytes; MAP, LIST: entries */
    const struct registry_field *fields; /* OBJECT: its members' table */
    const struct registry_field *items;  /* MAP, LIST: what each entry is */
    /* Rules beyond the kind's, run on a value that passed them (a pattern,
     * members that depend on each other); NULL: none. */
    int (*check)(const json_t *v, const char *path, loom_error_t *err);
} registry_field_t;

/*
 * Checks obj (named path in messages) against a table: members that are
 * neither in it nor in extra (NULL-terminated, may be NULL; the caller
 * checks those) are refused, then each field in table order. Null members
 * count as absent.
 */
int registry_fields_check(const json_t *obj, const char *path, const registry_field_t *fields,
                          const char *const *extra, loom_error_t *err);
/* Checks one value (NULL or null: absent) as field f, at path. */
int registry_value_check(const json_t *v, const char *path, const registry_field_t *f,
                         loom_error_t *err);
/* Fails naming the first member of obj whose name is not in allowed. */
int registry_keys(const json_t *obj, const char *path, const char *const *allowed,
                  loom_error_t *err);

/* [a-z0-9-], 1..max bytes. */
bool registry_slug_valid(const char *s, size_t max);
bool registry_status_valid(const char *s);

/* ---- definitions ------------------------------------------------------------------- */

/*
 * Checks a service definition:
 *   {id, image?: {name, internal_ports[]}, repository?: {url, version?,
 *    build_context?, container_file?, internal_ports[]}, api_specs?: [{url,
 *    protocol_type?, version?, metadata?{}}], clients?: [{language, url}],
 *    envars?: [{key, value}], ports?: [{internal, host}]}
 * with exactly one of image and repository. path names the definition in
 * messages ("definition").
 */
int registry_definition_check(const json_t *def, const char *path, loom_error_t *err);

/* ---- instances --------------------------------------------------------------------- */

/* The parts of an instance url the registry uses. */
typedef struct registry_url {
    char host[REGISTRY_HOST_MAX + 1]; /* lower-case; an IPv6 address without brackets */
    int port;
} registry_url_t;

/*
 * Checks an instance url: absolute ("scheme://host:port[/path][?query]"),
 * with an explicit port, no user info, at most 2048 bytes. The whole url is
 * kept as given (host, port, path); out (may be NULL) gets the host and port
 * to probe.
 */
int registry_url_parse(const char *url, const char *path, registry_url_t *out, loom_error_t *err);

/* The instance id of a url: "inst-" + the first 24 hex digits of SHA-256(url). */
void registry_instance_id(const char *url, char out[REGISTRY_INSTANCE_ID_LEN + 1]);
/* "inst-" + 24 lower-case hex digits. */
bool registry_instance_id_valid(const char *id);

/* What a registration carries (borrowed from the checked JSON). */
typedef struct registry_instance_in {
    const char *url, *deployment_id, *node_url;
    json_t *tags; /* array of strings, or NULL */
    registry_url_t parsed;
    char id[REGISTRY_INSTANCE_ID_LEN + 1];
} registry_instance_in_t;

/*
 * Checks a registration {url, deployment_id?, node_url?, tags?[]} (plus the
 * members named in extra, which the caller checks) and fills in.
 */
int registry_instance_check(const json_t *body, const char *const *extra,
                            registry_instance_in_t *in, loom_error_t *err);

/* ---- commands ---------------------------------------------------------------------- */

/* The members every command from a caller carries: "caller" (the slug) and
 * "admin" (whether it holds registry:admin); for registry_fields_check's
 * extra and for registry_caller_of. */
extern const char *const registry_caller_keys[];
/* Checks and reads them from a command d. */
int registry_caller_of(const json_t *d, const char **caller, bool *admin, loom_error_t *err);

/* ---- rows ------------------------------------------------------------------------ */

/* The columns registry_instance_json() reads, for SELECT and RETURNING. */
#define REGISTRY_INSTANCE_COLUMNS                                                               \
    "id, url, slug, host, port, deployment_id, node_url, status, details, tags::TEXT AS tags, " \
    "(extract(epoch FROM last_heartbeat) * 1000000)::BIGINT AS heartbeat_us, "                  \
    "(extract(epoch FROM registered_at) * 1000000)::BIGINT AS registered_us, "                  \
    "(extract(epoch FROM updated_at) * 1000000)::BIGINT AS updated_us"

/* A column of a row by name; NULL when absent or SQL NULL. */
const char *registry_col(const PGresult *res, int row, const char *col);

/*
 * An instance row as the API shows it: {id, url, slug, host, port,
 * deployment_id?, node_url?, status, last_heartbeat?, details?, tags[],
 * registered_at, updated_at}. Optional members are left out when unset.
 * Returns a new reference.
 */
json_t *registry_instance_json(const PGresult *res, int row);

#endif
