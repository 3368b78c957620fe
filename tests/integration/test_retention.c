/*
 * Retention of loom_commands (loom/retention.h) against the real Postgres and
 * the real Kafka broker: only finished rows (applied, expired) older than the
 * window go, counted exactly; the deletion runs in statements of a bounded
 * number of rows (seen by a statement trigger on the table); its statement
 * reads the index on an unanalyzed table; a retention shorter than a topic's
 * retention.ms (+ segment.ms), or on a topic that keeps messages forever, is
 * refused, by the check and by `loom worker` at start; a safe one runs as a
 * periodic job of `loom worker`.
 */
#include "support.h"
#include "loom/bus.h"
#include "loom/retention.h"

#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define DAY_MS (86400LL * 1000)

/* n rows of status received `age` ago ("2 days"), ids prefix-1..prefix-n. */
static void add_rows(const char *url, const char *prefix, const char *status, int n,
                     const char *age)
{
    char sql[1024];
    snprintf(sql, sizeof(sql),
             "INSERT INTO loom_commands (consumer, message_id, type, topic, kafka_partition, "
             "kafka_offset, status, received_at, updated_at) "
             "SELECT 'c1', '%s-' || i, 'test.credit', 'loom.cmd.test', 0, i, '%s', "
             "now() - interval '%s' + i * interval '1 microsecond', "
             "now() - interval '%s' FROM generate_series(1, %d) i",
             prefix, status, age, age, n);
    loom_test_sql(url, sql);
}

static long long count_of(const char *url, const char *where)
{
    char sql[512];
    snprintf(sql, sizeof(sql), "SELECT count(*) FROM loom_commands WHERE %s", where);
    return loom_test_sql_ll(url, sql);
}

Test(retention, deletes_only_finished_rows_older_than_the_window, .timeout = 120)
{
    char url[512];
    loom_test_db_create_migrated(url, sizeof(url));
    /* Older than the one-day window. */
    add_rows(url, "old-applied", "applied", 2500, "2 days");
    add_rows(url, "old-expired", "expired", 30, "3 days");
    add_rows(url, "old-rejected", "rejected", 40, "2 days");
    add_rows(url, "old-parked", "parked", 5, "5 days");
    add_rows(url, "old-retrying", "retrying", 3, "2 days");
    add_rows(url, "old-conflict", "conflict", 2, "2 days");
    /* Inside it, some just inside. */
    add_rows(url, "new-applied", "applied", 100, "1 hour");
    add_rows(url, "edge-applied", "applied", 7, "23 hours");
    add_rows(url, "new-expired", "expired", 10, "1 minute");
    add_rows(url, "new-rejected", "rejected", 4, "1 hour");

    loom_db_pool_t *pool = loom_test_pool(url, 2);
    loom_retention_opts_t o = {.retention_ms = DAY_MS};
    loom_retention_stats_t st;
    loom_error_t err;
    cr_assert_eq(loom_retention_run(pool, &o, &st, &err), 0, "%s", err.message);
    cr_assert_eq(st.deleted, 2530, "deleted %lld", (long long)st.deleted);
    cr_assert_eq(count_of(url, "message_id LIKE 'old-applied-%'"), 0);
    cr_assert_eq(count_of(url, "message_id LIKE 'old-expired-%'"), 0);
    cr_assert_eq(count_of(url, "message_id LIKE 'old-rejected-%'"), 40);
    cr_assert_eq(count_of(url, "message_id LIKE 'old-parked-%'"), 5);
    cr_assert_eq(count_of(url, "message_id LIKE 'old-retrying-%'"), 3);
    cr_assert_eq(count_of(url, "message_id LIKE 'old-conflict-%'"), 2);
    cr_assert_eq(count_of(url, "message_id LIKE 'new-applied-%'"), 100);
    cr_assert_eq(count_of(url, "message_id LIKE 'edge-applied-%'"), 7);
    cr_assert_eq(count_of(url, "message_id LIKE 'new-expired-%'"), 10);
    cr_assert_eq(count_of(url, "message_id LIKE 'new-rejected-%'"), 4);
    cr_assert_eq(count_of(url, "true"), 40 + 5 + 3 + 2 + 100 + 7 + 10 + 4);

    /* A second run finds nothing more to delete. */
    cr_assert_eq(loom_retention_run(pool, &o, &st, &err), 0, "%s", err.message);
    cr_assert_eq(st.deleted, 0);
    /* A shorter window takes the newer finished rows too, and still no
     * rejected one. */
    o.retention_ms = 30 * 60 * 1000;
    cr_assert_eq(loom_retention_run(pool, &o, &st, &err), 0, "%s", err.message);
    cr_assert_eq(st.deleted, 100 + 7, "deleted %lld", (long long)st.deleted);
    cr_assert_eq(count_of(url, "message_id LIKE 'new-rejected-%'"), 4);
    cr_assert_eq(count_of(url, "message_id LIKE 'new-expired-%'"), 10);
    loom_db_pool_free(pool);
}

Test(retention, deletes_in_statements_of_a_bounded_number_of_rows, .timeout = 120)
{
    char url[512];
    loom_test_db_create_migrated(url, sizeof(url));
    /* Every DELETE statement on loom_commands logs how many rows it took. */
    loom_test_sql(url, "CREATE TABLE deletes_seen (id serial PRIMARY KEY, n bigint NOT NULL)");
    loom_test_sql(url,
                  "CREATE FUNCTION log_deletes() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                  "INSERT INTO deletes_seen (n) SELECT count(*) FROM gone; RETURN NULL; END $$");
    loom_test_sql(url, "CREATE TRIGGER log_deletes AFTER DELETE ON loom_commands "
                       "REFERENCING OLD TABLE AS gone FOR EACH STATEMENT "
                       "EXECUTE FUNCTION log_deletes()");
    /* Kept rows between the deletable ones, and more of them than a batch:
     * they must be passed over, not read again by every batch. */
    add_rows(url, "a", "applied", 1050, "2 days");
    add_rows(url, "r", "rejected", 250, "2 days");
    add_rows(url, "b", "applied", 333, "4 days");

    loom_db_pool_t *pool = loom_test_pool(url, 2);
    loom_retention_opts_t o = {.retention_ms = DAY_MS, .batch = 100, .pause_min_ms = 1};
    loom_retention_stats_t st;
    loom_error_t err;
    /* A run cut short after three statements has deleted at most 300 rows. */
    o.max_batches = 3;
    cr_assert_eq(loom_retention_run(pool, &o, &st, &err), 0, "%s", err.message);
    cr_assert_eq(st.statements, 3);
    cr_assert_leq(st.deleted, 300);
    cr_assert_eq(count_of(url, "status = 'applied'"), 1383 - st.deleted);
    int64_t first = st.deleted;

    o.max_batches = 0;
    cr_assert_eq(loom_retention_run(pool, &o, &st, &err), 0, "%s", err.message);
    cr_assert_eq(first + st.deleted, 1383);
    cr_assert_leq(st.max_rows, 100);
    cr_assert_eq(count_of(url, "status = 'applied'"), 0);
    cr_assert_eq(count_of(url, "status = 'rejected'"), 250);
    /* Seen from the database: no statement deleted more than 100 rows, and
     * every row went by one of them. */
    cr_assert_leq(loom_test_sql_ll(url, "SELECT max(n) FROM deletes_seen"), 100);
    cr_assert_eq(loom_test_sql_ll(url, "SELECT sum(n) FROM deletes_seen"), 1383);
    cr_assert_geq(loom_test_sql_ll(url, "SELECT count(*) FROM deletes_seen WHERE n > 0"), 14);
    /* Rows read once per run: 1633 rows in batches of 100 is 17 statements
     * (plus the three of the first run), not one per kept row. */
    cr_assert_leq(loom_test_sql_ll(url, "SELECT count(*) FROM deletes_seen"), 3 + 17);
    loom_db_pool_free(pool);
}

Test(retention, its_statement_reads_the_index_on_an_unanalyzed_table, .timeout = 120)
{
    char url[512];
    loom_test_db_create_migrated(url, sizeof(url));
    loom_test_sql(url, "ALTER TABLE loom_commands SET (autovacuum_enabled = false)");
    add_rows(url, "x", "applied", 20000, "2 days");
    loom_db_pool_t *pool = loom_test_pool(url, 1);
    loom_db_t *db = NULL;
    loom_error_t err;
    cr_assert_eq(loom_db_acquire(pool, &db, &err), 0, "%s", err.message);
    PGresult *res = NULL;
    const char *p[] = {"-infinity", "", "", "86400000", "1000"};
    char explain[4096];
    snprintf(explain, sizeof(explain), "EXPLAIN %s", loom_retention_sql());
    cr_assert_eq(loom_db_query(db, explain, 5, p, &res, &err), 0, "%s", err.message);
    char plan[8192] = "";
    for (int i = 0; i < PQntuples(res); i++) {
        strncat(plan, PQgetvalue(res, i, 0), sizeof(plan) - strlen(plan) - 2);
        strcat(plan, "\n");
    }
    PQclear(res);
    loom_db_release(db);
    loom_db_pool_free(pool);
    cr_assert(strstr(plan, "loom_commands_by_received"), "%s", plan);
    cr_assert_null(strstr(plan, "Seq Scan on loom_commands"), "%s", plan);
}

/* ---- the topics' retention ---------------------------------------------------- */

static rd_kafka_t *admin_client(void)
{
    char errbuf[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "bootstrap.servers", loom_test_kafka_brokers(), errbuf, sizeof(errbuf));
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errbuf, sizeof(errbuf));
    cr_assert_not_null(rk, "%s", errbuf);
    return rk;
}

/* Polls DescribeConfigs until topic's key is value (up to 60 s). */
static bool topic_says(rd_kafka_t *rk, const char *topic, const char *key, const char *value)
{
    for (int round = 0; round < 300; round++) {
        rd_kafka_ConfigResource_t *cr = rd_kafka_ConfigResource_new(RD_KAFKA_RESOURCE_TOPIC, topic);
        rd_kafka_queue_t *q = rd_kafka_queue_new(rk);
        rd_kafka_DescribeConfigs(rk, &cr, 1, NULL, q);
        rd_kafka_event_t *ev = rd_kafka_queue_poll(q, 30000);
        bool same = false;
        if (ev && !rd_kafka_event_error(ev)) {
            size_t cnt = 0, n = 0;
            const rd_kafka_ConfigResource_t **rs = rd_kafka_DescribeConfigs_result_resources(
                rd_kafka_event_DescribeConfigs_result(ev), &cnt);
            const rd_kafka_ConfigEntry_t **e =
                cnt == 1 ? rd_kafka_ConfigResource_configs(rs[0], &n) : NULL;
            for (size_t i = 0; i < n; i++)
                if (strcmp(rd_kafka_ConfigEntry_name(e[i]), key) == 0)
                    same = rd_kafka_ConfigEntry_value(e[i]) &&
                           strcmp(rd_kafka_ConfigEntry_value(e[i]), value) == 0;
        }
        if (ev)
            rd_kafka_event_destroy(ev);
        rd_kafka_queue_destroy(q);
        rd_kafka_ConfigResource_destroy(cr);
        if (same)
            return true;
        usleep(200 * 1000);
    }
    return false;
}

/* Sets a topic's configuration (AlterConfigs: every other key back to the
 * broker's default). */
static void topic_config(rd_kafka_t *rk, const char *topic, const char *const *kv, size_t n)
{
    char errbuf[256];
    rd_kafka_ConfigResource_t *cr = rd_kafka_ConfigResource_new(RD_KAFKA_RESOURCE_TOPIC, topic);
    for (size_t i = 0; i < n; i++)
        rd_kafka_ConfigResource_set_config(cr, kv[2 * i], kv[2 * i + 1]);
    rd_kafka_queue_t *q = rd_kafka_queue_new(rk);
    rd_kafka_AdminOptions_t *ao = rd_kafka_AdminOptions_new(rk, RD_KAFKA_ADMIN_OP_ALTERCONFIGS);
    rd_kafka_AdminOptions_set_request_timeout(ao, 15000, errbuf, sizeof(errbuf));
    rd_kafka_AlterConfigs(rk, &cr, 1, ao, q);
    rd_kafka_event_t *ev = rd_kafka_queue_poll(q, 30000);
    cr_assert_not_null(ev, "no answer to AlterConfigs");
    cr_assert_eq(rd_kafka_event_error(ev), 0, "%s", rd_kafka_event_error_string(ev));
    size_t cnt = 0;
    const rd_kafka_ConfigResource_t **rs =
        rd_kafka_AlterConfigs_result_resources(rd_kafka_event_AlterConfigs_result(ev), &cnt);
    cr_assert_eq(cnt, 1);
    cr_assert_eq(rd_kafka_ConfigResource_error(rs[0]), 0, "%s",
                 rd_kafka_ConfigResource_error_string(rs[0]));
    rd_kafka_event_destroy(ev);
    rd_kafka_AdminOptions_destroy(ao);
    rd_kafka_queue_destroy(q);
    rd_kafka_ConfigResource_destroy(cr);
    /* The brokers take a new configuration in a moment: wait until they
     * describe it. */
    for (size_t i = 0; i < n; i++)
        cr_assert(topic_says(rk, topic, kv[2 * i], kv[2 * i + 1]), "%s did not take %s=%s", topic,
                  kv[2 * i], kv[2 * i + 1]);
}

Test(retention, a_window_shorter_than_a_topic_keeps_messages_is_refused, .timeout = 180)
{
    char safe[128], short_one[128];
    loom_test_unique_name("retention_safe", safe, sizeof(safe));
    loom_test_unique_name("retention_short", short_one, sizeof(short_one));
    loom_test_kafka_topic(loom_test_kafka_brokers(), safe, 1);
    loom_test_kafka_topic(loom_test_kafka_brokers(), short_one, 1);
    rd_kafka_t *rk = admin_client();
    const char *one_day[] = {"retention.ms", "86400000", "segment.ms", "3600000"};
    topic_config(rk, safe, one_day, 2);
    const char *week[] = {"retention.ms", "604800000", "segment.ms", "86400000"};
    topic_config(rk, short_one, week, 2);
    const char *both[] = {safe, short_one};
    loom_error_t err;

    /* 25 h covers the first (1 day + 1 hour) alone. */
    cr_assert_eq(loom_retention_check_topics(rk, both, 1, 25 * 3600 * 1000LL, 0, &err), 0, "%s",
                 err.message);
    /* Not the second: 7 days + 1 day. */
    cr_assert_neq(loom_retention_check_topics(rk, both, 2, 25 * 3600 * 1000LL, 0, &err), 0);
    cr_assert_str_eq(err.code, "CONFIG_INVALID");
    cr_assert(strstr(err.message, short_one), "%s", err.message);
    cr_assert(strstr(err.message, "retention.ms=604800000"), "%s", err.message);
    cr_assert(strstr(err.message, "is refused"), "%s", err.message);
    /* Shorter than retention.ms alone: refused too. */
    cr_assert_neq(loom_retention_check_topics(rk, both + 1, 1, 6 * DAY_MS, 0, &err), 0);
    /* retention.ms alone is not enough: the last segment may be a day old. */
    cr_assert_neq(loom_retention_check_topics(rk, both + 1, 1, 7 * DAY_MS, 0, &err), 0);
    cr_assert_eq(loom_retention_check_topics(rk, both, 2, 8 * DAY_MS, 0, &err), 0, "%s",
                 err.message);

    /* A topic that keeps its messages forever refuses any window. */
    const char *forever[] = {"retention.ms", "-1"};
    topic_config(rk, short_one, forever, 1);
    cr_assert_neq(loom_retention_check_topics(rk, both, 2, 3650 * DAY_MS, 0, &err), 0);
    cr_assert(strstr(err.message, "keep forever"), "%s", err.message);
    const char *compacted[] = {"cleanup.policy", "compact"};
    topic_config(rk, short_one, compacted, 1);
    cr_assert_neq(loom_retention_check_topics(rk, both, 2, 3650 * DAY_MS, 0, &err), 0);
    cr_assert(strstr(err.message, "cleanup.policy=compact"), "%s", err.message);

    /* A topic that does not exist cannot be judged: refused. */
    const char *missing[] = {"retention_no_such_topic_at_all"};
    cr_assert_neq(loom_retention_check_topics(rk, missing, 1, 3650 * DAY_MS, 0, &err), 0);
    cr_assert(strstr(err.message, "retention_no_such_topic_at_all"), "%s", err.message);
    rd_kafka_destroy(rk);
}

/* ---- loom worker ---------------------------------------------------------------- */

static int run_app(const char *const *env, const char *const *args, char **out, char **err)
{
    const char *argv[8] = {loom_test_app_bin()};
    for (int i = 0; args[i] && i < 6; i++)
        argv[i + 1] = args[i];
    return loom_test_run(argv, env, out, err);
}

Test(retention, loom_worker_refuses_an_unsafe_window_and_runs_a_safe_one, .timeout = 300)
{
    char url[512], prefix[64];
    loom_test_db_create(url, sizeof(url));
    loom_test_topic_prefix("ret", prefix, sizeof(prefix));
    char e_url[600], e_b[300], e_p[128];
    snprintf(e_url, sizeof(e_url), "LOOM_DATABASE_URL=%s", url);
    snprintf(e_b, sizeof(e_b), "LOOM_KAFKA_BROKERS=%s", loom_test_kafka_brokers());
    snprintf(e_p, sizeof(e_p), "LOOM_TOPIC_PREFIX=%s", prefix);
    const char *env_plain[] = {e_url, e_b, e_p, NULL};
    char *out = NULL, *err = NULL;
    const char *migrate[] = {"migrate", "up", NULL};
    cr_assert_eq(run_app(env_plain, migrate, &out, &err), 0, "%s%s", out, err);
    free(out);
    free(err);
    /* Every topic `loom migrate up` created (the test consumer's, the
     * engine's) keeps messages a week, in one-day segments. */
    rd_kafka_t *rk = admin_client();
    const char *week[] = {"retention.ms", "604800000", "segment.ms", "86400000"};
    const struct rd_kafka_metadata *md = NULL;
    cr_assert_eq(rd_kafka_metadata(rk, 1, NULL, &md, 15000), 0);
    int set = 0;
    for (int i = 0; i < md->topic_cnt; i++)
        if (strncmp(md->topics[i].topic, prefix, strlen(prefix)) == 0) {
            topic_config(rk, md->topics[i].topic, week, 2);
            set++;
        }
    rd_kafka_metadata_destroy(md);
    rd_kafka_destroy(rk);
    cr_assert_geq(set, 2, "migrate up created %d topics", set);

    const char *env_short[] = {
        e_url, e_b, e_p, "LOOM_COMMANDS_RETENTION=3d", "LOOM_WORKER_LISTEN=127.0.0.1:0", NULL};
    const char *worker[] = {"worker", NULL};
    int rc = run_app(env_short, worker, &out, &err);
    cr_assert_eq(rc, 78, "exit %d: %s%s", rc, out, err);
    cr_assert(strstr(err, "LOOM_COMMANDS_RETENTION=72h is refused"), "%s", err);
    cr_assert(strstr(err, "retention.ms=604800000 (168h) + segment.ms=86400000 (24h) = 192h"), "%s",
              err);
    cr_assert(strstr(err, prefix), "%s", err);
    free(out);
    free(err);

    /* Nine days covers it: the worker starts and its job deletes the old
     * finished rows, and only those. */
    add_rows(url, "old-applied", "applied", 1200, "10 days");
    add_rows(url, "old-rejected", "rejected", 3, "10 days");
    add_rows(url, "new-applied", "applied", 5, "1 day");
    const char *env_safe[] = {
        e_url, e_b, e_p, "LOOM_COMMANDS_RETENTION=9d", "LOOM_WORKER_LISTEN=127.0.0.1:0", NULL};
    const char *argv[] = {loom_test_app_bin(), "worker", NULL};
    int fd;
    pid_t pid = loom_test_spawn(argv, env_safe, &fd);
    char *log = NULL;
    cr_assert(loom_test_read_until(fd, "deleted old rows of loom_commands", 120000, &log), "%s",
              log);
    cr_assert(strstr(log, "rows=1200"), "%s", log);
    cr_assert_eq(count_of(url, "message_id LIKE 'old-applied-%'"), 0);
    cr_assert_eq(count_of(url, "message_id LIKE 'old-rejected-%'"), 3);
    cr_assert_eq(count_of(url, "message_id LIKE 'new-applied-%'"), 5);
    kill(pid, SIGTERM);
    cr_assert_eq(loom_test_wait(pid, 60000), 0);
    close(fd);
    free(log);
}
