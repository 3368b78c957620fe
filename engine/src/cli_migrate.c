/*
 * cli_migrate.c: `loom migrate up | down [N] | status`.
 */
#include "cli.h"
#include "loom/bus.h"
#include "loom/log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The per-type topics of an earlier Loom ("<prefix>.cmd.<type>") that still
 * exist on the broker: up to max names into found; returns how many, or -1
 * when the broker could not be asked. */
static int legacy_topics(const cli_ctx_t *ctx, const char *brokers, char (*found)[LOOM_TOPIC_MAX],
                         int max)
{
    char errbuf[512];
    rd_kafka_conf_t *conf = loom_kafka_conf_new(brokers, &ctx->cfg, errbuf, sizeof(errbuf));
    rd_kafka_t *rk = conf ? rd_kafka_new(RD_KAFKA_PRODUCER, conf, errbuf, sizeof(errbuf)) : NULL;
    if (!rk) {
        if (conf)
            rd_kafka_conf_destroy(conf);
        return -1;
    }
    const struct rd_kafka_metadata *md = NULL;
    int n = -1;
    if (rd_kafka_metadata(rk, 1, NULL, &md, 10000) == RD_KAFKA_RESP_ERR_NO_ERROR) {
        n = 0;
        for (size_t i = 0; i < ctx->app->n_consumers; i++) {
            const loom_command_t *c = ctx->app->consumers[i].commands;
            for (size_t k = 0; c && c[k].type; k++) {
                char legacy[LOOM_TOPIC_MAX], now[LOOM_TOPIC_MAX];
                loom_topic_legacy_for_command(c[k].type, legacy, sizeof(legacy));
                loom_topic_for_command(c[k].type, now, sizeof(now));
                if (strcmp(legacy, now) == 0)
                    continue;
                for (int t = 0; t < md->topic_cnt; t++)
                    if (strcmp(md->topics[t].topic, legacy) == 0 && n < max)
                        snprintf(found[n++], LOOM_TOPIC_MAX, "%s", legacy);
            }
        }
        rd_kafka_metadata_destroy(md);
    }
    rd_kafka_destroy(rk);
    return n;
}

int cli_create_topics(cli_ctx_t *ctx, const char *brokers, FILE *out)
{
    const loom_app_t *app = ctx->app;
    static char names[256][LOOM_TOPIC_MAX];
    const char *topics[256];
    size_t n = 0;
    for (size_t i = 0; i < app->n_consumers && n < 256; i++) {
        char mine[64][LOOM_TOPIC_MAX];
        size_t nt = loom_consumer_topics(&app->consumers[i], mine, 64);
        for (size_t t = 0; t < nt && t < 64 && n < 256; t++) {
            bool dup = false;
            for (size_t k = 0; k < n && !dup; k++)
                dup = strcmp(names[k], mine[t]) == 0;
            if (!dup) {
                memcpy(names[n], mine[t], LOOM_TOPIC_MAX);
                topics[n] = names[n];
                n++;
            }
        }
    }
    int created = 0;
    loom_error_t err;
    if (loom_kafka_create_topics(brokers, &ctx->cfg, topics, n, ctx->cfg.kafka_partitions, &created,
                                 &err) != 0) {
        /* Some brokers do not allow it (the embedded mock, locked-down clusters):
         * the schema is done, so say what to do and succeed. */
        fprintf(out,
                "kafka: topics not created (%s); create them with %d partitions, or let the "
                "broker auto-create them\n",
                err.message, ctx->cfg.kafka_partitions);
        return -1;
    }
    fprintf(out, "kafka: %d topic%s created, %zu already there (%d partitions each)\n", created,
            created == 1 ? "" : "s", n - (size_t)created, ctx->cfg.kafka_partitions);
    char legacy[32][LOOM_TOPIC_MAX];
    int nl = legacy_topics(ctx, brokers, legacy, 32);
    for (int i = 0; i < nl; i++)
        fprintf(out,
                "kafka: %s is a per-type topic of an earlier Loom: workers apply what is left on "
                "it; delete it once its consumer lag is 0\n",
                legacy[i]);
    return created;
}

static int migrate_up(loom_db_t *db, cli_ctx_t *ctx)
{
    const loom_app_t *app = ctx->app;
    loom_error_t err;
    int applied = 0;
    if (loom_migrate_up(db, &app->migrations, &applied, &err) != 0)
        return cli_fail("migrate up", "%s", err.message);
    printf("%d migration%s applied; schema is up to date (%zu known)\n", applied,
           applied == 1 ? "" : "s", app->migrations.count);
    if (!ctx->cfg.kafka_brokers) {
        printf("kafka: LOOM_KAFKA_BROKERS is not set, no topics created\n");
        return LOOM_EXIT_OK;
    }
    cli_create_topics(ctx, ctx->cfg.kafka_brokers, stdout);
    return LOOM_EXIT_OK;
}

static int migrate_down(loom_db_t *db, const loom_app_t *app, int steps)
{
    loom_error_t err;
    int reverted = 0;
    int rc = loom_migrate_down(db, &app->migrations, steps, &reverted, &err);
    printf("%d migration%s reverted\n", reverted, reverted == 1 ? "" : "s");
    if (rc != 0)
        return cli_fail("migrate down", "%s", err.message);
    return LOOM_EXIT_OK;
}

static int migrate_status(loom_db_t *db, const loom_app_t *app)
{
    loom_error_t err;
    loom_migration_status_t *st = NULL;
    size_t n = 0;
    if (loom_migrate_status(db, &app->migrations, &st, &n, &err) != 0)
        return cli_fail("migrate status", "%s", err.message);
    int changed = 0, pending = 0;
    printf("%-8s %-32s %-8s %s\n", "VERSION", "NAME", "STATE", "APPLIED AT");
    for (size_t i = 0; i < n; i++) {
        printf("%04d     %-32s %-8s %s\n", st[i].version, st[i].name,
               loom_migration_state_name(st[i].state),
               st[i].applied_at[0] ? st[i].applied_at : "-");
        changed += st[i].state == LOOM_MIGRATION_CHANGED;
        pending += st[i].state == LOOM_MIGRATION_PENDING;
    }
    free(st);
    printf("%d pending, %d changed since applied\n", pending, changed);
    if (changed)
        return cli_fail("migrate status", "%d applied migration file%s changed: restore %s",
                        changed, changed == 1 ? " was" : "s were", changed == 1 ? "it" : "them");
    return LOOM_EXIT_OK;
}

static int cmd_migrate(cli_ctx_t *ctx, int argc, char **argv)
{
    if (argc < 2)
        return cli_usage_error("migrate", "missing subcommand: up, down or status");
    const char *sub = argv[1];
    int steps = 1;
    for (int i = 2; i < argc; i++)
        if (argv[i][0] == '-')
            return cli_usage_error("migrate", "unknown option '%s'", argv[i]);
    if (strcmp(sub, "down") == 0) {
        if (argc > 3)
            return cli_usage_error("migrate", "unexpected argument '%s'", argv[3]);
        if (argc == 3) {
            char *end = NULL;
            long v = strtol(argv[2], &end, 10);
            if (!*argv[2] || *end || v < 1 || v > 100000)
                return cli_usage_error("migrate", "down takes a count of at least 1, not '%s'",
                                       argv[2]);
            steps = (int)v;
        }
    } else if (strcmp(sub, "up") == 0 || strcmp(sub, "status") == 0) {
        if (argc > 2)
            return cli_usage_error("migrate", "unexpected argument '%s'", argv[2]);
    } else {
        return cli_usage_error("migrate", "unknown subcommand '%s': use up, down or status", sub);
    }

    loom_db_pool_t *pool = NULL;
    int rc = cli_open_db(ctx, "migrate", 1, &pool);
    if (rc != 0)
        return rc;
    loom_db_t *db = NULL;
    loom_error_t err;
    if (loom_db_acquire(pool, &db, &err) != 0) {
        loom_db_pool_free(pool);
        return cli_fail("migrate", "%s", err.message);
    }
    if (strcmp(sub, "up") == 0)
        rc = migrate_up(db, ctx);
    else if (strcmp(sub, "down") == 0)
        rc = migrate_down(db, ctx->app, steps);
    else
        rc = migrate_status(db, ctx->app);
    loom_db_release(db);
    loom_db_pool_free(pool);
    return rc;
}

const cli_command_t cli_migrate_command = {
    "migrate", "apply, revert or list schema migrations",
    "usage: loom migrate up\n"
    "       loom migrate down [N]\n"
    "       loom migrate status\n"
    "\n"
    "Schema migrations are the numbered files of migrations/ (NNNN_name.up.sql and\n"
    ".down.sql), built into the binary. Each applied one is recorded with its\n"
    "version, name and SHA-256; a run refuses to start when an applied file has\n"
    "changed. Several processes may migrate at once: they take turns.\n"
    "'up' also creates the Kafka topics the consumers read (one per service,\n"
    "<prefix>.cmd.<service>, and those a service declares), with\n"
    "LOOM_KAFKA_PARTITIONS partitions, when LOOM_KAFKA_BROKERS is set, and names\n"
    "any per-type topic of an earlier Loom that workers still drain.\n"
    "\n"
    "  up        apply every pending migration, in order\n"
    "  down [N]  revert the last N applied migrations (default 1), newest first\n"
    "  status    list every migration: applied (when), pending, CHANGED or missing\n"
    "\n"
    "Needs LOOM_DATABASE_URL.\n",
    true, cmd_migrate};
