/*
 * store.c: consumer "registry.store": applies the registry's commands to
 * registry_definitions and registry_instances and records what changed as
 * events.
 *
 * Every command is checked again here with the field tables the gateway
 * checked it with (../../ops/registry/model.h): commands also come from
 * `loom publish`, other services and replays, and a bad one must be rejected
 * (4xx, never retried)
 * rather than fail in SQL and be retried forever. Ownership is decided here
 * for good: the route's early 403 is a courtesy for HTTP callers. Every
 * command travels on the one topic loom.cmd.registry, keyed by the definition
 * or instance id, so one entity's commands are applied in the order Kafka
 * acknowledged them (a put then a delete of one instance stay in that order).
 */
#include "registry.h"
#include "loom/clock.h"
#include "../../ops/registry/model.h"

#include <stdio.h>
#include <string.h>

/* ---- helpers ------------------------------------------------------------------------ */

static char *stream_of(loom_msg_t *msg, const char *kind, const char *id)
{
    return loom_arena_sprintf(loom_msg_arena(msg), "registry.%s-%s", kind, id);
}

/* The members of the commands, as field tables (model.h); "caller" and
 * "admin" are checked by registry_caller_of. */
static const registry_field_t definition_id_fields[] = {
    {"id", REGISTRY_TEXT, REGISTRY_REQUIRED | REGISTRY_NO_SPACE, REGISTRY_ID_MAX}, {NULL}};

static const registry_field_t instance_id_fields[] = {
    {"id", REGISTRY_TEXT, REGISTRY_REQUIRED | REGISTRY_NO_SPACE, REGISTRY_INSTANCE_ID_LEN}, {NULL}};

/* In a registration the id is optional: it is derived from the url. */
static const registry_field_t given_id_field = {"id", REGISTRY_TEXT, REGISTRY_NO_SPACE,
                                                REGISTRY_INSTANCE_ID_LEN};

static int status_rule(const json_t *v, const char *path, loom_error_t *err)
{
    if (registry_status_valid(json_string_value(v)))
        return 0;
    return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                          "%s: must be unknown, healthy, degraded, unreachable or not_probed",
                          path);
}

static const registry_field_t status_fields[] = {
    {"id", REGISTRY_TEXT, REGISTRY_REQUIRED | REGISTRY_NO_SPACE, REGISTRY_INSTANCE_ID_LEN},
    {"status", REGISTRY_TEXT, REGISTRY_REQUIRED | REGISTRY_NO_SPACE, 32, .check = status_rule},
    {"details", REGISTRY_TEXT, REGISTRY_EMPTY_OK, REGISTRY_DETAILS_MAX},
    {NULL}};

/* ---- definitions ---------------------------------------------------------------------- */

/* The owner is set by the first put and kept by every later one. */
static const loom_db_stmt_t stmt_put_definition = {
    "registry_definition_put",
    "INSERT INTO registry_definitions (id, definition, slug) VALUES ($1, $2::JSONB, $3) "
    "ON CONFLICT (id) DO UPDATE SET definition = EXCLUDED.definition, updated_at = now()",
    3};

static const loom_db_stmt_t stmt_definition_owner = {
    "registry_definition_owner", "SELECT slug FROM registry_definitions WHERE id = $1 FOR UPDATE",
    1};

static const loom_db_stmt_t stmt_delete_definition = {
    "registry_definition_delete", "DELETE FROM registry_definitions WHERE id = $1 RETURNING id", 1};

/*
 * Whether caller may change definition id: yes when it does not exist yet
 * (*exists false), when caller owns it, or when admin. A definition stored
 * before definitions had owners (slug NULL) is the admins' only. Locks the
 * row until the transaction ends.
 */
static int definition_writable(loom_msg_t *msg, const char *id, const char *caller, bool admin,
                               bool *exists, loom_error_t *err)
{
    const char *p[] = {id};
    PGresult *res = NULL;
    int rc = loom_db_exec(loom_msg_db(msg), &stmt_definition_owner, p, &res, err);
    if (rc != 0)
        return rc;
    *exists = PQntuples(res) > 0;
    bool legacy = *exists && PQgetisnull(res, 0, 0);
    const char *owner = *exists && !legacy ? PQgetvalue(res, 0, 0) : NULL;
    if (*exists && !admin && (legacy || strcmp(owner, caller) != 0))
        rc = loom_error_setc(err, &registry_error_codes[REGISTRY_ERR_DEFINITION_OWNED_BY_OTHER],
                             "definition \"%s\" belongs to \"%s\", not to \"%s\"", id,
                             legacy ? "(no owner: admins only)" : owner, caller);
    PQclear(res);
    return rc;
}

static int put_definition(loom_msg_t *msg, json_t *d, loom_error_t *err)
{
    static const char *const keys[] = {"definition", "caller", "admin", NULL};
    const char *caller = NULL;
    bool admin = false, exists = false;
    int rc = registry_keys(d, "command", keys, err);
    json_t *def = json_object_get(d, "definition");
    if (rc == 0)
        rc = registry_definition_check(def, "definition", err);
    if (rc == 0)
        rc = registry_caller_of(d, &caller, &admin, err);
    if (rc != 0)
        return rc;
    const char *id = json_string_value(json_object_get(def, "id"));
    if ((rc = definition_writable(msg, id, caller, admin, &exists, err)) != 0)
        return rc;
    char *text = json_dumps(def, JSON_COMPACT);
    const char *p[] = {id, text, caller};
    rc = loom_db_exec(loom_msg_db(msg), &stmt_put_definition, p, NULL, err);
    free(text);
    if (rc == 0)
        rc = loom_emit(msg, stream_of(msg, "definition", id), -1, "registry.definition_put",
                       json_pack("{s:O}", "definition", def), err);
    if (rc == 0)
        loom_msg_set_result(msg, json_pack("{s:s, s:O}", "id", id, "definition", def));
    return rc;
}

static int delete_definition(loom_msg_t *msg, json_t *d, loom_error_t *err)
{
    const char *caller = NULL;
    bool admin = false, exists = false;
    int rc = registry_fields_check(d, "command", definition_id_fields, registry_caller_keys, err);
    const char *id = json_string_value(json_object_get(d, "id"));
    if (rc == 0)
        rc = registry_caller_of(d, &caller, &admin, err);
    if (rc == 0)
        rc = definition_writable(msg, id, caller, admin, &exists, err);
    if (rc != 0)
        return rc;
    const char *p[] = {id};
    PGresult *res = NULL;
    if ((rc = loom_db_exec(loom_msg_db(msg), &stmt_delete_definition, p, &res, err)) != 0)
        return rc;
    int n = PQntuples(res);
    PQclear(res);
    if (n == 0)
        return loom_error_setc(err, &registry_error_codes[REGISTRY_ERR_DEFINITION_NOT_FOUND],
                               "no definition \"%s\"", id);
    rc = loom_emit(msg, stream_of(msg, "definition", id), -1, "registry.definition_deleted",
                   json_pack("{s:s}", "id", id), err);
    if (rc == 0)
        loom_msg_set_result(msg, json_pack("{s:s, s:b}", "id", id, "deleted", 1));
    return rc;
}

/* ---- instances ------------------------------------------------------------------------ */

static const loom_db_stmt_t stmt_owner = {
    "registry_instance_owner", "SELECT slug, url FROM registry_instances WHERE id = $1 FOR UPDATE",
    1};

static const loom_db_stmt_t stmt_put_instance = {
    "registry_instance_put",
    "INSERT INTO registry_instances (id, url, host, port, slug, deployment_id, node_url, tags) "
    "VALUES ($1, $2, $3, $4::INT, $5, $6, $7, $8::JSONB) "
    "ON CONFLICT (id) DO UPDATE SET deployment_id = EXCLUDED.deployment_id, "
    "node_url = EXCLUDED.node_url, tags = EXCLUDED.tags, updated_at = now() "
    "RETURNING " REGISTRY_INSTANCE_COLUMNS,
    8};

static const loom_db_stmt_t stmt_delete_instance = {
    "registry_instance_delete", "DELETE FROM registry_instances WHERE id = $1", 1};

static const loom_db_stmt_t stmt_status = {
    "registry_instance_status",
    "UPDATE registry_instances SET status = $2::TEXT, details = $3, "
    "status_checked_at = $4::TIMESTAMPTZ, "
    "last_heartbeat = CASE WHEN $2::TEXT = 'healthy' THEN "
    "greatest(coalesce(last_heartbeat, $4::TIMESTAMPTZ), $4::TIMESTAMPTZ) "
    "ELSE last_heartbeat END "
    "WHERE id = $1 AND (status_checked_at IS NULL OR status_checked_at <= $4::TIMESTAMPTZ) "
    "RETURNING id",
    4};

static const loom_db_stmt_t stmt_heartbeats = {
    "registry_instance_heartbeats",
    "UPDATE registry_instances SET last_heartbeat = "
    "greatest(coalesce(last_heartbeat, $2::TIMESTAMPTZ), $2::TIMESTAMPTZ) "
    "WHERE id IN (SELECT jsonb_array_elements_text($1::JSONB))",
    2};

/*
 * The owner of instance id: 1 with *slug (new string) when it exists, 0 when
 * not; locks the row until the transaction ends. A row whose url differs is
 * an id collision, which must not pass as the same instance.
 */
static int owner_of(loom_msg_t *msg, const char *id, const char *url, char **slug,
                    loom_error_t *err)
{
    const char *p[] = {id};
    PGresult *res = NULL;
    int rc = loom_db_exec(loom_msg_db(msg), &stmt_owner, p, &res, err);
    if (rc != 0)
        return rc;
    int found = PQntuples(res) > 0;
    if (found && url && strcmp(PQgetvalue(res, 0, 1), url) != 0) {
        PQclear(res);
        return loom_error_set(err, LOOM_CODE_ALREADY_EXISTS,
                              "instance id %s of \"%s\" is taken by another url", id, url);
    }
    *slug = found ? loom_arena_strdup(loom_msg_arena(msg), PQgetvalue(res, 0, 0)) : NULL;
    PQclear(res);
    return found;
}

static int put_instance(loom_msg_t *msg, json_t *d, loom_error_t *err)
{
    static const char *const extra[] = {"id", "caller", "admin", NULL};
    registry_instance_in_t in;
    const char *caller = NULL, *given_id = NULL;
    bool admin = false;
    int rc = registry_instance_check(d, extra, &in, err);
    if (rc == 0)
        rc = registry_caller_of(d, &caller, &admin, err);
    if (rc == 0)
        rc = registry_value_check(json_object_get(d, "id"), "command.id", &given_id_field, err);
    if (rc != 0)
        return rc;
    given_id = json_string_value(json_object_get(d, "id"));
    if (given_id && strcmp(given_id, in.id) != 0)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "command.id: the id of url \"%s\" is %s, not %s", in.url, in.id,
                              given_id);
    char *owner;
    if ((rc = owner_of(msg, in.id, in.url, &owner, err)) < 0)
        return rc;
    if (owner && strcmp(owner, caller) != 0 && !admin)
        return loom_error_setc(err, &registry_error_codes[REGISTRY_ERR_INSTANCE_OWNED_BY_OTHER],
                               "instance \"%s\" belongs to \"%s\", not to \"%s\"", in.url, owner,
                               caller);
    char port[16];
    snprintf(port, sizeof(port), "%d", in.parsed.port);
    char *tags = in.tags ? json_dumps(in.tags, JSON_COMPACT) : NULL;
    const char *p[] = {in.id,
                       in.url,
                       in.parsed.host,
                       port,
                       owner ? owner : caller,
                       in.deployment_id,
                       in.node_url,
                       tags ? tags : "[]"};
    PGresult *res = NULL;
    rc = loom_db_exec(loom_msg_db(msg), &stmt_put_instance, p, &res, err);
    free(tags);
    if (rc != 0)
        return rc;
    json_t *inst = registry_instance_json(res, 0);
    PQclear(res);
    rc = loom_emit(msg, stream_of(msg, "instance", in.id), -1, "registry.instance_registered",
                   json_incref(inst), err);
    if (rc == 0)
        loom_msg_set_result(msg, inst);
    else
        json_decref(inst);
    return rc;
}

static int delete_instance(loom_msg_t *msg, json_t *d, loom_error_t *err)
{
    const char *caller = NULL;
    bool admin = false;
    int rc = registry_fields_check(d, "command", instance_id_fields, registry_caller_keys, err);
    const char *id = json_string_value(json_object_get(d, "id"));
    if (rc == 0)
        rc = registry_caller_of(d, &caller, &admin, err);
    if (rc != 0)
        return rc;
    char *owner;
    if ((rc = owner_of(msg, id, NULL, &owner, err)) < 0)
        return rc;
    if (!owner)
        return loom_error_setc(err, &registry_error_codes[REGISTRY_ERR_INSTANCE_NOT_FOUND],
                               "no instance \"%s\"", id);
    if (strcmp(owner, caller) != 0 && !admin)
        return loom_error_setc(err, &registry_error_codes[REGISTRY_ERR_INSTANCE_OWNED_BY_OTHER],
                               "instance \"%s\" belongs to \"%s\", not to \"%s\"", id, owner,
                               caller);
    const char *p[] = {id};
    if ((rc = loom_db_exec(loom_msg_db(msg), &stmt_delete_instance, p, NULL, err)) != 0)
        return rc;
    rc = loom_emit(msg, stream_of(msg, "instance", id), -1, "registry.instance_deleted",
                   json_pack("{s:s}", "id", id), err);
    if (rc == 0)
        loom_msg_set_result(msg, json_pack("{s:s, s:b}", "id", id, "deleted", 1));
    return rc;
}

/* An RFC 3339 member, re-formatted canonically into out. */
static int time_of(const json_t *d, const char *key, char out[40], loom_error_t *err)
{
    const char *s = json_string_value(json_object_get(d, key));
    int64_t us;
    if (!s || loom_rfc3339_parse(s, &us) != 0)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "command.%s: must be an RFC 3339 time", key);
    loom_rfc3339_format(us, out, 40);
    return 0;
}

static int instance_status(loom_msg_t *msg, json_t *d, loom_error_t *err)
{
    static const char *const extra[] = {"checked_at", "connect_ms", NULL};
    char at[40];
    int rc = registry_fields_check(d, "command", status_fields, extra, err);
    if (rc == 0)
        rc = time_of(d, "checked_at", at, err);
    if (rc != 0)
        return rc;
    const char *id = json_string_value(json_object_get(d, "id"));
    const char *status = json_string_value(json_object_get(d, "status"));
    const char *details = json_string_value(json_object_get(d, "details"));
    const char *p[] = {id, status, details && *details ? details : NULL, at};
    PGresult *res = NULL;
    if ((rc = loom_db_exec(loom_msg_db(msg), &stmt_status, p, &res, err)) != 0)
        return rc;
    /* An instance deleted meanwhile, or a newer probe result already
     * applied: nothing to do, and nothing wrong with the command. */
    bool applied = PQntuples(res) > 0;
    PQclear(res);
    if (applied) {
        json_t *ev = json_pack("{s:s, s:s, s:s}", "id", id, "status", status, "checked_at", at);
        if (details && *details)
            json_object_set_new(ev, "details", json_string(details));
        rc = loom_emit(msg, stream_of(msg, "instance", id), -1, "registry.instance_status_changed",
                       ev, err);
    }
    if (rc == 0)
        loom_msg_set_result(
            msg, json_pack("{s:s, s:s, s:b}", "id", id, "status", status, "applied", applied));
    return rc;
}

static int instance_heartbeats(loom_msg_t *msg, json_t *d, loom_error_t *err)
{
    static const char *const keys[] = {"ids", "at", NULL};
    char at[40];
    int rc = registry_keys(d, "command", keys, err);
    if (rc == 0)
        rc = time_of(d, "at", at, err);
    if (rc != 0)
        return rc;
    json_t *ids = json_object_get(d, "ids");
    if (!json_is_array(ids) || json_array_size(ids) > 10000)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "command.ids: must be an array of at most 10000 instance ids");
    size_t i;
    json_t *v;
    json_array_foreach(ids, i, v)
    {
        if (!json_is_string(v) || json_string_length(v) > 64)
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                                  "command.ids[%zu]: must be an instance id", i);
    }
    char *text = json_dumps(ids, JSON_COMPACT);
    const char *p[] = {text, at};
    PGresult *res = NULL;
    rc = loom_db_exec(loom_msg_db(msg), &stmt_heartbeats, p, &res, err);
    free(text);
    if (rc != 0)
        return rc;
    long long n = atoll(PQcmdTuples(res));
    PQclear(res);
    if (n > 0)
        rc = loom_emit(msg,
                       loom_arena_sprintf(loom_msg_arena(msg), "registry.heartbeats-%s",
                                          loom_msg_event(msg)->id),
                       0, "registry.instances_heartbeat",
                       json_pack("{s:O, s:s}", "ids", ids, "at", at), err);
    if (rc == 0)
        loom_msg_set_result(msg, json_pack("{s:I}", "updated", (json_int_t)n));
    return rc;
}

/* ---- dispatch ------------------------------------------------------------------------- */

/* One topic, loom.cmd.registry, for every command: a definition's commands
 * share its id as key and an instance's commands its id, so each entity's
 * commands are applied in the order Kafka acknowledged them. */
const loom_command_t registry_commands[] = {
    {"registry.put_definition", put_definition, NULL},
    {"registry.delete_definition", delete_definition, NULL},
    {"registry.put_instance", put_instance, NULL},
    {"registry.delete_instance", delete_instance, NULL},
    {"registry.instance_status", instance_status, NULL},
    {"registry.instance_heartbeats", instance_heartbeats, NULL},
    {0},
};
