/*
 * cli_consumers.c: `loom consumers`, where each consumer stands: for every
 * partition of its topics, the node that owns it, the committed offset, the
 * end of the log, the lag between them, and whether a command holds it.
 *
 * Everything comes from the outside, so it works from any machine and shows
 * the same picture whatever worker runs: partitions and end offsets from the
 * brokers, owners from the consumer group (a member's client.id is its
 * node id), committed offsets from the group coordinator, and commands being
 * retried from loom_commands.
 */
#include "cli.h"
#include "loom/bus.h"
#include "loom/envelope.h"
#include "loom/mem.h"

#include <jansson.h>
#include <librdkafka/rdkafka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A command retried this many times holds its partition for good until
 * someone acts (by then the backoff has grown to seconds): STUCK. */
#define CONSUMERS_STUCK_ATTEMPTS 5
#define CONSUMERS_TIMEOUT_MS     10000

typedef struct part_row {
    char topic[256];
    int32_t partition;
    char owner[128], host[128];
    int64_t committed; /* -1: none */
    int64_t low, end;  /* -1: unknown */
    int attempts;      /* of the command being retried; 0: none */
    char message_id[160];
    char error[256];
} part_row_t;

typedef struct rows {
    part_row_t *v;
    size_t n, cap;
} rows_t;

static part_row_t *rows_add(rows_t *r)
{
    if (r->n == r->cap) {
        r->cap = r->cap ? 2 * r->cap : 32;
        r->v = loom_xrealloc(r->v, r->cap * sizeof(*r->v));
    }
    part_row_t *p = &r->v[r->n++];
    memset(p, 0, sizeof(*p));
    p->committed = p->low = p->end = -1;
    return p;
}

static part_row_t *rows_find(rows_t *r, const char *topic, int32_t partition)
{
    for (size_t i = 0; i < r->n; i++)
        if (r->v[i].partition == partition && strcmp(r->v[i].topic, topic) == 0)
            return &r->v[i];
    return NULL;
}

/* Waits for the result of an admin request on q; NULL on timeout. */
static rd_kafka_event_t *admin_wait(rd_kafka_queue_t *q, rd_kafka_event_type_t type)
{
    for (int waited = 0; waited < CONSUMERS_TIMEOUT_MS + 5000; waited += 500) {
        rd_kafka_event_t *ev = rd_kafka_queue_poll(q, 500);
        if (!ev)
            continue;
        if (rd_kafka_event_type(ev) == type)
            return ev;
        rd_kafka_event_destroy(ev);
    }
    return NULL;
}

/* Partitions of the consumer's topics, with their watermarks. */
static int add_partitions(rd_kafka_t *rk, const loom_consumer_def_t *c, rows_t *rows, char *why,
                          size_t wlen)
{
    for (const char *const *t = c->topics; t && *t; t++) {
        char topic[256];
        loom_topic_map(*t, topic, sizeof(topic));
        rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topic, NULL);
        const struct rd_kafka_metadata *md = NULL;
        rd_kafka_resp_err_t e = rd_kafka_metadata(rk, 0, rkt, &md, CONSUMERS_TIMEOUT_MS);
        rd_kafka_topic_destroy(rkt);
        if (e) {
            snprintf(why, wlen, "could not read the metadata of topic %s: %s", topic,
                     rd_kafka_err2str(e));
            return -1;
        }
        if (md->topic_cnt != 1 || md->topics[0].err) {
            fprintf(stderr, "loom consumers: topic %s: %s (run 'loom migrate up')\n", topic,
                    md->topic_cnt == 1 ? rd_kafka_err2str(md->topics[0].err) : "not found");
            rd_kafka_metadata_destroy(md);
            continue;
        }
        for (int i = 0; i < md->topics[0].partition_cnt; i++) {
            part_row_t *p = rows_add(rows);
            snprintf(p->topic, sizeof(p->topic), "%s", topic);
            p->partition = md->topics[0].partitions[i].id;
        }
        rd_kafka_metadata_destroy(md);
    }
    for (size_t i = 0; i < rows->n; i++) {
        int64_t lo = -1, hi = -1;
        if (rd_kafka_query_watermark_offsets(rk, rows->v[i].topic, rows->v[i].partition, &lo, &hi,
                                             CONSUMERS_TIMEOUT_MS) == 0) {
            rows->v[i].low = lo;
            rows->v[i].end = hi;
        }
    }
    return 0;
}

/* Owners from the group's members; the group's state into state. */
static void add_owners(rd_kafka_t *rk, rd_kafka_queue_t *q, const char *group, rows_t *rows,
                       char *state, size_t slen, int *members)
{
    snprintf(state, slen, "unknown");
    *members = -1;
    rd_kafka_AdminOptions_t *o = rd_kafka_AdminOptions_new(rk, RD_KAFKA_ADMIN_OP_ANY);
    rd_kafka_AdminOptions_set_request_timeout(o, CONSUMERS_TIMEOUT_MS, NULL, 0);
    const char *groups[] = {group};
    rd_kafka_DescribeConsumerGroups(rk, groups, 1, o, q);
    rd_kafka_event_t *ev = admin_wait(q, RD_KAFKA_EVENT_DESCRIBECONSUMERGROUPS_RESULT);
    rd_kafka_AdminOptions_destroy(o);
    if (!ev)
        return;
    if (rd_kafka_event_error(ev)) {
        snprintf(state, slen, "unknown (%s)", rd_kafka_event_error_string(ev));
        rd_kafka_event_destroy(ev);
        return;
    }
    size_t n = 0;
    const rd_kafka_ConsumerGroupDescription_t **gs = rd_kafka_DescribeConsumerGroups_result_groups(
        rd_kafka_event_DescribeConsumerGroups_result(ev), &n);
    for (size_t i = 0; i < n; i++) {
        const rd_kafka_error_t *ge = rd_kafka_ConsumerGroupDescription_error(gs[i]);
        if (ge) {
            snprintf(state, slen, "unknown (%s)", rd_kafka_error_string(ge));
            continue;
        }
        snprintf(
            state, slen, "%s",
            rd_kafka_consumer_group_state_name(rd_kafka_ConsumerGroupDescription_state(gs[i])));
        size_t nm = rd_kafka_ConsumerGroupDescription_member_count(gs[i]);
        *members = (int)nm;
        for (size_t m = 0; m < nm; m++) {
            const rd_kafka_MemberDescription_t *md =
                rd_kafka_ConsumerGroupDescription_member(gs[i], (int)m);
            const rd_kafka_topic_partition_list_t *l =
                rd_kafka_MemberAssignment_partitions(rd_kafka_MemberDescription_assignment(md));
            for (int k = 0; l && k < l->cnt; k++) {
                part_row_t *p = rows_find(rows, l->elems[k].topic, l->elems[k].partition);
                if (!p)
                    continue;
                snprintf(p->owner, sizeof(p->owner), "%s",
                         rd_kafka_MemberDescription_client_id(md));
                snprintf(p->host, sizeof(p->host), "%s", rd_kafka_MemberDescription_host(md));
            }
        }
    }
    rd_kafka_event_destroy(ev);
}

/* Committed offsets of the group. */
static int add_committed(rd_kafka_t *rk, rd_kafka_queue_t *q, const char *group, rows_t *rows,
                         char *why, size_t wlen)
{
    if (rows->n == 0)
        return 0;
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new((int)rows->n);
    for (size_t i = 0; i < rows->n; i++)
        rd_kafka_topic_partition_list_add(l, rows->v[i].topic, rows->v[i].partition);
    rd_kafka_ListConsumerGroupOffsets_t *req = rd_kafka_ListConsumerGroupOffsets_new(group, l);
    rd_kafka_topic_partition_list_destroy(l);
    rd_kafka_AdminOptions_t *o = rd_kafka_AdminOptions_new(rk, RD_KAFKA_ADMIN_OP_ANY);
    rd_kafka_AdminOptions_set_request_timeout(o, CONSUMERS_TIMEOUT_MS, NULL, 0);
    rd_kafka_ListConsumerGroupOffsets(rk, &req, 1, o, q);
    rd_kafka_ListConsumerGroupOffsets_destroy(req);
    rd_kafka_event_t *ev = admin_wait(q, RD_KAFKA_EVENT_LISTCONSUMERGROUPOFFSETS_RESULT);
    rd_kafka_AdminOptions_destroy(o);
    if (!ev) {
        snprintf(why, wlen, "the group coordinator of %s did not answer", group);
        return -1;
    }
    int rc = 0;
    if (rd_kafka_event_error(ev)) {
        snprintf(why, wlen, "could not read the offsets of %s: %s", group,
                 rd_kafka_event_error_string(ev));
        rc = -1;
    } else {
        size_t n = 0;
        const rd_kafka_group_result_t **gs = rd_kafka_ListConsumerGroupOffsets_result_groups(
            rd_kafka_event_ListConsumerGroupOffsets_result(ev), &n);
        for (size_t i = 0; i < n; i++) {
            const rd_kafka_topic_partition_list_t *pl = rd_kafka_group_result_partitions(gs[i]);
            for (int k = 0; pl && k < pl->cnt; k++) {
                part_row_t *p = rows_find(rows, pl->elems[k].topic, pl->elems[k].partition);
                if (p && !pl->elems[k].err && pl->elems[k].offset >= 0)
                    p->committed = pl->elems[k].offset;
            }
        }
    }
    rd_kafka_event_destroy(ev);
    return rc;
}

/* Commands being retried, from loom_commands (the oldest of a partition is
 * the one holding it). */
static int add_retrying(loom_db_pool_t *pool, const char *consumer, rows_t *rows, char *why,
                        size_t wlen)
{
    loom_db_t *db = NULL;
    loom_error_t err;
    PGresult *res = NULL;
    const char *p[] = {consumer};
    int rc = loom_db_acquire(pool, &db, &err);
    if (rc == 0)
        rc = loom_db_query(db,
                           "SELECT topic, kafka_partition, attempts, message_id, "
                           "coalesce(last_error, '') FROM loom_commands "
                           "WHERE status = 'retrying' AND consumer = $1 "
                           "ORDER BY kafka_offset DESC",
                           1, p, &res, &err);
    loom_db_release(db);
    if (rc != 0) {
        snprintf(why, wlen, "%s", err.message);
        return -1;
    }
    for (int i = 0; i < PQntuples(res); i++) {
        part_row_t *r = rows_find(rows, PQgetvalue(res, i, 0), atoi(PQgetvalue(res, i, 1)));
        if (!r)
            continue;
        r->attempts = atoi(PQgetvalue(res, i, 2));
        snprintf(r->message_id, sizeof(r->message_id), "%s", PQgetvalue(res, i, 3));
        snprintf(r->error, sizeof(r->error), "%s", PQgetvalue(res, i, 4));
    }
    PQclear(res);
    return 0;
}

static int64_t row_lag(const part_row_t *p)
{
    if (p->end < 0)
        return -1;
    /* Nothing committed yet: the group starts at the beginning of the log. */
    int64_t from = p->committed >= 0 ? p->committed : (p->low >= 0 ? p->low : 0);
    return p->end > from ? p->end - from : 0;
}

static const char *row_state(const part_row_t *p)
{
    if (p->attempts >= CONSUMERS_STUCK_ATTEMPTS)
        return "stuck";
    if (p->attempts > 0)
        return "retrying";
    return "ok";
}

static void print_num(int64_t v)
{
    if (v < 0)
        printf("  %10s", "-");
    else
        printf("  %10lld", (long long)v);
}

static int cmd_consumers(cli_ctx_t *ctx, int argc, char **argv)
{
    bool as_json = false;
    const char *only = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0)
            as_json = true;
        else if (strcmp(argv[i], "--consumer") == 0 && i + 1 < argc)
            only = argv[++i];
        else
            return cli_usage_error("consumers", "%s '%s'",
                                   argv[i][0] == '-' ? "unknown option" : "unexpected argument",
                                   argv[i]);
    }
    int rc = cli_need_brokers(ctx, "consumers");
    if (rc != 0)
        return rc;
    bool found = !only;
    for (size_t i = 0; only && i < ctx->app->n_consumers; i++)
        found = found || strcmp(ctx->app->consumers[i].name, only) == 0;
    if (!found)
        return cli_usage_error("consumers", "no consumer named '%s'", only);
    loom_db_pool_t *pool = NULL;
    rc = cli_open_db(ctx, "consumers", 1, &pool);
    if (rc != 0)
        return rc;
    char errbuf[512];
    rd_kafka_conf_t *conf =
        loom_kafka_conf_new(ctx->cfg.kafka_brokers, &ctx->cfg, errbuf, sizeof(errbuf));
    rd_kafka_t *rk = conf ? rd_kafka_new(RD_KAFKA_PRODUCER, conf, errbuf, sizeof(errbuf)) : NULL;
    if (!rk) {
        if (conf)
            rd_kafka_conf_destroy(conf);
        loom_db_pool_free(pool);
        return cli_fail("consumers", "could not configure Kafka: %s", errbuf);
    }
    rd_kafka_queue_t *q = rd_kafka_queue_new(rk);
    json_t *out = json_array();
    rc = LOOM_EXIT_OK;
    int64_t total_lag = 0;
    int n_retrying = 0, n_stuck = 0;
    for (size_t ci = 0; ci < ctx->app->n_consumers && rc == LOOM_EXIT_OK; ci++) {
        const loom_consumer_def_t *c = &ctx->app->consumers[ci];
        if (only && strcmp(c->name, only) != 0)
            continue;
        char group[256], why[512] = "", state[128];
        int members = -1;
        snprintf(group, sizeof(group), "loom.%s", c->name);
        rows_t rows = {0};
        if (add_partitions(rk, c, &rows, why, sizeof(why)) != 0 ||
            add_committed(rk, q, group, &rows, why, sizeof(why)) != 0 ||
            add_retrying(pool, c->name, &rows, why, sizeof(why)) != 0) {
            rc = cli_fail("consumers", "%s", why);
            free(rows.v);
            break;
        }
        add_owners(rk, q, group, &rows, state, sizeof(state), &members);
        if (!as_json) {
            printf("%s  (group %s, %s, %d member%s)\n", c->name, group, state,
                   members < 0 ? 0 : members, members == 1 ? "" : "s");
            printf("  %-40s  %4s  %-36s  %10s  %10s  %10s  %s\n", "TOPIC", "PART", "OWNER",
                   "COMMITTED", "END", "LAG", "STATE");
        }
        for (size_t i = 0; i < rows.n; i++) {
            part_row_t *p = &rows.v[i];
            int64_t lag = row_lag(p);
            const char *st = row_state(p);
            total_lag += lag > 0 ? lag : 0;
            n_retrying += p->attempts > 0;
            n_stuck += p->attempts >= CONSUMERS_STUCK_ATTEMPTS;
            if (as_json) {
                json_t *o = json_pack(
                    "{s:s, s:s, s:s, s:i, s:s?, s:s?, s:I, s:I, s:I, s:s, s:i}", "consumer",
                    c->name, "group", group, "topic", p->topic, "partition", (int)p->partition,
                    "owner", p->owner[0] ? p->owner : NULL, "host", p->host[0] ? p->host : NULL,
                    "committed", (json_int_t)p->committed, "end", (json_int_t)p->end, "lag",
                    (json_int_t)lag, "state", st, "attempts", p->attempts);
                if (p->attempts > 0) {
                    json_object_set_new(o, "message_id", json_string(p->message_id));
                    json_object_set_new(o, "last_error", json_string(p->error));
                }
                json_array_append_new(out, o);
                continue;
            }
            printf("  %-40s  %4d  %-36s", p->topic, (int)p->partition,
                   p->owner[0] ? p->owner : "-");
            print_num(p->committed);
            print_num(p->end);
            print_num(lag);
            if (p->attempts > 0)
                printf("  %s (command %s, %d attempts: %s)\n", st, p->message_id, p->attempts,
                       p->error);
            else
                printf("  %s\n", st);
        }
        free(rows.v);
    }
    if (rc == LOOM_EXIT_OK) {
        if (as_json) {
            char *text = json_dumps(out, JSON_INDENT(2));
            printf("%s\n", text);
            free(text);
        } else {
            printf("lag %lld in all; %d partition%s retrying a command, %d stuck "
                   "(%d attempts or more: see 'loom commands list --stuck')\n",
                   (long long)total_lag, n_retrying, n_retrying == 1 ? "" : "s", n_stuck,
                   CONSUMERS_STUCK_ATTEMPTS);
        }
    }
    json_decref(out);
    rd_kafka_queue_destroy(q);
    rd_kafka_destroy(rk);
    loom_db_pool_free(pool);
    return rc;
}

const cli_command_t cli_consumers_command = {
    "consumers", "show each consumer's partitions: owner node, offsets, lag, retries",
    "usage: loom consumers [--consumer NAME] [--json]\n"
    "\n"
    "For every consumer (Kafka consumer group loom.<consumer>) and every partition\n"
    "of its topics:\n"
    "  OWNER      the node id of the worker that holds the partition ('-': nobody;\n"
    "             'loom nodes' lists the nodes)\n"
    "  COMMITTED  the group's committed offset: every command before it is handled\n"
    "  END        the end of the partition (the next offset to be written)\n"
    "  LAG        END - COMMITTED: commands waiting, or applied but not yet\n"
    "             committed (from the start of the log when nothing is committed)\n"
    "  STATE      ok; retrying: a command failed transiently and its partition\n"
    "             waits (paused) for the next attempt; stuck: retried 5 times or\n"
    "             more (see 'loom commands list --stuck', 'loom commands park')\n"
    "\n"
    "It asks the brokers and the group coordinator and reads loom_commands, so it\n"
    "shows the same from any machine. --json prints one object per partition.\n"
    "Needs LOOM_KAFKA_BROKERS and LOOM_DATABASE_URL.\n",
    true, cmd_consumers};
