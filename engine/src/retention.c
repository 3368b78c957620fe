/*
 * retention.c: deleting old rows of loom_commands in small batches, and the
 * check that the retention is not shorter than the command topics' own
 * (loom/retention.h).
 *
 * Each batch is one statement, so one short transaction of its own: it reads
 * the next `batch` rows older than the cut-off in the order of the index
 * loom_commands_by_received (received_at, message_id, consumer), starting
 * after the last row the previous batch read, and deletes those of them that
 * are finished (applied, expired) by their primary key. Starting after the
 * last row read, rather than at the oldest row again, means rows that are
 * kept (a rejected command waiting for an operator) are read once per run,
 * not once per batch. Between two batches the job pauses at least as long as
 * the last one took, so it never holds more than about half of one
 * connection's time and applies keep the rest.
 */
#include "loom/retention.h"
#include "loom/clock.h"
#include "loom/log.h"
#include "loom/mem.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* $1..$3: the last row the previous batch read ('-infinity', '', '' at the
 * start); $4: the retention in ms; $5: rows per batch. Answers one row: rows
 * deleted, rows read, and the last row read (NULLs when none was). */
static const loom_db_stmt_t stmt_delete_batch = {
    "loom_commands_retention_delete",
    "WITH c AS (SELECT received_at, message_id, consumer, status FROM loom_commands "
    "WHERE (received_at, message_id, consumer) > ($1::timestamptz, $2::text, $3::text) "
    "AND received_at < now() - $4::bigint * interval '1 millisecond' "
    "ORDER BY received_at, message_id, consumer LIMIT $5::int), "
    "d AS (DELETE FROM loom_commands l USING c "
    "WHERE l.consumer = c.consumer AND l.message_id = c.message_id "
    "AND c.status IN ('applied', 'expired') AND l.status IN ('applied', 'expired') "
    "RETURNING 1) "
    "SELECT (SELECT count(*) FROM d), (SELECT count(*) FROM c), "
    "last.received_at::text, last.message_id, last.consumer "
    "FROM (SELECT 1) one LEFT JOIN (SELECT received_at, message_id, consumer FROM c "
    "ORDER BY received_at DESC, message_id DESC, consumer DESC LIMIT 1) last ON true",
    5};

const char *loom_retention_sql(void)
{
    return stmt_delete_batch.sql;
}

int64_t loom_retention_ms(const loom_config_t *cfg)
{
    const loom_config_value_t *v = cfg ? loom_config_get(cfg, "LOOM_COMMANDS_RETENTION") : NULL;
    return v && v->raw && v->num > 0 ? v->num : 0;
}

int loom_retention_run(loom_db_pool_t *pool, const loom_retention_opts_t *opts,
                       loom_retention_stats_t *stats, loom_error_t *err)
{
    memset(stats, 0, sizeof(*stats));
    if (opts->retention_ms <= 0)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "no retention given");
    int batch = opts->batch > 0 ? opts->batch : LOOM_RETENTION_BATCH;
    int64_t pause_min = opts->pause_min_ms > 0 ? opts->pause_min_ms : 10;
    char after_at[64] = "-infinity", after_id[512] = "", after_consumer[256] = "";
    char retention[32], limit[16];
    snprintf(retention, sizeof(retention), "%" PRId64, opts->retention_ms);
    snprintf(limit, sizeof(limit), "%d", batch);
    for (;;) {
        if (opts->max_batches > 0 && stats->statements >= opts->max_batches)
            return 0;
        if (opts->stopping && opts->stopping(opts->stop_arg))
            return 0;
        loom_db_t *db = NULL;
        int rc = loom_db_acquire(pool, &db, err);
        if (rc != 0)
            return rc;
        const char *p[] = {after_at, after_id, after_consumer, retention, limit};
        PGresult *res = NULL;
        int64_t t0 = loom_mono_ms();
        rc = loom_db_exec(db, &stmt_delete_batch, p, &res, err);
        loom_db_release(db);
        if (rc != 0)
            return rc;
        int64_t took = loom_mono_ms() - t0;
        int64_t deleted = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
        int64_t read = strtoll(PQgetvalue(res, 0, 1), NULL, 10);
        if (read > 0) {
            snprintf(after_at, sizeof(after_at), "%s", PQgetvalue(res, 0, 2));
            snprintf(after_id, sizeof(after_id), "%s", PQgetvalue(res, 0, 3));
            snprintf(after_consumer, sizeof(after_consumer), "%s", PQgetvalue(res, 0, 4));
        }
        PQclear(res);
        stats->statements++;
        stats->deleted += deleted;
        if (deleted > stats->max_rows)
            stats->max_rows = deleted;
        if (read < batch)
            return 0; /* nothing older than the cut-off is left to read */
        /* Give the database back to the applies for at least as long. */
        int64_t pause = took > pause_min ? took : pause_min;
        for (int64_t t = 0; t < pause; t += 50) {
            if (opts->stopping && opts->stopping(opts->stop_arg))
                return 0;
            loom_sleep_ms(pause - t < 50 ? pause - t : 50);
        }
    }
}

/* ---- the topics' retention ----------------------------------------------------- */

static void fmt_ms(int64_t ms, char *out, size_t size)
{
    loom_duration_format(ms, out, size);
}

/* Judges one topic's configuration: 0 when retention_ms covers it. */
static int judge_topic(const rd_kafka_ConfigResource_t *r, int64_t retention_ms, loom_error_t *err)
{
    const char *topic = rd_kafka_ConfigResource_name(r);
    if (rd_kafka_ConfigResource_error(r) != RD_KAFKA_RESP_ERR_NO_ERROR) {
        const char *why = rd_kafka_ConfigResource_error_string(r);
        return loom_error_set(
            err, LOOM_CODE_CONFIG_INVALID,
            "LOOM_COMMANDS_RETENTION: could not read the retention of topic "
            "\"%s\" (%s); it must be known to delete old rows of loom_commands "
            "safely (create the topics first: loom migrate up)",
            topic, why && *why ? why : rd_kafka_err2str(rd_kafka_ConfigResource_error(r)));
    }
    size_t n = 0;
    const rd_kafka_ConfigEntry_t **e = rd_kafka_ConfigResource_configs(r, &n);
    int64_t keep_ms = -2, segment_ms = 0;
    const char *policy = "delete";
    for (size_t i = 0; i < n; i++) {
        const char *name = rd_kafka_ConfigEntry_name(e[i]);
        const char *value = rd_kafka_ConfigEntry_value(e[i]);
        if (!value)
            continue;
        if (strcmp(name, "retention.ms") == 0)
            keep_ms = strtoll(value, NULL, 10);
        else if (strcmp(name, "segment.ms") == 0)
            segment_ms = strtoll(value, NULL, 10);
        else if (strcmp(name, "cleanup.policy") == 0)
            policy = value;
    }
    char want[32], have[32], seg[32], total[32];
    fmt_ms(retention_ms, want, sizeof(want));
    if (!strstr(policy, "delete"))
        return loom_error_set(err, LOOM_CODE_CONFIG_INVALID,
                              "LOOM_COMMANDS_RETENTION=%s is refused: topic \"%s\" has "
                              "cleanup.policy=%s and keeps its commands forever, so any of them "
                              "can be delivered again and would apply twice once its row of "
                              "loom_commands is deleted",
                              want, topic, policy);
    if (keep_ms == -2)
        return loom_error_set(err, LOOM_CODE_CONFIG_INVALID,
                              "LOOM_COMMANDS_RETENTION: the brokers did not say the retention.ms "
                              "of topic \"%s\"",
                              topic);
    if (keep_ms < 0)
        return loom_error_set(err, LOOM_CODE_CONFIG_INVALID,
                              "LOOM_COMMANDS_RETENTION=%s is refused: topic \"%s\" has "
                              "retention.ms=%lld (keep forever), so any of its commands can be "
                              "delivered again and would apply twice once its row of "
                              "loom_commands is deleted",
                              want, topic, (long long)keep_ms);
    if (segment_ms < 0)
        segment_ms = 0;
    int64_t need = keep_ms + segment_ms;
    if (retention_ms < need) {
        fmt_ms(keep_ms, have, sizeof(have));
        fmt_ms(segment_ms, seg, sizeof(seg));
        fmt_ms(need, total, sizeof(total));
        return loom_error_set(
            err, LOOM_CODE_CONFIG_INVALID,
            "LOOM_COMMANDS_RETENTION=%s is refused: it is shorter than topic \"%s\" may hold a "
            "command (retention.ms=%lld (%s) + segment.ms=%lld (%s) = %s); a command still in "
            "the topic could be delivered again after its row of loom_commands is deleted, and "
            "apply twice. Set LOOM_COMMANDS_RETENTION to %s or more, or lower the topic's "
            "retention.ms",
            want, topic, (long long)keep_ms, have, (long long)segment_ms, seg, total, total);
    }
    return 0;
}

int loom_retention_check_topics(rd_kafka_t *rk, const char *const *topics, size_t n,
                                int64_t retention_ms, int timeout_ms, loom_error_t *err)
{
    if (n == 0)
        return 0;
    if (timeout_ms <= 0)
        timeout_ms = 15000;
    char errbuf[256];
    rd_kafka_ConfigResource_t **cr = loom_xcalloc(n, sizeof(*cr));
    for (size_t i = 0; i < n; i++)
        cr[i] = rd_kafka_ConfigResource_new(RD_KAFKA_RESOURCE_TOPIC, topics[i]);
    rd_kafka_queue_t *q = rd_kafka_queue_new(rk);
    rd_kafka_AdminOptions_t *ao = rd_kafka_AdminOptions_new(rk, RD_KAFKA_ADMIN_OP_DESCRIBECONFIGS);
    rd_kafka_AdminOptions_set_request_timeout(ao, timeout_ms, errbuf, sizeof(errbuf));
    rd_kafka_DescribeConfigs(rk, cr, n, ao, q);
    rd_kafka_event_t *ev = rd_kafka_queue_poll(q, timeout_ms + 5000);
    int rc = 0;
    if (!ev) {
        rc = loom_error_set(err, LOOM_CODE_BROKER_UNAVAILABLE,
                            "LOOM_COMMANDS_RETENTION: Kafka did not say the topics' retention "
                            "within %d ms",
                            timeout_ms + 5000);
    } else if (rd_kafka_event_error(ev)) {
        rc = loom_error_set(err, LOOM_CODE_BROKER_UNAVAILABLE,
                            "LOOM_COMMANDS_RETENTION: could not read the topics' retention: %s",
                            rd_kafka_event_error_string(ev));
    } else {
        const rd_kafka_DescribeConfigs_result_t *res = rd_kafka_event_DescribeConfigs_result(ev);
        size_t cnt = 0;
        const rd_kafka_ConfigResource_t **rs =
            res ? rd_kafka_DescribeConfigs_result_resources(res, &cnt) : NULL;
        if (cnt != n)
            rc = loom_error_set(err, LOOM_CODE_BROKER_UNAVAILABLE,
                                "LOOM_COMMANDS_RETENTION: Kafka described %zu of %zu topics", cnt,
                                n);
        for (size_t i = 0; rc == 0 && i < cnt; i++)
            rc = judge_topic(rs[i], retention_ms, err);
    }
    if (ev)
        rd_kafka_event_destroy(ev);
    rd_kafka_AdminOptions_destroy(ao);
    rd_kafka_queue_destroy(q);
    for (size_t i = 0; i < n; i++)
        rd_kafka_ConfigResource_destroy(cr[i]);
    free(cr);
    return rc;
}

/* ---- the periodic job ------------------------------------------------------------- */

static loom_metrics_family_t *deleted_metric;

void loom_retention_job_metric(loom_metrics_family_t *deleted)
{
    deleted_metric = deleted;
}

static bool job_stopping(void *arg)
{
    return loom_job_stopping(arg);
}

static int retention_job(loom_job_ctx_t *ctx, loom_error_t *err)
{
    int64_t ms = loom_retention_ms(loom_job_config(ctx));
    if (ms <= 0)
        return 0;
    loom_retention_opts_t o = {.retention_ms = ms, .stopping = job_stopping, .stop_arg = ctx};
    loom_retention_stats_t st;
    int rc = loom_retention_run(loom_job_pool(ctx), &o, &st, err);
    if (deleted_metric && st.deleted > 0)
        loom_metrics_counter_add(deleted_metric, NULL, (double)st.deleted);
    if (st.deleted > 0)
        LOOM_INFO("deleted old rows of loom_commands", "rows=%lld statements=%lld",
                  (long long)st.deleted, (long long)st.statements);
    return rc;
}

const loom_periodic_def_t loom_retention_job = {
    "loom.commands.retention", NULL, LOOM_RETENTION_INTERVAL_MS, retention_job,
    "deletes rows of applied and expired commands older than LOOM_COMMANDS_RETENTION"};
