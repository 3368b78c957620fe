/*
 * cli_commands.c: `loom commands list|show|park|replay`: see and steer what
 * the workers are doing, from the loom_commands table.
 */
#include "cli.h"
#include "loom/bus.h"
#include "loom/clock.h"
#include "loom/command_admin.h"
#include "loom/log.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int query(loom_db_pool_t *pool, const char *sql, int n, const char *const *p, PGresult **res,
                 loom_error_t *err)
{
    loom_db_t *db = NULL;
    int rc = loom_db_acquire(pool, &db, err);
    if (rc == 0)
        rc = loom_db_query(db, sql, n, p, res, err);
    loom_db_release(db);
    return rc;
}

static int cmd_list(loom_db_pool_t *pool, bool stuck, const char *consumer, int limit)
{
    char lim[16];
    snprintf(lim, sizeof(lim), "%d", limit);
    const char *p[] = {stuck ? "t" : "f", consumer, lim};
    PGresult *res = NULL;
    loom_error_t err;
    int rc = query(pool,
                   "SELECT message_id, consumer, type, status, attempts, "
                   "floor(extract(epoch FROM updated_at))::BIGINT, "
                   "coalesce(last_error, '') FROM loom_commands "
                   "WHERE ($1::bool = false OR status IN ('retrying', 'parked')) "
                   "AND ($2::text IS NULL OR consumer = $2) "
                   "ORDER BY updated_at DESC, message_id LIMIT $3::int",
                   3, p, &res, &err);
    if (rc != 0)
        return cli_fail("commands", "%s", err.message);
    printf("%-36s  %-20s  %-24s  %-8s  %8s  %-20s  %s\n", "MESSAGE ID", "CONSUMER", "TYPE",
           "STATUS", "ATTEMPTS", "UPDATED", "LAST ERROR");
    for (int i = 0; i < PQntuples(res); i++) {
        char updated[32];
        loom_rfc3339_format_seconds(atoll(PQgetvalue(res, i, 5)), updated, sizeof(updated));
        printf("%-36s  %-20s  %-24s  %-8s  %8s  %-20s  %.120s\n", PQgetvalue(res, i, 0),
               PQgetvalue(res, i, 1), PQgetvalue(res, i, 2), PQgetvalue(res, i, 3),
               PQgetvalue(res, i, 4), updated, PQgetvalue(res, i, 6));
    }
    printf("%d command%s\n", PQntuples(res), PQntuples(res) == 1 ? "" : "s");
    PQclear(res);
    return LOOM_EXIT_OK;
}

static int cmd_show(loom_db_pool_t *pool, const char *id)
{
    const char *p[] = {id};
    PGresult *res = NULL;
    loom_error_t err;
    int rc = query(pool,
                   "SELECT json_build_object('message_id', message_id, 'consumer', consumer, "
                   "'type', type, 'stream_id', stream_id, 'topic', topic, "
                   "'partition', kafka_partition, 'offset', kafka_offset, 'status', status, "
                   "'attempts', attempts, 'last_error', last_error, 'result', result, "
                   "'ray_id', ray_id, 'received_at', received_at, 'updated_at', updated_at, "
                   "'source', source, 'conflict_of', conflict_of)::text "
                   "FROM loom_commands WHERE message_id = $1 OR conflict_of = $1 "
                   "ORDER BY conflict_of NULLS FIRST, consumer, received_at",
                   1, p, &res, &err);
    if (rc != 0)
        return cli_fail("commands", "%s", err.message);
    if (PQntuples(res) == 0) {
        PQclear(res);
        fprintf(stderr, "loom commands: no command with id \"%s\" (COMMAND_NOT_FOUND)\n", id);
        return loom_error_class_exit_status(LOOM_ERR_NOT_FOUND);
    }
    for (int i = 0; i < PQntuples(res); i++) {
        json_t *o = json_loads(PQgetvalue(res, i, 0), 0, NULL);
        char *text = json_dumps(o, isatty(1) ? JSON_INDENT(2) : JSON_COMPACT);
        printf("%s\n", text ? text : PQgetvalue(res, i, 0));
        free(text);
        json_decref(o);
    }
    PQclear(res);
    return LOOM_EXIT_OK;
}

/* Parks or takes for replay with the statements the console's routes use
 * (loom/command_admin.h), on one connection of pool. */
typedef int (*admin_fn)(loom_db_t *db, const char *id, const char *consumer, PGresult **rows,
                        loom_error_t *err);

static int admin(loom_db_pool_t *pool, admin_fn fn, const char *id, const char *consumer,
                 PGresult **res, loom_error_t *err)
{
    loom_db_t *db = NULL;
    int rc = loom_db_acquire(pool, &db, err);
    if (rc == 0)
        rc = fn(db, id, consumer, res, err);
    loom_db_release(db);
    return rc;
}

static int cmd_park(loom_db_pool_t *pool, const char *id, const char *consumer)
{
    PGresult *res = NULL;
    loom_error_t err;
    int rc = admin(pool, loom_command_park, id, consumer, &res, &err);
    if (rc != 0)
        return cli_fail("commands", "%s", err.message);
    int n = PQntuples(res);
    for (int i = 0; i < n; i++)
        printf("parked %s for consumer %s: its partition moves on; 'loom commands replay %s' "
               "runs it again\n",
               id, PQgetvalue(res, i, 0), id);
    PQclear(res);
    if (n == 0) {
        fprintf(stderr, "loom commands: no retrying command with id \"%s\" to park\n", id);
        return loom_error_class_exit_status(LOOM_ERR_NOT_FOUND);
    }
    return LOOM_EXIT_OK;
}

static int cmd_replay(cli_ctx_t *ctx, loom_db_pool_t *pool, const char *id, const char *consumer)
{
    int rc = cli_need_brokers(ctx, "commands");
    if (rc != 0)
        return rc;
    loom_producer_t *prod = NULL;
    loom_error_t err;
    loom_producer_opts_t popts = {.brokers = ctx->cfg.kafka_brokers, .cfg = &ctx->cfg};
    if (loom_producer_new(&popts, &prod, &err) != 0)
        return cli_fail("commands", "%s", err.message);
    /* Marked retrying in the same statement that reads it, so the dedup lets
     * the replayed copy through. */
    PGresult *res = NULL;
    rc = admin(pool, loom_command_replay_take, id, consumer, &res, &err);
    if (rc != 0) {
        loom_producer_free(prod);
        return cli_fail("commands", "%s", err.message);
    }
    if (PQntuples(res) == 0) {
        PQclear(res);
        loom_producer_free(prod);
        fprintf(stderr, "loom commands: no parked or rejected command with id \"%s\"\n", id);
        return loom_error_class_exit_status(LOOM_ERR_NOT_FOUND);
    }
    for (int i = 0; i < PQntuples(res) && rc == 0; i++) {
        rd_kafka_headers_t *h = loom_kafka_headers_from_json(PQgetvalue(res, i, 3));
        size_t len = 0;
        unsigned char *payload =
            PQunescapeBytea((const unsigned char *)PQgetvalue(res, i, 4), &len);
        /* The raw key when it was kept (a key that is not text), else the
         * stream id. */
        size_t key_len = 0;
        unsigned char *raw_key =
            PQgetisnull(res, i, 5)
                ? NULL
                : PQunescapeBytea((const unsigned char *)PQgetvalue(res, i, 5), &key_len);
        const char *key = raw_key                  ? (const char *)raw_key
                          : PQgetisnull(res, i, 2) ? NULL
                                                   : PQgetvalue(res, i, 2);
        if (key && !raw_key)
            key_len = strlen(key);
        loom_delivery_t d;
        loom_delivery_init(&d);
        rc = loom_producer_send_raw(prod, PQgetvalue(res, i, 1), key, key_len, h, payload, len,
                                    loom_delivery_future_cb, &d, &err);
        if (raw_key)
            PQfreemem(raw_key);
        if (rc != 0)
            rd_kafka_headers_destroy(h);
        else
            rc = loom_delivery_wait(&d, 30000, &err);
        loom_delivery_release(&d);
        PQfreemem(payload);
        if (rc == 0)
            printf("replayed %s to %s for consumer %s\n", id, PQgetvalue(res, i, 1),
                   PQgetvalue(res, i, 0));
    }
    PQclear(res);
    loom_producer_free(prod);
    if (rc != 0)
        return cli_fail("commands", "could not replay %s: %s", id, err.message);
    return LOOM_EXIT_OK;
}

static int cmd_commands(cli_ctx_t *ctx, int argc, char **argv)
{
    if (argc < 2)
        return cli_usage_error("commands", "missing subcommand: list, show, park or replay");
    const char *sub = argv[1], *consumer = NULL, *id = NULL;
    bool stuck = false;
    int limit = 50;
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--stuck") == 0 && strcmp(sub, "list") == 0) {
            stuck = true;
        } else if (strcmp(argv[i], "--consumer") == 0 && i + 1 < argc) {
            consumer = argv[++i];
        } else if (strcmp(argv[i], "--limit") == 0 && i + 1 < argc && strcmp(sub, "list") == 0) {
            char *end;
            long v = strtol(argv[++i], &end, 10);
            if (*end || v < 1 || v > 100000)
                return cli_usage_error("commands", "--limit takes 1 to 100000, not '%s'", argv[i]);
            limit = (int)v;
        } else if (argv[i][0] == '-') {
            return cli_usage_error("commands", "unknown option '%s'", argv[i]);
        } else if (!id && strcmp(sub, "list") != 0) {
            id = argv[i];
        } else {
            return cli_usage_error("commands", "unexpected argument '%s'", argv[i]);
        }
    }
    bool needs_id =
        strcmp(sub, "show") == 0 || strcmp(sub, "park") == 0 || strcmp(sub, "replay") == 0;
    if (!needs_id && strcmp(sub, "list") != 0)
        return cli_usage_error("commands",
                               "unknown subcommand '%s': use list, show, park or replay", sub);
    if (needs_id && !id)
        return cli_usage_error("commands", "%s needs a command id", sub);

    loom_db_pool_t *pool = NULL;
    int rc = cli_open_db(ctx, "commands", 1, &pool);
    if (rc != 0)
        return rc;
    if (strcmp(sub, "list") == 0)
        rc = cmd_list(pool, stuck, consumer, limit);
    else if (strcmp(sub, "show") == 0)
        rc = cmd_show(pool, id);
    else if (strcmp(sub, "park") == 0)
        rc = cmd_park(pool, id, consumer);
    else
        rc = cmd_replay(ctx, pool, id, consumer);
    loom_db_pool_free(pool);
    return rc;
}

const cli_command_t cli_commands_command = {
    "commands", "list, show, park and replay commands the workers handle",
    "usage: loom commands list [--stuck] [--consumer C] [--limit N]\n"
    "       loom commands show ID\n"
    "       loom commands park ID [--consumer C]\n"
    "       loom commands replay ID [--consumer C]\n"
    "\n"
    "Every command a consumer handled has a row: status applied, rejected (the\n"
    "handler refused it for good), retrying (failing transiently; its partition\n"
    "waits), parked, or conflict (it reused the id of another command with\n"
    "another type or data, and was not applied). With its attempts, last error\n"
    "and result.\n"
    "\n"
    "  list      newest first; --stuck shows only retrying and parked ones\n"
    "  show      the rows of one command id, as JSON\n"
    "  park      stop retrying a command so its partition moves on; it is kept\n"
    "  replay    publish a parked or rejected command again to its topic\n"
    "\n"
    "Needs LOOM_DATABASE_URL; replay also LOOM_KAFKA_BROKERS.\n",
    true, cmd_commands};
