/*
 * fuzz_kafka.c: libFuzzer target for what a worker does with a message from
 * Kafka: the bytes become the headers, key and value of one or two messages
 * of a partition, which go through decoding (envelope.c) and the consumer's
 * apply and record path (consumer.c) against a real PostgreSQL, with a
 * handler that writes what it is given (an event on the key's stream).
 *
 * It fails (abort) on any message whose outcome is not recorded: every
 * message before the offset the worker would commit must have its row in
 * loom_commands, under its own offset, or (a resend skipped by the dedup)
 * under its id. With a healthy database nothing may be left uncommitted.
 *
 * The database: LOOM_FUZZ_DATABASE_URL (a server where it may create
 * databases), else a private cluster it starts with pglocal.c, the code of
 * `loom dev` and of the test harness (see start_pg).
 * Build and run: `make fuzz`.
 */
#include "loom/consumer.h"
#include "loom/db.h"
#include "loom/log.h"
#include "loom/migrate.h"
#include "loom/pglocal.h"

#include <librdkafka/rdkafka.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

extern const loom_migration_set_t loom_app_migrations;

static loom_db_pool_t *pool;
static rd_kafka_t *rk;
static rd_kafka_topic_t *rkt;
static loom_pglocal_t pg;
static long iteration;

/* ---- the handler ---------------------------------------------------------------- */

/* Writes an event with the command's data on stream "fuzz-<key>"; data with
 * "fail": "permanent" is refused, as a service refuses a bad command. */
static int fuzz_handler(loom_msg_t *msg, loom_error_t *err)
{
    json_t *d = loom_msg_json(msg, err);
    if (!d)
        return LOOM_EINVAL;
    if (json_is_object(d) && json_is_string(json_object_get(d, "fail")))
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "refused: %s",
                              json_string_value(json_object_get(d, "fail")));
    const loom_ce_t *ce = loom_msg_event(msg);
    char stream[LOOM_CE_ID_MAX + 16];
    snprintf(stream, sizeof(stream), "fuzz-%s", ce->key ? ce->key : "");
    int rc = loom_emit(msg, stream, -1, "fuzz.done", json_incref(d), err);
    if (rc == 0)
        loom_msg_set_result(msg, json_incref(d));
    return rc;
}

static const char *const topics[] = {"fuzz", NULL};
static loom_consumer_def_t def = {"fuzz", topics, fuzz_handler, 10, "fuzz target"};

/* ---- setup ------------------------------------------------------------------------ */

static char pg_root[600]; /* the directory holding the cluster, removed at exit */

static void remove_root(void)
{
    char cmd[700];
    if (strncmp(pg_root, "/tmp/loom-fuzz-pg-", 18) != 0)
        return;
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", pg_root);
    if (system(cmd) != 0)
        fprintf(stderr, "fuzz_kafka: could not remove %s\n", pg_root);
}

static void stop_pg(void)
{
    loom_pglocal_stop(&pg);
    remove_root();
}

static void die(const char *what, const char *why)
{
    fprintf(stderr, "fuzz_kafka: %s: %s\n", what, why);
    exit(1);
}

/* A private cluster (pglocal.c, as `loom dev` and the test harness start
 * theirs) in LOOM_FUZZ_PG_DIR or a new /tmp directory. With LOOM_FUZZ_PG_STOP
 * set, stops the one in LOOM_FUZZ_PG_DIR and exits: `make fuzz` does that
 * after the run, since a crash ends the process without running atexit. */
static const char *start_pg(void)
{
    loom_error_t err;
    const char *dir = getenv("LOOM_FUZZ_PG_DIR");
    if (dir && *dir)
        snprintf(pg_root, sizeof(pg_root), "%s", dir);
    else {
        snprintf(pg_root, sizeof(pg_root), "/tmp/loom-fuzz-pg-XXXXXX");
        if (!mkdtemp(pg_root))
            die("mkdtemp", "failed");
    }
    char pgdir[700];
    snprintf(pgdir, sizeof(pgdir), "%s/pg", pg_root);
    if (getenv("LOOM_FUZZ_PG_STOP")) {
        loom_pglocal_t old = {.started = true, .lock_fd = -1};
        snprintf(old.dir, sizeof(old.dir), "%s", pgdir);
        if (loom_pglocal_find_bindir(old.bindir, sizeof(old.bindir)) == 0)
            loom_pglocal_stop(&old);
        remove_root();
        exit(0);
    }
    mkdir(pg_root, 0755);
    chmod(pg_root, 0755); /* the server may run as postgres (pglocal.h) */
    loom_pglocal_opts_t po = {.fast = true, .dbname = "loom"};
    if (loom_pglocal_start(&pg, pgdir, &po, &err) != 0)
        die("could not start PostgreSQL", err.message);
    atexit(stop_pg);
    return pg.url;
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    loom_log_setup(LOOM_LOG_OFF, LOOM_LOG_TEXT);
    loom_error_t err;
    const char *url = getenv("LOOM_FUZZ_DATABASE_URL");
    if (!url || !*url)
        url = start_pg();
    /* A database of its own, migrated. */
    loom_db_pool_opts_t o = {.size = 2};
    loom_db_pool_t *admin = NULL;
    if (loom_db_pool_new(url, &o, &admin, &err) != 0)
        die("could not connect", err.message);
    char name[64], sql[128];
    snprintf(name, sizeof(name), "loom_fuzz_%d", (int)getpid());
    loom_db_t *db = NULL;
    if (loom_db_acquire(admin, &db, &err) != 0)
        die("could not connect", err.message);
    snprintf(sql, sizeof(sql), "DROP DATABASE IF EXISTS %s", name);
    loom_db_exec_script(db, sql, &err);
    snprintf(sql, sizeof(sql), "CREATE DATABASE %s", name);
    if (loom_db_exec_script(db, sql, &err) != 0)
        die("could not create the database", err.message);
    loom_db_release(db);
    loom_db_pool_free(admin);
    /* Same server, that database: replace the path of the URL. */
    char fuzz_url[1024];
    const char *slash = strrchr(url, '/');
    const char *query = strchr(url, '?');
    if (!slash || slash < url + 10)
        die("LOOM_FUZZ_DATABASE_URL", "must be a postgresql:// URL");
    snprintf(fuzz_url, sizeof(fuzz_url), "%.*s/%s%s", (int)(slash - url), url, name,
             query ? query : "");
    if (loom_db_pool_new(fuzz_url, &o, &pool, &err) != 0)
        die("could not connect", err.message);
    if (loom_db_acquire(pool, &db, &err) != 0)
        die("could not connect", err.message);
    int applied = 0;
    if (loom_migrate_up(db, &loom_app_migrations, &applied, &err) != 0)
        die("could not migrate", err.message);
    loom_db_release(db);
    /* A client handle only to give the messages a topic: it connects nowhere. */
    char errbuf[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errbuf, sizeof(errbuf));
    if (!rk)
        die("rd_kafka_new", errbuf);
    rkt = rd_kafka_topic_new(rk, "loom.cmd.fuzz", NULL);
    return 0;
}

/* ---- bytes to messages ----------------------------------------------------------------- */

/* Room for librdkafka's rd_kafka_msg_t around the rd_kafka_message_t, as
 * tests/engine/test_envelope.c does. */
typedef union {
    rd_kafka_message_t rkm;
    max_align_t align[1024 / sizeof(max_align_t)];
} msg_buf_t;

typedef struct reader {
    const uint8_t *p;
    size_t n;
} reader_t;

static int take_byte(reader_t *r)
{
    if (r->n == 0)
        return -1;
    r->n--;
    return *r->p++;
}

/* A chunk: one length byte, then that many bytes (fewer at the end). */
static const uint8_t *take_chunk(reader_t *r, size_t *len)
{
    int l = take_byte(r);
    if (l < 0)
        l = 0;
    *len = (size_t)l < r->n ? (size_t)l : r->n;
    const uint8_t *p = r->p;
    r->p += *len;
    r->n -= *len;
    return p;
}

static const char *const known[] = {
    "ce_specversion", "ce_id",          "ce_source",    "ce_type",
    "ce_time",        "ce_subject",     "ce_rayid",     "ce_causationid",
    "ce_deadline",    "ce_traceparent", "content-type", "ce_datacontenttype",
    "ce_dataschema",  "ce_x",           "ce_",
};

/*
 * One message: a flags byte (low 4 bits: headers; 0x10: no key; 0x20: a
 * valid base of specversion/id/source/type first; top 2 bits: its id), then per header a name
 * chunk (empty: a known name picked by the next byte) and a value chunk (a
 * 255 length byte: no value), a key chunk, a value-length byte * 16 and the
 * value.
 */
static rd_kafka_message_t *take_message(reader_t *r, int64_t offset)
{
    msg_buf_t *b = calloc(1, sizeof(*b));
    if (!b)
        abort();
    rd_kafka_message_t *m = &b->rkm;
    m->rkt = rkt;
    m->partition = 0;
    m->offset = offset;
    int flags = take_byte(r);
    if (flags < 0)
        flags = 0x20;
    rd_kafka_headers_t *h = rd_kafka_headers_new(8);
    if (flags & 0x20) {
        /* The top bits pick the id: two messages of an input may share it
         * (a resend, or a conflict when their data differ). */
        char id[32];
        snprintf(id, sizeof(id), "f-%d", (flags >> 6) & 3);
        rd_kafka_header_add(h, "ce_specversion", -1, "1.0", -1);
        rd_kafka_header_add(h, "ce_id", -1, id, -1);
        rd_kafka_header_add(h, "ce_source", -1, "urn:fuzz", -1);
        rd_kafka_header_add(h, "ce_type", -1, "fuzz.cmd", -1);
    }
    for (int i = 0; i < (flags & 15); i++) {
        size_t nl, vl;
        const uint8_t *name = take_chunk(r, &nl);
        char nbuf[256];
        if (nl == 0) {
            int k = take_byte(r);
            snprintf(nbuf, sizeof(nbuf), "%s",
                     known[(k < 0 ? 0 : k) % (sizeof(known) / sizeof(known[0]))]);
        } else {
            memcpy(nbuf, name, nl);
            nbuf[nl] = '\0'; /* a NUL inside cuts the name, as a C string would */
        }
        bool null_value = r->n > 0 && r->p[0] == 255;
        const uint8_t *v = take_chunk(r, &vl);
        rd_kafka_header_remove(h, nbuf);
        rd_kafka_header_add(h, nbuf, -1, null_value ? NULL : v, null_value ? 0 : (ssize_t)vl);
    }
    rd_kafka_message_set_headers(m, h);
    size_t kl;
    const uint8_t *key = take_chunk(r, &kl);
    if (!(flags & 0x10)) {
        void *k = malloc(kl + 1);
        memcpy(k, key, kl);
        m->key = k;
        m->key_len = kl;
    }
    int vlen = take_byte(r);
    size_t len = vlen < 0 ? r->n : (size_t)vlen * 16;
    if (len > r->n)
        len = r->n;
    if (len > 0) {
        void *v = malloc(len);
        memcpy(v, r->p, len);
        m->payload = v;
        m->len = len;
    }
    r->p += len;
    r->n -= len;
    return m;
}

static void free_message(rd_kafka_message_t *m)
{
    rd_kafka_headers_t *h;
    if (rd_kafka_message_detach_headers(m, &h) == RD_KAFKA_RESP_ERR_NO_ERROR)
        rd_kafka_headers_destroy(h);
    free(m->key);
    free(m->payload);
    free(m);
}

/* ---- the check ---------------------------------------------------------------------- */

static long long count_rows(const char *consumer, int64_t offset, const char *id)
{
    loom_db_t *db;
    loom_error_t err;
    if (loom_db_acquire(pool, &db, &err) != 0)
        die("could not connect", err.message);
    char off[32];
    snprintf(off, sizeof(off), "%lld", (long long)offset);
    const char *p[] = {consumer, off, id};
    PGresult *res = NULL;
    if (loom_db_query(db,
                      "SELECT count(*) FROM loom_commands WHERE consumer = $1 AND "
                      "(kafka_offset = $2::bigint OR message_id = $3)",
                      3, p, &res, &err) != 0)
        die("could not check", err.message);
    long long n = atoll(PQgetvalue(res, 0, 0));
    PQclear(res);
    loom_db_release(db);
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    iteration++;
    reader_t r = {data, size};
    /* Two messages at most, on one partition, with a consumer of their own
     * so that earlier inputs do not dedup them. */
    rd_kafka_message_t *msgs[2];
    size_t n = 0;
    msgs[n++] = take_message(&r, 0);
    if (r.n > 0)
        msgs[n++] = take_message(&r, 1);
    char name[64];
    snprintf(name, sizeof(name), "fuzz.%d.%ld", (int)getpid(), iteration);
    def.name = name;
    int64_t committed = loom_consumer_apply_offline(pool, &def, msgs, n);
    if (committed != (int64_t)n) {
        fprintf(stderr,
                "fuzz_kafka: %zu message(s), but the worker would commit up to %lld: "
                "an outcome was not recorded\n",
                n, (long long)committed);
        abort();
    }
    /* Each one has its row: under its offset, or (a resend) under its id. */
    for (size_t i = 0; i < n; i++) {
        loom_arena_t a;
        loom_arena_init(&a, 0);
        loom_ce_t ce;
        loom_error_t err;
        loom_ce_decode(msgs[i], &a, &ce, &err);
        if (count_rows(name, msgs[i]->offset, ce.id ? ce.id : "") == 0) {
            fprintf(stderr, "fuzz_kafka: message %zu was committed but has no row\n", i);
            abort();
        }
        loom_arena_release(&a);
    }
    for (size_t i = 0; i < n; i++)
        free_message(msgs[i]);
    return 0;
}
