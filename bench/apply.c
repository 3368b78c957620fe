/*
 * apply.c: commands applied end to end per second: N commands published to a
 * topic of 12 partitions, then a worker (in this process) applies them with
 * the test consumer: per command one ledger row, one event row and the
 * loom_commands row, batched per partition. Timed from the first applied row
 * to the last, so the consumer group's join is not counted.
 *
 *   bench_apply BROKERS PG_ADMIN_URL [COMMANDS] [BATCH_SIZE...]
 *
 * Prints "apply_commands_per_s{batch=B} R" for each batch size. With
 * BENCH_STUCK_PCT=P (1..50) each batch size is run again with P % of the
 * accounts stuck (their commands fail transiently until the end), printing
 * "apply_stuck_commands_per_s{batch=B,stuck_pct=P} R": the rate of the other
 * accounts' commands, which share their partitions with the stuck ones.
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

static long long count(PGconn *c)
{
    PGresult *r = PQexec(c, "SELECT count(*) FROM test_ledger");
    long long n = PQresultStatus(r) == PGRES_TUPLES_OK ? atoll(PQgetvalue(r, 0, 0)) : -1;
    PQclear(r);
    return n;
}

static double run(const char *brokers, const char *admin, long n, int batch, int stuck_pct)
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
    loom_db_pool_opts_t po = {.size = 4};
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
    loom_worker_opts_t wo = {.brokers = brokers, .pool = pool, .consumers = &def, .n_consumers = 1};
    PGconn *c = PQconnectdb(url);
    int64_t start = loom_mono_ns(), t0 = 0;
    long long got = 0, first = 0;
    loom_worker_t *w;
    loom_worker_start(&wo, &w, &err);
    long want = n - stuck_cmds;
    while ((got = count(c)) < want && loom_mono_ns() - start < 600LL * 1000000000) {
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
    PQfinish(c);
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
    for (int i = 0; i < nb; i++) {
        printf("apply_commands_per_s{batch=%d} %.0f\n", batches[i],
               run(argv[1], argv[2], n, batches[i], 0));
        fflush(stdout);
        if (stuck_pct > 0)
            printf("apply_stuck_commands_per_s{batch=%d,stuck_pct=%d} %.0f\n", batches[i],
                   stuck_pct, run(argv[1], argv[2], n, batches[i], stuck_pct));
    }
    return 0;
}
