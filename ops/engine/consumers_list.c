/*
 * engine.consumers.list: every consumer that a live node runs, with the
 * partitions it owns and which node owns each, their lag, and the consumer's
 * rates summed over its nodes. Nodes publish this with their heartbeat
 * (loom_nodes.consumers, every 5 s; the lag is measured every 5 s), so it
 * covers every worker of the deployment, not only the process that answers.
 * Nodes stale for more than 20 s are left out.
 *
 *   request  {}
 *   result   {"stale_after_ms": 20000, "consumers": [{"name", "nodes": [id],
 *             "counts": {"applied", "rejected", "retried", "skipped", "parked",
 *             "expired"}, "per_s": {the same per second}, "lag", "retrying_partitions",
 *             "partitions": [{"topic", "partition", "lag", "retrying", "node",
 *             "node_role", "node_url", "heartbeat_age_ms"}]}]}
 *
 * A partition that two nodes report (one took it over from the other
 * between their heartbeats) is shown once, with the node that reported last.
 */
#include "loom/op.h"
#include "../row.h"

#include <string.h>

#define STALE_AFTER_MS 20000
/* Most consumers and partitions per consumer shown. */
#define MAX_CONSUMERS  1000
#define MAX_PARTITIONS 10000

static const loom_db_stmt_t select_reports = {
    "loom_op_engine_consumers_list",
    "SELECT id::TEXT AS id, role, url, consumers::TEXT AS consumers, "
    "greatest(0, (extract(epoch FROM (now() - last_heartbeat)) * 1000)::BIGINT) AS age_ms "
    "FROM loom_nodes WHERE consumers IS NOT NULL "
    "AND last_heartbeat > now() - make_interval(secs => $1::INT / 1000.0) "
    "ORDER BY last_heartbeat DESC, id LIMIT 10000",
    1};

static json_t *consumer_entry(json_t *list, const char *name)
{
    size_t i;
    json_t *c;
    json_array_foreach(list, i, c)
    {
        if (strcmp(json_string_value(json_object_get(c, "name")), name) == 0)
            return c;
    }
    if (json_array_size(list) >= MAX_CONSUMERS)
        return NULL;
    c = json_pack("{s:s, s:[], s:{}, s:{}, s:I, s:I, s:[]}", "name", name, "nodes", "counts",
                  "per_s", "lag", (json_int_t)0, "retrying_partitions", (json_int_t)0,
                  "partitions");
    json_array_append_new(list, c);
    return c;
}

/* Adds the numbers of src (an object of numbers) into dst. */
static void add_numbers(json_t *dst, const json_t *src)
{
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)src, k, v)
    {
        if (!json_is_number(v) || strlen(k) > 32 || json_object_size(dst) >= 16)
            continue;
        json_t *have = json_object_get(dst, k);
        if (json_is_integer(v) && (!have || json_is_integer(have)))
            json_object_set_new(dst, k,
                                json_integer(json_integer_value(v) + json_integer_value(have)));
        else
            json_object_set_new(dst, k, json_real(json_number_value(v) + json_number_value(have)));
    }
}

static bool has_partition(const json_t *parts, const char *topic, json_int_t partition)
{
    size_t i;
    json_t *p;
    json_array_foreach((json_t *)parts, i, p)
    {
        if (json_integer_value(json_object_get(p, "partition")) == partition &&
            strcmp(json_string_value(json_object_get(p, "topic")), topic) == 0)
            return true;
    }
    return false;
}

/* One node's report into the list (newest node first, so a partition that
 * two nodes claim stays with the newer report). A report that is not of the
 * expected shape is skipped in the parts that are not. */
static void add_report(json_t *list, const json_t *report, const PGresult *r, int row)
{
    const char *node = row_text(r, row, "id");
    json_int_t age = strtoll(row_text(r, row, "age_ms"), NULL, 10);
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(report, "consumers"), i, c)
    {
        const char *name = json_string_value(json_object_get(c, "name"));
        json_t *entry = name && strlen(name) <= 200 ? consumer_entry(list, name) : NULL;
        if (!entry)
            continue;
        json_array_append_new(json_object_get(entry, "nodes"), json_string(node));
        if (json_is_object(json_object_get(c, "counts")))
            add_numbers(json_object_get(entry, "counts"), json_object_get(c, "counts"));
        if (json_is_object(json_object_get(c, "per_s")))
            add_numbers(json_object_get(entry, "per_s"), json_object_get(c, "per_s"));
        json_t *parts = json_object_get(entry, "partitions");
        size_t k;
        json_t *p;
        json_array_foreach(json_object_get(c, "partitions"), k, p)
        {
            const char *topic = json_string_value(json_object_get(p, "topic"));
            json_t *part = json_object_get(p, "partition");
            if (!topic || !json_is_integer(part) || json_array_size(parts) >= MAX_PARTITIONS ||
                has_partition(parts, topic, json_integer_value(part)))
                continue;
            json_t *lag = json_object_get(p, "lag");
            bool retrying = json_is_true(json_object_get(p, "retrying"));
            json_array_append_new(
                parts, json_pack("{s:s, s:I, s:O, s:b, s:s, s:o, s:o, s:I}", "topic", topic,
                                 "partition", json_integer_value(part), "lag",
                                 json_is_integer(lag) ? lag : json_null(), "retrying", retrying,
                                 "node", node, "node_role", row_string(r, row, "role"), "node_url",
                                 row_string(r, row, "url"), "heartbeat_age_ms", age));
            if (json_is_integer(lag))
                json_object_set_new(entry, "lag",
                                    json_integer(json_integer_value(json_object_get(entry, "lag")) +
                                                 json_integer_value(lag)));
            if (retrying)
                json_object_set_new(
                    entry, "retrying_partitions",
                    json_integer(json_integer_value(json_object_get(entry, "retrying_partitions")) +
                                 1));
        }
    }
}

static int consumers_list(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                          loom_error_t *err)
{
    (void)ctx;
    static const char *const keys[] = {NULL};
    int rc = loom_op_req_check_keys(req, keys, err);
    if (rc != 0)
        return rc;
    char stale[16];
    snprintf(stale, sizeof(stale), "%d", STALE_AFTER_MS);
    const char *params[] = {stale};
    PGresult *r = NULL;
    rc = loom_db_exec(db, &select_reports, params, &r, err);
    if (rc != 0)
        return rc;
    json_t *list = json_array();
    for (int i = 0; i < PQntuples(r); i++) {
        const char *text = row_text(r, i, "consumers");
        json_t *report = text ? json_loads(text, 0, NULL) : NULL;
        if (json_is_object(report))
            add_report(list, report, r, i);
        json_decref(report);
    }
    PQclear(r);
    *res = json_pack("{s:I, s:o}", "stale_after_ms", (json_int_t)STALE_AFTER_MS, "consumers", list);
    return 0;
}

const loom_op_t loom_op_engine_consumers_list = {
    .name = "engine.consumers.list",
    .fn = consumers_list,
    .timeout_ms = 5000,
    .description = "Consumers of the live nodes: partitions with their owner node and lag, rates",
};
