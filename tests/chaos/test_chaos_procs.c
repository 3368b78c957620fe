/*
 * test_chaos_procs.c: the process-level half of the fault-injection suite
 * (issue #8). Real processes are killed or stopped while commands flow:
 *
 *   kill9_workers      worker processes killed with SIGKILL, one after
 *                      another, on the real Kafka broker of the harness
 *   postgres_restart   a private PostgreSQL stopped and started again on the
 *                      same port under load
 *   kafka_restart      a private Apache Kafka broker (scripts/kafka-broker)
 *                      killed, then started again on its data and port
 *   gateway_kill       `loom api` killed with SIGKILL while clients write
 *                      with Idempotency-Key and retry
 *   kafka_cluster_*    a 3-node KRaft cluster (scripts/kafka-cluster), topic
 *                      with replication factor 3 and min.insync.replicas 2
 *                      made by `loom migrate up`: the leader of partition 0
 *                      killed with SIGKILL (CTest runs this one, once), the
 *                      active controller killed, every node restarted in turn
 *                      (the long run only)
 *
 * Afterwards every command acknowledged to its sender must be applied exactly
 * once (counts per id and a checksum of the amounts) and the system must
 * have recovered by itself. Each test prints one line
 *
 *   chaos: scenario=NAME commands=N acked=N applied=N lost=N duplicated=N
 *          faults=N recovery_ms=MS extra=k=v,k=v
 *
 * (on one line) to stdout, to the criterion log and, when LOOM_CHAOS_RESULTS
 * names a file, appended to it; tests/chaos/run collects those lines.
 * LOOM_CHAOS_SCALE=long runs the long version (tests/chaos/run --long); the
 * default is the short one CTest runs. LOOM_CHAOS_COMMANDS sets the number of
 * commands of kill9_workers. No timing is asserted, only generous
 * bounds so that nothing hangs.
 */
#include "http_client.h"
#include "support.h"
#include "loom/bus.h"
#include "loom/clock.h"
#include "loom/mem.h"
#include "loom/pglocal.h"
#include "loom/sha256.h"

#include <criterion/criterion.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* ---- scale, results, scratch directories ---------------------------------------- */

static bool is_long(void)
{
    const char *s = getenv("LOOM_CHAOS_SCALE");
    return s && strcmp(s, "long") == 0;
}

typedef struct result {
    const char *scenario;
    long long commands, acked, applied, lost, duplicated;
    int faults;
    long long recovery_ms;
    char extra[768]; /* ",k=v,k=v" */
} result_t;

static void extra_add(result_t *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void extra_add(result_t *r, const char *fmt, ...)
{
    size_t len = strlen(r->extra);
    if (len + 2 >= sizeof(r->extra))
        return;
    r->extra[len++] = ',';
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->extra + len, sizeof(r->extra) - len, fmt, ap);
    va_end(ap);
}

/* Prints the result line (stdout, criterion's log, $LOOM_CHAOS_RESULTS). */
static void report(const result_t *r)
{
    char line[1200];
    snprintf(line, sizeof(line),
             "chaos: scenario=%s commands=%lld acked=%lld applied=%lld lost=%lld duplicated=%lld "
             "faults=%d recovery_ms=%lld extra=scale=%s%s",
             r->scenario, r->commands, r->acked, r->applied, r->lost, r->duplicated, r->faults,
             r->recovery_ms, is_long() ? "long" : "short", r->extra);
    printf("%s\n", line);
    fflush(stdout);
    cr_log_info("%s", line);
    const char *path = getenv("LOOM_CHAOS_RESULTS");
    if (path && *path) {
        int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            size_t n = strlen(line);
            line[n] = '\n';
            if (write(fd, line, n + 1) != (ssize_t)(n + 1))
                cr_log_warn("could not append to %s", path);
            close(fd);
        }
    }
}

/* A scratch directory for logs and servers; removed when the test passes. */
static void scratch_dir(const char *what, char *out, size_t size)
{
    snprintf(out, size, "/tmp/loom-chaos-%s-XXXXXX", what);
    cr_assert_not_null(mkdtemp(out));
    chmod(out, 0755);
}

static void scratch_remove(const char *dir)
{
    char cmd[600];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    if (strncmp(dir, "/tmp/loom-chaos-", 16) == 0 && system(cmd) != 0)
        cr_log_warn("could not remove %s", dir);
}

/* The last n bytes of a file, for failure messages (new string). */
static char *file_tail(const char *path, size_t n)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return loom_xstrdup("(no log)");
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, size > (long)n ? size - (long)n : 0, SEEK_SET);
    char *buf = loom_xcalloc(1, n + 1);
    size_t got = fread(buf, 1, n, f);
    buf[got] = '\0';
    fclose(f);
    return buf;
}

static bool file_contains(const char *path, const char *needle)
{
    char *t = file_tail(path, 1 << 20);
    bool found = strstr(t, needle) != NULL;
    free(t);
    return found;
}

/* A number from SQL, or -1 when the server does not answer (during an outage). */
static long long try_ll(const char *url, const char *sql)
{
    PGconn *c = PQconnectdb(url);
    long long v = -1;
    if (PQstatus(c) == CONNECTION_OK) {
        PGresult *r = PQexec(c, sql);
        if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) > 0)
            v = atoll(PQgetvalue(r, 0, 0));
        PQclear(r);
    }
    PQfinish(c);
    return v;
}

static long long rss_kb(pid_t pid)
{
    char path[64], line[256];
    snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    long long kb = -1;
    while (f && fgets(line, sizeof(line), f))
        if (strncmp(line, "VmRSS:", 6) == 0)
            kb = atoll(line + 6);
    if (f)
        fclose(f);
    return kb;
}

/* ---- processes -------------------------------------------------------------------- */

/* What a failed test leaves running is stopped by its .fini: the processes it
 * started, a private broker and a private Postgres. */
static pid_t live_pids[64];
static char live_broker_dir[300];
static loom_pglocal_t *live_pg;

static void track(pid_t pid, bool on)
{
    for (size_t i = 0; i < sizeof(live_pids) / sizeof(live_pids[0]); i++) {
        if (on ? live_pids[i] == 0 : live_pids[i] == pid) {
            live_pids[i] = on ? pid : 0;
            return;
        }
    }
}

static void cleanup(void)
{
    for (size_t i = 0; i < sizeof(live_pids) / sizeof(live_pids[0]); i++) {
        if (live_pids[i] > 0) {
            kill(live_pids[i], SIGKILL);
            waitpid(live_pids[i], NULL, 0);
            live_pids[i] = 0;
        }
    }
    if (live_broker_dir[0]) {
        char cmd[700];
        snprintf(cmd, sizeof(cmd), "'%s/scripts/kafka-broker' stop '%s' >/dev/null 2>&1",
                 LOOM_CHAOS_SOURCE_DIR, live_broker_dir);
        if (system(cmd) != 0)
            fprintf(stderr, "could not stop the broker in %s\n", live_broker_dir);
        live_broker_dir[0] = '\0';
    }
    if (live_pg) {
        loom_pglocal_stop(live_pg);
        live_pg = NULL;
    }
}

typedef struct proc {
    pid_t pid;
    char log[300];
} proc_t;

/* `loom_test_app worker` (consumer test.ledger.<suffix>) logging to
 * dir/worker-<n>.log, serving /readyz and /metrics on 127.0.0.1:port (0: a
 * free port: several workers run on one machine). */
static void worker_start_on(proc_t *w, const char *dir, int n, const char *url, const char *brokers,
                            const char *suffix, int port)
{
    char e1[600], e2[300], e3[128], e4[64];
    snprintf(e1, sizeof(e1), "LOOM_DATABASE_URL=%s", url);
    snprintf(e2, sizeof(e2), "LOOM_KAFKA_BROKERS=%s", brokers);
    snprintf(e3, sizeof(e3), "LOOM_TEST_LEDGER_SUFFIX=%s", suffix);
    snprintf(e4, sizeof(e4), "LOOM_WORKER_LISTEN=127.0.0.1:%d", port);
    const char *env[] = {e1, e2, e3, "LOOM_DATABASE_POOL_SIZE=4", e4, NULL};
    const char *argv[] = {loom_test_app_bin(), "worker", NULL};
    snprintf(w->log, sizeof(w->log), "%s/worker-%d.log", dir, n);
    w->pid = loom_test_spawn_logged(argv, env, w->log);
    track(w->pid, true);
}

static void worker_start(proc_t *w, const char *dir, int n, const char *url, const char *brokers,
                         const char *suffix)
{
    worker_start_on(w, dir, n, url, brokers, suffix, 0);
}

/* SIGKILL and reap; a process that had already died on its own (a crash, a
 * sanitizer report) fails the test. */
static void proc_kill9(proc_t *p)
{
    int st = 0;
    pid_t pid = p->pid;
    if (waitpid(pid, &st, WNOHANG) == pid) {
        track(pid, false);
        p->pid = 0;
        char *t = file_tail(p->log, 4000);
        cr_assert_fail("process %d died before it was killed (wait status %d, log %s):\n%s",
                       (int)pid, st, p->log, t);
    }
    kill(p->pid, SIGKILL);
    loom_test_wait(p->pid, 30000);
    track(p->pid, false);
    p->pid = 0;
}

/* SIGTERM and wait; asserts a clean exit (under ASan that includes LeakSanitizer). */
static void proc_stop(proc_t *p, const char *what)
{
    if (p->pid <= 0)
        return;
    kill(p->pid, SIGTERM);
    int st = loom_test_wait(p->pid, 90000);
    track(p->pid, false);
    p->pid = 0;
    if (st != 0) {
        char *t = file_tail(p->log, 4000);
        cr_assert_fail("%s exited %d on SIGTERM (log %s):\n%s", what, st, p->log, t);
    }
}

/* ---- a stream of credit commands with delivery acknowledgements ------------------ */

enum { MAX_PARTS = 64 };

typedef struct stream stream_t;
typedef struct ref {
    stream_t *s;
    int i;
} ref_t;

struct stream {
    loom_producer_t *p;
    char topic[200];
    const char *prefix; /* command ids are "<prefix>-<i>" */
    int n, rate;        /* commands, per second */
    int keys;           /* accounts (Kafka keys) the commands spread over */
    pthread_t thread;
    ref_t *refs;
    _Atomic unsigned char *state; /* 0 not sent, 1 queued, 2 acked, 3 failed */
    atomic_int sent, acked, failed, resent;
    atomic_bool done, stop;
    pthread_mutex_t mu;
    int64_t acked_max[MAX_PARTS]; /* highest acknowledged offset per partition */
};

static long amount_of(int i)
{
    return i % 997 + 1;
}

static void on_delivery(void *opaque, const loom_error_t *err, int32_t partition, int64_t offset)
{
    ref_t *r = opaque;
    stream_t *s = r->s;
    if (err) {
        atomic_store(&s->state[r->i], 3);
        atomic_fetch_add(&s->failed, 1);
        return;
    }
    pthread_mutex_lock(&s->mu);
    if (partition >= 0 && partition < MAX_PARTS && offset > s->acked_max[partition])
        s->acked_max[partition] = offset;
    pthread_mutex_unlock(&s->mu);
    atomic_store(&s->state[r->i], 2);
    atomic_fetch_add(&s->acked, 1);
}

/* Sends command i (state queued), trying again while the local queue is
 * full or the producer refuses it, until it is taken or the stream stops. */
static void send_one(stream_t *s, int i, bool ignore_stop)
{
    loom_arena_t a;
    loom_arena_init(&a, 0);
    loom_ce_t ce;
    loom_ce_init(&ce, &a, "chaos", "producer", "test.credit");
    char id[64], acct[32];
    snprintf(id, sizeof(id), "%s-%d", s->prefix, i);
    snprintf(acct, sizeof(acct), "acct-%d", i % s->keys);
    ce.id = id;
    char *data = loom_arena_sprintf(&a, "{\"account\":\"%s\",\"amount\":%ld}", acct, amount_of(i));
    ce.data = data;
    ce.data_len = strlen(data);
    loom_error_t err;
    atomic_store(&s->state[i], 1);
    /* A full local queue (the broker is away) or a refusal: try again. */
    while (loom_producer_send(s->p, s->topic, acct, strlen(acct), &ce, on_delivery, &s->refs[i],
                              &err) != 0 &&
           (ignore_stop || !atomic_load(&s->stop)))
        loom_sleep_ms(20);
    loom_arena_release(&a);
}

/* How long the stream keeps sending again what failed, after its last
 * command: what a client does with a write that was not acknowledged. */
#define RESEND_FOR_MS 120000

static void *stream_main(void *arg)
{
    stream_t *s = arg;
    int64_t t0 = loom_mono_ms();
    int sent = 0;
    for (int i = 0; i < s->n && !atomic_load(&s->stop); i++) {
        int64_t due = t0 + (int64_t)i * 1000 / s->rate;
        int64_t now = loom_mono_ms();
        if (due > now)
            loom_sleep_ms(due - now);
        send_one(s, i, false);
        atomic_fetch_add(&s->sent, 1);
        sent = i + 1;
    }
    /* Commands whose delivery failed (the broker away, or an acknowledgement
     * the producer does not trust) are sent again, with the same id, until
     * each is acknowledged; the consumers' dedup absorbs a copy that had
     * landed. */
    int64_t until = loom_mono_ms() + RESEND_FOR_MS;
    for (bool open = true; open && loom_mono_ms() < until;) {
        open = false;
        for (int i = 0; i < sent; i++) {
            int st = atomic_load(&s->state[i]);
            if (st == 3) {
                atomic_fetch_add(&s->resent, 1);
                send_one(s, i, true);
            }
            open = open || st != 2;
        }
        if (open)
            loom_sleep_ms(50);
    }
    atomic_store(&s->done, true);
    return NULL;
}

static void stream_start(stream_t *s, const char *brokers, const char *topic, const char *prefix,
                         int n, int rate)
{
    memset(s, 0, sizeof(*s));
    loom_producer_opts_t o = {.brokers = brokers, .flush_timeout_ms = 60000};
    loom_error_t err;
    cr_assert_eq(loom_producer_new(&o, &s->p, &err), 0, "%s", err.message);
    snprintf(s->topic, sizeof(s->topic), "%s", topic);
    s->prefix = prefix;
    s->n = n;
    s->rate = rate;
    s->keys = 97;
    s->refs = loom_xcalloc((size_t)n, sizeof(ref_t));
    s->state = loom_xcalloc((size_t)n, 1);
    for (int i = 0; i < n; i++)
        s->refs[i] = (ref_t){s, i};
    for (int p = 0; p < MAX_PARTS; p++)
        s->acked_max[p] = -1;
    pthread_mutex_init(&s->mu, NULL);
    cr_assert_eq(pthread_create(&s->thread, NULL, stream_main, s), 0);
}

/* Waits for the sender and every delivery report (bounded). */
static void stream_finish(stream_t *s, int timeout_ms)
{
    pthread_join(s->thread, NULL);
    loom_producer_flush(s->p, timeout_ms);
}

static void stream_free(stream_t *s)
{
    loom_producer_free(s->p);
    pthread_mutex_destroy(&s->mu);
    free(s->refs);
    free((void *)s->state);
}

/* Compares test_ledger with what the stream had acknowledged. */
typedef struct tally {
    long long acked, applied, lost, duplicated, unacked_applied;
    long long sum_db, sum_want, commands_applied, events;
    int bad_ids;
} tally_t;

static void tally(const char *url, stream_t *s, tally_t *t)
{
    memset(t, 0, sizeof(*t));
    unsigned char *seen = loom_xcalloc((size_t)s->n, 1);
    PGconn *c = PQconnectdb(url);
    cr_assert_eq(PQstatus(c), CONNECTION_OK, "%s", PQerrorMessage(c));
    PGresult *r = PQexec(c, "SELECT message_id, count(*), sum(amount) FROM test_ledger GROUP BY 1");
    cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "%s", PQerrorMessage(c));
    size_t pl = strlen(s->prefix);
    for (int row = 0; row < PQntuples(r); row++) {
        const char *id = PQgetvalue(r, row, 0);
        long long count = atoll(PQgetvalue(r, row, 1));
        long long sum = atoll(PQgetvalue(r, row, 2));
        int i = -1;
        if (strncmp(id, s->prefix, pl) == 0 && id[pl] == '-')
            i = atoi(id + pl + 1);
        if (i < 0 || i >= s->n || sum != count * amount_of(i)) {
            t->bad_ids++;
            continue;
        }
        seen[i] = 1;
        t->applied++;
        t->duplicated += count - 1;
        t->sum_db += sum;
    }
    PQclear(r);
    PQfinish(c);
    for (int i = 0; i < s->n; i++) {
        bool acked = atomic_load(&s->state[i]) == 2;
        t->acked += acked;
        if (acked && !seen[i])
            t->lost++;
        if (!acked && seen[i])
            t->unacked_applied++;
        if (seen[i])
            t->sum_want += amount_of(i);
    }
    free(seen);
    t->commands_applied =
        loom_test_sql_ll(url, "SELECT count(*) FROM loom_commands WHERE status = 'applied'");
    t->events = loom_test_sql_ll(url, "SELECT count(*) FROM loom_events");
}

/* Waits until every acknowledged command is applied (or timeout), then
 * lets a late double apply show before the final count. Returns the
 * monotonic time at which nothing acknowledged was missing (0: never). */
static int64_t tally_when_settled(const char *url, stream_t *s, tally_t *t, int timeout_ms)
{
    int64_t end = loom_mono_ms() + timeout_ms;
    long long acked = atomic_load(&s->acked);
    while (loom_test_sql_ll(url, "SELECT count(*) FROM test_ledger") < acked &&
           loom_mono_ms() < end)
        loom_sleep_ms(250);
    tally(url, s, t);
    while (t->lost > 0 && loom_mono_ms() < end) {
        loom_sleep_ms(500);
        tally(url, s, t);
    }
    int64_t all_at = t->lost == 0 ? loom_mono_ms() : 0;
    loom_sleep_ms(1500);
    tally(url, s, t);
    return all_at;
}

static void result_from_tally(result_t *r, stream_t *s, const tally_t *t)
{
    r->commands = atomic_load(&s->sent);
    r->acked = t->acked;
    r->applied = t->applied;
    r->lost = t->lost;
    r->duplicated = t->duplicated;
    extra_add(r, "unacked_applied=%lld", t->unacked_applied);
    extra_add(r, "checksum=%lld", t->sum_db);
}

static void assert_exactly_once(const result_t *r, const tally_t *t, const char *dir)
{
    cr_assert_eq(t->bad_ids, 0, "%d rows with a foreign id or a wrong amount (logs: %s)",
                 t->bad_ids, dir);
    cr_assert_eq(r->lost, 0, "%lld acknowledged commands were never applied (logs: %s)", r->lost,
                 dir);
    cr_assert_eq(r->duplicated, 0, "%lld commands were applied twice (logs: %s)", r->duplicated,
                 dir);
    cr_assert_eq(t->sum_db, t->sum_want, "checksum of amounts %lld, want %lld", t->sum_db,
                 t->sum_want);
    cr_assert_eq(t->commands_applied, t->applied, "loom_commands says %lld applied, ledger %lld",
                 t->commands_applied, t->applied);
    cr_assert_eq(t->events, t->applied, "%lld events for %lld applied commands", t->events,
                 t->applied);
}

/* A ledger database, a topic and a consumer suffix of its own. */
typedef struct ledger {
    char url[768];
    loom_test_ledger_t led;
} ledger_t;

/* Highest applied offset per partition (-1: none yet); an index keeps it cheap. */
static bool applied_max(const char *url, int parts, int64_t *out)
{
    char sql[300];
    snprintf(sql, sizeof(sql),
             "SELECT p, coalesce((SELECT max(kafka_offset) FROM test_ledger WHERE "
             "kafka_partition = p), -1) FROM generate_series(0, %d) p ORDER BY p",
             parts - 1);
    PGconn *c = PQconnectdb(url);
    bool ok = false;
    if (PQstatus(c) == CONNECTION_OK) {
        PGresult *r = PQexec(c, sql);
        if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == parts) {
            for (int p = 0; p < parts; p++)
                out[p] = atoll(PQgetvalue(r, p, 1));
            ok = true;
        }
        PQclear(r);
    }
    PQfinish(c);
    return ok;
}

/* ---- 1. kill -9 of worker processes ------------------------------------------------ */

/* Commands of one account applied out of the order they were published: each
 * account's events, by version, must come from commands "<prefix>-<i>" with
 * growing i. */
static long long order_violations(const char *url)
{
    return try_ll(url, "SELECT count(*) FROM (SELECT split_part(causation_id, '-', 2)::int AS i, "
                       "lag(split_part(causation_id, '-', 2)::int) OVER (PARTITION BY stream_id "
                       "ORDER BY version) AS prev FROM loom_events "
                       "WHERE stream_id LIKE 'account-%') e WHERE prev IS NOT NULL AND i < prev");
}

/*
 * Workers killed with kill -9 and replaced while commands stream in, spread
 * over `keys` accounts on `parts` partitions: with few partitions and many
 * keys, every partition's keys are applied side by side (kill9_key_parallel).
 */
static void kill9(const char *scenario, const char *prefix, int parts, int keys)
{
    bool lg = is_long();
    /* LOOM_CHAOS_COMMANDS: fewer for a long run under ASan (tests/chaos/run --asan). */
    const char *nenv = getenv("LOOM_CHAOS_COMMANDS");
    const int n = nenv && atoi(nenv) >= 1000 ? atoi(nenv) : lg ? 200000 : 20000;
    const int rate = 500;
    const int kill_every_ms = lg ? 12000 : 9000;
    const char *brokers = loom_test_kafka_brokers();
    char dir[128];
    scratch_dir("kill9", dir, sizeof(dir));
    ledger_t l;
    loom_test_ledger_init(&l.led, "c");
    loom_test_db_create_ledger(l.url, sizeof(l.url));
    loom_test_sql(l.url, "CREATE INDEX ON test_ledger (kafka_partition, kafka_offset)");
    loom_test_kafka_topic(brokers, l.led.topic, parts);

    /* Worker 0 is never killed: its RSS over the run shows whether memory
     * stays flat. Workers 1 and 2 are the ones killed and replaced. */
    enum { W = 3 };
    proc_t w[W];
    int started = 0;
    for (int k = 0; k < W; k++)
        worker_start(&w[k], dir, started++, l.url, brokers, l.led.suffix);
    int64_t end = loom_mono_ms() + 120000;
    while (!file_contains(w[0].log, "partitions assigned") && loom_mono_ms() < end)
        loom_sleep_ms(100);
    cr_assert(file_contains(w[0].log, "partitions assigned"), "worker 0 got no partitions: %s",
              w[0].log);

    stream_t s;
    stream_start(&s, brokers, l.led.topic, prefix, n, rate);
    s.keys = keys;
    int kills = 0;
    long long max_recovery = 0, sum_recovery = 0;
    long long rss_first = -1, rss_last = -1, rss_max = -1;
    int64_t next_kill = loom_mono_ms() + kill_every_ms / 2;
    int64_t next_rss = loom_mono_ms();
    int64_t last_kill_at = 0;
    int64_t at_kill[MAX_PARTS];
    bool pending = false; /* a kill whose recovery is not measured yet */
    unsigned seed = (unsigned)getpid();
    end = loom_mono_ms() + (int64_t)n / rate * 1000 + 600000;
    while ((!atomic_load(&s.done) || pending) && loom_mono_ms() < end) {
        loom_sleep_ms(200);
        int64_t now = loom_mono_ms();
        if (pending) {
            /* Recovered when every partition has applied something since the
             * kill or has nothing acknowledged left to apply. */
            int64_t cur[MAX_PARTS], want[MAX_PARTS];
            pthread_mutex_lock(&s.mu);
            memcpy(want, s.acked_max, sizeof(want));
            pthread_mutex_unlock(&s.mu);
            if (applied_max(l.url, parts, cur)) {
                bool all = true;
                for (int p = 0; p < parts && all; p++)
                    all = cur[p] > at_kill[p] || cur[p] >= want[p];
                if (all) {
                    long long ms = now - last_kill_at;
                    pending = false;
                    sum_recovery += ms;
                    if (ms > max_recovery)
                        max_recovery = ms;
                    cr_log_info("kill %d: every partition moving again after %lld ms", kills, ms);
                }
            }
            if (pending && now - last_kill_at > 180000)
                cr_assert_fail("kill %d: partitions did not move again within 180 s (logs: %s)",
                               kills, dir);
        }
        if (now >= next_rss) {
            long long kb = rss_kb(w[0].pid);
            /* The first sample once the worker is warm: 10 % of the stream in. */
            if (kb > 0 && atomic_load(&s.acked) >= n / 10) {
                if (rss_first < 0)
                    rss_first = kb;
                rss_last = kb;
                if (kb > rss_max)
                    rss_max = kb;
            }
            next_rss = now + (lg ? 10000 : 2000);
        }
        if (!pending && !atomic_load(&s.done) && now >= next_kill) {
            int victim = 1 + (int)(rand_r(&seed) % (W - 1));
            applied_max(l.url, parts, at_kill);
            proc_kill9(&w[victim]);
            last_kill_at = loom_mono_ms();
            kills++;
            pending = true;
            /* A supervisor would start a replacement at once. */
            worker_start(&w[victim], dir, started++, l.url, brokers, l.led.suffix);
            next_kill = last_kill_at + kill_every_ms + (int64_t)(rand_r(&seed) % 4000);
        }
    }
    cr_assert(atomic_load(&s.done), "the stream did not finish in time (logs: %s)", dir);
    stream_finish(&s, 120000);
    int64_t drain_from = loom_mono_ms();
    tally_t t;
    int64_t all_at = tally_when_settled(l.url, &s, &t, 300000);
    long long drain_ms = all_at ? all_at - drain_from : -1;
    long long last_kill_to_all = all_at && last_kill_at ? all_at - last_kill_at : -1;
    long long kb = rss_kb(w[0].pid);
    if (kb > 0) {
        rss_last = kb;
        if (kb > rss_max)
            rss_max = kb;
    }

    long long out_of_order = order_violations(l.url);
    result_t r = {.scenario = scenario, .faults = kills, .recovery_ms = max_recovery};
    result_from_tally(&r, &s, &t);
    extra_add(&r, "workers=%d", W);
    extra_add(&r, "partitions=%d", parts);
    extra_add(&r, "keys=%d", keys);
    extra_add(&r, "out_of_key_order=%lld", out_of_order);
    extra_add(&r, "mean_recovery_ms=%lld", kills ? sum_recovery / kills : 0);
    extra_add(&r, "last_kill_to_all_applied_ms=%lld", last_kill_to_all);
    extra_add(&r, "drain_after_stream_ms=%lld", drain_ms);
    extra_add(&r, "worker_rss_kb_first=%lld", rss_first);
    extra_add(&r, "worker_rss_kb_last=%lld", rss_last);
    extra_add(&r, "worker_rss_kb_max=%lld", rss_max);
    report(&r);

    assert_exactly_once(&r, &t, dir);
    cr_assert_gt(kills, 0, "no worker was killed");
    cr_assert_eq(t.acked, n, "only %lld of %d commands were acknowledged", t.acked, n);
    cr_assert_eq(out_of_order, 0, "%lld commands were applied before an earlier one of their key",
                 out_of_order);
    for (int k = 0; k < W; k++)
        proc_stop(&w[k], "worker");
    stream_free(&s);
    scratch_remove(dir);
}

Test(chaos, kill9_workers, .timeout = 7200, .fini = cleanup)
{
    kill9("kill9_workers", "k9", 12, 97);
}

Test(chaos, kill9_key_parallel, .timeout = 7200, .fini = cleanup)
{
    kill9("kill9_key_parallel", "kp", 2, 2000);
}

/* ---- 2. PostgreSQL stopped and started again ----------------------------------------- */

/* Waits until the applied count passes `from` (the count when the fault
 * ended); returns the milliseconds since `since`, or -1 after timeout_ms. */
static long long wait_moving(const char *url, long long from, int64_t since, int timeout_ms)
{
    int64_t end = loom_mono_ms() + timeout_ms;
    while (loom_mono_ms() < end) {
        long long v = try_ll(url, "SELECT count(*) FROM test_ledger");
        if (v > from)
            return loom_mono_ms() - since;
        loom_sleep_ms(100);
    }
    return -1;
}

/* Waits until t (monotonic ms), for the next fault. */
static void sleep_until(int64_t t)
{
    int64_t now = loom_mono_ms();
    if (t > now)
        loom_sleep_ms(t - now);
}

/* Waits until `want` commands are applied; returns the milliseconds since
 * `since`, or -1 after timeout_ms. */
static long long wait_caught_up(const char *url, long long want, int64_t since, int timeout_ms)
{
    int64_t end = loom_mono_ms() + timeout_ms;
    while (loom_mono_ms() < end) {
        if (try_ll(url, "SELECT count(*) FROM test_ledger") >= want)
            return loom_mono_ms() - since;
        loom_sleep_ms(100);
    }
    return -1;
}

/* The applied count, retried while the server is not reachable. */
static long long count_applied(const char *url)
{
    long long v;
    for (int i = 0; i < 100 && (v = try_ll(url, "SELECT count(*) FROM test_ledger")) < 0; i++)
        loom_sleep_ms(100);
    return v;
}

Test(chaos, postgres_restart, .timeout = 7200, .fini = cleanup)
{
    /* The stream runs until the last outage has been recovered from; n only
     * bounds it. */
    bool lg = is_long();
    const int n = 400000;
    const int rate = 400;
    const int outages = lg ? 4 : 1;
    const int down_ms = lg ? 10000 : 6000;
    const int gap_ms = lg ? 20000 : 8000; /* load between outages */
    const char *brokers = loom_test_kafka_brokers();
    char dir[128], pgdir[200];
    scratch_dir("pg", dir, sizeof(dir));
    snprintf(pgdir, sizeof(pgdir), "%s/pg", dir);
    loom_pglocal_t pg;
    loom_error_t err;
    loom_pglocal_opts_t po = {.fast = true};
    cr_assert_eq(loom_pglocal_start(&pg, pgdir, &po, &err), 0, "%s", err.message);
    live_pg = &pg;
    po.port = pg.port; /* a restart keeps the address the workers know */

    ledger_t l;
    loom_test_ledger_init(&l.led, "c");
    snprintf(l.url, sizeof(l.url), "%s", pg.url);
    loom_test_migrate_ledger(l.url);
    loom_test_kafka_topic(brokers, l.led.topic, 6);
    proc_t w[2];
    for (int k = 0; k < 2; k++)
        worker_start(&w[k], dir, k, l.url, brokers, l.led.suffix);

    stream_t s;
    stream_start(&s, brokers, l.led.topic, "pg", n, rate);
    long long max_recovery = 0, max_caught_up = 0, total_down = 0;
    int done_outages = 0;
    int64_t next_fault = loom_mono_ms() + gap_ms;
    for (int o = 0; o < outages; o++) {
        sleep_until(next_fault);
        cr_assert_gt(count_applied(l.url), 0, "nothing applied before the outage (logs: %s)", dir);
        cr_assert_eq(loom_pglocal_stop(&pg), 0);
        int64_t down_at = loom_mono_ms();
        loom_sleep_ms(down_ms);
        cr_assert_eq(loom_pglocal_start(&pg, pgdir, &po, &err), 0, "%s", err.message);
        int64_t up_at = loom_mono_ms();
        total_down += up_at - down_at;
        done_outages++;
        long long base = count_applied(l.url);
        int acked_then = atomic_load(&s.acked);
        long long rec = wait_moving(l.url, base, up_at, 180000);
        cr_assert_geq(rec, 0, "nothing applied within 180 s of the restart (logs: %s)", dir);
        if (rec > max_recovery)
            max_recovery = rec;
        /* Caught up: everything acknowledged before the restart applied. */
        long long caught = wait_caught_up(l.url, acked_then, up_at, 180000);
        if (caught > max_caught_up)
            max_caught_up = caught;
        cr_log_info("postgres outage %d: down %lld ms; applying again %lld ms after the restart, "
                    "caught up after %lld ms",
                    o + 1, (long long)(up_at - down_at), rec, caught);
        next_fault = loom_mono_ms() + gap_ms;
    }
    loom_sleep_ms(3000);
    atomic_store(&s.stop, true);
    stream_finish(&s, 120000);
    tally_t t;
    tally_when_settled(l.url, &s, &t, 300000);
    result_t r = {
        .scenario = "postgres_restart", .faults = done_outages, .recovery_ms = max_recovery};
    result_from_tally(&r, &s, &t);
    extra_add(&r, "down_ms_total=%lld", total_down);
    extra_add(&r, "caught_up_ms_max=%lld", max_caught_up);
    extra_add(&r, "resent=%d", atomic_load(&s.resent));
    report(&r);
    assert_exactly_once(&r, &t, dir);
    cr_assert_eq(t.acked, r.commands, "only %lld of %lld commands were acknowledged", t.acked,
                 r.commands);
    for (int k = 0; k < 2; k++)
        proc_stop(&w[k], "worker");
    stream_free(&s);
    loom_pglocal_stop(&pg);
    live_pg = NULL;
    scratch_remove(dir);
}

/* ---- 3. the Kafka broker process stopped and started again ------------------------- */

static const char *kafka_script(void)
{
    return LOOM_CHAOS_SOURCE_DIR "/scripts/kafka-broker";
}

static int read_pid(const char *path)
{
    FILE *f = fopen(path, "r");
    int pid = 0;
    if (f) {
        if (fscanf(f, "%d", &pid) != 1)
            pid = 0;
        fclose(f);
    }
    return pid;
}

/* The broker's command line, each argument single-quoted for sh (new string). */
static char *broker_cmdline(int pid)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/cmdline", pid);
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f, "no broker process %d", pid);
    char raw[16384];
    size_t n = fread(raw, 1, sizeof(raw) - 1, f);
    fclose(f);
    raw[n] = '\0';
    char *out = loom_xcalloc(1, n * 4 + 16);
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        const char *arg = raw + i;
        out[o++] = '\'';
        for (const char *c = arg; *c; c++) {
            if (*c == '\'') {
                memcpy(out + o, "'\\''", 4);
                o += 4;
            } else {
                out[o++] = *c;
            }
        }
        out[o++] = '\'';
        out[o++] = ' ';
        i += strlen(arg) + 1;
    }
    out[o] = '\0';
    return out;
}

/* Starts the broker again with the same command line: same data, same ports.
 * As scripts/kafka-broker does, under setsid and recorded in broker.pid, so
 * `kafka-broker stop` stops it. */
static void broker_restart(const char *kdir, const char *cmdline)
{
    char *sh = loom_xasprintf("setsid %s >>'%s/broker.log' 2>&1 </dev/null & echo $! >'%s/"
                              "broker.pid'",
                              cmdline, kdir, kdir);
    const char *argv[] = {"/bin/sh", "-c", sh, NULL};
    char *out = NULL, *errs = NULL;
    int rc = loom_test_run(argv, NULL, &out, &errs);
    cr_assert_eq(rc, 0, "could not restart the broker: %s", errs);
    free(out);
    free(errs);
    free(sh);
}

static bool broker_answers(const char *addr)
{
    char cmd[400];
    const char *colon = strrchr(addr, ':');
    snprintf(cmd, sizeof(cmd),
             "kcat -L -b %s -m 3 2>/dev/null | grep -q 'broker 1 at 127.0.0.1:%s'", addr,
             colon ? colon + 1 : "");
    return system(cmd) == 0;
}

Test(chaos, kafka_restart, .timeout = 7200, .fini = cleanup)
{
    /* The stream runs until the last outage has been recovered from; n only
     * bounds it. */
    bool lg = is_long();
    const int n = 400000;
    const int rate = lg ? 250 : 150;
    const int outages = lg ? 3 : 1;
    const int down_ms = lg ? 5000 : 3000;
    const int gap_ms = lg ? 20000 : 8000; /* load between outages */
    char dir[128], kdir[200];
    scratch_dir("kafka", dir, sizeof(dir));
    snprintf(kdir, sizeof(kdir), "%s/kafka", dir);
    const char *argv[] = {kafka_script(), "start", kdir, NULL};
    char *out = NULL, *errs = NULL;
    int64_t t0 = loom_mono_ms();
    int rc = loom_test_run(argv, NULL, &out, &errs);
    cr_assert_eq(rc, 0, "could not start a private Kafka broker: %s", errs);
    snprintf(live_broker_dir, sizeof(live_broker_dir), "%s", kdir);
    long long first_start_ms = loom_mono_ms() - t0;
    char addr[128];
    out[strcspn(out, "\n")] = '\0';
    snprintf(addr, sizeof(addr), "%s", out);
    free(out);
    free(errs);

    ledger_t l;
    loom_test_ledger_init(&l.led, "c");
    loom_test_db_create_ledger(l.url, sizeof(l.url));
    loom_test_kafka_topic(addr, l.led.topic, 4);
    proc_t w[2];
    for (int k = 0; k < 2; k++)
        worker_start(&w[k], dir, k, l.url, addr, l.led.suffix);
    int64_t end = loom_mono_ms() + 120000;
    while (!file_contains(w[0].log, "partitions assigned") && loom_mono_ms() < end)
        loom_sleep_ms(100);

    stream_t s;
    stream_start(&s, addr, l.led.topic, "kf", n, rate);
    long long max_recovery = 0, max_ready = 0, max_caught_up = 0, total_down = 0;
    int done_outages = 0;
    char pidfile[300];
    snprintf(pidfile, sizeof(pidfile), "%s/broker.pid", kdir);
    int64_t next_fault = loom_mono_ms() + gap_ms;
    for (int o = 0; o < outages; o++) {
        sleep_until(next_fault);
        cr_assert_gt(count_applied(l.url), 0, "nothing applied before the outage (logs: %s)", dir);
        int pid = read_pid(pidfile);
        cr_assert_gt(pid, 0, "no broker.pid in %s", kdir);
        char *cmdline = broker_cmdline(pid);
        /* Odd outages: SIGKILL (a crash); even ones: SIGTERM (a clean stop). */
        int sig = o % 2 == 0 ? SIGKILL : SIGTERM;
        int64_t down_at = loom_mono_ms();
        kill(pid, sig);
        for (int i = 0; i < 600 && kill(pid, 0) == 0; i++)
            loom_sleep_ms(100);
        cr_assert_neq(kill(pid, 0), 0, "the broker did not stop");
        loom_sleep_ms(down_ms);
        broker_restart(kdir, cmdline);
        free(cmdline);
        int64_t up_at = loom_mono_ms();
        total_down += up_at - down_at;
        done_outages++;
        end = loom_mono_ms() + 180000;
        while (!broker_answers(addr) && loom_mono_ms() < end)
            loom_sleep_ms(300);
        cr_assert(broker_answers(addr), "the broker did not come back within 180 s (%s)", kdir);
        long long ready = loom_mono_ms() - up_at;
        if (ready > max_ready)
            max_ready = ready;
        long long base = count_applied(l.url);
        long long rec = wait_moving(l.url, base, up_at, 240000);
        cr_assert_geq(rec, 0, "nothing applied within 240 s of the broker restart (logs: %s)", dir);
        /* Caught up: as many applied as were acknowledged once it answered. */
        long long caught = wait_caught_up(l.url, atomic_load(&s.acked), up_at, 240000);
        if (caught > max_caught_up)
            max_caught_up = caught;
        if (rec > max_recovery)
            max_recovery = rec;
        cr_log_info("kafka outage %d (%s): down %lld ms; broker answering %lld ms and commands "
                    "applied again %lld ms after the restart",
                    o + 1, sig == SIGKILL ? "SIGKILL" : "SIGTERM", (long long)(up_at - down_at),
                    ready, rec);
        next_fault = loom_mono_ms() + gap_ms;
    }
    loom_sleep_ms(3000);
    atomic_store(&s.stop, true);
    stream_finish(&s, 300000);
    tally_t t;
    tally_when_settled(l.url, &s, &t, 300000);
    result_t r = {.scenario = "kafka_restart", .faults = done_outages, .recovery_ms = max_recovery};
    result_from_tally(&r, &s, &t);
    extra_add(&r, "send_failed=%d,resent=%d", atomic_load(&s.failed), atomic_load(&s.resent));
    extra_add(&r, "down_ms_total=%lld", total_down);
    extra_add(&r, "broker_ready_ms_max=%lld", max_ready);
    extra_add(&r, "caught_up_ms_max=%lld", max_caught_up);
    extra_add(&r, "broker_first_start_ms=%lld", first_start_ms);
    report(&r);
    assert_exactly_once(&r, &t, dir);
    for (int k = 0; k < 2; k++)
        proc_stop(&w[k], "worker");
    stream_free(&s);
    const char *stop[] = {kafka_script(), "stop", kdir, NULL};
    cr_assert_eq(loom_test_run(stop, NULL, NULL, NULL), 0);
    live_broker_dir[0] = '\0';
    scratch_remove(dir);
}

/* ---- 4. the gateway killed while clients write with Idempotency-Key --------------- */

typedef struct gw_run {
    int port;
    const char *token;
    int per_client, pace_ms;
    atomic_int ok, retries, unanswered, errors;
    atomic_llong restart_at, first_ok; /* first success since the last restart */
    atomic_bool abort;
    char error[256];
    pthread_mutex_t mu;
} gw_run_t;

typedef struct gw_client {
    gw_run_t *run;
    int t;
    pthread_t thread;
} gw_client_t;

/* Writes its messages, one request each, retrying until a 2xx. Odd clients
 * write a quarter as many and add ?wait=10s: the gateway answers only once a worker applied the
 * command, so a kill often finds the command published and unanswered, and
 * the retry publishes the same command id again. */
static void *gw_client_main(void *arg)
{
    gw_client_t *cl = arg;
    gw_run_t *run = cl->run;
    loom_test_http_conn_t *c = NULL;
    int n = cl->t % 2 ? run->per_client / 4 : run->per_client;
    for (int i = 0; i < n && !atomic_load(&run->abort); i++) {
        char id[64];
        snprintf(id, sizeof(id), "gw-%d-%d", cl->t, i);
        char *body = loom_xasprintf("{\"msgs\":[{\"id\":\"%s\",\"source\":\"urn:chaos\","
                                    "\"specversion\":\"1.0\",\"type\":\"chaos.put\","
                                    "\"data\":{\"t\":%d,\"i\":%d}}]}",
                                    id, cl->t, i);
        char *req =
            loom_xasprintf("POST /v1/messages:batchPut%s HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           "Authorization: Bearer %s\r\nIdempotency-Key: %s\r\n"
                           "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
                           cl->t % 2 ? "?wait=10s" : "", run->token, id, strlen(body), body);
        int64_t give_up = loom_mono_ms() + 300000;
        for (bool first = true;; first = false) {
            if (!first)
                atomic_fetch_add(&run->retries, 1);
            if (atomic_load(&run->abort) || loom_mono_ms() > give_up) {
                atomic_fetch_add(&run->errors, 1);
                break;
            }
            if (!c && !(c = loom_test_http_try_open(run->port))) {
                loom_sleep_ms(20);
                continue;
            }
            loom_test_http_res_t res = {0};
            bool sent = loom_test_http_sends(c, req);
            if (!sent || !loom_test_http_read(c, 20000, &res)) {
                /* Sent and no answer: the gateway may have published it. */
                if (sent)
                    atomic_fetch_add(&run->unanswered, 1);
                loom_test_http_res_free(&res);
                loom_test_http_close(c);
                c = NULL;
                continue;
            }
            int status = res.status;
            char conn[32];
            bool closing = loom_test_http_header(&res, "Connection", conn, sizeof(conn)) &&
                           strcmp(conn, "close") == 0;
            if (status >= 200 && status < 300) {
                atomic_fetch_add(&run->ok, 1);
                long long zero = 0;
                if (atomic_load(&run->restart_at) > 0)
                    atomic_compare_exchange_strong(&run->first_ok, &zero, loom_mono_ms());
            } else if (status < 500 && status != 429 && status != 408) {
                pthread_mutex_lock(&run->mu);
                snprintf(run->error, sizeof(run->error), "%s: %d %.200s", id, status,
                         res.body ? res.body : "");
                pthread_mutex_unlock(&run->mu);
                atomic_fetch_add(&run->errors, 1);
                status = 200; /* not retried */
            }
            loom_test_http_res_free(&res);
            if (closing) {
                loom_test_http_close(c);
                c = NULL;
            }
            if (status >= 200 && status < 300)
                break;
            loom_sleep_ms(50);
        }
        free(req);
        free(body);
        if (run->pace_ms)
            loom_sleep_ms(run->pace_ms);
    }
    loom_test_http_close(c);
    return NULL;
}

/* Messages on topic (the sum of its partitions' high watermarks). */
static long long topic_messages(const char *brokers, const char *topic)
{
    char errstr[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "bootstrap.servers", brokers, NULL, 0);
    rd_kafka_conf_set(conf, "log_level", "3", NULL, 0);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    cr_assert_not_null(rk, "%s", errstr);
    long long total = 0;
    for (int32_t p = 0; p < MAX_PARTS; p++) {
        int64_t lo = 0, hi = 0;
        if (rd_kafka_query_watermark_offsets(rk, topic, p, &lo, &hi, 10000) !=
            RD_KAFKA_RESP_ERR_NO_ERROR)
            break;
        total += hi - lo;
    }
    rd_kafka_destroy(rk);
    return total;
}

static void start_loom(proc_t *p, const char *cmd, const char *const *env, const char *log)
{
    const char *argv[] = {loom_test_bin(), cmd, NULL};
    snprintf(p->log, sizeof(p->log), "%s", log);
    p->pid = loom_test_spawn_logged(argv, env, p->log);
    track(p->pid, true);
}

Test(chaos, gateway_kill, .timeout = 7200, .fini = cleanup)
{
    bool lg = is_long();
    enum { CLIENTS = 4 };
    const int per_client = lg ? 2500 : 250;
    const int kills = lg ? 6 : 2;
    const int down_ms = lg ? 2000 : 1000;
    const char *brokers = loom_test_kafka_brokers();
    char dir[128];
    scratch_dir("gw", dir, sizeof(dir));
    char url[768];
    loom_test_db_create(url, sizeof(url));

    static const char *token = "chaos-token-0123456789";
    char hex[65], tokens[300];
    loom_sha256_hex(token, strlen(token), hex);
    snprintf(tokens, sizeof(tokens), "%s/tokens", dir);
    FILE *f = fopen(tokens, "w");
    cr_assert_not_null(f);
    fprintf(f, "%s chaos messages:read,messages:write\n", hex);
    fclose(f);

    char prefix[64], e_db[800], e_k[300], e_p[128], e_l[64], e_t[400];
    loom_test_topic_prefix("chaos", prefix, sizeof(prefix));
    int port = loom_free_port();
    snprintf(e_db, sizeof(e_db), "LOOM_DATABASE_URL=%s", url);
    snprintf(e_k, sizeof(e_k), "LOOM_KAFKA_BROKERS=%s", brokers);
    snprintf(e_p, sizeof(e_p), "LOOM_TOPIC_PREFIX=%s", prefix);
    snprintf(e_l, sizeof(e_l), "LOOM_API_LISTEN=127.0.0.1:%d", port);
    snprintf(e_t, sizeof(e_t), "LOOM_API_TOKENS_FILE=%s", tokens);
    const char *env[] = {
        e_db, e_k, e_p, e_l, e_t, "LOOM_KAFKA_PARTITIONS=4", "LOOM_DATABASE_POOL_SIZE=4", NULL};
    const char *mig[] = {loom_test_bin(), "migrate", "up", NULL};
    char *out = NULL, *errs = NULL;
    cr_assert_eq(loom_test_run(mig, env, &out, &errs), 0, "loom migrate up: %s", errs);
    free(out);
    free(errs);

    char log[300];
    proc_t worker, api;
    snprintf(log, sizeof(log), "%s/worker.log", dir);
    start_loom(&worker, "worker", env, log);
    snprintf(log, sizeof(log), "%s/api.log", dir);
    start_loom(&api, "api", env, log);
    cr_assert(loom_test_http_wait_status(port, "/readyz", 200, 60000) == 200,
              "loom api did not become ready (log %s)", api.log);

    gw_run_t run = {.port = port, .token = token, .per_client = per_client, .pace_ms = 10};
    pthread_mutex_init(&run.mu, NULL);
    gw_client_t cl[CLIENTS];
    for (int c = 0; c < CLIENTS; c++) {
        cl[c] = (gw_client_t){&run, c, 0};
        cr_assert_eq(pthread_create(&cl[c].thread, NULL, gw_client_main, &cl[c]), 0);
    }
    const int total = CLIENTS / 2 * (per_client + per_client / 4);
    long long max_recovery = 0, total_down = 0;
    int done_kills = 0;
    for (int k = 1; k <= kills; k++) {
        int64_t end = loom_mono_ms() + 300000;
        while (atomic_load(&run.ok) < total * k / (kills + 1) && atomic_load(&run.errors) == 0 &&
               loom_mono_ms() < end)
            loom_sleep_ms(20);
        if (atomic_load(&run.errors) > 0)
            break;
        proc_kill9(&api);
        int64_t down_at = loom_mono_ms();
        done_kills++;
        loom_sleep_ms(down_ms);
        atomic_store(&run.first_ok, 0);
        int64_t up_at = loom_mono_ms();
        atomic_store(&run.restart_at, up_at);
        snprintf(log, sizeof(log), "%s/api-%d.log", dir, k);
        start_loom(&api, "api", env, log);
        total_down += up_at - down_at;
        end = loom_mono_ms() + 120000;
        while (atomic_load(&run.first_ok) == 0 && atomic_load(&run.ok) < total &&
               loom_mono_ms() < end)
            loom_sleep_ms(5);
        long long first = atomic_load(&run.first_ok);
        cr_assert_gt(first, 0, "no write succeeded within 120 s of the gateway's restart (log %s)",
                     api.log);
        long long rec = first - up_at;
        if (rec > max_recovery)
            max_recovery = rec;
        cr_log_info("gateway kill %d: down %lld ms, first acknowledged write %lld ms after the "
                    "restart",
                    k, (long long)(up_at - down_at), rec);
    }
    for (int c = 0; c < CLIENTS; c++)
        pthread_join(cl[c].thread, NULL);
    cr_assert_eq(atomic_load(&run.errors), 0, "a client gave up or was refused: %s", run.error);

    /* Every acknowledged write stored once; one command per Idempotency-Key. */
    long long acked = atomic_load(&run.ok);
    long long stored = loom_test_wait_for(url, "SELECT count(*) FROM messages WHERE id LIKE 'gw-%'",
                                          acked, 120000);
    loom_sleep_ms(1500); /* a second command for one key would land by now */
    stored = loom_test_sql_ll(url, "SELECT count(*) FROM messages WHERE id LIKE 'gw-%'");
    long long commands =
        loom_test_sql_ll(url, "SELECT count(DISTINCT message_id) FROM loom_commands WHERE type = "
                              "'messages.put_batch' AND status = 'applied'");
    /* Commands published more than once (a retry after the gateway died
     * with the first publish acknowledged by Kafka): the dedup path ran. */
    char *topic = loom_test_sql_value(
        url, "SELECT min(topic) FROM loom_commands WHERE type = 'messages.put_batch'");
    long long published = topic_messages(brokers, topic);
    free(topic);
    result_t r = {.scenario = "gateway_kill",
                  .commands = total,
                  .acked = acked,
                  .applied = stored,
                  .lost = acked > stored ? acked - stored : 0,
                  .duplicated = commands > stored ? commands - stored : 0,
                  .faults = done_kills,
                  .recovery_ms = max_recovery};
    extra_add(&r, "clients=%d", CLIENTS);
    extra_add(&r, "retries=%d", atomic_load(&run.retries));
    extra_add(&r, "unanswered=%d", atomic_load(&run.unanswered));
    extra_add(&r, "commands_applied=%lld", commands);
    extra_add(&r, "published=%lld", published);
    extra_add(&r, "republished=%lld", published - commands);
    extra_add(&r, "down_ms_total=%lld", total_down);
    report(&r);
    cr_assert_eq(acked, total, "%lld of %d writes acknowledged", acked, total);
    cr_assert_eq(r.lost, 0, "%lld acknowledged writes not stored (logs: %s)", r.lost, dir);
    cr_assert_eq(r.duplicated, 0,
                 "%lld extra commands: a retry with the same Idempotency-Key was not deduplicated",
                 r.duplicated);
    cr_assert_eq(stored, total, "%lld rows for %d writes", stored, total);
    cr_assert_gt(done_kills, 0);
    proc_stop(&api, "loom api");
    proc_stop(&worker, "loom worker");
    pthread_mutex_destroy(&run.mu);
    scratch_remove(dir);
}

/* ---- 5. a 3-broker Kafka cluster: leader, controller, rolling restart ---------------- */

/* The cluster (scripts/kafka-cluster) of the running scenario, stopped by
 * cluster_cleanup() when a test fails half-way. */
static char live_cluster_dir[300];

static const char *cluster_script(void)
{
    return LOOM_CHAOS_SOURCE_DIR "/scripts/kafka-cluster";
}

/* Runs `kafka-cluster CMD KDIR [ARG]`; returns its stdout's first line (new
 * string) or aborts with its stderr. */
static char *cluster(const char *kdir, const char *cmd, const char *arg)
{
    const char *argv[] = {cluster_script(), cmd, kdir, arg, NULL};
    char *out = NULL, *errs = NULL;
    int rc = loom_test_run(argv, NULL, &out, &errs);
    cr_assert_eq(rc, 0, "kafka-cluster %s %s: %s", cmd, arg ? arg : "", errs);
    free(errs);
    char *last = out, *nl;
    /* `start` prints its bootstrap list last. */
    while ((nl = strchr(last, '\n')) && nl[1])
        last = nl + 1;
    last[strcspn(last, "\n")] = '\0';
    char *r = loom_xstrdup(last);
    free(out);
    return r;
}

static void cluster_cleanup(void)
{
    cleanup();
    if (live_cluster_dir[0]) {
        char cmd[700];
        snprintf(cmd, sizeof(cmd), "'%s' stop '%s' >/dev/null 2>&1", cluster_script(),
                 live_cluster_dir);
        if (system(cmd) != 0)
            fprintf(stderr, "could not stop the cluster in %s\n", live_cluster_dir);
        live_cluster_dir[0] = '\0';
    }
}

/* A topic's configuration value from the brokers (DescribeConfigs; new string). */
static char *topic_config(const char *brokers, const char *topic, const char *name)
{
    char errbuf[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "bootstrap.servers", brokers, errbuf, sizeof(errbuf));
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errbuf, sizeof(errbuf));
    cr_assert_not_null(rk, "%s", errbuf);
    rd_kafka_ConfigResource_t *cr = rd_kafka_ConfigResource_new(RD_KAFKA_RESOURCE_TOPIC, topic);
    rd_kafka_queue_t *q = rd_kafka_queue_new(rk);
    rd_kafka_DescribeConfigs(rk, &cr, 1, NULL, q);
    rd_kafka_event_t *ev = rd_kafka_queue_poll(q, 30000);
    char *value = loom_xstrdup("?");
    if (ev && !rd_kafka_event_error(ev)) {
        size_t n = 0;
        const rd_kafka_ConfigResource_t **rs = rd_kafka_DescribeConfigs_result_resources(
            rd_kafka_event_DescribeConfigs_result(ev), &n);
        for (size_t i = 0; i < n; i++) {
            size_t ne = 0;
            const rd_kafka_ConfigEntry_t **es = rd_kafka_ConfigResource_configs(rs[i], &ne);
            for (size_t k = 0; k < ne; k++)
                if (strcmp(rd_kafka_ConfigEntry_name(es[k]), name) == 0 &&
                    rd_kafka_ConfigEntry_value(es[k])) {
                    free(value);
                    value = loom_xstrdup(rd_kafka_ConfigEntry_value(es[k]));
                }
        }
    }
    if (ev)
        rd_kafka_event_destroy(ev);
    rd_kafka_queue_destroy(q);
    rd_kafka_ConfigResource_destroy(cr);
    rd_kafka_destroy(rk);
    return value;
}

/* Replicas of partition 0 as kcat reports them ("1,2,3"; new string). */
static char *replicas_of(const char *brokers, const char *topic)
{
    char cmd[600];
    snprintf(cmd, sizeof(cmd),
             "kcat -L -b %s -t %s -m 10 2>/dev/null | awk '$1 == \"partition\" && $2 == \"0,\" "
             "{ for (i = 1; i <= NF; i++) if ($i == \"replicas:\") { print $(i + 1); exit } }'",
             brokers, topic);
    FILE *f = popen(cmd, "r");
    char line[128] = "";
    if (!f || !fgets(line, sizeof(line), f))
        line[0] = '\0';
    if (f)
        pclose(f);
    line[strcspn(line, "\n")] = '\0';
    size_t n = strlen(line);
    if (n > 0 && line[n - 1] == ',') /* kcat ends the list with a comma */
        line[n - 1] = '\0';
    return loom_xstrdup(line);
}

/* Waits until every partition applied a command acknowledged after the
 * fault (acked_at_fault: the highest acknowledged offsets then): the
 * producer, the brokers and the workers all work again, end to end. Returns
 * the milliseconds since `since`, -1 after timeout_ms. */
static long long wait_partitions_moving(const char *url, int parts, const int64_t *acked_at_fault,
                                        int64_t since, int timeout_ms)
{
    int64_t end = loom_mono_ms() + timeout_ms;
    while (loom_mono_ms() < end) {
        int64_t cur[MAX_PARTS];
        if (applied_max(url, parts, cur)) {
            bool all = true;
            for (int p = 0; p < parts && all; p++)
                all = cur[p] > acked_at_fault[p];
            if (all)
                return loom_mono_ms() - since;
        }
        loom_sleep_ms(100);
    }
    return -1;
}

typedef enum { CL_LEADER, CL_CONTROLLER, CL_ROLLING } cluster_fault_t;

/*
 * Commands flow from an idempotent producer (acks=all) to two workers over a
 * 3-node cluster whose topic `loom migrate up` created with replication
 * factor 3 and min.insync.replicas 2; meanwhile a node is killed with SIGKILL
 * (the leader of partition 0, or the active controller) and started again,
 * or every node is restarted in turn. Every acknowledged command must be
 * applied exactly once; the recovery time is from the fault until every
 * partition applies again.
 */
static void cluster_scenario(cluster_fault_t kind)
{
    static const char *names[] = {"kafka_cluster_leader_kill9", "kafka_cluster_controller_kill9",
                                  "kafka_cluster_rolling_restart"};
    bool lg = is_long();
    const int parts = 6;
    const int rate = lg ? 200 : 150;
    const int faults = kind == CL_ROLLING ? 3 : lg ? 3 : 1;
    const int gap_ms = lg ? 15000 : 6000;
    char dir[128], kdir[200];
    scratch_dir("cluster", dir, sizeof(dir));
    snprintf(kdir, sizeof(kdir), "%s/kafka", dir);
    int64_t t0 = loom_mono_ms();
    char *brokers = cluster(kdir, "start", NULL);
    snprintf(live_cluster_dir, sizeof(live_cluster_dir), "%s", kdir);
    long long start_ms = loom_mono_ms() - t0;

    /* The schema and the topic, as an operator would make them. */
    ledger_t l;
    loom_test_ledger_init(&l.led, "c");
    loom_test_db_create(l.url, sizeof(l.url));
    char e1[800], e2[300], e3[128];
    snprintf(e1, sizeof(e1), "LOOM_DATABASE_URL=%s", l.url);
    snprintf(e2, sizeof(e2), "LOOM_KAFKA_BROKERS=%s", brokers);
    snprintf(e3, sizeof(e3), "LOOM_TEST_LEDGER_SUFFIX=%s", l.led.suffix);
    const char *env[] = {e1,
                         e2,
                         e3,
                         "LOOM_KAFKA_PARTITIONS=6",
                         "LOOM_KAFKA_REPLICATION_FACTOR=3",
                         "LOOM_KAFKA_MIN_INSYNC_REPLICAS=2",
                         NULL};
    const char *mig[] = {loom_test_app_bin(), "migrate", "up", NULL};
    char *out = NULL, *errs = NULL;
    cr_assert_eq(loom_test_run(mig, env, &out, &errs), 0, "migrate up: %s", errs);
    free(out);
    free(errs);
    loom_test_sql(l.url, "CREATE INDEX ON test_ledger (kafka_partition, kafka_offset)");
    char *reps = NULL;
    for (int i = 0; i < 50; i++) {
        free(reps);
        reps = replicas_of(brokers, l.led.topic);
        if (strlen(reps) == 5)
            break;
        loom_sleep_ms(200);
    }
    cr_assert_eq(strlen(reps), 5, "partition 0 of %s has replicas '%s', want three", l.led.topic,
                 reps);
    /* A broker may answer for a topic it learnt of a moment ago without its
     * config yet (the value then reads "?"): ask again, for up to 10 s. */
    char *isr = NULL;
    for (int i = 0; i < 50; i++) {
        free(isr);
        isr = topic_config(brokers, l.led.topic, "min.insync.replicas");
        if (strcmp(isr, "2") == 0)
            break;
        loom_sleep_ms(200);
    }
    cr_assert_str_eq(isr, "2", "min.insync.replicas of %s", l.led.topic);
    free(isr);
    free(reps);

    proc_t w[2];
    for (int k = 0; k < 2; k++)
        worker_start(&w[k], dir, k, l.url, brokers, l.led.suffix);
    int64_t end = loom_mono_ms() + 120000;
    while (!file_contains(w[0].log, "partitions assigned") && loom_mono_ms() < end)
        loom_sleep_ms(100);

    stream_t s;
    stream_start(&s, brokers, l.led.topic, "cl", 400000, rate);
    long long max_recovery = 0, sum_recovery = 0, max_back = 0;
    int done = 0;
    char victims[64] = "";
    int64_t next_fault = loom_mono_ms() + gap_ms;
    for (int f = 0; f < faults; f++) {
        sleep_until(next_fault);
        cr_assert_gt(count_applied(l.url), 0, "nothing applied before the fault (logs: %s)", dir);
        char node[8];
        if (kind == CL_ROLLING) {
            snprintf(node, sizeof(node), "%d", f + 1);
        } else {
            char *v = NULL;
            if (kind == CL_LEADER) {
                const char *argv[] = {cluster_script(), "leader", kdir, l.led.topic, "0", NULL};
                char *e = NULL;
                cr_assert_eq(loom_test_run(argv, NULL, &v, &e), 0, "leader: %s", e);
                v[strcspn(v, "\n")] = '\0';
                free(e);
            } else {
                v = cluster(kdir, "controller", NULL);
            }
            snprintf(node, sizeof(node), "%s", v);
            free(v);
        }
        int64_t fault_at = loom_mono_ms();
        free(cluster(kdir, kind == CL_ROLLING ? "stop-node" : "kill", node));
        /* What was acknowledged until the node was gone: recovered once every
         * partition applies something acknowledged after that. */
        int64_t at_fault[MAX_PARTS];
        pthread_mutex_lock(&s.mu);
        memcpy(at_fault, s.acked_max, sizeof(at_fault));
        pthread_mutex_unlock(&s.mu);
        done++;
        snprintf(victims + strlen(victims), sizeof(victims) - strlen(victims), "%s%s",
                 victims[0] ? "/" : "", node);
        long long rec = wait_partitions_moving(l.url, parts, at_fault, fault_at, 180000);
        cr_assert_geq(rec, 0, "fault %d (node %s): partitions did not move within 180 s (logs %s)",
                      done, node, dir);
        if (rec > max_recovery)
            max_recovery = rec;
        sum_recovery += rec;
        printf("%s %d: node %s, partitions applying again after %lld ms\n", names[kind], done, node,
               rec);
        /* The short run ends on two nodes: a restart costs it half a minute. */
        if (!lg && kind != CL_ROLLING && f == faults - 1)
            break;
        /* Node back: the next fault finds a full cluster again. */
        int64_t back_at = loom_mono_ms();
        free(cluster(kdir, "start-node", node));
        /* Back in sync (no under-replicated partition) before the next fault,
         * as a careful operator does. */
        const char *wi[] = {cluster_script(), "wait-isr", kdir, l.led.topic, NULL};
        char *wo = NULL, *we = NULL;
        cr_assert_eq(loom_test_run(wi, NULL, &wo, &we), 0, "wait-isr: %s", we);
        free(wo);
        free(we);
        long long back = loom_mono_ms() - back_at;
        if (back > max_back)
            max_back = back;
        cr_log_info("%s %d: node %s down; every partition applying again after %lld ms; node "
                    "back and in sync in %lld ms",
                    names[kind], done, node, rec, back);
        next_fault = loom_mono_ms() + (kind == CL_ROLLING ? gap_ms / 2 : gap_ms);
    }
    loom_sleep_ms(3000);
    atomic_store(&s.stop, true);
    stream_finish(&s, 300000);
    tally_t t;
    tally_when_settled(l.url, &s, &t, 300000);
    result_t r = {.scenario = names[kind], .faults = done, .recovery_ms = max_recovery};
    result_from_tally(&r, &s, &t);
    extra_add(&r, "nodes=3");
    extra_add(&r, "rf=3");
    extra_add(&r, "min_isr=2");
    extra_add(&r, "victims=%s", victims);
    extra_add(&r, "mean_recovery_ms=%lld", done ? sum_recovery / done : 0);
    extra_add(&r, "node_back_ms_max=%lld", max_back);
    extra_add(&r, "send_failed=%d,resent=%d", atomic_load(&s.failed), atomic_load(&s.resent));
    extra_add(&r, "cluster_start_ms=%lld", start_ms);
    report(&r);
    assert_exactly_once(&r, &t, dir);
    for (int k = 0; k < 2; k++)
        proc_stop(&w[k], "worker");
    stream_free(&s);
    free(brokers);
    free(cluster(kdir, "stop", NULL));
    live_cluster_dir[0] = '\0';
    scratch_remove(dir);
}

/* The one cluster scenario CTest runs (about a minute); the others run in
 * the long run (tests/chaos/run --long). */
Test(chaos, kafka_cluster_leader_kill9, .timeout = 7200, .fini = cluster_cleanup)
{
    cluster_scenario(CL_LEADER);
}

Test(chaos, kafka_cluster_controller_kill9, .timeout = 7200, .fini = cluster_cleanup)
{
    if (!is_long())
        cr_skip_test("long run only (tests/chaos/run --long)");
    cluster_scenario(CL_CONTROLLER);
}

Test(chaos, kafka_cluster_rolling_restart, .timeout = 7200, .fini = cluster_cleanup)
{
    if (!is_long())
        cr_skip_test("long run only (tests/chaos/run --long)");
    cluster_scenario(CL_ROLLING);
}

/* ---- 6. PostgreSQL with automatic failover (Patroni): the primary killed ------------- */

static char live_pgf_dir[300];

static const char *pgf_script(void)
{
    return LOOM_CHAOS_SOURCE_DIR "/scripts/pg-failover";
}

/* Runs `pg-failover CMD DIR [ARG [ARG2]]`; its last stdout line (new string). */
static char *pgf(const char *dir, const char *cmd, const char *arg, const char *arg2)
{
    const char *argv[] = {pgf_script(), cmd, dir, arg, arg2, NULL};
    char *out = NULL, *errs = NULL;
    int rc = loom_test_run(argv, NULL, &out, &errs);
    cr_assert_eq(rc, 0, "pg-failover %s: %s", cmd, errs);
    free(errs);
    char *last = out, *nl;
    while ((nl = strchr(last, '\n')) && nl[1])
        last = nl + 1;
    last[strcspn(last, "\n")] = '\0';
    char *r = loom_xstrdup(last);
    free(out);
    return r;
}

static void pgf_cleanup(void)
{
    cleanup();
    if (live_pgf_dir[0]) {
        char cmd[700];
        snprintf(cmd, sizeof(cmd), "'%s' stop '%s' >/dev/null 2>&1", pgf_script(), live_pgf_dir);
        if (system(cmd) != 0)
            fprintf(stderr, "could not stop the cluster in %s\n", live_pgf_dir);
        live_pgf_dir[0] = '\0';
    }
}

/* Polls a worker's /readyz until it answers want; ms since `since`, or -1. */
static long long wait_readyz(int port, int want, int64_t since, int timeout_ms)
{
    if (loom_test_http_wait_status(port, "/readyz", want, timeout_ms) != want)
        return -1;
    return loom_mono_ms() - since;
}

/*
 * Two workers on a Patroni pair (scripts/pg-failover) through a libpq
 * multi-host URL with target_session_attrs=read-write, commands streaming;
 * the primary machine is lost (SIGKILL of its Patroni, postmaster and
 * backends at once), Patroni promotes the replica, the old primary rejoins.
 * sync: synchronous_mode, every acknowledged command must be applied exactly
 * once. async: asynchronous replication; what was lost is measured and
 * reported, not asserted (docs/deployment.md says what it risks).
 */
static void pg_failover_scenario(bool sync)
{
    bool lg = is_long();
    const int parts = 6, rate = 200, faults = lg ? 2 : 1, gap_ms = lg ? 15000 : 8000;
    const char *scenario = sync ? "postgres_failover_sync" : "postgres_failover_async";
    const char *brokers = loom_test_kafka_brokers();
    char dir[128], pdir[200];
    scratch_dir("pgf", dir, sizeof(dir));
    snprintf(pdir, sizeof(pdir), "%s/pg", dir);
    int64_t t0 = loom_mono_ms();
    char *url = pgf(pdir, "start", sync ? "sync" : "async", NULL);
    snprintf(live_pgf_dir, sizeof(live_pgf_dir), "%s", pdir);
    long long start_ms = loom_mono_ms() - t0;

    ledger_t l;
    loom_test_ledger_init(&l.led, "c");
    snprintf(l.url, sizeof(l.url), "%s", url);
    loom_test_migrate_ledger(l.url);
    loom_test_sql(l.url, "CREATE INDEX ON test_ledger (kafka_partition, kafka_offset)");
    loom_test_kafka_topic(brokers, l.led.topic, parts);
    int port = loom_free_port();
    proc_t w[2];
    worker_start_on(&w[0], dir, 0, l.url, brokers, l.led.suffix, port);
    worker_start(&w[1], dir, 1, l.url, brokers, l.led.suffix);
    cr_assert_geq(wait_readyz(port, 200, loom_mono_ms(), 60000), 0, "worker 0 never ready (%s)",
                  w[0].log);
    int64_t end = loom_mono_ms() + 120000;
    while (!file_contains(w[0].log, "partitions assigned") && loom_mono_ms() < end)
        loom_sleep_ms(100);

    stream_t s;
    stream_start(&s, brokers, l.led.topic, "pf", 400000, rate);
    long long max_recovery = 0, max_failover = 0, max_rejoin = 0, max_unready = 0;
    long long not_ready_ms = -1;
    int done = 0;
    int64_t next_fault = loom_mono_ms() + gap_ms;
    for (int f = 0; f < faults; f++) {
        sleep_until(next_fault);
        cr_assert_gt(count_applied(l.url), 0, "nothing applied before the fault (logs: %s)", dir);
        /* Every second failover finds the replica 2 s behind (the primary's
         * WAL sender held): what a busy replica or a slow link looks like. */
        bool lagging = f % 2 == 1;
        int64_t fault_at = loom_mono_ms();
        char *victim = pgf(pdir, "kill-primary", lagging ? "2" : "0", NULL);
        int64_t at_fault[MAX_PARTS];
        pthread_mutex_lock(&s.mu);
        memcpy(at_fault, s.acked_max, sizeof(at_fault));
        pthread_mutex_unlock(&s.mu);
        done++;
        /* The worker says so while there is no primary. */
        long long unready = wait_readyz(port, 503, fault_at, 30000);
        if (not_ready_ms < 0 || unready > not_ready_ms)
            not_ready_ms = unready;
        char *now_primary = pgf(pdir, "wait-primary", "180", NULL);
        long long failover = loom_mono_ms() - fault_at;
        long long ready = wait_readyz(port, 200, fault_at, 180000);
        cr_assert_geq(ready, 0, "worker 0 not ready again within 180 s of the failover (%s)",
                      w[0].log);
        long long rec = wait_partitions_moving(l.url, parts, at_fault, fault_at, 240000);
        cr_assert_geq(rec, 0, "failover %d: partitions did not move within 240 s (logs %s)", done,
                      dir);
        int64_t back_at = loom_mono_ms();
        free(pgf(pdir, "start-node", victim, NULL));
        free(pgf(pdir, "wait-replica", "240", NULL));
        long long rejoin = loom_mono_ms() - back_at;
        if (failover > max_failover)
            max_failover = failover;
        if (rec > max_recovery)
            max_recovery = rec;
        if (rejoin > max_rejoin)
            max_rejoin = rejoin;
        if (ready > max_unready)
            max_unready = ready;
        printf("%s %d: %s killed%s, %s primary after %lld ms, worker not ready after %lld ms "
               "and ready after %lld ms, every partition applying after %lld ms, old primary back "
               "as a replica in %lld ms\n",
               scenario, done, victim, lagging ? " (replica 2 s behind)" : "", now_primary,
               failover, unready, ready, rec, rejoin);
        fflush(stdout);
        free(victim);
        free(now_primary);
        next_fault = loom_mono_ms() + gap_ms;
    }
    loom_sleep_ms(3000);
    atomic_store(&s.stop, true);
    stream_finish(&s, 300000);
    tally_t t;
    tally_when_settled(l.url, &s, &t, sync ? 300000 : 60000);
    result_t r = {.scenario = scenario, .faults = done, .recovery_ms = max_recovery};
    result_from_tally(&r, &s, &t);
    extra_add(&r, "replication=%s", sync ? "synchronous" : "asynchronous");
    extra_add(&r, "failover_ms_max=%lld", max_failover);
    extra_add(&r, "worker_not_ready_after_ms=%lld", not_ready_ms);
    extra_add(&r, "worker_ready_again_ms_max=%lld", max_unready);
    extra_add(&r, "rejoin_ms_max=%lld", max_rejoin);
    extra_add(&r, "cluster_start_ms=%lld", start_ms);
    extra_add(&r, "replica_behind_ms_on_even_faults=2000");
    report(&r);
    cr_assert_geq(not_ready_ms, 0, "worker 0's /readyz never said 503 during a failover");
    if (sync) {
        assert_exactly_once(&r, &t, dir);
    } else {
        cr_assert_eq(t.bad_ids, 0, "rows with a foreign id or a wrong amount (logs: %s)", dir);
        cr_assert_eq(r.duplicated, 0, "%lld commands applied twice (logs: %s)", r.duplicated, dir);
    }
    for (int k = 0; k < 2; k++)
        proc_stop(&w[k], "worker");
    stream_free(&s);
    free(url);
    free(pgf(pdir, "stop", NULL, NULL));
    live_pgf_dir[0] = '\0';
    scratch_remove(dir);
}

/* Long run only: a Patroni pair takes about half a minute to start. */
Test(chaos, postgres_failover_sync, .timeout = 7200, .fini = pgf_cleanup)
{
    if (!is_long())
        cr_skip_test("long run only (tests/chaos/run --long)");
    pg_failover_scenario(true);
}

Test(chaos, postgres_failover_async, .timeout = 7200, .fini = pgf_cleanup)
{
    if (!is_long())
        cr_skip_test("long run only (tests/chaos/run --long)");
    pg_failover_scenario(false);
}
