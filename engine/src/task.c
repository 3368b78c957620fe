/*
 * task.c: headless tasks (one thread each, a lease for singletons) and
 * oneshot jobs (a row per job in loom_oneshot_runs): loom/task.h.
 */
#include "loom/task_runner.h"
#include "loom/clock.h"
#include "loom/envelope.h"
#include "loom/log.h"
#include "loom/mem.h"
#include "loom/periodic.h"
#include "loom/topic.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct loom_task_ctx {
    const char *name;
    loom_tasks_t *t;              /* NULL for a oneshot job */
    atomic_int stop;              /* this run must return */
    const volatile int *ext_stop; /* a oneshot's signal flag */
    loom_db_pool_t *pool;
    loom_producer_t *producer;
    const loom_config_t *cfg;
};

typedef struct task_slot {
    loom_tasks_t *t;
    const loom_task_def_t *def;
    loom_task_ctx_t ctx;
    char lease[160];
    pthread_t thread;
    bool started;
    atomic_llong runs;
    atomic_int running;
} task_slot_t;

struct loom_tasks {
    loom_tasks_opts_t opts;
    char holder[128];
    atomic_int stop;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    task_slot_t *slots;
    size_t n;
};

/* ---- the context ---------------------------------------------------------- */

const char *loom_task_name(const loom_task_ctx_t *ctx)
{
    return ctx->name;
}

bool loom_task_stopping(loom_task_ctx_t *ctx)
{
    return atomic_load(&ctx->stop) || (ctx->t && atomic_load(&ctx->t->stop)) ||
           (ctx->ext_stop && *ctx->ext_stop);
}

/* Waits up to ms on t's condition (or in slices of 100 ms for a oneshot),
 * returning early when stop() says so. */
static void wait_ms(loom_tasks_t *t, int64_t ms, bool (*stop)(void *), void *arg)
{
    int64_t until = loom_mono_ms() + ms;
    for (;;) {
        if (stop(arg))
            return;
        int64_t left = until - loom_mono_ms();
        if (left <= 0)
            return;
        if (left > 100)
            left = 100;
        if (t) {
            struct timespec ts;
            loom_timespec_in(left, &ts);
            pthread_mutex_lock(&t->mu);
            if (!stop(arg))
                pthread_cond_timedwait(&t->cv, &t->mu, &ts);
            pthread_mutex_unlock(&t->mu);
        } else {
            struct timespec ts = {0, left * 1000000L};
            nanosleep(&ts, NULL);
        }
    }
}

static bool ctx_stopping(void *arg)
{
    return loom_task_stopping(arg);
}

bool loom_task_sleep(loom_task_ctx_t *ctx, int64_t ms)
{
    wait_ms(ctx->t, ms, ctx_stopping, ctx);
    return loom_task_stopping(ctx);
}

const loom_config_t *loom_task_config(const loom_task_ctx_t *ctx)
{
    return ctx->cfg;
}

loom_db_pool_t *loom_task_pool(const loom_task_ctx_t *ctx)
{
    return ctx->pool;
}

int loom_command_publish(loom_producer_t *p, const loom_config_t *cfg, const char *type,
                         const char *key, json_t *data, loom_error_t *err)
{
    if (!p) {
        json_decref(data);
        return loom_error_set(err, LOOM_CODE_BROKER_UNAVAILABLE,
                              "no Kafka to publish %s on (LOOM_KAFKA_BROKERS is not set)", type);
    }
    loom_arena_t a;
    loom_arena_init(&a, 0);
    loom_ce_t ce;
    loom_ce_init(&ce, &a, cfg ? cfg->site_name : "local", cfg ? cfg->node_id : "node", type);
    char *text = json_dumps(data, JSON_COMPACT | JSON_ENCODE_ANY);
    json_decref(data);
    ce.data = text ? text : "null";
    ce.data_len = strlen(ce.data);
    char topic[LOOM_TOPIC_MAX];
    loom_topic_for_command(type, topic, sizeof(topic));
    const char *k = key ? key : ce.id;
    loom_delivery_t d;
    loom_delivery_init(&d);
    int rc = loom_producer_send(p, topic, k, strlen(k), &ce, loom_delivery_future_cb, &d, err);
    if (rc == 0)
        rc = loom_delivery_wait(&d, 30000, err);
    loom_delivery_release(&d);
    free(text);
    loom_arena_release(&a);
    return rc;
}

int loom_task_publish(loom_task_ctx_t *ctx, const char *type, const char *key, json_t *data,
                      loom_error_t *err)
{
    return loom_command_publish(ctx->producer, ctx->cfg, type, key, data, err);
}

/* ---- headless tasks --------------------------------------------------------- */

static const loom_db_stmt_t stmt_renew = {
    "loom_task_lease_renew",
    "UPDATE loom_leases SET expires_at = now() + $3::bigint * interval '1 millisecond' "
    "WHERE name = $1 AND holder = $2 RETURNING 1",
    3};
static const loom_db_stmt_t stmt_release = {
    "loom_task_lease_release", "DELETE FROM loom_leases WHERE name = $1 AND holder = $2", 2};

/* 1 renewed, 0 the lease is another's, negative: the database failed. */
static int lease_renew(task_slot_t *s, bool release, loom_error_t *err)
{
    loom_tasks_t *t = s->t;
    loom_db_t *db = NULL;
    int rc = loom_db_acquire(t->opts.pool, &db, err);
    if (rc != 0)
        return rc;
    char ttl[32];
    snprintf(ttl, sizeof(ttl), "%lld", (long long)t->opts.lease_ms);
    const char *p[] = {s->lease, t->holder, ttl};
    PGresult *res = NULL;
    rc = loom_db_exec(db, release ? &stmt_release : &stmt_renew, p, release ? NULL : &res, err);
    loom_db_release(db);
    if (rc != 0)
        return rc;
    int held = release ? 0 : PQntuples(res) > 0;
    PQclear(res);
    return held;
}

static bool tasks_stopping(void *arg)
{
    return atomic_load(&((loom_tasks_t *)arg)->stop);
}

/* Runs the task until its context says stop, again after a pause when it
 * returns early. */
static void run_until_stopped(task_slot_t *s)
{
    loom_tasks_t *t = s->t;
    while (!loom_task_stopping(&s->ctx)) {
        atomic_fetch_add(&s->runs, 1);
        atomic_store(&s->running, 1);
        LOOM_INFO("headless task started", "task=%s", s->def->name);
        loom_error_t err;
        loom_error_clear(&err);
        int rc = s->def->run(&s->ctx, &err);
        atomic_store(&s->running, 0);
        if (loom_task_stopping(&s->ctx)) {
            LOOM_INFO("headless task stopped", "task=%s", s->def->name);
            break;
        }
        if (rc != 0)
            LOOM_WARN("headless task failed; starting it again",
                      "task=%s error=\"%s\" after_ms=%lld", s->def->name, err.message,
                      (long long)t->opts.restart_ms);
        else
            LOOM_WARN("headless task returned; starting it again", "task=%s after_ms=%lld",
                      s->def->name, (long long)t->opts.restart_ms);
        wait_ms(t, t->opts.restart_ms, ctx_stopping, &s->ctx);
    }
}

static void *runner_main(void *arg)
{
    run_until_stopped(arg);
    return NULL;
}

/* A singleton: take the lease, run the task in a thread of its own while
 * renewing it, stop the task when the lease is lost or the worker stops. */
static void run_singleton(task_slot_t *s)
{
    loom_tasks_t *t = s->t;
    int64_t tick = t->opts.lease_ms / 3;
    while (!atomic_load(&t->stop)) {
        loom_error_t err;
        int got = loom_lease_try(t->opts.pool, s->lease, t->holder, t->opts.lease_ms, &err);
        if (got < 0)
            LOOM_WARN("could not take a headless task's lease", "task=%s error=\"%s\"",
                      s->def->name, err.message);
        if (got != 1) {
            wait_ms(t, tick < 1000 ? tick : 1000, tasks_stopping, t);
            continue;
        }
        LOOM_INFO("took the lease of a headless task", "task=%s holder=%s", s->def->name,
                  t->holder);
        atomic_store(&s->ctx.stop, 0);
        pthread_t runner;
        if (pthread_create(&runner, NULL, runner_main, s) != 0) {
            LOOM_ERROR("could not start a headless task's thread", "task=%s", s->def->name);
            lease_renew(s, true, &err);
            wait_ms(t, t->opts.restart_ms, tasks_stopping, t);
            continue;
        }
        int64_t renewed = loom_mono_ms();
        for (;;) {
            wait_ms(t, tick, tasks_stopping, t);
            if (atomic_load(&t->stop))
                break;
            int held = lease_renew(s, false, &err);
            if (held == 1) {
                renewed = loom_mono_ms();
                continue;
            }
            if (held == 0) {
                LOOM_WARN("lost the lease of a headless task; stopping it", "task=%s",
                          s->def->name);
                break;
            }
            LOOM_WARN("could not renew a headless task's lease", "task=%s error=\"%s\"",
                      s->def->name, err.message);
            if (loom_mono_ms() - renewed >= t->opts.lease_ms) {
                LOOM_WARN("a headless task's lease ran out; stopping it", "task=%s", s->def->name);
                break;
            }
        }
        atomic_store(&s->ctx.stop, 1);
        pthread_mutex_lock(&t->mu);
        pthread_cond_broadcast(&t->cv);
        pthread_mutex_unlock(&t->mu);
        pthread_join(runner, NULL);
        /* Give it up at once, so another node need not wait for it to expire. */
        if (lease_renew(s, true, &err) < 0)
            LOOM_WARN("could not give up a headless task's lease", "task=%s error=\"%s\"",
                      s->def->name, err.message);
    }
}

static void *slot_main(void *arg)
{
    task_slot_t *s = arg;
    if (s->def->singleton)
        run_singleton(s);
    else
        run_until_stopped(s);
    return NULL;
}

int loom_tasks_start(const loom_tasks_opts_t *opts, loom_tasks_t **out, loom_error_t *err)
{
    *out = NULL;
    loom_tasks_t *t = loom_xcalloc(1, sizeof(*t));
    t->opts = *opts;
    if (t->opts.lease_ms <= 0)
        t->opts.lease_ms = 15000;
    if (t->opts.restart_ms <= 0)
        t->opts.restart_ms = 1000;
    snprintf(t->holder, sizeof(t->holder), "%s",
             opts->holder ? opts->holder
             : opts->cfg  ? opts->cfg->node_id
                          : "node");
    pthread_mutex_init(&t->mu, NULL);
    pthread_cond_init(&t->cv, NULL);
    t->n = opts->n_tasks;
    t->slots = loom_xcalloc(t->n ? t->n : 1, sizeof(*t->slots));
    for (size_t i = 0; i < t->n; i++) {
        task_slot_t *s = &t->slots[i];
        s->t = t;
        s->def = &opts->tasks[i];
        s->ctx = (loom_task_ctx_t){.name = s->def->name,
                                   .t = t,
                                   .pool = opts->pool,
                                   .producer = opts->producer,
                                   .cfg = opts->cfg};
        snprintf(s->lease, sizeof(s->lease), "task:%s", s->def->name);
        if (!s->def->name || !s->def->run) {
            loom_tasks_stop(t);
            return loom_error_set(err, LOOM_CODE_CONFIG_INVALID,
                                  "headless task %zu has no name or no run function", i);
        }
    }
    for (size_t i = 0; i < t->n; i++) {
        if (pthread_create(&t->slots[i].thread, NULL, slot_main, &t->slots[i]) != 0) {
            loom_tasks_stop(t);
            return loom_error_set(err, LOOM_CODE_INTERNAL, "could not start headless task %s",
                                  opts->tasks[i].name);
        }
        t->slots[i].started = true;
    }
    *out = t;
    return 0;
}

void loom_tasks_stop(loom_tasks_t *t)
{
    if (!t)
        return;
    pthread_mutex_lock(&t->mu);
    atomic_store(&t->stop, 1);
    pthread_cond_broadcast(&t->cv);
    pthread_mutex_unlock(&t->mu);
    for (size_t i = 0; i < t->n; i++)
        if (t->slots[i].started)
            pthread_join(t->slots[i].thread, NULL);
    pthread_cond_destroy(&t->cv);
    pthread_mutex_destroy(&t->mu);
    free(t->slots);
    free(t);
}

static task_slot_t *slot_of(loom_tasks_t *t, const char *name)
{
    for (size_t i = 0; t && i < t->n; i++)
        if (strcmp(t->slots[i].def->name, name) == 0)
            return &t->slots[i];
    return NULL;
}

int64_t loom_tasks_runs(loom_tasks_t *t, const char *name)
{
    task_slot_t *s = slot_of(t, name);
    return s ? atomic_load(&s->runs) : 0;
}

bool loom_tasks_running(loom_tasks_t *t, const char *name)
{
    task_slot_t *s = slot_of(t, name);
    return s && atomic_load(&s->running);
}

/* ---- oneshot jobs ------------------------------------------------------------- */

static const loom_db_stmt_t stmt_claim = {
    "loom_oneshot_claim",
    "INSERT INTO loom_oneshot_runs (name, status, node, version) VALUES ($1, 'running', $2, $3) "
    "ON CONFLICT (name) DO UPDATE SET status = 'running', node = EXCLUDED.node, "
    "version = EXCLUDED.version, attempts = loom_oneshot_runs.attempts + 1, started_at = now(), "
    "finished_at = NULL, error = NULL "
    "WHERE loom_oneshot_runs.status = 'failed' OR $4::bool RETURNING attempts",
    4};
static const loom_db_stmt_t stmt_state = {
    "loom_oneshot_state",
    "SELECT status, coalesce(finished_at, started_at)::text, node FROM loom_oneshot_runs "
    "WHERE name = $1",
    1};
static const loom_db_stmt_t stmt_finish = {
    "loom_oneshot_finish",
    "UPDATE loom_oneshot_runs SET status = $2, finished_at = now(), error = $3 WHERE name = $1", 3};

static int exec1(loom_db_pool_t *pool, const loom_db_stmt_t *stmt, const char *const *p,
                 PGresult **res, loom_error_t *err)
{
    loom_db_t *db = NULL;
    int rc = loom_db_acquire(pool, &db, err);
    if (rc != 0)
        return rc;
    rc = loom_db_exec(db, stmt, p, res, err);
    loom_db_release(db);
    return rc;
}

int loom_oneshot_run(const loom_oneshot_def_t *def, const loom_oneshot_opts_t *opts,
                     loom_oneshot_result_t *result, char *when, loom_error_t *err)
{
    const char *node = opts->cfg ? opts->cfg->node_id : "node";
    const char *claim[] = {def->name, node, opts->version ? opts->version : "",
                           opts->again ? "true" : "false"};
    PGresult *res = NULL;
    int rc = exec1(opts->pool, &stmt_claim, claim, &res, err);
    if (rc != 0)
        return rc;
    bool claimed = PQntuples(res) == 1;
    PQclear(res);
    if (!claimed) {
        const char *p[] = {def->name};
        rc = exec1(opts->pool, &stmt_state, p, &res, err);
        if (rc != 0)
            return rc;
        bool done = PQntuples(res) == 1 && strcmp(PQgetvalue(res, 0, 0), "done") == 0;
        if (when)
            snprintf(when, 40, "%s", PQntuples(res) == 1 ? PQgetvalue(res, 0, 1) : "");
        PQclear(res);
        *result = done ? LOOM_ONESHOT_DONE : LOOM_ONESHOT_RUNNING;
        return 0;
    }
    LOOM_INFO("running oneshot job", "job=%s", def->name);
    loom_task_ctx_t ctx = {.name = def->name,
                           .ext_stop = opts->stop,
                           .pool = opts->pool,
                           .producer = opts->producer,
                           .cfg = opts->cfg};
    loom_error_t jerr;
    loom_error_clear(&jerr);
    int jrc = def->run(&ctx, &jerr);
    if (jrc != 0 && !jerr.code)
        loom_error_set(&jerr, LOOM_CODE_INTERNAL, "the job returned %d without an error", jrc);
    const char *fin[] = {def->name, jrc == 0 ? "done" : "failed", jrc == 0 ? NULL : jerr.message};
    rc = exec1(opts->pool, &stmt_finish, fin, NULL, err);
    if (rc != 0)
        return rc;
    *result = jrc == 0 ? LOOM_ONESHOT_RAN : LOOM_ONESHOT_FAILED;
    if (jrc != 0 && err)
        *err = jerr;
    LOOM_INFO("oneshot job finished", "job=%s status=%s", def->name, fin[1]);
    return 0;
}
