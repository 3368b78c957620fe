/*
 * op_dispatch: what calling an op by name costs compared with calling its C
 * function directly.
 *
 *   op_dispatch [--quick] [DATABASE_URL]
 *
 * Without a database it measures the dispatcher alone, with an op that
 * declares LOOM_OP_NO_DB (so no transaction): a direct call, the name lookup
 * (a hash probe in a table of 64 ops), lookup + call through the op's
 * function pointer, and the whole loom_op_call() (lookup, request check,
 * deadline, result check, error mapping) without and with metrics. With a
 * DATABASE_URL it also compares "SELECT 1" as an op (its own READ ONLY
 * transaction with statement_timeout: BEGIN, SET LOCAL, SELECT, COMMIT) with
 * the same prepared statement run directly on a connection.
 *
 * The dispatcher figures are the calling thread's CPU time per call
 * (CLOCK_THREAD_CPUTIME_ID): on a shared machine, wall-clock time also
 * counts the time other processes hold the core, which says nothing about
 * the call. Each is the least of five rounds: what other processes do can
 * only add to a round (caches, a sibling hyperthread), never take from it.
 * The database figures are wall-clock time (they wait for the server).
 */
#include "loom/clock.h"
#include "loom/op.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static volatile long sink;              /* sum of return codes: 0 when all succeeded */
static const loom_op_t *volatile found; /* keeps the lookups */

__attribute__((noinline)) static int empty_op(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req,
                                              json_t **res, loom_error_t *err)
{
    (void)ctx;
    (void)db;
    (void)req;
    (void)err;
    *res = json_null(); /* a singleton: no allocation to measure */
    return 0;
}

static const loom_db_stmt_t select_one = {"bench_select_one", "SELECT 1", 0};

static int select_op(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                     loom_error_t *err)
{
    (void)ctx;
    (void)req;
    int rc = loom_db_exec(db, &select_one, NULL, NULL, err);
    if (rc == 0)
        *res = json_null();
    return rc;
}

/* CPU time of this thread, in nanoseconds. */
static int64_t cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void report(const char *what, double ns_per_call, long n)
{
    printf("%-44s %10.1f ns/call  (%ld calls)\n", what, ns_per_call, n);
}

enum { ROUNDS = 5 };

/* Runs BODY n / ROUNDS times per round and reports the least CPU time per
 * call of the rounds. */
#define MEASURE(what, n, body)                                    \
    do {                                                          \
        long per_ = (n) / ROUNDS;                                 \
        double best_ = 0;                                         \
        for (int r_ = 0; r_ < ROUNDS; r_++) {                     \
            int64_t t0_ = cpu_ns();                               \
            for (long i = 0; i < per_; i++) {                     \
                body;                                             \
            }                                                     \
            double ns_ = (double)(cpu_ns() - t0_) / (double)per_; \
            if (r_ == 0 || ns_ < best_)                           \
                best_ = ns_;                                      \
        }                                                         \
        report(what, best_, per_ *ROUNDS);                        \
    } while (0)

int main(int argc, char **argv)
{
    bool quick = false;
    const char *db_url = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0)
            quick = true;
        else if (argv[i][0] == '-')
            return fprintf(stderr, "usage: op_dispatch [--quick] [DATABASE_URL]\n"), 2;
        else
            db_url = argv[i];
    }
    long n = quick ? 10000 : 5000000;

    /* 64 ops, like a service-sized table; the one called sits in the middle. */
    static loom_op_t ops[64];
    static char names[64][32];
    const loom_op_t *ptrs[64];
    for (int i = 0; i < 63; i++) {
        snprintf(names[i], sizeof(names[i]), "svc%02d.things.get", i);
        ops[i] = (loom_op_t){names[i], empty_op, 0, "filler", LOOM_OP_NO_DB};
    }
    ops[63] = (loom_op_t){"bench.empty", empty_op, 0, "does nothing", LOOM_OP_NO_DB};
    for (int i = 0; i < 64; i++)
        ptrs[i] = &ops[i];
    loom_op_table_t *table = loom_op_table_new();
    loom_error_t err;
    if (loom_op_table_add(table, ptrs, 64, &err) != 0)
        return fprintf(stderr, "op_dispatch: %s\n", err.message), 1;
    loom_op_runtime_t rt;
    loom_op_runtime_init(&rt, table, NULL, NULL);
    loom_op_ctx_t ctx = {.rt = &rt, .ray_id = "bench"};
    json_t *req = json_object();
    json_t *res = NULL;
    int (*volatile fn)(loom_op_ctx_t *, loom_db_t *, const json_t *, json_t **, loom_error_t *) =
        empty_op;

    printf("op dispatch, %s run\n", quick ? "quick" : "full");
    MEASURE("direct call (function pointer)", n, sink += fn(&ctx, NULL, req, &res, &err));
    MEASURE("lookup by name (64 ops)", n, found = loom_op_find(table, "bench.empty"));
    MEASURE("lookup + call", n, {
        const loom_op_t *op = loom_op_find(table, "bench.empty");
        sink += op->fn(&ctx, NULL, req, &res, &err);
    });
    MEASURE("loom_op_call, no metrics", n,
            sink += loom_op_call(&ctx, "bench.empty", req, &res, &err));

    loom_metrics_t *metrics = loom_metrics_new();
    loom_op_runtime_t rtm;
    loom_op_runtime_init(&rtm, table, NULL, metrics);
    loom_op_ctx_t ctxm = {.rt = &rtm, .ray_id = "bench"};
    MEASURE("loom_op_call, with metrics", n,
            sink += loom_op_call(&ctxm, "bench.empty", req, &res, &err));

    loom_op_ctx_t ctxr = {.rt = &rt};
    MEASURE("loom_op_call, generating a ray id", n / 10, {
        ctxr.ray_id = NULL;
        sink += loom_op_call(&ctxr, "bench.empty", req, &res, &err);
    });

    int rc = 0;
    if (db_url) {
        long m = quick ? 50 : 20000;
        loom_db_pool_t *pool = NULL;
        loom_db_pool_opts_t popts = {.size = 1, .read_only = true};
        if (loom_db_pool_new(db_url, &popts, &pool, &err) != 0) {
            fprintf(stderr, "op_dispatch: %s\n", err.message);
            rc = 1;
        } else {
            static const loom_op_t select = {"bench.select", select_op, 0, "SELECT 1", 0};
            const loom_op_t *one[] = {&select};
            loom_op_table_add(table, one, 1, &err);
            loom_op_runtime_t rtd;
            loom_op_runtime_init(&rtd, table, pool, NULL);
            loom_op_ctx_t ctxd = {.rt = &rtd, .ray_id = "bench"};
            loom_db_t *db;
            loom_db_acquire(pool, &db, &err);
            int64_t t = loom_mono_ns();
            for (long i = 0; i < m; i++)
                sink += loom_db_exec(db, &select_one, NULL, NULL, &err);
            report("SELECT 1, prepared, on a held connection",
                   (double)(loom_mono_ns() - t) / (double)m, m);
            loom_db_release(db);
            t = loom_mono_ns();
            for (long i = 0; i < m; i++)
                sink += loom_op_call(&ctxd, "bench.select", req, &res, &err);
            report("SELECT 1 as an op (READ ONLY tx)", (double)(loom_mono_ns() - t) / (double)m, m);
            loom_db_pool_free(pool);
        }
    }
    loom_metrics_free(metrics);
    json_decref(req);
    loom_op_table_free(table);
    if (sink != 0) {
        fprintf(stderr, "op_dispatch: a call failed: %s\n", err.message);
        rc = 1;
    }
    return rc;
}
