/*
 * apply.c: commands applied end to end per second: N commands published to a
 * topic of 12 partitions, then a worker (in this process) applies them with
 * the test consumer: per command one ledger row, one event row and the
 * loom_commands row, batched per partition. Timed from the first applied
 * command to the last, so the consumer group's join is not counted. Progress
 * is read from the worker's own counters (loom_worker_stats(), committed
 * commands): nothing is counted in the database while the clock runs; the
 * ledger is counted once at the end, to check.
 *
 *   bench_apply BROKERS PG_ADMIN_URL [COMMANDS] [BATCH_SIZE...]
 *
 * Prints "apply_commands_per_s{batch=B} R" for each batch size. With
 * BENCH_STUCK_PCT=P (1..50) each batch size is run again with P % of the
 * accounts stuck (their commands fail transiently until the end), printing
 * "apply_stuck_commands_per_s{batch=B,stuck_pct=P} R": the rate of the other
 * accounts' commands, which share their partitions with the stuck ones.
 *
 * With BENCH_PREFILL=ROWS, loom_commands and loom_events hold ROWS rows each
 * before the run (INSERT ... SELECT generate_series; from 1,000,000 rows the
 * secondary indexes and primary keys are dropped first and built again after,
 * which is faster; the tables stay ordinary logged tables). BENCH_ANALYZE=1
 * (the default) then runs VACUUM ANALYZE on them; BENCH_ANALYZE=0 leaves them
 * never analyzed. The line printed is
 * "apply_commands_per_s{batch=B,prefill=ROWS,analyzed=0|1} R", and the fill
 * time goes to stderr. BENCH_AUTOVACUUM=0 turns autovacuum off for the
 * tables the run writes, so that nothing analyzes them during the run.
 *
 * BENCH_APPLY_THREADS=N (default 4, as LOOM_WORKER_APPLY_THREADS) sets the
 * worker's apply threads; its pool has N + 4 connections, as `loom worker`
 * gives it.
 *
 * Each run also tells on stderr what ran in the server meanwhile (autovacuum
 * and autoanalyze of the tables written, checkpoints): the usual suspects
 * when two runs differ.
 */
#include "loom/bus.h"
#include "loom/clock.h"
#include "loom/log.h"
#include "loom/worker.h"
#include "support.h"

#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void sql(const char *url, const char *q)
{
    PGconn *c = PQconnectdb(url);
    PGresult *r = PQexec(c, q);
    if (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK) {
        fprintf(stderr, "bench_apply: %s: %s", q, PQerrorMessage(c));
        exit(1);
    }
    PQclear(r);
    PQfinish(c);
}

static long long sql_ll(PGconn *c, const char *q)
{
    PGresult *r = PQexec(c, q);
    long long n =
        PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) > 0 ? atoll(PQgetvalue(r, 0, 0)) : -1;
    PQclear(r);
    return n;
}

/* Runs one script per connection at once (both cores work); exits on error. */
static void sql_pair(PGconn *c1, const char *q1, PGconn *c2, const char *q2)
{
    PGconn *cs[] = {c1, c2};
    const char *qs[] = {q1, q2};
    for (int i = 0; i < 2; i++)
        if (!PQsendQuery(cs[i], qs[i])) {
            fprintf(stderr, "bench_apply: %s", PQerrorMessage(cs[i]));
            exit(1);
        }
    for (int i = 0; i < 2; i++) {
        PGresult *r;
        while ((r = PQgetResult(cs[i])) != NULL) {
            if (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK) {
                fprintf(stderr, "bench_apply: %.200s...: %s", qs[i], PQerrorMessage(cs[i]));
                exit(1);
            }
            PQclear(r);
        }
    }
}

/* DDL read from the catalog as the migrations left loom_commands and
 * loom_events, joined with "; ". `what`: "drop" (every index and the
 * constraints they back, of `table`), "keys" (the constraints of `table`
 * again), "indexes" (the other indexes of both tables, every second one from
 * `part` 0 or 1, the largest tables' first: two connections share them). */
#define FROM_INDEXES                                                           \
    " FROM pg_indexes i LEFT JOIN pg_constraint k ON k.conname = i.indexname " \
    "AND k.conrelid = format('%%I', i.tablename)::regclass "                   \
    "WHERE i.tablename IN ('loom_commands', 'loom_events')"

static char *index_ddl(PGconn *c, const char *what, const char *table, int part)
{
    char q[1600];
    if (strcmp(what, "drop") == 0)
        snprintf(q, sizeof(q),
                 "SELECT string_agg(CASE WHEN k.conname IS NOT NULL THEN "
                 "format('ALTER TABLE %%I DROP CONSTRAINT %%I', i.tablename, k.conname) "
                 "ELSE format('DROP INDEX %%I', i.indexname) END, '; ')" FROM_INDEXES
                 " AND i.tablename = '%s'",
                 table);
    else if (strcmp(what, "keys") == 0)
        snprintf(
            q, sizeof(q),
            "SELECT coalesce(string_agg(format('ALTER TABLE %%I ADD CONSTRAINT %%I %%s', "
            "i.tablename, k.conname, pg_get_constraintdef(k.oid)), '; '), 'SELECT 1')" FROM_INDEXES
            " AND k.conname IS NOT NULL AND i.tablename = '%s'",
            table);
    else
        snprintf(q, sizeof(q),
                 "SELECT coalesce(string_agg(d, '; '), 'SELECT 1') FROM (SELECT i.indexdef AS d, "
                 "row_number() OVER (ORDER BY i.tablename DESC, i.indexname) AS n" FROM_INDEXES
                 " AND k.conname IS NULL) x WHERE n %% 2 = %d",
                 part);
    PGresult *r = PQexec(c, q);
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        fprintf(stderr, "bench_apply: %s", PQerrorMessage(c));
        exit(1);
    }
    char *out = strdup(PQgetvalue(r, 0, 0));
    PQclear(r);
    return out;
}

/* LOOM_WORKER_APPLY_THREADS of the worker under test (BENCH_APPLY_THREADS). */
static int apply_threads = 4;

/* ROWS rows in loom_commands (a third for this consumer, the rest for two
 * others; ids cmd-1...) and in loom_events (a million streams of up to ten
 * versions each, account-acct-0... among them: the streams the run appends
 * to). Returns the seconds it took. */
static double prefill(const char *url, const char *consumer, long rows, int analyze)
{
    PGconn *c1 = PQconnectdb(url), *c2 = PQconnectdb(url);
    int64_t t0 = loom_mono_ns();
    bool rebuild = rows >= 1000000;
    /* keys: loom_commands', loom_events'; then the other indexes, in halves */
    char *make[4] = {NULL, NULL, NULL, NULL};
    if (rebuild) {
        make[0] = index_ddl(c1, "keys", "loom_commands", 0);
        make[1] = index_ddl(c1, "keys", "loom_events", 0);
        make[2] = index_ddl(c1, "indexes", NULL, 0);
        make[3] = index_ddl(c1, "indexes", NULL, 1);
        char *drop_c = index_ddl(c1, "drop", "loom_commands", 0);
        char *drop_e = index_ddl(c1, "drop", "loom_events", 0);
        sql_pair(c1, drop_c, c2, drop_e);
        free(drop_c);
        free(drop_e);
    }
    char qc[2048], qe[1024];
    snprintf(qc, sizeof(qc),
             "INSERT INTO loom_commands (consumer, message_id, type, stream_id, topic, "
             "kafka_partition, kafka_offset, status, attempts, result, ray_id, source, digest, "
             "causation_id, received_at, updated_at) "
             "SELECT (ARRAY['%s', 'bench.other.a', 'bench.other.b'])[1 + i %% 3], 'cmd-' || i, "
             "'test.credit', 'account-acct-' || (i %% 1000000), 'bench.fill', i %% 12, i, "
             "'applied', 1, '{\"credited\":1}', 'ray-' || (i - i %% 10), 'urn:bench', "
             "md5(i::text), 'cmd-' || (i - 1), now() - interval '1 day' + interval '1 day' * i / "
             "%ld, now() - interval '1 day' + interval '1 day' * i / %ld "
             "FROM generate_series(1, %ld) AS i",
             consumer, rows, rows, rows);
    snprintf(qe, sizeof(qe),
             "INSERT INTO loom_events (stream_id, version, event_id, type, data, ray_id, "
             "causation_id) SELECT 'account-acct-' || (i %% 1000000), 1 + i / 1000000, "
             "'evt-' || i, 'test.credited', '{\"account\":\"acct\",\"amount\":1}', "
             "'ray-' || (i - i %% 10), 'cmd-' || i FROM generate_series(1, %ld) AS i",
             rows);
    /* Index builds sort in memory (the 10M-row indexes are up to ~600 MB). */
    sql_pair(c1, "SET maintenance_work_mem = '1GB'", c2, "SET maintenance_work_mem = '1GB'");
    sql_pair(c1, qc, c2, qe);
    double t_rows = (double)(loom_mono_ns() - t0) / 1e9;
    if (rebuild) {
        /* Adding a primary key locks its table; two plain index builds on one
         * table do not lock each other. */
        sql_pair(c1, make[0], c2, make[1]);
        sql_pair(c1, make[2], c2, make[3]);
        for (int i = 0; i < 4; i++)
            free(make[i]);
    }
    double t_index = (double)(loom_mono_ns() - t0) / 1e9 - t_rows;
    if (analyze)
        sql_pair(c1, "VACUUM ANALYZE loom_commands", c2, "VACUUM ANALYZE loom_events");
    /* The fill's dirty pages are written now, not by a checkpoint in the run. */
    PQclear(PQexec(c1, "CHECKPOINT"));
    double total = (double)(loom_mono_ns() - t0) / 1e9;
    fprintf(stderr,
            "bench_apply: filled %ld rows in loom_commands and loom_events in %.1f s "
            "(rows %.1f s, indexes %s%.1f s, vacuum analyze and checkpoint %.1f s)\n",
            rows, total, t_rows, rebuild ? "" : "kept, ", t_index, total - t_rows - t_index);
    PQfinish(c1);
    PQfinish(c2);
    return total;
}

/* What ran in the server: autovacuums and autoanalyzes of the tables the run
 * writes, and checkpoints (three numbers). */
static void server_activity(PGconn *c, long long out[3])
{
    out[0] = sql_ll(c, "SELECT coalesce(sum(autovacuum_count), 0) FROM pg_stat_user_tables "
                       "WHERE relname IN ('loom_commands', 'loom_events', 'test_ledger')");
    out[1] = sql_ll(c, "SELECT coalesce(sum(autoanalyze_count), 0) FROM pg_stat_user_tables "
                       "WHERE relname IN ('loom_commands', 'loom_events', 'test_ledger')");
    out[2] = sql_ll(c, "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter");
}

typedef struct fill {
    long rows;      /* BENCH_PREFILL */
    int analyze;    /* BENCH_ANALYZE */
    int autovacuum; /* BENCH_AUTOVACUUM */
} fill_t;

static double run(const char *brokers, const char *admin, long n, int batch, int stuck_pct,
                  const fill_t *fill)
{
    char db[64], url[600], topic[128], name[128];
    snprintf(db, sizeof(db), "bench_%lld_%d", (long long)loom_now_ms(), batch);
    char q[160];
    snprintf(q, sizeof(q), "CREATE DATABASE %s", db);
    sql(admin, q);
    const char *slash = strrchr(admin, '/');
    snprintf(url, sizeof(url), "%.*s/%s", (int)(slash - admin), admin, db);
    loom_error_t err;
    loom_db_pool_t *pool = NULL;
    /* Sized as `loom worker` sizes its pool: the apply threads and 4 more. */
    loom_db_pool_opts_t po = {.size = apply_threads + 4};
    if (loom_db_pool_new(url, &po, &pool, &err) != 0) {
        fprintf(stderr, "bench_apply: %s\n", err.message);
        exit(1);
    }
    loom_db_t *dbc;
    loom_migration_set_t set = loom_test_migrations();
    loom_db_acquire(pool, &dbc, &err);
    if (loom_migrate_up(dbc, &set, NULL, &err) != 0) {
        fprintf(stderr, "bench_apply: %s\n", err.message);
        exit(1);
    }
    loom_db_release(dbc);
    /* The stuck accounts: acct-0 .. acct-(k-1) of 1000. */
    long stuck_keys = stuck_pct * 1000L / 100, stuck_cmds = 0;
    for (long k = 0; k < stuck_keys; k++) {
        char ins[128];
        snprintf(ins, sizeof(ins), "INSERT INTO test_blocks VALUES ('acct-%ld')", k);
        sql(url, ins);
    }

    snprintf(topic, sizeof(topic), "bench.apply.%s", db);
    snprintf(name, sizeof(name), "bench.%s", db);
    if (!fill->autovacuum)
        sql(url, "ALTER TABLE loom_commands SET (autovacuum_enabled = false);"
                 "ALTER TABLE loom_events SET (autovacuum_enabled = false);"
                 "ALTER TABLE test_ledger SET (autovacuum_enabled = false)");
    if (fill->rows > 0)
        prefill(url, name, fill->rows, fill->analyze);
    const char *topics[] = {topic, NULL};
    int created;
    if (loom_kafka_create_topics(brokers, NULL, topics, 1, 12, &created, &err) != 0) {
        fprintf(stderr, "bench_apply: %s\n", err.message);
        exit(1);
    }
    loom_producer_t *p;
    loom_producer_opts_t o = {.brokers = brokers};
    loom_producer_new(&o, &p, &err);
    loom_arena_t a;
    loom_arena_init(&a, 0);
    for (long i = 0; i < n; i++) {
        loom_ce_t ce;
        loom_ce_init(&ce, &a, "bench", "bench", "test.credit");
        bool stuck = i % 1000 < stuck_keys;
        stuck_cmds += stuck;
        char *data = loom_arena_sprintf(&a, "{\"account\":\"acct-%ld\",\"amount\":1%s}", i % 1000,
                                        stuck ? ",\"fail\":\"blocked\"" : "");
        ce.data = data;
        ce.data_len = strlen(data);
        char key[32];
        snprintf(key, sizeof(key), "acct-%ld", i % 1000);
        while (loom_producer_send(p, topic, key, strlen(key), &ce, NULL, NULL, &err) != 0)
            loom_sleep_ms(1);
        loom_arena_reset(&a);
    }
    loom_producer_flush(p, 120000);
    loom_arena_release(&a);

    loom_consumer_def_t def = loom_test_consumers[0];
    def.name = name;
    def.topics = topics;
    def.batch_size = batch;
    loom_worker_opts_t wo = {.brokers = brokers,
                             .pool = pool,
                             .consumers = &def,
                             .n_consumers = 1,
                             .apply_threads = apply_threads};
    PGconn *c = PQconnectdb(url);
    long long before[3], after[3];
    server_activity(c, before);
    int64_t start = loom_mono_ns(), t0 = 0;
    long long got = 0, first = 0;
    loom_worker_t *w;
    loom_worker_start(&wo, &w, &err);
    long want = n - stuck_cmds;
    loom_worker_stats_t st;
    while (loom_worker_stats(w, &st),
           (got = st.applied) < want && loom_mono_ns() - start < 600LL * 1000000000) {
        if (got > 0 && t0 == 0) {
            t0 = loom_mono_ns();
            first = got;
        }
        if (getenv("BENCH_TRACE") && (loom_mono_ns() - start) / 1000000 % 500 < 5)
            fprintf(stderr, "bench_apply: %.1f s %lld\n", (double)(loom_mono_ns() - start) / 1e9,
                    got);
        loom_sleep_ms(5);
    }
    if (t0 == 0) {
        t0 = start;
        first = 0;
    }
    double secs = (double)(loom_mono_ns() - t0) / 1e9;
    loom_worker_free(w);
    loom_producer_free(p);
    loom_db_pool_free(pool);
    server_activity(c, after);
    long long ledger = sql_ll(c, "SELECT count(*) FROM test_ledger");
    PQfinish(c);
    if (ledger != got)
        fprintf(stderr, "bench_apply: the worker counted %lld applied, the ledger holds %lld\n",
                got, ledger);
    fprintf(stderr,
            "bench_apply: batch %d: %.0f cmd/s; during the run: %lld autovacuum, %lld "
            "autoanalyze, %lld checkpoints\n",
            batch, secs > 0 ? (double)(got - first) / secs : 0, after[0] - before[0],
            after[1] - before[1], after[2] - before[2]);
    if (got != want)
        fprintf(stderr, "bench_apply: only %lld of %ld applied\n", got, want);
    return secs > 0 ? (double)(got - first) / secs : 0;
}

int main(int argc, char **argv)
{
    if (argc < 3 || strcmp(argv[1], "--help") == 0) {
        fprintf(stderr, "usage: bench_apply BROKERS PG_ADMIN_URL [COMMANDS] [BATCH_SIZE...]\n");
        return 2;
    }
    loom_log_level = getenv("BENCH_LOG") ? LOOM_LOG_DEBUG : LOOM_LOG_WARN;
    long n = argc > 3 ? atol(argv[3]) : 50000;
    int batches[16] = {100}, nb = 1;
    if (argc > 4) {
        nb = 0;
        for (int i = 4; i < argc && nb < 16; i++)
            batches[nb++] = atoi(argv[i]);
    }
    const char *sp = getenv("BENCH_STUCK_PCT");
    int stuck_pct = sp ? atoi(sp) : 0;
    if (stuck_pct < 0 || stuck_pct > 50)
        stuck_pct = 0;
    fill_t fill = {0, 1, 1};
    const char *e = getenv("BENCH_PREFILL");
    fill.rows = e ? atol(e) : 0;
    e = getenv("BENCH_ANALYZE");
    fill.analyze = !e || atoi(e) != 0;
    e = getenv("BENCH_AUTOVACUUM");
    fill.autovacuum = !e || atoi(e) != 0;
    e = getenv("BENCH_APPLY_THREADS");
    if (e && atoi(e) > 0 && atoi(e) <= 64)
        apply_threads = atoi(e);
    for (int i = 0; i < nb; i++) {
        double r = run(argv[1], argv[2], n, batches[i], 0, &fill);
        if (fill.rows > 0)
            printf("apply_commands_per_s{batch=%d,prefill=%ld,analyzed=%d} %.0f\n", batches[i],
                   fill.rows, fill.analyze, r);
        else
            printf("apply_commands_per_s{batch=%d} %.0f\n", batches[i], r);
        fflush(stdout);
        if (stuck_pct > 0)
            printf("apply_stuck_commands_per_s{batch=%d,stuck_pct=%d} %.0f\n", batches[i],
                   stuck_pct, run(argv[1], argv[2], n, batches[i], stuck_pct, &fill));
    }
    return 0;
}
