/*
 * consumer.c: one consumer's loop: fetch, apply a partition's batch in one
 * transaction with its dedup rows, commit offsets after the database, and
 * retry transient failures forever while only that partition waits.
 *
 * Partitions are independent: the batches of different partitions run at
 * once on the consumer's apply threads (LOOM_WORKER_APPLY_THREADS, each with
 * its own transaction), while each partition's batches stay in order.
 * Commands that come while a partition's last batch waits for a thread join
 * that batch (job_join). Each partition's offset (its lowest command not
 * finished) is committed at most every COMMIT_EVERY_MS while it flows, and
 * at once on a stop or a revoke.
 *
 * Failure handling. A batch that fails is run again one message at a time
 * to find the bad one. A message a handler rejects (4xx class) or that is
 * not a valid CloudEvent is recorded as "rejected" and passed over. A message
 * that fails transiently is recorded as "retrying" (attempts, last_error),
 * its partition is paused and rewound to it (rd_kafka_seek drops whatever was
 * fetched after it), and after a capped exponential backoff with jitter the
 * partition resumes from that message. Other partitions keep flowing.
 *
 * Writes per batch: one multi-row INSERT each for loom_commands, loom_events
 * and loom_outbox, built from text arrays with unnest(), and one for each
 * statement handlers fed with loom_msg_add_row(). Round trips per batch:
 * BEGIN goes with the dedup SELECT, all the multi-row INSERTs go in one
 * pipeline, then COMMIT; a handler adds only the statements it runs itself.
 * A partition whose batches found nothing handled skips the dedup SELECT
 * (apply_job says why that is safe): BEGIN, the INSERTs and COMMIT are then
 * one round trip.
 */
#include "keyq.h"
#include "worker_int.h"
#include "loom/clock.h"
#include "loom/log.h"
#include "loom/mem.h"
#include "loom/sha256.h"
#include "loom/uuid.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* Bytes in bytea hex form ("\x0a1b..."), a new string. */
static char *bytea_hex(const void *data, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    char *buf = loom_xmalloc(2 * n + 3);
    buf[0] = '\\';
    buf[1] = 'x';
    for (size_t i = 0; i < n; i++) {
        buf[2 + 2 * i] = hex[((const unsigned char *)data)[i] >> 4];
        buf[3 + 2 * i] = hex[((const unsigned char *)data)[i] & 15];
    }
    buf[2 * n + 2] = '\0';
    return buf;
}

static void db_array_add_bytea(loom_db_array_t *a, const void *data, size_t n)
{
    char *buf = bytea_hex(data, n);
    loom_db_array_add_n(a, buf, 2 * n + 2);
    free(buf);
}

/* ---- per-batch state -------------------------------------------------------- */

typedef struct stream_ver {
    const char *stream;
    int64_t version; /* last version given out, when known */
    bool known;      /* version was read from loom_events */
    int64_t rel;     /* appends numbered relative to the stored version */
} stream_ver_t;

/* Event rows waiting for the batch's commit, one text[] per column. */
typedef struct evrows {
    loom_db_array_t stream, version, id, type, data, ray, cause;
} evrows_t;

/* Rows handlers added for one statement, one text[] per column. */
typedef struct rowset {
    const loom_db_stmt_t *stmt;
    loom_db_array_t *cols;
} rowset_t;

typedef struct batch batch_t;

struct loom_msg {
    batch_t *batch;
    rd_kafka_message_t *rkm;
    loom_ce_t ce;
    bool decoded;
    loom_error_t decode_err;
    bool done; /* found applied/rejected/parked: skip */
    json_t *json;
    json_t *result;
    int attempt;
    char fallback_id[160];                /* for messages without a usable ce_id */
    char digest[2 * LOOM_SHA256_LEN + 1]; /* of type and data: tells a resend from a reuse */
    const char *conflict;                 /* why its id is taken by another command (arena) */
    bool skip;                            /* its outcome is set already (expired): not applied */
};

struct batch {
    worker_consumer_t *wc;
    loom_db_t *db;
    loom_arena_t arena;   /* lives as long as the batch */
    loom_arena_t scratch; /* reset at each transaction attempt */
    loom_msg_t *msgs;
    size_t n;
    /* rows of the current attempt */
    evrows_t ev;  /* events with their version (expected_version given) */
    evrows_t rel; /* appends whose version the INSERT computes (expected -1) */
    loom_db_array_t ob_topic, ob_key, ob_headers, ob_payload;
    rowset_t *rowsets;
    size_t n_rowsets;
    stream_ver_t *streams;
    size_t n_streams, cap_streams;
    const char *site, *node;
};

loom_db_t *loom_msg_db(loom_msg_t *msg)
{
    return msg->batch->db;
}

const loom_ce_t *loom_msg_event(const loom_msg_t *msg)
{
    return &msg->ce;
}

loom_arena_t *loom_msg_arena(loom_msg_t *msg)
{
    return &msg->batch->scratch;
}

int loom_msg_attempt(const loom_msg_t *msg)
{
    return msg->attempt;
}

const char *loom_msg_topic(const loom_msg_t *msg)
{
    return rd_kafka_topic_name(msg->rkm->rkt);
}

int32_t loom_msg_partition(const loom_msg_t *msg)
{
    return msg->rkm->partition;
}

int64_t loom_msg_offset(const loom_msg_t *msg)
{
    return msg->rkm->offset;
}

json_t *loom_msg_json(loom_msg_t *msg, loom_error_t *err)
{
    if (msg->json)
        return msg->json;
    json_error_t jerr;
    msg->json = json_loadb(msg->ce.data ? msg->ce.data : "", msg->ce.data_len,
                           JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &jerr);
    if (!msg->json)
        loom_error_set(err, LOOM_CODE_INVALID_JSON, "command data is not valid JSON: %s",
                       jerr.text);
    return msg->json;
}

const loom_config_t *loom_msg_config(const loom_msg_t *msg)
{
    return msg->batch->wc->w->opts.cfg;
}

int loom_msg_dispatch(loom_msg_t *msg, const loom_command_t *cmds, size_t n, loom_error_t *err)
{
    json_t *d = loom_msg_json(msg, err);
    if (!d)
        return LOOM_EINVAL;
    if (!json_is_object(d))
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "command data must be an object");
    const char *type = msg->ce.type ? msg->ce.type : "";
    for (size_t i = 0; i < n; i++)
        if (strcmp(type, cmds[i].type) == 0)
            return cmds[i].fn(msg, d, err);
    return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "unknown command type \"%s\"", type);
}

size_t loom_commands_count(const loom_command_t *cmds)
{
    size_t n = 0;
    while (cmds && cmds[n].type)
        n++;
    return n;
}

size_t loom_consumer_topics(const loom_consumer_def_t *def, char (*out)[LOOM_TOPIC_MAX], size_t max)
{
    size_t n = 0;
    char topic[LOOM_TOPIC_MAX];
    size_t n_commands = loom_commands_count(def->commands);
    for (size_t i = 0; def->topics ? def->topics[i] != NULL : i < n_commands; i++) {
        if (def->topics)
            loom_topic_map(def->topics[i], topic, sizeof(topic));
        else if (def->commands[i].topic)
            loom_topic_map(def->commands[i].topic, topic, sizeof(topic));
        else
            loom_topic_for_command(def->commands[i].type, topic, sizeof(topic));
        bool seen = false;
        for (size_t k = 0; k < n && k < max && !seen; k++)
            seen = strcmp(out[k], topic) == 0;
        if (seen)
            continue;
        if (n < max)
            memcpy(out[n], topic, sizeof(topic));
        n++;
    }
    return n;
}

int loom_consumer_routes_register(const loom_consumer_def_t *defs, size_t n, loom_error_t *err)
{
    for (size_t i = 0; i < n; i++)
        for (size_t k = 0; k < loom_commands_count(defs[i].commands); k++) {
            const loom_command_t *c = &defs[i].commands[k];
            if (c->topic && !loom_topic_route_add(c->type, c->topic))
                return loom_error_set(err, LOOM_CODE_CONFIG_INVALID,
                                      "command %s of consumer %s: routed to two topics, or too "
                                      "many declared routes",
                                      c->type, defs[i].name);
        }
    return 0;
}

void loom_msg_set_result(loom_msg_t *msg, json_t *result)
{
    json_decref(msg->result);
    msg->result = result;
}

int loom_msg_add_row(loom_msg_t *msg, const loom_db_stmt_t *stmt, const char *const *values,
                     loom_error_t *err)
{
    batch_t *b = msg->batch;
    if (!stmt || stmt->nparams <= 0 || !values)
        return loom_error_set(err, LOOM_CODE_INTERNAL,
                              "loom_msg_add_row needs a statement with parameters and values");
    rowset_t *rs = NULL;
    for (size_t i = 0; i < b->n_rowsets && !rs; i++)
        if (b->rowsets[i].stmt == stmt)
            rs = &b->rowsets[i];
    if (!rs) {
        b->rowsets = loom_xrealloc(b->rowsets, (b->n_rowsets + 1) * sizeof(*b->rowsets));
        rs = &b->rowsets[b->n_rowsets++];
        rs->stmt = stmt;
        rs->cols = loom_xcalloc((size_t)stmt->nparams, sizeof(*rs->cols));
        for (int k = 0; k < stmt->nparams; k++)
            loom_db_array_reset(&rs->cols[k]);
    }
    for (int k = 0; k < stmt->nparams; k++)
        loom_db_array_add(&rs->cols[k], values[k]);
    return 0;
}

static loom_db_array_t *evrows_cols(evrows_t *e, size_t i)
{
    loom_db_array_t *cols[] = {&e->stream, &e->version, &e->id,   &e->type,
                               &e->data,   &e->ray,     &e->cause};
    return cols[i];
}

static void evrows_reset(evrows_t *e)
{
    for (size_t i = 0; i < 7; i++)
        loom_db_array_reset(evrows_cols(e, i));
}

static void evrows_free(evrows_t *e)
{
    for (size_t i = 0; i < 7; i++)
        loom_db_array_free(evrows_cols(e, i));
}

static void evrows_add(evrows_t *e, const char *stream, int64_t version, const char *type,
                       const char *data, const char *ray, const char *cause)
{
    char id[LOOM_UUID_STRLEN + 1];
    loom_uuid_v7_string(id);
    loom_db_array_add(&e->stream, stream);
    loom_db_array_add_int(&e->version, version);
    loom_db_array_add(&e->id, id);
    loom_db_array_add(&e->type, type);
    loom_db_array_add(&e->data, data);
    loom_db_array_add(&e->ray, ray);
    loom_db_array_add(&e->cause, cause);
}

static void reset_attempt(batch_t *b)
{
    loom_arena_reset(&b->scratch);
    loom_db_array_t *arrs[] = {&b->ob_topic, &b->ob_key, &b->ob_headers, &b->ob_payload};
    for (size_t i = 0; i < sizeof(arrs) / sizeof(arrs[0]); i++)
        loom_db_array_reset(arrs[i]);
    evrows_reset(&b->ev);
    evrows_reset(&b->rel);
    for (size_t i = 0; i < b->n_rowsets; i++)
        for (int k = 0; k < b->rowsets[i].stmt->nparams; k++)
            loom_db_array_reset(&b->rowsets[i].cols[k]);
    b->n_streams = 0;
    for (size_t i = 0; i < b->n; i++) {
        json_decref(b->msgs[i].result);
        b->msgs[i].result = NULL;
    }
}

static const loom_db_stmt_t stmt_stream_version = {"loom_events_stream_version",
                                                   LOOM_SQL_STREAM_VERSION, 1, .plan_once = true};

int loom_emit(loom_msg_t *msg, const char *stream_id, int64_t expected_version, const char *type,
              json_t *data, loom_error_t *err)
{
    batch_t *b = msg->batch;
    if (!stream_id || !*stream_id || !type || !*type || !data) {
        json_decref(data);
        return loom_error_set(err, LOOM_CODE_INTERNAL,
                              "loom_emit needs a stream id, a type and data");
    }
    stream_ver_t *sv = NULL;
    for (size_t i = 0; i < b->n_streams; i++)
        if (strcmp(b->streams[i].stream, stream_id) == 0)
            sv = &b->streams[i];
    if (!sv) {
        if (b->n_streams == b->cap_streams) {
            b->cap_streams = b->cap_streams ? 2 * b->cap_streams : 16;
            b->streams = loom_xrealloc(b->streams, b->cap_streams * sizeof(*b->streams));
        }
        sv = &b->streams[b->n_streams++];
        memset(sv, 0, sizeof(*sv));
        sv->stream = loom_arena_strdup(&b->scratch, stream_id);
    }
    char *text = json_dumps(data, JSON_COMPACT | JSON_ENCODE_ANY);
    json_decref(data);
    if (expected_version < 0 && !sv->known) {
        /* A plain append: the INSERT numbers it after what the stream holds,
         * which saves a round trip per stream. */
        evrows_add(&b->rel, stream_id, ++sv->rel, type, text, msg->ce.rayid, msg->ce.id);
        free(text);
        return 0;
    }
    if (!sv->known) {
        const char *p[] = {stream_id};
        PGresult *res = NULL;
        int rc = loom_db_exec(b->db, &stmt_stream_version, p, &res, err);
        if (rc != 0) {
            free(text);
            return rc;
        }
        sv->version = strtoll(PQgetvalue(res, 0, 0), NULL, 10) + sv->rel;
        sv->known = true;
        PQclear(res);
    }
    if (expected_version >= 0 && expected_version != sv->version) {
        free(text);
        return loom_error_set(err, LOOM_CODE_VERSION_CONFLICT,
                              "stream \"%s\" is at version %" PRId64 ", not %" PRId64, stream_id,
                              sv->version, expected_version);
    }
    evrows_add(&b->ev, stream_id, ++sv->version, type, text, msg->ce.rayid, msg->ce.id);
    free(text);
    return 0;
}

int loom_publish(loom_msg_t *msg, const char *topic, const char *key, const char *type,
                 json_t *data, loom_error_t *err)
{
    batch_t *b = msg->batch;
    if (!topic || !*topic || !type || !*type || !data) {
        json_decref(data);
        return loom_error_set(err, LOOM_CODE_INTERNAL,
                              "loom_publish needs a topic, a type and data");
    }
    loom_ce_t ce;
    loom_ce_init(&ce, &b->scratch, b->site, b->node, type);
    ce.rayid = msg->ce.rayid;
    ce.causationid = msg->ce.id;
    ce.traceparent = msg->ce.traceparent;
    json_t *hdrs = json_object();
    const char *attrs[][2] = {
        {"ce_specversion", ce.specversion},
        {"ce_id", ce.id},
        {"ce_source", ce.source},
        {"ce_type", ce.type},
        {"ce_time", ce.time},
        {"ce_rayid", ce.rayid},
        {"ce_causationid", ce.causationid},
        {"ce_traceparent", ce.traceparent},
        {"content-type", "application/json"},
    };
    for (size_t i = 0; i < sizeof(attrs) / sizeof(attrs[0]); i++)
        if (attrs[i][1])
            json_object_set_new(hdrs, attrs[i][0], json_string(attrs[i][1]));
    char *htext = json_dumps(hdrs, JSON_COMPACT);
    char *payload = json_dumps(data, JSON_COMPACT | JSON_ENCODE_ANY);
    json_decref(hdrs);
    json_decref(data);
    char mapped[256];
    loom_topic_map(topic, mapped, sizeof(mapped));
    loom_db_array_add(&b->ob_topic, mapped);
    loom_db_array_add(&b->ob_key, key);
    loom_db_array_add(&b->ob_headers, htext);
    db_array_add_bytea(&b->ob_payload, payload, strlen(payload));
    free(htext);
    free(payload);
    return 0;
}

/* ---- applying ----------------------------------------------------------------- */

static const char *msg_id(loom_msg_t *m)
{
    /* Decoded, or usable by itself (loom_ce_decode keeps only such an id). */
    if (m->ce.id)
        return m->ce.id;
    if (!m->fallback_id[0])
        snprintf(m->fallback_id, sizeof(m->fallback_id), "kafka:%s:%" PRId32 ":%" PRId64,
                 rd_kafka_topic_name(m->rkm->rkt), m->rkm->partition, m->rkm->offset);
    return m->fallback_id;
}

/* A ray id for log lines: printable id characters only, so a hostile header
 * cannot forge log fields; "-" when there is none. */
static const char *msg_ray(const loom_msg_t *m)
{
    const char *r = m->decoded ? m->ce.rayid : NULL;
    size_t n = r ? strspn(r, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                             "._:/+=-")
                 : 0;
    return r && n > 0 && n <= 128 && r[n] == '\0' ? r : "-";
}

/* The W3C trace context (version-traceid-parentid-flags, lower-case hex), or
 * NULL when absent or malformed: only a well-formed one is stored and logged. */
static const char *msg_traceparent(const loom_msg_t *m)
{
    const char *t = m->decoded ? m->ce.traceparent : NULL;
    if (!t || strlen(t) != 55)
        return NULL;
    for (int i = 0; i < 55; i++) {
        bool dash = i == 2 || i == 35 || i == 52;
        if (dash ? t[i] != '-' : !strchr("0123456789abcdef", t[i]) || !t[i])
            return NULL;
    }
    return t;
}

/* The HTTP request that published the command (the gateway's extension
 * loomrequest, docs/console.md) as compact JSON for loom_commands.request, or
 * NULL. It comes from Kafka like the rest: anything but a small JSON object
 * of strings is left out, never failing the command (nor its batch: jsonb
 * takes every string jansson accepts). */
static char *msg_request(const loom_msg_t *m)
{
    if (!m->decoded)
        return NULL;
    for (size_t i = 0; i < m->ce.n_ext; i++) {
        if (strcmp(m->ce.ext[i].name, LOOM_CE_EXT_REQUEST) != 0)
            continue;
        const char *v = m->ce.ext[i].value;
        size_t len = v ? strlen(v) : 0;
        if (len == 0 || len > LOOM_CE_REQUEST_MAX)
            return NULL;
        json_t *o = json_loadb(v, len, JSON_REJECT_DUPLICATES, NULL);
        bool ok = json_is_object(o) && json_object_size(o) <= 8;
        const char *k;
        json_t *f;
        json_object_foreach(o, k, f)
        {
            ok = ok && json_is_string(f);
        }
        char *text = ok ? json_dumps(o, JSON_COMPACT) : NULL;
        json_decref(o);
        return text;
    }
    return NULL;
}

/* One index probe per id by construction (worker_int.h says how). */
static const loom_db_stmt_t stmt_dedup = {"loom_commands_dedup", LOOM_SQL_COMMANDS_DEDUP, 2,
                                          .plan_once = true};

/* A batch's loom_commands rows, one per column array. */
#define COMMANDS_INSERT                                                                           \
    "INSERT INTO loom_commands (consumer, message_id, type, stream_id, topic, kafka_partition, "  \
    "kafka_offset, status, attempts, result, ray_id, source, digest, traceparent, causation_id, " \
    "request) SELECT $1, u.m, u.t, u.s, $2, $3, u.o, 'applied', u.a, u.r::jsonb, u.ray, u.src, "  \
    "u.dg, u.tp, u.c, u.rq::jsonb FROM unnest($4::text[], $5::text[], $6::text[], $7::bigint[], " \
    "$8::int[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[], "    \
    "$15::text[]) AS u(m, t, s, o, a, r, ray, src, dg, tp, c, rq)"

static const loom_db_stmt_t stmt_commands_applied = {
    "loom_commands_applied",
    COMMANDS_INSERT
    " ON CONFLICT (consumer, message_id) DO UPDATE SET status = 'applied', "
    "attempts = greatest(loom_commands.attempts + 1, EXCLUDED.attempts), "
    "result = EXCLUDED.result, last_error = NULL, headers = NULL, payload = NULL, "
    "msg_key = NULL, source = EXCLUDED.source, digest = EXCLUDED.digest, "
    "kafka_partition = EXCLUDED.kafka_partition, kafka_offset = EXCLUDED.kafka_offset, "
    "traceparent = EXCLUDED.traceparent, updated_at = now() "
    "WHERE loom_commands.status = 'retrying' RETURNING message_id",
    15, .plan_once = true};

/* The same rows for a batch applied without the dedup probe: any row there
 * already fails the INSERT (unique violation), and the batch runs again with
 * the probe (apply_job says when). */
static const loom_db_stmt_t stmt_commands_new = {"loom_commands_new", COMMANDS_INSERT, 15,
                                                 .plan_once = true};

/* JSON travels as text[] and is cast per row: CockroachDB has no jsonb[]. */
static const loom_db_stmt_t stmt_events = {
    "loom_events_append",
    "INSERT INTO loom_events (stream_id, version, event_id, type, data, ray_id, causation_id) "
    "SELECT u.s, u.v, u.id, u.t, u.d::jsonb, u.ray, u.c FROM unnest($1::text[], $2::bigint[], "
    "$3::text[], $4::text[], $5::text[], $6::text[], $7::text[]) AS u(s, v, id, t, d, ray, c)",
    7, .plan_once = true};

/* Appends numbered after the stream's stored version (worker_int.h). */
static const loom_db_stmt_t stmt_events_append = {
    "loom_events_append_relative", LOOM_SQL_EVENTS_APPEND_RELATIVE, 7, .plan_once = true};

static const loom_db_stmt_t stmt_outbox = {
    "loom_outbox_add",
    "INSERT INTO loom_outbox (topic, msg_key, headers, payload) "
    "SELECT u.t, u.k, u.h::jsonb, u.p FROM unnest($1::text[], $2::text[], $3::text[], "
    "$4::bytea[]) AS u(t, k, h, p)",
    4, .plan_once = true};

typedef struct apply_arg {
    batch_t *b;
    size_t from, to;   /* messages [from, to) */
    size_t failed;     /* index of the message whose handler failed */
    loom_error_t herr; /* its error */
    bool handler_failed;
    bool in_handler; /* the failure came from a handler (transient ones too):
                      * a command's own trouble, not an outage; `failed` then
                      * says whose */
    int stop;        /* set with in_handler: the transaction runner does not
                      * run the batch again (the command's key backs off) */
    bool optimistic; /* no dedup probe: the loom_commands rows are inserted
                      * plainly, and go with the COMMIT (one round trip) */
    size_t found;    /* rows the dedup probe found handled already */
} apply_arg_t;

static int flush_rows(batch_t *b, size_t from, size_t to, bool optimistic, loom_error_t *err)
{
    worker_consumer_t *wc = b->wc;
    loom_db_array_t ids = {0}, types = {0}, streams = {0}, offs = {0}, atts = {0}, results = {0},
                    rays = {0}, srcs = {0}, digests = {0}, tps = {0}, causes = {0}, reqs = {0};
    loom_db_array_t *all[] = {&ids,  &types, &streams, &offs, &atts,   &results,
                              &rays, &srcs,  &digests, &tps,  &causes, &reqs};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        loom_db_array_reset(all[i]);
    size_t expected = 0;
    for (size_t i = from; i < to; i++) {
        loom_msg_t *m = &b->msgs[i];
        if (m->done)
            continue;
        expected++;
        loom_db_array_add(&ids, msg_id(m));
        loom_db_array_add(&types, m->ce.type);
        loom_db_array_add(&streams, m->ce.key);
        loom_db_array_add_int(&offs, m->rkm->offset);
        loom_db_array_add_int(&atts, m->attempt);
        char *r = m->result ? json_dumps(m->result, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
        loom_db_array_add(&results, r);
        free(r);
        loom_db_array_add(&rays, m->ce.rayid);
        loom_db_array_add(&srcs, m->ce.source);
        loom_db_array_add(&digests, m->digest);
        loom_db_array_add(&tps, msg_traceparent(m));
        loom_db_array_add(&causes, m->ce.causationid);
        char *rq = msg_request(m);
        loom_db_array_add(&reqs, rq);
        free(rq);
    }
    int rc = 0;
    /* Everything but the loom_commands INSERT is deferred: they all go to
     * the server with it, in one pipeline. The handlers' rows first. */
    for (size_t i = 0; i < b->n_rowsets && rc == 0; i++) {
        rowset_t *rs = &b->rowsets[i];
        if (rs->cols[0].count == 0)
            continue;
        const char **p = loom_xcalloc((size_t)rs->stmt->nparams, sizeof(*p));
        for (int k = 0; k < rs->stmt->nparams; k++)
            p[k] = loom_db_array_str(&rs->cols[k]);
        rc = loom_db_exec_deferred(b->db, rs->stmt, p, err);
        free(p);
    }
    /* Relative appends first: the versions given out after them count them. */
    evrows_t *sets[] = {&b->rel, &b->ev};
    const loom_db_stmt_t *stmts[] = {&stmt_events_append, &stmt_events};
    for (size_t k = 0; k < 2 && rc == 0; k++) {
        evrows_t *e = sets[k];
        if (e->stream.count == 0)
            continue;
        const char *p[7];
        for (size_t i = 0; i < 7; i++)
            p[i] = loom_db_array_str(evrows_cols(e, i));
        rc = loom_db_exec_deferred(b->db, stmts[k], p, err);
    }
    if (rc == 0 && b->ob_topic.count > 0) {
        const char *p[] = {loom_db_array_str(&b->ob_topic), loom_db_array_str(&b->ob_key),
                           loom_db_array_str(&b->ob_headers), loom_db_array_str(&b->ob_payload)};
        rc = loom_db_exec_deferred(b->db, &stmt_outbox, p, err);
    }
    if (rc == 0 && expected > 0) {
        char part[16];
        snprintf(part, sizeof(part), "%" PRId32, b->msgs[from].rkm->partition);
        const char *p[] = {wc->def->name,
                           rd_kafka_topic_name(b->msgs[from].rkm->rkt),
                           part,
                           loom_db_array_str(&ids),
                           loom_db_array_str(&types),
                           loom_db_array_str(&streams),
                           loom_db_array_str(&offs),
                           loom_db_array_str(&atts),
                           loom_db_array_str(&results),
                           loom_db_array_str(&rays),
                           loom_db_array_str(&srcs),
                           loom_db_array_str(&digests),
                           loom_db_array_str(&tps),
                           loom_db_array_str(&causes),
                           loom_db_array_str(&reqs)};
        PGresult *res = NULL;
        if (optimistic) {
            /* Sent with the COMMIT: a row that exists fails the transaction. */
            rc = loom_db_exec_deferred(b->db, &stmt_commands_new, p, err);
        } else {
            rc = loom_db_exec(b->db, &stmt_commands_applied, p, &res, err);
            if (rc == 0 && (size_t)PQntuples(res) != expected)
                /* Another worker applied one of these meanwhile (a rebalance):
                 * undo ours; the retry finds its row and skips it. */
                rc = loom_error_set(err, LOOM_CODE_SERIALIZATION_FAILURE,
                                    "%zu of %zu commands were applied concurrently",
                                    expected - (size_t)PQntuples(res), expected);
            PQclear(res);
        }
    }
    /* Another writer took a version we counted on: run the batch again. */
    if (rc != 0 && loom_error_is(err, LOOM_CODE_ALREADY_EXISTS) &&
        strcmp(err->constraint, "loom_events_pkey") == 0) {
        char why[LOOM_ERROR_MESSAGE_MAX];
        snprintf(why, sizeof(why), "%s", err->message);
        rc = loom_error_set(err, LOOM_CODE_SERIALIZATION_FAILURE,
                            "event stream written concurrently: %s", why);
    }
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        loom_db_array_free(all[i]);
    return rc;
}

/*
 * A message whose id is taken already. CloudEvents makes producers keep
 * source + id unique, so the same id with the same type and data is a resend
 * (skipped). With another type or data it is a different command reusing the
 * id: it is not applied, and is recorded as a conflict. The source is not
 * compared: Loom's gateway stamps its node into the source, and a retry of
 * one write through another gateway is the same command.
 */
static void dedup_mark(batch_t *b, loom_msg_t *m, const char *digest, const char *type,
                       const char *source, const char *status)
{
    m->done = true;
    if (!digest || strcmp(digest, m->digest) == 0)
        return;
    m->conflict = loom_arena_sprintf(
        &b->arena,
        "id already used by another command (%s, type %s, source %s) with another type or data; "
        "this one (type %s, source %s) was not applied",
        status, type ? type : "unknown", source ? source : "unknown",
        m->ce.type ? m->ce.type : "unknown", m->ce.source ? m->ce.source : "unknown");
}

/* Marks the messages of [a->from, a->to) that loom_commands holds as
 * handled already (applied, rejected, parked, expired): one index probe per
 * id (worker_int.h says how). */
static int dedup_probe(batch_t *b, apply_arg_t *a, loom_error_t *err)
{
    loom_db_array_t ids = {0};
    loom_db_array_reset(&ids);
    for (size_t i = a->from; i < a->to; i++)
        if (!b->msgs[i].skip)
            loom_db_array_add(&ids, msg_id(&b->msgs[i]));
    const char *p[] = {b->wc->def->name, loom_db_array_str(&ids)};
    PGresult *res = NULL;
    int rc = loom_db_exec(b->db, &stmt_dedup, p, &res, err);
    loom_db_array_free(&ids);
    if (rc != 0)
        return rc;
    a->found = (size_t)PQntuples(res);
    for (int r = 0; r < PQntuples(res); r++)
        for (size_t i = a->from; i < a->to; i++)
            if (!b->msgs[i].skip && strcmp(PQgetvalue(res, r, 0), msg_id(&b->msgs[i])) == 0)
                dedup_mark(b, &b->msgs[i], PQgetisnull(res, r, 1) ? NULL : PQgetvalue(res, r, 1),
                           PQgetvalue(res, r, 2),
                           PQgetisnull(res, r, 3) ? NULL : PQgetvalue(res, r, 3),
                           PQgetvalue(res, r, 4));
    PQclear(res);
    return 0;
}

static int apply_body(loom_db_t *db, void *arg, loom_error_t *err)
{
    apply_arg_t *a = arg;
    batch_t *b = a->b;
    worker_consumer_t *wc = b->wc;
    b->db = db;
    reset_attempt(b);
    a->handler_failed = false;
    a->in_handler = false;
    a->stop = 0;

    /* Dedup: which of these were handled already? Not asked on the
     * optimistic path: there a row that exists fails the transaction. */
    a->found = 0;
    for (size_t i = a->from; i < a->to; i++) {
        b->msgs[i].done = b->msgs[i].skip;
        b->msgs[i].conflict = NULL;
    }
    int rc = a->optimistic ? 0 : dedup_probe(b, a, err);
    if (rc != 0)
        return rc;
    /* The same command twice in one batch (a producer retry, a replay): the
     * first copy is applied, the others are skipped (or are conflicts). */
    for (size_t i = a->from; i < a->to; i++)
        for (size_t j = a->from; j < i && !b->msgs[i].done; j++)
            if (!b->msgs[j].skip && strcmp(msg_id(&b->msgs[i]), msg_id(&b->msgs[j])) == 0)
                dedup_mark(b, &b->msgs[i], b->msgs[j].digest, b->msgs[j].ce.type,
                           b->msgs[j].ce.source, "in the same batch");

    for (size_t i = a->from; i < a->to; i++) {
        loom_msg_t *m = &b->msgs[i];
        if (m->done)
            continue;
        if (!m->decoded) {
            a->failed = i;
            a->herr = m->decode_err;
            a->handler_failed = true;
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "%s", m->decode_err.message);
        }
        loom_error_t herr;
        loom_error_clear(&herr);
        rc = wc->def->handler ? wc->def->handler(m, &herr)
                              : loom_msg_dispatch(m, wc->def->commands,
                                                  loom_commands_count(wc->def->commands), &herr);
        if (rc != 0) {
            if (!herr.code)
                loom_error_set(&herr, LOOM_CODE_INTERNAL, "handler failed: %s", loom_strerror(rc));
            a->in_handler = true;
            a->failed = i;
            a->stop = 1;
            /* Database trouble inside the handler is the engine's to retry. */
            if (!loom_db_error_is_transient(&herr)) {
                a->failed = i;
                a->herr = herr;
                a->handler_failed = true;
            }
            if (err)
                *err = herr;
            return rc;
        }
    }
    rc = flush_rows(b, a->from, a->to, a->optimistic, err);
    if (rc != 0 && err && !loom_db_error_is_transient(err)) {
        /* A batch statement refused a row (a handler's row, an event): the
         * batch is isolated message by message to find whose. */
        a->failed = a->from;
        a->herr = *err;
        a->handler_failed = true;
    }
    return rc;
}

/* ---- recording failures ------------------------------------------------------- */

static const loom_db_stmt_t stmt_record = {
    "loom_commands_record",
    "INSERT INTO loom_commands (consumer, message_id, type, stream_id, topic, kafka_partition, "
    "kafka_offset, status, attempts, last_error, ray_id, headers, payload, source, digest, "
    "msg_key, conflict_of, causation_id, request) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 1, $9, $10, $11::jsonb, $12::bytea, $13, $14, "
    "$15::bytea, $16, $17, $18::jsonb) "
    "ON CONFLICT (consumer, message_id) DO UPDATE SET status = EXCLUDED.status, "
    "attempts = loom_commands.attempts + 1, last_error = EXCLUDED.last_error, "
    "headers = EXCLUDED.headers, payload = EXCLUDED.payload, msg_key = EXCLUDED.msg_key, "
    "source = EXCLUDED.source, digest = EXCLUDED.digest, updated_at = now() "
    "WHERE loom_commands.status = 'retrying'",
    18};

/* The headers as a JSON object for loom_commands.headers (and `loom commands
 * replay`): a value that is UTF-8 text without NUL as a string, any other as
 * {"hex": "..."} so that jsonb takes it and no byte is lost. A name that is
 * not UTF-8 is escaped (\xNN). */
static char *headers_json(rd_kafka_message_t *rkm)
{
    json_t *o = json_object();
    rd_kafka_headers_t *hdrs = NULL;
    if (rd_kafka_message_headers(rkm, &hdrs) == RD_KAFKA_RESP_ERR_NO_ERROR) {
        const char *name;
        const void *val;
        size_t len;
        for (size_t i = 0; rd_kafka_header_get_all(hdrs, i, &name, &val, &len) == 0; i++) {
            json_t *v;
            if (!val)
                v = json_null();
            else if (loom_text_valid(val, len))
                v = json_stringn(val, len);
            else {
                char *hex = bytea_hex(val, len);
                v = json_pack("{s:s}", "hex", hex + 2);
                free(hex);
            }
            char *safe = loom_text_escape(name, strlen(name), 0);
            json_object_set_new(o, safe, v);
            free(safe);
        }
    }
    char *text = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    return text;
}

typedef struct record_arg {
    batch_t *b;
    loom_msg_t *m;
    const char *status;
    const char *error;
    bool safe; /* the fallback form: only the Kafka position and raw bytes */
} record_arg_t;

static int record_body(loom_db_t *db, void *arg, loom_error_t *err)
{
    record_arg_t *r = arg;
    loom_msg_t *m = r->m;
    bool conflict = strcmp(r->status, "conflict") == 0;
    char part[16], off[32], cid[LOOM_CE_ID_MAX + 400];
    snprintf(part, sizeof(part), "%" PRId32, m->rkm->partition);
    snprintf(off, sizeof(off), "%" PRId64, m->rkm->offset);
    const char *id = msg_id(m);
    if (r->safe) {
        id = m->fallback_id;
        if (!id[0]) {
            snprintf(m->fallback_id, sizeof(m->fallback_id), "kafka:%s:%" PRId32 ":%" PRId64,
                     rd_kafka_topic_name(m->rkm->rkt), m->rkm->partition, m->rkm->offset);
        }
    } else if (conflict) {
        /* Its own row, next to the command that holds the id. */
        snprintf(cid, sizeof(cid), "%s (conflict at %s:%" PRId32 ":%" PRId64 ")", id,
                 rd_kafka_topic_name(m->rkm->rkt), m->rkm->partition, m->rkm->offset);
        id = cid;
    }
    char *hdrs = r->safe ? NULL : headers_json(m->rkm);
    char *bytea = bytea_hex(m->rkm->payload ? m->rkm->payload : "", m->rkm->len);
    char *key = m->rkm->key ? bytea_hex(m->rkm->key, m->rkm->key_len) : NULL;
    char *error = loom_text_escape(r->error, strlen(r->error), 4000);
    char *request = r->safe ? NULL : msg_request(m);
    const char *p[] = {r->b->wc->def->name,
                       id,
                       !r->safe && m->ce.type ? m->ce.type : "unknown",
                       !r->safe && m->decoded ? m->ce.key : NULL,
                       rd_kafka_topic_name(m->rkm->rkt),
                       part,
                       off,
                       r->status,
                       error,
                       !r->safe && m->decoded ? m->ce.rayid : NULL,
                       hdrs,
                       bytea,
                       r->safe ? NULL : m->ce.source,
                       m->digest,
                       key,
                       conflict && !r->safe ? msg_id(m) : NULL,
                       !r->safe && m->decoded ? m->ce.causationid : NULL,
                       request};
    int rc = loom_db_exec(db, &stmt_record, p, NULL, err);
    free(request);
    free(hdrs);
    free(bytea);
    free(key);
    free(error);
    return rc;
}

/*
 * Records a message's outcome. When the row cannot be written as it is (the
 * database refuses a value for good), it is written in a safe form: under
 * its Kafka position, with the raw payload and key and the reason. Returns 0,
 * or an error when not even that could be written: the caller must then not
 * move past the message.
 */
static int record(batch_t *b, loom_msg_t *m, const char *status, const char *error)
{
    record_arg_t r = {b, m, status, error, false};
    loom_error_t err;
    loom_tx_opts_t o = {.max_attempts = 2};
    int rc = loom_tx_run(b->wc->w->opts.pool, &o, record_body, &r, &err);
    if (rc == 0)
        return 0;
    if (!loom_db_error_is_transient(&err)) {
        char *why =
            loom_arena_sprintf(&b->arena, "%s (recorded in safe form: %s)", error, err.message);
        record_arg_t safe = {b, m, status, why, true};
        loom_tx_opts_t o2 = {.max_attempts = 2};
        char *text = loom_text_escape(why, strlen(why), 1000);
        rc = loom_tx_run(b->wc->w->opts.pool, &o2, record_body, &safe, &err);
        if (rc == 0)
            LOOM_WARN("command recorded in safe form, under its Kafka position",
                      "consumer=%s message_id=%s status=%s error=%s", b->wc->def->name,
                      m->fallback_id, status, text);
        free(text);
        if (rc == 0)
            return 0;
    }
    char *id = loom_text_escape(msg_id(m), strlen(msg_id(m)), 200);
    LOOM_ERROR("could not record a command's outcome: its key waits",
               "consumer=%s topic=%s partition=%d offset=%lld message_id=%s ray_id=%s status=%s "
               "error=%s",
               b->wc->def->name, rd_kafka_topic_name(m->rkm->rkt), (int)m->rkm->partition,
               (long long)m->rkm->offset, id, msg_ray(m), status, err.message);
    free(id);
    return LOOM_EDB;
}

/* ---- metrics ------------------------------------------------------------------------ */

static void count(worker_consumer_t *wc, const char *topic, const char *outcome, long long n)
{
    for (int i = 0; i < OUT_N && n > 0; i++)
        if (strcmp(loom__outcome_names[i], outcome) == 0)
            atomic_fetch_add_explicit(&wc->outcomes[i], n, memory_order_relaxed);
    if (n <= 0 || !wc->w->m_messages)
        return;
    const char *labels[] = {wc->def->name, topic, outcome};
    loom_metrics_counter_add(wc->w->m_messages, labels, (double)n);
}

/* ---- partitions ------------------------------------------------------------------- */

typedef struct part_state {
    char topic[256];
    int32_t partition;
    keyq_t q;  /* commands fetched and not yet committed, by key */
    int jobs;  /* batches of it in flight */
    bool held; /* the whole partition waits: the database is unavailable */
    int64_t held_until;
    int hold_attempts;
    bool fetch_paused;     /* over max_pending: fetching paused */
    int64_t commit_offset; /* next offset to commit (all before it finished); -1 none */
    int64_t committed;     /* what the group coordinator confirmed; -1 unknown */
    bool committed_asked;  /* committed was asked for (-1 then: none, start of log) */
    int64_t sent;          /* last offset sent in an asynchronous commit */
    int64_t sent_ms;       /* and when (mono ms) */
    int64_t last_msg_ms;
    bool stalled;
    int repairs;         /* stall repairs tried since it last moved */
    int64_t repaired_ms; /* when the first was (mono ms) */
    struct job *waiting; /* its last batch handed out, until it lands (it may have started) */
    bool optimistic;     /* its batches skip the dedup probe (apply_job); off when it
                          * is assigned and after a batch met a command handled already */
} part_state_t;

/* ---- apply threads ------------------------------------------------------------------ */

enum { OUT_RETURN, OUT_DONE, OUT_RETRY };

/*
 * One batch of a partition, applied on an apply thread. The consumer's thread
 * fills the messages (commands whose keys are free, from keyq) and reads the
 * outcome of each when the job comes back: done (applied, skipped, rejected,
 * parked, expired, a conflict), retry (failed: its key waits retry_ms), or
 * return (not tried: another command of its key failed first).
 */
typedef struct job {
    struct consumer_rt *rt;
    part_state_t *ps;
    size_t n;
    rd_kafka_message_t **msgs;
    int *attempt;        /* in: 1 on the first try */
    int64_t *first_fail; /* in: mono ms of its first failure; 0: none */
    uint8_t *out;        /* out: OUT_* */
    int64_t *retry_ms;   /* out: the backoff of a retried one */
    bool hold_partition; /* out: a failure no command caused (the database is down) */
    char why[256];       /* out: why, for the log */
    size_t cap;          /* messages its arrays have room for */
    bool started;        /* an apply thread took it (pool mutex) */
    bool alone;          /* holds a command that failed before: nothing joins it */
    bool optimistic;     /* in: try it without the dedup probe first */
    bool met_handled;    /* out: it met a command handled already */
    bool probed_clean;   /* out: applied after a dedup probe that found none */
    struct job *next;
} job_t;

typedef struct apply_pool {
    pthread_t *threads;
    int n_threads;
    pthread_mutex_t mu;
    pthread_cond_t work, done;
    job_t *todo, *todo_tail;  /* waiting for a thread, in order */
    job_t *finished;          /* back from the threads */
    size_t queued, in_flight; /* jobs submitted and not collected */
    bool quit;
    rd_kafka_queue_t *wake; /* yielded when a job is done, so the loop sees it */
} apply_pool_t;

typedef struct consumer_rt {
    worker_consumer_t *wc;
    rd_kafka_t *rk;
    part_state_t **parts;
    size_t n_parts, cap_parts;
    bool commit_failing; /* the last offset commit failed (logged once) */
    int stall_cursor;    /* where the next stall check starts asking the broker */
    apply_pool_t pool;
    size_t batch_size;
    int key_concurrency;
    size_t max_pending;
    int64_t max_pending_bytes; /* of all its partitions together */
    size_t rr;                 /* where the next round of scheduling starts */
    bool rejoin;               /* a stall repair asks to leave and rejoin the group */
} consumer_rt_t;

static void job_run(job_t *job);

static void *apply_thread(void *arg)
{
    apply_pool_t *ap = arg;
    pthread_mutex_lock(&ap->mu);
    for (;;) {
        while (!ap->quit && !ap->todo)
            pthread_cond_wait(&ap->work, &ap->mu);
        if (!ap->todo)
            break;
        job_t *job = ap->todo;
        ap->todo = job->next;
        if (!ap->todo)
            ap->todo_tail = NULL;
        ap->queued--;
        job->started = true;
        pthread_mutex_unlock(&ap->mu);
        job_run(job);
        pthread_mutex_lock(&ap->mu);
        job->next = ap->finished;
        ap->finished = job;
        pthread_cond_broadcast(&ap->done);
        if (ap->wake)
            rd_kafka_queue_yield(ap->wake);
    }
    pthread_mutex_unlock(&ap->mu);
    return NULL;
}

static void apply_pool_start(apply_pool_t *ap, const char *name, int n, rd_kafka_queue_t *wake)
{
    memset(ap, 0, sizeof(*ap));
    ap->wake = wake;
    pthread_mutex_init(&ap->mu, NULL);
    pthread_cond_init(&ap->work, NULL);
    pthread_cond_init(&ap->done, NULL);
    ap->threads = loom_xcalloc((size_t)(n > 0 ? n : 1), sizeof(pthread_t));
    for (int i = 0; i < (n > 0 ? n : 1); i++) {
        if (pthread_create(&ap->threads[ap->n_threads], NULL, apply_thread, ap) != 0) {
            LOOM_WARN("could not start an apply thread", "consumer=%s threads=%d", name,
                      ap->n_threads);
            break;
        }
        ap->n_threads++;
    }
}

static void apply_pool_submit(apply_pool_t *ap, job_t *job)
{
    pthread_mutex_lock(&ap->mu);
    job->next = NULL;
    if (ap->todo_tail)
        ap->todo_tail->next = job;
    else
        ap->todo = job;
    ap->todo_tail = job;
    ap->queued++;
    ap->in_flight++;
    pthread_cond_signal(&ap->work);
    pthread_mutex_unlock(&ap->mu);
}

/* The jobs that came back (a list), waiting up to wait_ms for one when some
 * are in flight and none is back yet. */
static job_t *apply_pool_collect(apply_pool_t *ap, int64_t wait_ms)
{
    pthread_mutex_lock(&ap->mu);
    if (!ap->finished && ap->in_flight > 0 && wait_ms > 0) {
        struct timespec ts;
        loom_timespec_in(wait_ms, &ts);
        pthread_cond_timedwait(&ap->done, &ap->mu, &ts);
    }
    job_t *list = ap->finished;
    ap->finished = NULL;
    for (job_t *j = list; j; j = j->next)
        ap->in_flight--;
    pthread_mutex_unlock(&ap->mu);
    return list;
}

/* Stops the threads once every job queued ran. */
static void apply_pool_stop(apply_pool_t *ap)
{
    pthread_mutex_lock(&ap->mu);
    ap->quit = true;
    pthread_cond_broadcast(&ap->work);
    pthread_mutex_unlock(&ap->mu);
    for (int i = 0; i < ap->n_threads; i++)
        pthread_join(ap->threads[i], NULL);
    free(ap->threads);
    pthread_mutex_destroy(&ap->mu);
    pthread_cond_destroy(&ap->work);
    pthread_cond_destroy(&ap->done);
}

/* Bytes of the messages this consumer thread holds between fetch and commit.
 * A consumer's messages are pushed and destroyed on its own thread only (the
 * rebalance callback runs inside its poll), so a thread-local counts them. */
static _Thread_local int64_t held_bytes;

/* What a fetched message costs while held: its key and value, and
 * librdkafka's records of it (about 1 KiB more a message, by heap profile). */
static int64_t msg_cost(const rd_kafka_message_t *m)
{
    return (int64_t)m->len + (int64_t)m->key_len + 1024;
}

static void msg_destroy(void *m)
{
    held_bytes -= msg_cost(m);
    rd_kafka_message_destroy(m);
}

static part_state_t *part_find(consumer_rt_t *rt, const char *topic, int32_t partition)
{
    for (size_t i = 0; i < rt->n_parts; i++)
        if (rt->parts[i]->partition == partition && strcmp(rt->parts[i]->topic, topic) == 0)
            return rt->parts[i];
    return NULL;
}

static part_state_t *part_get(consumer_rt_t *rt, const char *topic, int32_t partition)
{
    part_state_t *found = part_find(rt, topic, partition);
    if (found)
        return found;
    if (rt->n_parts == rt->cap_parts) {
        rt->cap_parts = rt->cap_parts ? 2 * rt->cap_parts : 32;
        rt->parts = loom_xrealloc(rt->parts, rt->cap_parts * sizeof(*rt->parts));
    }
    part_state_t *ps = loom_xcalloc(1, sizeof(*ps));
    rt->parts[rt->n_parts++] = ps;
    snprintf(ps->topic, sizeof(ps->topic), "%s", topic);
    ps->partition = partition;
    kq_init(&ps->q);
    ps->commit_offset = -1;
    ps->committed = -1;
    ps->sent = -1;
    ps->last_msg_ms = loom_mono_ms();
    return ps;
}

/* Forgets a partition (no job of it may be in flight); the messages it
 * still tracks are dropped: the next owner gets them again. */
static void part_remove(consumer_rt_t *rt, const char *topic, int32_t partition)
{
    for (size_t i = 0; i < rt->n_parts; i++) {
        part_state_t *ps = rt->parts[i];
        if (ps->partition != partition || strcmp(ps->topic, topic) != 0)
            continue;
        kq_free(&ps->q, msg_destroy);
        free(ps);
        rt->parts[i] = rt->parts[--rt->n_parts];
        return;
    }
}

/* Records what the coordinator confirmed; a partition whose commit failed
 * is sent again by the next commit_offsets(). */
static void commit_result(consumer_rt_t *rt, rd_kafka_resp_err_t e,
                          const rd_kafka_topic_partition_list_t *l)
{
    rd_kafka_resp_err_t first = e;
    for (int i = 0; l && i < l->cnt; i++) {
        const rd_kafka_topic_partition_t *tp = &l->elems[i];
        if (!e && !tp->err) {
            part_state_t *ps = part_find(rt, tp->topic, tp->partition);
            if (ps && tp->offset > ps->committed)
                ps->committed = tp->offset;
        } else if (!first) {
            first = tp->err;
        }
    }
    if (first == RD_KAFKA_RESP_ERR__NO_OFFSET)
        return;
    if (first && !rt->commit_failing) {
        LOOM_WARN("could not commit offsets; will try again", "consumer=%s error=%s",
                  rt->wc->def->name, rd_kafka_err2str(first));
        rt->commit_failing = true;
    } else if (first) {
        LOOM_DEBUG("could not commit offsets", "consumer=%s error=%s", rt->wc->def->name,
                   rd_kafka_err2str(first));
    } else if (rt->commit_failing) {
        LOOM_INFO("offsets committed again", "consumer=%s", rt->wc->def->name);
        rt->commit_failing = false;
    }
}

static void offset_commit_cb(rd_kafka_t *rk, rd_kafka_resp_err_t e,
                             rd_kafka_topic_partition_list_t *offsets, void *opaque)
{
    (void)rk;
    commit_result(opaque, e, offsets);
}

/* The finished offsets the coordinator has not confirmed (a new list). An
 * asynchronous commit sent less than a second ago may still be answered:
 * with `all` false, it is not sent again yet. */
static rd_kafka_topic_partition_list_t *unconfirmed_offsets(consumer_rt_t *rt, bool all)
{
    int64_t now = loom_mono_ms();
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new((int)rt->n_parts + 1);
    for (size_t i = 0; i < rt->n_parts; i++) {
        part_state_t *ps = rt->parts[i];
        if (ps->commit_offset < 0 || ps->commit_offset <= ps->committed)
            continue;
        if (!all && ps->sent == ps->commit_offset && now - ps->sent_ms < 1000)
            continue;
        rd_kafka_topic_partition_list_add(l, ps->topic, ps->partition)->offset = ps->commit_offset;
        ps->sent = ps->commit_offset;
        ps->sent_ms = now;
    }
    return l;
}

/* How often a flowing consumer commits its offsets (a stop, a rebalance and
 * a revoke commit at once). */
#define COMMIT_EVERY_MS 100

/* How long a revoke (and so a stop) waits for its offsets' commit. A
 * coordinator that just died may not answer for a long time, and
 * rd_kafka_commit() would wait for it with the partitions' hand-over and the
 * worker's shutdown held behind it. What is not confirmed in time is
 * delivered again to the next owner, whose loom_commands rows skip it. */
#define COMMIT_SYNC_MS 10000

typedef struct sync_commit {
    consumer_rt_t *rt;
    bool done;
} sync_commit_t;

static void sync_commit_cb(rd_kafka_t *rk, rd_kafka_resp_err_t e,
                           rd_kafka_topic_partition_list_t *offsets, void *opaque)
{
    (void)rk;
    sync_commit_t *sc = opaque;
    commit_result(sc->rt, e, offsets);
    sc->done = true;
}

/* Commits every partition's finished offset the coordinator has not
 * confirmed; a synchronous commit (revoke) sends all of them and waits for
 * the answer up to COMMIT_SYNC_MS. */
static void commit_offsets(consumer_rt_t *rt, bool sync)
{
    rd_kafka_topic_partition_list_t *l = unconfirmed_offsets(rt, sync);
    if (l->cnt > 0 && !sync) {
        rd_kafka_resp_err_t e = rd_kafka_commit(rt->rk, l, 1);
        if (e)
            commit_result(rt, e, l);
    } else if (l->cnt > 0) {
        /* The answer comes on a queue of its own, served here only: past
         * the wait nobody serves it, and the callback never runs. */
        rd_kafka_queue_t *q = rd_kafka_queue_new(rt->rk);
        sync_commit_t sc = {rt, false};
        rd_kafka_resp_err_t e = rd_kafka_commit_queue(rt->rk, l, q, sync_commit_cb, &sc);
        if (e) {
            commit_result(rt, e, l);
        } else {
            int64_t end = loom_mono_ms() + COMMIT_SYNC_MS;
            while (!sc.done && loom_mono_ms() < end)
                rd_kafka_queue_poll_callback(q, 100);
            if (!sc.done)
                LOOM_WARN("offsets not confirmed in time; the next owner skips what was applied",
                          "consumer=%s partitions=%d wait_ms=%d", rt->wc->def->name, l->cnt,
                          COMMIT_SYNC_MS);
        }
        rd_kafka_queue_destroy(q);
    }
    rd_kafka_topic_partition_list_destroy(l);
}

/* Pauses or resumes fetching a partition. */
static void part_fetch(consumer_rt_t *rt, part_state_t *ps, bool on)
{
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(l, ps->topic, ps->partition);
    if (on)
        rd_kafka_resume_partitions(rt->rk, l);
    else
        rd_kafka_pause_partitions(rt->rk, l);
    rd_kafka_topic_partition_list_destroy(l);
    ps->fetch_paused = !on;
}

static bool is_permanent(const loom_error_t *e)
{
    switch (e->cls) {
    case LOOM_ERR_BAD_REQUEST:
    case LOOM_ERR_UNAUTHORIZED:
    case LOOM_ERR_FORBIDDEN:
    case LOOM_ERR_NOT_FOUND:
    case LOOM_ERR_CONFLICT:
    case LOOM_ERR_TOO_LARGE:
        return !e->retriable;
    default:
        return false;
    }
}

/* One debug line per command applied or skipped, with its ray id and trace
 * context, so a request can be followed into the worker's log. */
static void log_applied(batch_t *b, size_t from, size_t to)
{
    if (loom_log_level > LOOM_LOG_DEBUG)
        return;
    for (size_t i = from; i < to; i++) {
        loom_msg_t *m = &b->msgs[i];
        if (m->skip)
            continue;
        const char *tp = msg_traceparent(m);
        LOOM_DEBUG(m->done ? "command skipped: already handled" : "command applied",
                   "consumer=%s topic=%s partition=%d offset=%lld message_id=%s ray_id=%s "
                   "traceparent=%s",
                   b->wc->def->name, rd_kafka_topic_name(m->rkm->rkt), (int)m->rkm->partition,
                   (long long)m->rkm->offset, msg_id(m), msg_ray(m), tp ? tp : "-");
    }
}

/* A failure no command caused: the database cannot be reached or is shutting
 * down. The whole partition waits, and no command's attempt is counted. */
static bool is_outage(const loom_error_t *e)
{
    return loom_error_is(e, LOOM_CODE_DB_UNAVAILABLE) || loom_error_is(e, LOOM_CODE_SHUTTING_DOWN);
}

/* ---- outcomes (on the apply thread) ------------------------------------------------- */

/* The message failed transiently: it goes back with a backoff for its key,
 * or is parked when it has been failing for LOOM_WORKER_PARK_AFTER. */
static void failed(job_t *job, batch_t *b, size_t i, const loom_error_t *why)
{
    worker_consumer_t *wc = job->rt->wc;
    loom_worker_t *w = wc->w;
    loom_msg_t *m = &b->msgs[i];
    int64_t now = loom_mono_ms();
    char *id = loom_text_escape(msg_id(m), strlen(msg_id(m)), 200);
    char *text = loom_text_escape(why->message, strlen(why->message), 1000);
    if (w->opts.park_after_ms > 0 && job->first_fail[i] > 0 &&
        now - job->first_fail[i] >= w->opts.park_after_ms) {
        char *reason = loom_arena_sprintf(
            &b->arena, "parked after failing for %lld ms (LOOM_WORKER_PARK_AFTER): %s",
            (long long)(now - job->first_fail[i]), why->message);
        if (record(b, m, "parked", reason) == 0) {
            job->out[i] = OUT_DONE;
            atomic_fetch_add(&w->parked, 1);
            count(wc, job->ps->topic, "parked", 1);
            LOOM_WARN("command parked: it kept failing; `loom commands replay` sends it again",
                      "consumer=%s topic=%s partition=%d offset=%lld message_id=%s ray_id=%s "
                      "attempts=%d error=%s",
                      wc->def->name, job->ps->topic, (int)job->ps->partition,
                      (long long)m->rkm->offset, id, msg_ray(m), m->attempt, text);
            free(id);
            free(text);
            return;
        }
    }
    record(b, m, "retrying", why->message);
    job->out[i] = OUT_RETRY;
    job->retry_ms[i] = loom_backoff_ms(m->attempt - 1, w->opts.retry_base_ms, w->opts.retry_max_ms);
    atomic_fetch_add(&w->retries, 1);
    count(wc, job->ps->topic, "retried", 1);
    LOOM_WARN("command failed, will retry; only its key waits",
              "consumer=%s topic=%s partition=%d offset=%lld message_id=%s ray_id=%s attempt=%d "
              "retry_in_ms=%lld error=%s",
              wc->def->name, job->ps->topic, (int)job->ps->partition, (long long)m->rkm->offset, id,
              msg_ray(m), m->attempt, (long long)job->retry_ms[i], text);
    free(id);
    free(text);
}

/* A message whose outcome could not be recorded: its offset is not
 * committed, and it is tried again after the backoff (its key waits).
 * record() logged why, at error level. */
static void unrecorded(job_t *job, batch_t *b, size_t i, const char *status)
{
    count(job->rt->wc, job->ps->topic, "unrecorded", 1);
    char why[200];
    snprintf(why, sizeof(why),
             "its outcome (%s) could not be recorded; its key waits: see the error log", status);
    /* Not parked: an outcome that cannot be written cannot be parked either. */
    record(b, &b->msgs[i], "retrying", why);
    job->out[i] = OUT_RETRY;
    job->retry_ms[i] = loom_backoff_ms(b->msgs[i].attempt - 1, job->rt->wc->w->opts.retry_base_ms,
                                       job->rt->wc->w->opts.retry_max_ms);
}

/* After msgs [from, to) were applied (or skipped) in a committed
 * transaction: records the conflicts among them and counts them. */
static void applied_ok(job_t *job, batch_t *b, size_t from, size_t to)
{
    worker_consumer_t *wc = job->rt->wc;
    loom_worker_t *w = wc->w;
    for (size_t i = from; i < to; i++) {
        loom_msg_t *m = &b->msgs[i];
        if (m->skip)
            continue; /* expired: its outcome is set */
        if (m->conflict) {
            if (record(b, m, "conflict", m->conflict) != 0) {
                unrecorded(job, b, i, "conflict");
                continue;
            }
            char *id = loom_text_escape(msg_id(m), strlen(msg_id(m)), 200);
            LOOM_WARN("command id reused: recorded as a conflict, not applied",
                      "consumer=%s topic=%s partition=%d offset=%lld message_id=%s", wc->def->name,
                      job->ps->topic, (int)job->ps->partition, (long long)m->rkm->offset, id);
            free(id);
            count(wc, job->ps->topic, "conflict", 1);
        }
        atomic_fetch_add(m->done ? &w->skipped : &w->applied, 1);
        if (!m->conflict)
            count(wc, job->ps->topic, m->done ? "skipped" : "applied", 1);
        job->out[i] = OUT_DONE;
    }
    log_applied(b, from, to);
}

/* Records a rejected message. */
static void rejected(job_t *job, batch_t *b, size_t i, const loom_error_t *why)
{
    worker_consumer_t *wc = job->rt->wc;
    loom_msg_t *m = &b->msgs[i];
    if (record(b, m, "rejected", why->message) != 0) {
        unrecorded(job, b, i, "rejected");
        return;
    }
    atomic_fetch_add(&wc->w->rejected, 1);
    count(wc, job->ps->topic, "rejected", 1);
    char *id = loom_text_escape(msg_id(m), strlen(msg_id(m)), 200);
    char *text = loom_text_escape(why->message, strlen(why->message), 1000);
    LOOM_WARN("command rejected", "consumer=%s message_id=%s ray_id=%s code=%s error=%s",
              wc->def->name, id, msg_ray(m), why->code, text);
    free(id);
    free(text);
    job->out[i] = OUT_DONE;
}

/* A command first taken after its ce_deadline is not applied: it is recorded
 * as expired. Returns true when m was expired (and its outcome set). */
static bool expired(job_t *job, batch_t *b, size_t i)
{
    loom_msg_t *m = &b->msgs[i];
    int64_t deadline_us = 0;
    if (m->attempt != 1 || !m->decoded || !m->ce.deadline ||
        loom_rfc3339_parse(m->ce.deadline, &deadline_us) != 0 || deadline_us > loom_now_us())
        return false;
    m->skip = true;
    char why[200];
    snprintf(why, sizeof(why), "its deadline (%s) had passed when a worker took it",
             m->ce.deadline);
    if (record(b, m, "expired", why) != 0) {
        unrecorded(job, b, i, "expired");
        return true;
    }
    atomic_fetch_add(&job->rt->wc->w->expired, 1);
    count(job->rt->wc, job->ps->topic, "expired", 1);
    char *id = loom_text_escape(msg_id(m), strlen(msg_id(m)), 200);
    LOOM_WARN("command expired: not applied", "consumer=%s message_id=%s ray_id=%s deadline=%s",
              job->rt->wc->def->name, id, msg_ray(m), m->ce.deadline);
    free(id);
    job->out[i] = OUT_DONE;
    return true;
}

/* Whether two messages share a Kafka key (no key: never). */
static bool same_key(const rd_kafka_message_t *a, const rd_kafka_message_t *b)
{
    return a->key && b->key && a->key_len == b->key_len && memcmp(a->key, b->key, a->key_len) == 0;
}

/* The whole partition waits: a failure no command caused (the database is
 * unavailable). */
static void job_hold(job_t *job, const loom_error_t *err)
{
    job->hold_partition = true;
    snprintf(job->why, sizeof(job->why), "%s", err->message);
}

/*
 * Applies a job's messages: in one transaction when all goes well, else one
 * at a time to find the one that fails. A failing command holds only its
 * key: later commands of other keys in the job are still applied, those of
 * its key go back untried.
 */
static void apply_job(job_t *job, batch_t *b)
{
    worker_consumer_t *wc = job->rt->wc;
    loom_worker_t *w = wc->w;
    size_t live = 0;
    for (size_t i = 0; i < b->n; i++) {
        b->msgs[i].attempt = job->attempt[i];
        job->out[i] = OUT_RETURN;
        if (!expired(job, b, i))
            live++;
    }
    if (live == 0)
        return;
    char lock[64];
    snprintf(lock, sizeof(lock), "SET LOCAL lock_timeout = %lld",
             (long long)w->opts.lock_timeout_ms);
    /* Optimistic first, when its partition has met no command handled
     * already since it was assigned: no dedup probe, and the loom_commands
     * rows go with the COMMIT, so the whole transaction is one round trip.
     * A row there already (a redelivery after a crash between the database
     * commit and the offset commit, a producer's resend) fails it with a
     * unique violation, and nothing of it is kept. Any failure on that path,
     * a handler's too (it may have refused a command it applied before), is
     * not judged: the batch runs again with the probe, as below. A command
     * that failed before has a loom_commands row ("retrying"): its batch is
     * probed. */
    apply_arg_t a = {.b = b, .from = 0, .to = b->n, .optimistic = job->optimistic && !job->alone};
    loom_error_t err;
    int rc = 0;
    /* A command whose handler fails is known: it leaves the batch (failed or
     * rejected, and its key's later commands with it when it failed) and the
     * rest runs again as a batch, a few times; what cannot be pinned on one
     * command is isolated one command at a time below. The optimistic try
     * comes first, as round -1. */
    for (int round = a.optimistic ? -1 : 0; round < 8; round++) {
        loom_tx_opts_t o = {.max_attempts = 3, .begin_extra = lock, .stop = &a.stop};
        rc = loom_tx_run(w->opts.pool, &o, apply_body, &a, &err);
        if (rc == 0) {
            if (a.optimistic)
                atomic_fetch_add(&w->unprobed, 1);
            job->met_handled = job->met_handled || a.found > 0;
            job->probed_clean = !a.optimistic && a.found == 0;
            applied_ok(job, b, 0, b->n);
            return;
        }
        if (!a.in_handler && is_outage(&err)) {
            job_hold(job, &err);
            return;
        }
        if (a.optimistic) {
            if (loom_error_is(&err, LOOM_CODE_ALREADY_EXISTS) &&
                strcmp(err.constraint, "loom_commands_pkey") == 0)
                job->met_handled = true;
            atomic_fetch_add(&w->reprobed, 1);
            a.optimistic = false;
            continue;
        }
        if (!a.in_handler)
            break;
        size_t i = a.failed;
        if (a.handler_failed && is_permanent(&a.herr))
            rejected(job, b, i, &a.herr);
        else
            failed(job, b, i, a.handler_failed ? &a.herr : &err);
        b->msgs[i].skip = true;
        live--;
        for (size_t j = i + 1; job->out[i] == OUT_RETRY && j < b->n; j++)
            if (!b->msgs[j].skip && same_key(b->msgs[j].rkm, b->msgs[i].rkm)) {
                b->msgs[j].skip = true; /* OUT_RETURN: it waits behind its key */
                live--;
            }
        if (live == 0)
            return;
    }
    /* Isolate: one message at a time. */
    char *text = loom_text_escape(err.message, strlen(err.message), 500);
    LOOM_INFO("batch failed, applying its commands one by one",
              "consumer=%s topic=%s partition=%d messages=%zu error=%s", wc->def->name,
              job->ps->topic, (int)job->ps->partition, live, text);
    free(text);
    for (size_t i = 0; i < b->n; i++) {
        loom_msg_t *m = &b->msgs[i];
        if (m->skip)
            continue;
        bool behind = false; /* an earlier command of its key failed in this job */
        for (size_t k = 0; k < i && !behind; k++)
            behind = job->out[k] == OUT_RETRY && same_key(b->msgs[k].rkm, m->rkm);
        if (behind)
            continue;
        apply_arg_t one = {.b = b, .from = i, .to = i + 1};
        loom_tx_opts_t o1 = {.max_attempts = 2, .begin_extra = lock, .stop = &one.stop};
        rc = loom_tx_run(w->opts.pool, &o1, apply_body, &one, &err);
        if (rc == 0) {
            job->met_handled = job->met_handled || one.found > 0;
            applied_ok(job, b, i, i + 1);
            continue;
        }
        if (!one.in_handler && is_outage(&err)) {
            job_hold(job, &err);
            return; /* the rest goes back untried */
        }
        if (one.handler_failed && is_permanent(&one.herr))
            rejected(job, b, i, &one.herr);
        else
            failed(job, b, i, one.handler_failed ? &one.herr : &err);
    }
}

/* SHA-256 of the type and the data (the raw value when it did not decode):
 * what tells a resend of a command from another command reusing its id. */
static void msg_digest(loom_msg_t *m)
{
    loom_sha256_t h;
    loom_sha256_init(&h);
    const char *type = m->ce.type ? m->ce.type : "";
    loom_sha256_update(&h, type, strlen(type) + 1);
    if (m->decoded)
        loom_sha256_update(&h, m->ce.data ? m->ce.data : "", m->ce.data ? m->ce.data_len : 0);
    else
        loom_sha256_update(&h, m->rkm->payload ? m->rkm->payload : "", m->rkm->len);
    uint8_t out[LOOM_SHA256_LEN];
    loom_sha256_final(&h, out);
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < LOOM_SHA256_LEN; i++) {
        m->digest[2 * i] = hex[out[i] >> 4];
        m->digest[2 * i + 1] = hex[out[i] & 15];
    }
    m->digest[2 * LOOM_SHA256_LEN] = '\0';
}

/* Runs a job on the calling thread. */
static void job_run(job_t *job)
{
    loom_worker_t *w = job->rt->wc->w;
    batch_t b;
    memset(&b, 0, sizeof(b));
    b.wc = job->rt->wc;
    b.site = w->opts.cfg ? w->opts.cfg->site_name : "local";
    b.node = w->opts.cfg ? w->opts.cfg->node_id : "worker";
    loom_arena_init(&b.arena, 64 * 1024);
    loom_arena_init(&b.scratch, 16 * 1024);
    b.msgs = loom_xcalloc(job->n, sizeof(*b.msgs));
    b.n = job->n;
    for (size_t i = 0; i < job->n; i++) {
        loom_msg_t *m = &b.msgs[i];
        m->batch = &b;
        m->rkm = job->msgs[i];
        loom_error_clear(&m->decode_err);
        m->decoded = loom_ce_decode(job->msgs[i], &b.arena, &m->ce, &m->decode_err) == 0;
        msg_digest(m);
    }
    apply_job(job, &b);
    for (size_t i = 0; i < job->n; i++) {
        json_decref(b.msgs[i].json);
        json_decref(b.msgs[i].result);
    }
    loom_db_array_t *arrs[] = {&b.ob_topic, &b.ob_key, &b.ob_headers, &b.ob_payload};
    for (size_t i = 0; i < sizeof(arrs) / sizeof(arrs[0]); i++)
        loom_db_array_free(arrs[i]);
    evrows_free(&b.ev);
    evrows_free(&b.rel);
    for (size_t i = 0; i < b.n_rowsets; i++) {
        for (int k = 0; k < b.rowsets[i].stmt->nparams; k++)
            loom_db_array_free(&b.rowsets[i].cols[k]);
        free(b.rowsets[i].cols);
    }
    free(b.rowsets);
    free(b.streams);
    free(b.msgs);
    loom_arena_release(&b.arena);
    loom_arena_release(&b.scratch);
}

static job_t *job_new(consumer_rt_t *rt, part_state_t *ps, size_t max)
{
    job_t *job = loom_xcalloc(1, sizeof(*job));
    job->rt = rt;
    job->ps = ps;
    job->optimistic = ps->optimistic; /* read on the consumer's thread, which owns ps */
    job->cap = max;
    job->msgs = loom_xcalloc(max, sizeof(*job->msgs));
    job->attempt = loom_xcalloc(max, sizeof(*job->attempt));
    job->first_fail = loom_xcalloc(max, sizeof(*job->first_fail));
    job->out = loom_xcalloc(max, sizeof(*job->out));
    job->retry_ms = loom_xcalloc(max, sizeof(*job->retry_ms));
    return job;
}

static void job_free(job_t *job)
{
    free(job->msgs);
    free(job->attempt);
    free(job->first_fail);
    free(job->out);
    free(job->retry_ms);
    free(job);
}

int64_t loom_consumer_apply_offline(loom_db_pool_t *pool, const loom_consumer_def_t *def,
                                    rd_kafka_message_t **msgs, size_t n)
{
    if (n == 0)
        return -1;
    loom_worker_t w;
    memset(&w, 0, sizeof(w));
    w.opts.pool = pool;
    w.opts.retry_base_ms = 1;
    w.opts.retry_max_ms = 1;
    w.opts.lock_timeout_ms = 5000;
    worker_consumer_t wc = {.w = &w, .def = def};
    consumer_rt_t rt = {.wc = &wc};
    part_state_t ps = {.partition = msgs[0]->partition};
    snprintf(ps.topic, sizeof(ps.topic), "%s", rd_kafka_topic_name(msgs[0]->rkt));
    job_t *job = job_new(&rt, &ps, n);
    job->n = n;
    for (size_t i = 0; i < n; i++) {
        job->msgs[i] = msgs[i];
        job->attempt[i] = 1;
    }
    job_run(job);
    /* The offset to commit: the one after the last message, when every one
     * before it is finished. */
    int64_t committed = msgs[n - 1]->offset + 1;
    for (size_t i = 0; i < n; i++)
        if (job->out[i] != OUT_DONE) {
            committed = msgs[i]->offset;
            break;
        }
    job_free(job);
    return committed;
}

/* ---- scheduling (on the consumer's thread) ------------------------------------------- */

/* Takes a job's outcomes into its partition's queue. */
static void job_land(consumer_rt_t *rt, job_t *job)
{
    part_state_t *ps = job->ps;
    loom_worker_t *w = rt->wc->w;
    int64_t now = loom_mono_ms();
    bool progress = false;
    for (size_t i = 0; i < job->n; i++) {
        int64_t off = job->msgs[i]->offset;
        switch (job->out[i]) {
        case OUT_DONE: {
            /* A finished command's message is not needed any more: only
             * its offset stays, until the commands before it finish too,
             * so a stuck command holds memory for its own key's commands
             * only. */
            kq_item_t *it = kq_find(&ps->q, off);
            kq_done(&ps->q, off);
            if (it && it->msg) {
                msg_destroy(it->msg);
                it->msg = NULL;
            }
            progress = true;
            break;
        }
        case OUT_RETRY:
            kq_retry(&ps->q, off, now, now + job->retry_ms[i]);
            break;
        default:
            kq_return(&ps->q, off);
        }
    }
    if (job->hold_partition) {
        ps->held = true;
        ps->hold_attempts++;
        int64_t delay =
            loom_backoff_ms(ps->hold_attempts - 1, w->opts.retry_base_ms, w->opts.retry_max_ms);
        ps->held_until = now + delay;
        atomic_fetch_add(&w->retries, 1);
        count(rt->wc, ps->topic, "retried", (long long)job->n);
        LOOM_WARN("the database is unavailable: the partition waits",
                  "consumer=%s topic=%s partition=%d attempt=%d retry_in_ms=%lld error=%s",
                  rt->wc->def->name, ps->topic, (int)ps->partition, ps->hold_attempts,
                  (long long)delay, job->why);
    } else if (progress) {
        ps->hold_attempts = 0;
    }
    if (job->met_handled && ps->optimistic)
        LOOM_INFO("a command was handled already: the partition's batches ask loom_commands "
                  "first again",
                  "consumer=%s topic=%s partition=%d", rt->wc->def->name, ps->topic,
                  (int)ps->partition);
    if (job->met_handled)
        ps->optimistic = false;
    else if (job->probed_clean)
        ps->optimistic = true;
    ps->jobs--;
    if (ps->waiting == job)
        ps->waiting = NULL;
    job_free(job);
}

/* Lands every job that came back, waiting up to wait_ms for the first. */
static void collect(consumer_rt_t *rt, int64_t wait_ms)
{
    job_t *list = apply_pool_collect(&rt->pool, wait_ms);
    while (list) {
        job_t *next = list->next;
        job_land(rt, list);
        list = next;
    }
}

/* Gives a job that no thread took yet room for cap messages. */
static void job_grow(job_t *job, size_t cap)
{
    if (cap <= job->cap)
        return;
    size_t old = job->cap;
    job->msgs = loom_xrealloc(job->msgs, cap * sizeof(*job->msgs));
    job->attempt = loom_xrealloc(job->attempt, cap * sizeof(*job->attempt));
    job->first_fail = loom_xrealloc(job->first_fail, cap * sizeof(*job->first_fail));
    job->out = loom_xrealloc(job->out, cap * sizeof(*job->out));
    job->retry_ms = loom_xrealloc(job->retry_ms, cap * sizeof(*job->retry_ms));
    memset(job->msgs + old, 0, (cap - old) * sizeof(*job->msgs));
    memset(job->attempt + old, 0, (cap - old) * sizeof(*job->attempt));
    memset(job->first_fail + old, 0, (cap - old) * sizeof(*job->first_fail));
    memset(job->out + old, 0, (cap - old) * sizeof(*job->out));
    memset(job->retry_ms + old, 0, (cap - old) * sizeof(*job->retry_ms));
    job->cap = cap;
}

/* Fills job->msgs[from, from + n) from what kq_take gave. */
static void job_fill(job_t *job, part_state_t *ps, size_t from, size_t n, const int64_t *offsets,
                     void **msgs)
{
    for (size_t i = 0; i < n; i++) {
        kq_item_t *it = kq_find(&ps->q, offsets[i]);
        job->msgs[from + i] = msgs[i];
        job->attempt[from + i] = it->attempts + 1;
        job->first_fail[from + i] = it->first_fail_ms;
        if (it->attempts > 0)
            job->alone = true;
    }
    job->n = from + n;
}

/*
 * Commands of ps that came while its last batch still waits for a thread
 * join that batch, up to batch_size, instead of making a transaction of
 * their own: under load a partition's commands then share transactions
 * rather than queueing one transaction each behind the busy threads. The
 * batch stays one partition's, its commands taken by kq_take as any batch's
 * (keys free, in order). Nothing joins a batch a thread took already, a
 * full one (batch_size), or one that holds a command taken alone.
 */
static void job_join(consumer_rt_t *rt, part_state_t *ps, job_t *job, int64_t now, int64_t *offsets,
                     void **msgs)
{
    apply_pool_t *ap = &rt->pool;
    /* Only this thread adds to a job, so its room is known until a thread
     * takes it; the scan of the partition's queue runs without the pool's
     * lock, which the apply threads need to take and land jobs. */
    pthread_mutex_lock(&ap->mu);
    size_t room =
        !job->started && !job->alone && job->n < rt->batch_size ? rt->batch_size - job->n : 0;
    pthread_mutex_unlock(&ap->mu);
    if (room == 0)
        return;
    size_t n = kq_take(&ps->q, now, room, rt->key_concurrency, offsets, msgs);
    if (n == 0)
        return;
    bool alone = n == 1 && kq_find(&ps->q, offsets[0])->attempts > 0;
    if (!alone) {
        pthread_mutex_lock(&ap->mu);
        if (!job->started) {
            job_grow(job, job->n + n);
            job_fill(job, ps, job->n, n, offsets, msgs);
            pthread_mutex_unlock(&ap->mu);
            return;
        }
        pthread_mutex_unlock(&ap->mu);
    }
    /* A command that failed before goes alone, and commands taken while a
     * thread took the job meanwhile make a batch of their own. */
    job_t *own = job_new(rt, ps, alone ? 1 : rt->batch_size);
    job_fill(own, ps, 0, n, offsets, msgs);
    ps->jobs++;
    ps->waiting = own;
    apply_pool_submit(ap, own);
}

/* Hands out batches of commands whose keys are free, partition after
 * partition, while the apply threads have room for them. */
static void schedule(consumer_rt_t *rt)
{
    int64_t now = loom_mono_ms();
    size_t room = (size_t)rt->pool.n_threads * 2;
    int64_t *offsets = loom_xcalloc(rt->batch_size, sizeof(*offsets));
    void **msgs = loom_xcalloc(rt->batch_size, sizeof(*msgs));
    for (size_t k = 0; k < rt->n_parts; k++) {
        part_state_t *ps = rt->parts[(rt->rr + k) % rt->n_parts];
        if (ps->held && now < ps->held_until)
            continue;
        ps->held = false;
        if (ps->waiting)
            job_join(rt, ps, ps->waiting, now, offsets, msgs);
        while (rt->pool.queued < room) {
            size_t n = kq_take(&ps->q, now, rt->batch_size, rt->key_concurrency, offsets, msgs);
            if (n == 0)
                break;
            /* Room for a full batch: commands may join it (job_join). */
            job_t *job = job_new(rt, ps, rt->batch_size > n ? rt->batch_size : n);
            job_fill(job, ps, 0, n, offsets, msgs);
            ps->jobs++;
            ps->waiting = job;
            apply_pool_submit(&rt->pool, job);
        }
    }
    rt->rr = rt->n_parts ? (rt->rr + 1) % rt->n_parts : 0;
    free(offsets);
    free(msgs);
}

/* Moves each partition's commit offset to its lowest unfinished command,
 * and pauses or resumes fetching around max_pending (commands of a
 * partition, finished or not) and max_pending_bytes (bytes of unfinished
 * commands held by the whole consumer, so
 * memory stays bounded whatever the backlog and the message size). A
 * partition that holds nothing may always fetch: commands held for good (a
 * stuck key) never stop the others. */
static void release(consumer_rt_t *rt)
{
    for (size_t i = 0; i < rt->n_parts; i++) {
        part_state_t *ps = rt->parts[i];
        int64_t next = kq_release(&ps->q, msg_destroy);
        if (next >= 0)
            ps->commit_offset = next;
        size_t n = kq_count(&ps->q);
        bool full = n >= rt->max_pending || (n > 0 && held_bytes >= rt->max_pending_bytes);
        /* The count counts finished commands behind an unfinished one
         * too (a stuck key): resume as soon as it is under the bound. */
        bool room = n < rt->max_pending && (n == 0 || held_bytes <= rt->max_pending_bytes / 2);
        if (!ps->fetch_paused && full)
            part_fetch(rt, ps, false);
        else if (ps->fetch_paused && room)
            part_fetch(rt, ps, true);
    }
}

/* Waits for every job of the partitions in l (NULL: of all) to come back. */
static void drain(consumer_rt_t *rt, const rd_kafka_topic_partition_list_t *l)
{
    for (;;) {
        int busy = 0;
        for (size_t i = 0; i < rt->n_parts; i++) {
            part_state_t *ps = rt->parts[i];
            if (!l || rd_kafka_topic_partition_list_find(l, ps->topic, ps->partition))
                busy += ps->jobs;
        }
        if (busy == 0)
            return;
        collect(rt, 100);
    }
}

/* How many partitions have a key (or the whole partition) waiting on a
 * failure, and when the first of them is free again (0: none). */
static int retrying_parts(consumer_rt_t *rt, int64_t now, int64_t *next_free)
{
    int n = 0;
    *next_free = 0;
    for (size_t i = 0; i < rt->n_parts; i++) {
        part_state_t *ps = rt->parts[i];
        int64_t when = 0;
        int held = kq_held(&ps->q, now, &when);
        if (ps->held && ps->held_until > now) {
            held++;
            if (!when || ps->held_until < when)
                when = ps->held_until;
        }
        if (held) {
            n++;
            if (!*next_free || when < *next_free)
                *next_free = when;
        }
    }
    return n;
}

/* ---- stall detection ---------------------------------------------------------------- */

/* Time a stall check may spend asking the broker, so the loop (and every
 * command waiting in it) is never held long: partitions not asked this time
 * are asked at the next checks, in turn. */
#define STALL_CHECK_BUDGET_MS  50
#define STALL_QUERY_TIMEOUT_MS 500
/* A partition that fetched within this long has a fresh cached watermark:
 * every fetch answer carries it. */
#define WATERMARK_FRESH_MS 1000
/* The least a stalled partition waits after its seek before a rejoin. */
#define STALL_REJOIN_MS 60000

/*
 * Repairs a partition that is assigned but not fetched (seen with librdkafka
 * 2.0.2 after failed commits during a rebalance): first a seek to where it
 * stands, which restarts its fetcher; when it is still stalled a minute
 * later (three stall periods, if longer), the consumer leaves the group and
 * joins again. A partition whose fetches fail (a broker away) recovers by
 * itself once they work: the wait keeps a rejoin for real stalls.
 */
static void stall_repair(consumer_rt_t *rt, part_state_t *ps, int64_t pos)
{
    const char *name = rt->wc->def->name;
    if (ps->repairs == 0) {
        LOOM_WARN("stalled partition: fetching it again from where it stands",
                  "consumer=%s topic=%s partition=%d offset=%lld", name, ps->topic,
                  (int)ps->partition, (long long)pos);
        rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
        rd_kafka_topic_partition_list_add(l, ps->topic, ps->partition)->offset = pos;
        rd_kafka_error_t *e = rd_kafka_seek_partitions(rt->rk, l, STALL_QUERY_TIMEOUT_MS);
        if (e) {
            LOOM_WARN("could not seek the stalled partition", "consumer=%s error=%s", name,
                      rd_kafka_error_string(e));
            rd_kafka_error_destroy(e);
        }
        rd_kafka_resume_partitions(rt->rk, l);
        rd_kafka_topic_partition_list_destroy(l);
        ps->fetch_paused = false;
        ps->repairs = 1;
        ps->repaired_ms = loom_mono_ms();
    } else if (ps->repairs == 1) {
        int64_t wait = 3 * rt->wc->w->opts.stall_after_ms;
        if (wait < STALL_REJOIN_MS)
            wait = STALL_REJOIN_MS;
        if (loom_mono_ms() - ps->repaired_ms < wait)
            return;
        LOOM_WARN("stalled partition: still not fetched; leaving and rejoining the group",
                  "consumer=%s topic=%s partition=%d", name, ps->topic, (int)ps->partition);
        rt->rejoin = true;
        ps->repairs = 2;
    }
}

/* Publishes the partitions this consumer owns for the node's report (takes
 * parts; NULL: it owns none). */
static void report_parts(worker_consumer_t *wc, json_t *parts)
{
    pthread_mutex_lock(&wc->report_mu);
    json_decref(wc->parts);
    wc->parts = parts;
    pthread_mutex_unlock(&wc->report_mu);
}

static void check_stalls(consumer_rt_t *rt)
{
    loom_worker_t *w = rt->wc->w;
    const char *name = rt->wc->def->name;
    int64_t now = loom_mono_ms(), budget_end = now + STALL_CHECK_BUDGET_MS;
    rd_kafka_topic_partition_list_t *assigned = NULL;
    if (rd_kafka_assignment(rt->rk, &assigned) != RD_KAFKA_RESP_ERR_NO_ERROR)
        return;
    rd_kafka_position(rt->rk, assigned);
    /* A partition that fetched nothing since it was assigned has no position:
     * it starts at the group's committed offset, asked once for all. */
    rd_kafka_topic_partition_list_t *unknown = rd_kafka_topic_partition_list_new(4);
    for (int i = 0; i < assigned->cnt; i++) {
        rd_kafka_topic_partition_t *tp = &assigned->elems[i];
        part_state_t *ps = part_get(rt, tp->topic, tp->partition);
        if (tp->offset < 0 && ps->committed < 0 && !ps->committed_asked)
            rd_kafka_topic_partition_list_add(unknown, tp->topic, tp->partition);
    }
    if (unknown->cnt > 0 &&
        rd_kafka_committed(rt->rk, unknown, STALL_QUERY_TIMEOUT_MS) == RD_KAFKA_RESP_ERR_NO_ERROR)
        for (int i = 0; i < unknown->cnt; i++) {
            part_state_t *ps = part_find(rt, unknown->elems[i].topic, unknown->elems[i].partition);
            if (!ps || unknown->elems[i].err)
                continue;
            ps->committed_asked = true;
            if (unknown->elems[i].offset >= 0)
                ps->committed = unknown->elems[i].offset;
        }
    rd_kafka_topic_partition_list_destroy(unknown);
    int stalled = 0, next_cursor = rt->stall_cursor;
    json_t *report = json_array();
    for (int k = 0; k < assigned->cnt; k++) {
        int i = (rt->stall_cursor + k) % assigned->cnt;
        rd_kafka_topic_partition_t *tp = &assigned->elems[i];
        part_state_t *ps = part_get(rt, tp->topic, tp->partition);
        int64_t lo = 0, hi = 0;
        bool idle = !ps->fetch_paused && now - ps->last_msg_ms >= w->opts.stall_after_ms;
        /* Cached watermarks are free; an idle partition gets a fresh answer
         * while the budget lasts, and so does one holding commands that
         * fetches nothing (paused, or a key waiting: its cached watermark
         * may not move). A partition that is flowing is not asked: each
         * question is a round trip to the broker that holds this loop, and
         * so every command waiting in it (up to the budget every few
         * seconds: the ?wait tail of a loaded worker). */
        bool flowing = !ps->fetch_paused && now - ps->last_msg_ms < WATERMARK_FRESH_MS;
        bool holding = !flowing && (ps->fetch_paused || ps->held || kq_count(&ps->q) > 0);
        bool ask = (idle || holding) && loom_mono_ms() < budget_end;
        rd_kafka_resp_err_t e =
            ask ? rd_kafka_query_watermark_offsets(rt->rk, tp->topic, tp->partition, &lo, &hi,
                                                   STALL_QUERY_TIMEOUT_MS)
                : rd_kafka_get_watermark_offsets(rt->rk, tp->topic, tp->partition, &lo, &hi);
        if (ask)
            next_cursor = i + 1;
        int64_t when = 0;
        bool retrying = kq_held(&ps->q, now, &when) > 0 || (ps->held && ps->held_until > now);
        json_t *entry = json_pack("{s:s, s:i, s:n, s:b}", "topic", tp->topic, "partition",
                                  (int)tp->partition, "lag", "retrying", retrying);
        json_array_append_new(report, entry);
        if (e != RD_KAFKA_RESP_ERR_NO_ERROR || hi < 0)
            continue;
        int64_t pos = tp->offset >= 0 ? tp->offset : ps->committed;
        if (pos < 0)
            pos = lo;
        /* Stalls are about fetching (what was never fetched); the lag gauge
         * is what is not applied yet: from the lowest unfinished command. */
        int64_t fetch_lag = hi > pos ? hi - pos : 0;
        int64_t from = ps->commit_offset >= 0 && ps->commit_offset < pos ? ps->commit_offset : pos;
        int64_t lag = hi > from ? hi - from : 0;
        json_object_set_new(entry, "lag", json_integer(lag));
        if (w->m_lag) {
            char part[16];
            snprintf(part, sizeof(part), "%d", (int)tp->partition);
            const char *labels[] = {name, tp->topic, part};
            loom_metrics_gauge_set(w->m_lag, labels, (double)lag);
        }
        if (idle && fetch_lag > 0 && !ps->stalled) {
            ps->stalled = true;
            atomic_fetch_add(&w->stalls, 1);
            LOOM_WARN("partition lag is not shrinking: messages wait but none arrive",
                      "consumer=%s topic=%s partition=%d lag=%lld idle_ms=%lld", name, tp->topic,
                      tp->partition, (long long)fetch_lag, (long long)(now - ps->last_msg_ms));
        }
        if (idle && fetch_lag > 0 && ask) {
            stall_repair(rt, ps, pos);
        } else if (fetch_lag == 0) {
            ps->stalled = false;
        }
        stalled += ps->stalled;
    }
    int64_t next_free;
    int retrying = retrying_parts(rt, now, &next_free);
    const char *labels[] = {name};
    loom_metrics_gauge_set(w->m_stalled, labels, stalled);
    loom_metrics_gauge_set(w->m_retrying, labels, retrying);
    rt->stall_cursor = assigned->cnt > 0 ? next_cursor % assigned->cnt : 0;
    rd_kafka_topic_partition_list_destroy(assigned);
    report_parts(rt->wc, report);
}

/* ---- the loop ------------------------------------------------------------------------ */

static void rebalance_cb(rd_kafka_t *rk, rd_kafka_resp_err_t e,
                         rd_kafka_topic_partition_list_t *parts, void *opaque)
{
    consumer_rt_t *rt = opaque;
    if (e == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        drain(rt, parts);
        for (int i = 0; i < parts->cnt; i++)
            part_remove(rt, parts->elems[i].topic, parts->elems[i].partition);
        rd_kafka_assign(rk, parts);
        json_t *owned = json_array();
        for (int i = 0; i < parts->cnt; i++)
            json_array_append_new(owned,
                                  json_pack("{s:s, s:i, s:n, s:b}", "topic", parts->elems[i].topic,
                                            "partition", (int)parts->elems[i].partition, "lag",
                                            "retrying", 0));
        report_parts(rt->wc, owned);
        LOOM_INFO("partitions assigned", "consumer=%s count=%d", rt->wc->def->name, parts->cnt);
    } else {
        /* The batches in flight finish first; what was fetched and not
         * finished goes to the next owner (its dedup rows skip what was). */
        drain(rt, parts);
        release(rt);
        commit_offsets(rt, true);
        for (int i = 0; i < parts->cnt; i++) {
            part_remove(rt, parts->elems[i].topic, parts->elems[i].partition);
            /* Its next owner reports its lag now. */
            char part[16];
            snprintf(part, sizeof(part), "%d", (int)parts->elems[i].partition);
            const char *labels[] = {rt->wc->def->name, parts->elems[i].topic, part};
            if (rt->wc->w->m_lag)
                loom_metrics_gauge_set(rt->wc->w->m_lag, labels, 0);
        }
        rd_kafka_assign(rk, NULL);
        report_parts(rt->wc, json_array());
        LOOM_INFO("partitions revoked", "consumer=%s count=%d", rt->wc->def->name, parts->cnt);
    }
}

static rd_kafka_t *consumer_new(consumer_rt_t *rt)
{
    worker_consumer_t *wc = rt->wc;
    loom_worker_t *w = wc->w;
    char errbuf[512], group[256];
    rd_kafka_conf_t *conf =
        loom_kafka_conf_new(w->opts.brokers, w->opts.cfg, errbuf, sizeof(errbuf));
    if (!conf) {
        LOOM_ERROR("could not configure the consumer", "consumer=%s error=%s", wc->def->name,
                   errbuf);
        return NULL;
    }
    snprintf(group, sizeof(group), "%s%s", w->opts.group_prefix, wc->def->name);
    /* librdkafka wants fetch.max.bytes >= message.max.bytes. */
    long long fetch = 1 << 20;
    for (size_t i = 0; w->opts.cfg && i < w->opts.cfg->n_kafka_props; i++)
        if (strcmp(w->opts.cfg->kafka_props[i].key, "message.max.bytes") == 0 &&
            atoll(w->opts.cfg->kafka_props[i].value) > fetch)
            fetch = atoll(w->opts.cfg->kafka_props[i].value);
    char fetch_max[32];
    snprintf(fetch_max, sizeof(fetch_max), "%lld", fetch);
    const char *kv[][2] = {
        {"group.id", group},
        {"enable.auto.commit", "false"},
        {"enable.auto.offset.store", "false"},
        {"auto.offset.reset", "earliest"},
        {"session.timeout.ms", "10000"},
        {"heartbeat.interval.ms", "1000"},
        {"max.poll.interval.ms", "300000"},
        {"fetch.wait.max.ms", "50"},
        /* Prefetch bounds: librdkafka's defaults (100,000 messages per
         * partition, 64 MiB queued, 50 MiB a fetch) would let a lagging
         * worker hold far more memory than a few batches need. 1 MiB on the
         * wire is a few thousand small commands (each costs about five
         * times its size once fetched), well ahead of what the apply
         * threads take; what the worker holds itself is
         * LOOM_WORKER_MAX_PENDING_BYTES. */
        {"queued.min.messages", "10000"},
        {"queued.max.messages.kbytes", "1024"},
        {"fetch.max.bytes", fetch_max},
        {"max.partition.fetch.bytes", "262144"},
        /* A topic created just before the subscription (loom dev, a fresh
         * deployment) may not be in the first metadata answer: look again
         * within seconds rather than librdkafka's five minutes. */
        {"topic.metadata.refresh.interval.ms", "5000"},
    };
    /* Loom's defaults; a LOOM_KAFKA_<PROPERTY> wins, except the first three:
     * one group per consumer, and offsets that follow the database. */
    for (size_t i = 0; i < sizeof(kv) / sizeof(kv[0]); i++)
        if (i < 3 || !loom_kafka_user_set(w->opts.cfg, kv[i][0]))
            rd_kafka_conf_set(conf, kv[i][0], kv[i][1], NULL, 0);
    rd_kafka_conf_set_rebalance_cb(conf, rebalance_cb);
    rd_kafka_conf_set_offset_commit_cb(conf, offset_commit_cb);
    rd_kafka_conf_set_opaque(conf, rt);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errbuf, sizeof(errbuf));
    if (!rk) {
        rd_kafka_conf_destroy(conf);
        LOOM_ERROR("could not create the consumer", "consumer=%s error=%s", wc->def->name, errbuf);
        return NULL;
    }
    rd_kafka_poll_set_consumer(rk);
    return rk;
}

/*
 * The topics to subscribe to: the consumer's own (loom_consumer_topics), and
 * the per-type topics of an earlier Loom ("<prefix>.cmd.<type>") that still
 * exist, so commands published before an upgrade are applied rather than
 * stranded. The group and its committed offsets are the same, so only what
 * was not applied yet is delivered; a command seen twice is skipped by its
 * dedup row. Such a topic can be deleted once `loom consumers` shows no lag.
 */
static rd_kafka_topic_partition_list_t *consumer_subscription(consumer_rt_t *rt)
{
    const loom_consumer_def_t *def = rt->wc->def;
    static const size_t max = 64;
    char(*topics)[LOOM_TOPIC_MAX] = loom_xcalloc(max, sizeof(*topics));
    size_t n = loom_consumer_topics(def, topics, max);
    if (n > max)
        LOOM_ERROR("consumer reads more topics than a worker subscribes to",
                   "consumer=%s topics=%zu max=%zu", def->name, n, max);
    rd_kafka_topic_partition_list_t *subs = rd_kafka_topic_partition_list_new((int)max);
    for (size_t i = 0; i < n && i < max; i++)
        rd_kafka_topic_partition_list_add(subs, topics[i], RD_KAFKA_PARTITION_UA);
    const struct rd_kafka_metadata *md = NULL;
    size_t n_commands = loom_commands_count(def->commands);
    if (!def->topics && n_commands > 0 &&
        rd_kafka_metadata(rt->rk, 1, NULL, &md, 5000) != RD_KAFKA_RESP_ERR_NO_ERROR) {
        LOOM_WARN("could not list topics: per-type topics of an earlier Loom are not drained",
                  "consumer=%s", def->name);
        md = NULL;
    }
    for (size_t k = 0; md && k < n_commands; k++) {
        char legacy[LOOM_TOPIC_MAX];
        loom_topic_legacy_for_command(def->commands[k].type, legacy, sizeof(legacy));
        if (rd_kafka_topic_partition_list_find(subs, legacy, RD_KAFKA_PARTITION_UA))
            continue;
        for (int t = 0; t < md->topic_cnt; t++)
            if (strcmp(md->topics[t].topic, legacy) == 0 && !md->topics[t].err) {
                LOOM_WARN("draining a per-type topic of an earlier Loom: delete it once its lag "
                          "is 0 (loom consumers)",
                          "consumer=%s topic=%s", def->name, legacy);
                rd_kafka_topic_partition_list_add(subs, legacy, RD_KAFKA_PARTITION_UA);
            }
    }
    if (md)
        rd_kafka_metadata_destroy(md);
    free(topics);
    return subs;
}

/*
 * librdkafka calls that can block for good run on a thread of their own, and
 * the consumer's thread waits for them at most a bound; past it the call is
 * left behind, logged, rather than the stop hanging. Two are known (librdkafka
 * 2.0): rd_kafka_destroy() after a close that gave up (a lock-order inversion
 * between its threads when a broker goes away during destroy), and
 * rd_kafka_assign() while the consumer closes: when the group's close
 * finishes meanwhile, the assign's request is dropped unanswered, and the
 * call waits for its answer forever (librdkafka issue 4884). Offsets were
 * committed before either, so nothing is lost: the next owner of the
 * partitions reads from them.
 */
#define DESTROY_WAIT_MS  10000
#define UNASSIGN_WAIT_MS 5000

enum { KCALL_UNASSIGN, KCALL_DESTROY };

typedef struct {
    rd_kafka_t *rk;
    int call; /* KCALL_* */
    int flags;
    pthread_mutex_t mu;
    pthread_cond_t cond;
    bool done;
    int refs; /* the waiter and the calling thread: the last one frees */
} kcall_t;

static void kcall_unref(kcall_t *job)
{
    pthread_mutex_lock(&job->mu);
    int left = --job->refs;
    pthread_mutex_unlock(&job->mu);
    if (left)
        return;
    pthread_mutex_destroy(&job->mu);
    pthread_cond_destroy(&job->cond);
    free(job);
}

static void kcall_run(kcall_t *job)
{
    if (job->call == KCALL_DESTROY)
        rd_kafka_destroy_flags(job->rk, job->flags);
    else
        rd_kafka_assign(job->rk, NULL);
}

static void *kcall_main(void *arg)
{
    kcall_t *job = arg;
    kcall_run(job);
    pthread_mutex_lock(&job->mu);
    job->done = true;
    pthread_cond_signal(&job->cond);
    pthread_mutex_unlock(&job->mu);
    kcall_unref(job);
    return NULL;
}

/* Runs the call, waiting at most wait_ms; true when it returned. */
static bool kafka_bounded(rd_kafka_t *rk, int call, int flags, int wait_ms, const char *name)
{
    kcall_t *job = loom_xcalloc(1, sizeof(*job));
    job->rk = rk;
    job->call = call;
    job->flags = flags;
    job->refs = 2;
    pthread_mutex_init(&job->mu, NULL);
    pthread_cond_init(&job->cond, NULL);
    pthread_t t;
    if (pthread_create(&t, NULL, kcall_main, job) != 0) {
        job->refs = 1;
        kcall_run(job);
        kcall_unref(job);
        return true;
    }
    pthread_detach(t);
    struct timespec ts;
    loom_timespec_in(wait_ms, &ts);
    pthread_mutex_lock(&job->mu);
    while (!job->done)
        if (pthread_cond_timedwait(&job->cond, &job->mu, &ts) != 0)
            break;
    bool done = job->done;
    pthread_mutex_unlock(&job->mu);
    if (!done)
        LOOM_ERROR(call == KCALL_DESTROY
                       ? "the Kafka client did not close in time; leaving it behind"
                       : "the Kafka client did not unassign in time; leaving it",
                   "consumer=%s waited_ms=%d", name, wait_ms);
    kcall_unref(job);
    return done;
}

/* How long a stopping consumer may take to commit and leave its group. */
#define CONSUMER_CLOSE_MS 10000

/*
 * Commits what was applied and leaves the group, both through a queue polled
 * until `until`: with the broker gone, rd_kafka_commit() and
 * rd_kafka_consumer_close() would block until it is back. Returns true when
 * the consumer closed; what was not committed is delivered again to the next
 * owner and skipped by its dedup.
 */
static bool consumer_leave(consumer_rt_t *rt, int64_t until)
{
    rd_kafka_queue_t *cq = rd_kafka_queue_new(rt->rk);
    /* What was applied is committed before leaving; a refused commit (the
     * coordinator busy or timing out) is sent again, or the next owner would
     * get those commands again. For half the time at most, so that leaving
     * the group has the rest. */
    int64_t commit_until = loom_mono_ms() + (until - loom_mono_ms()) / 2;
    for (int attempt = 0; attempt < 20 && loom_mono_ms() < commit_until; attempt++) {
        rd_kafka_topic_partition_list_t *l = unconfirmed_offsets(rt, true);
        bool sent = l->cnt > 0 && rd_kafka_commit_queue(rt->rk, l, cq, NULL, NULL) == 0;
        rd_kafka_topic_partition_list_destroy(l);
        if (!sent)
            break;
        for (bool done = false; !done && loom_mono_ms() < commit_until;) {
            rd_kafka_event_t *ev = rd_kafka_queue_poll(cq, 100);
            if (ev && rd_kafka_event_type(ev) == RD_KAFKA_EVENT_OFFSET_COMMIT) {
                commit_result(rt, rd_kafka_event_error(ev),
                              rd_kafka_event_topic_partition_list(ev));
                done = true;
            }
            rd_kafka_event_destroy(ev);
        }
        if (attempt > 0 || rt->commit_failing)
            loom_sleep_ms(100);
    }
    bool closed = false;
    rd_kafka_error_t *e = rd_kafka_consumer_close_queue(rt->rk, cq);
    if (e) {
        LOOM_WARN("could not leave the consumer group", "consumer=%s error=%s", rt->wc->def->name,
                  rd_kafka_error_string(e));
        rd_kafka_error_destroy(e);
    } else {
        bool stuck = false;
        while (!stuck && !(closed = rd_kafka_consumer_closed(rt->rk)) && loom_mono_ms() < until) {
            rd_kafka_event_t *ev = rd_kafka_queue_poll(cq, 100);
            /* The offsets are committed above: a revocation only unassigns
             * (bounded: the close may finish meanwhile, see kafka_bounded). */
            if (ev && rd_kafka_event_type(ev) == RD_KAFKA_EVENT_REBALANCE)
                stuck =
                    !kafka_bounded(rt->rk, KCALL_UNASSIGN, 0, UNASSIGN_WAIT_MS, rt->wc->def->name);
            rd_kafka_event_destroy(ev);
        }
        if (!closed && !stuck) /* a stuck unassign logged already */
            LOOM_WARN("gave up leaving the consumer group: the broker does not answer",
                      "consumer=%s waited_ms=%d", rt->wc->def->name, CONSUMER_CLOSE_MS);
    }
    rd_kafka_queue_destroy(cq);
    return closed;
}

void *loom__consumer_run(void *arg)
{
    worker_consumer_t *wc = arg;
    loom_worker_t *w = wc->w;
    /* On the heap: a Kafka handle left behind (kafka_bounded) keeps it. */
    consumer_rt_t *rt = loom_xcalloc(1, sizeof(*rt));
    rt->wc = wc;
    rt->rk = consumer_new(rt);
    if (!rt->rk) {
        free(rt);
        return NULL;
    }
    rd_kafka_topic_partition_list_t *subs = consumer_subscription(rt);
    rd_kafka_resp_err_t e = rd_kafka_subscribe(rt->rk, subs);
    rd_kafka_topic_partition_list_destroy(subs);
    if (e) {
        LOOM_ERROR("could not subscribe", "consumer=%s error=%s", wc->def->name,
                   rd_kafka_err2str(e));
        rd_kafka_destroy(rt->rk);
        free(rt);
        return NULL;
    }
    LOOM_INFO("consumer started", "consumer=%s group=%s%s", wc->def->name, w->opts.group_prefix,
              wc->def->name);
    rt->batch_size = (size_t)(wc->def->batch_size > 0 ? wc->def->batch_size : 100);
    rt->key_concurrency = w->opts.key_concurrency;
    rt->max_pending = (size_t)w->opts.max_pending;
    rt->max_pending_bytes = w->max_pending_bytes;
    held_bytes = 0;
    rd_kafka_queue_t *q = rd_kafka_queue_get_consumer(rt->rk);
    apply_pool_start(&rt->pool, wc->def->name, w->opts.apply_threads, q);
    size_t fetch_max = 4000;
    rd_kafka_message_t **msgs = loom_xcalloc(fetch_max, sizeof(*msgs));
    int64_t check_every = w->opts.stall_after_ms / 2 < 5000 ? w->opts.stall_after_ms / 2 : 5000;
    int64_t next_stall_check = loom_mono_ms() + check_every;
    int64_t next_commit = 0;

    while (!atomic_load(&w->stop)) {
        collect(rt, 0);
        schedule(rt);
        /* Wait for a message, a batch coming back (it yields this queue)
         * or a held key's backoff to end, then take what else is fetched. */
        int64_t now = loom_mono_ms(), next_free = 0;
        retrying_parts(rt, now, &next_free);
        int timeout = 200;
        if (next_free && next_free - now < timeout)
            timeout = next_free > now ? (int)(next_free - now) : 1;
        ssize_t n = 0;
        rd_kafka_message_t *first = rd_kafka_consumer_poll(rt->rk, timeout);
        if (first) {
            msgs[n++] = first;
            /* Over max_pending_bytes the partitions are paused: take what
             * librdkafka fetched already one message a round rather than
             * all at once, so what is held stays near the bound. */
            ssize_t more = held_bytes >= rt->max_pending_bytes
                               ? 0
                               : rd_kafka_consume_batch_queue(q, 0, msgs + 1, fetch_max - 1);
            if (more > 0)
                n += more;
        }
        now = loom_mono_ms();
        for (ssize_t i = 0; i < n; i++) {
            rd_kafka_message_t *rkm = msgs[i];
            if (rkm->err) {
                if (rkm->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
                    LOOM_WARN("consumer error", "consumer=%s error=%s", wc->def->name,
                              rd_kafka_message_errstr(rkm));
                rd_kafka_message_destroy(rkm);
                continue;
            }
            part_state_t *ps = part_get(rt, rd_kafka_topic_name(rkm->rkt), rkm->partition);
            ps->last_msg_ms = now;
            ps->stalled = false;
            ps->repairs = 0;
            if (ps->q.next_offset >= 0 && rkm->offset < ps->q.next_offset) {
                rd_kafka_message_destroy(rkm); /* fetched again after a seek */
                continue;
            }
            held_bytes += msg_cost(rkm);
            kq_push(&ps->q, rkm, rkm->offset, rkm->key, rkm->key ? rkm->key_len : 0);
        }
        collect(rt, 0);
        schedule(rt);
        release(rt);
        /* Offsets go to the coordinator at most every COMMIT_EVERY_MS: each
         * commit is a write to Kafka's offsets log, and one per batch cost
         * the broker more than the commands' own messages under load. What
         * a crash leaves uncommitted is delivered again and found by the
         * dedup probe. */
        if (loom_mono_ms() >= next_commit) {
            commit_offsets(rt, false);
            next_commit = loom_mono_ms() + COMMIT_EVERY_MS;
        }
        if (loom_mono_ms() >= next_stall_check) {
            check_stalls(rt);
            next_stall_check = loom_mono_ms() + check_every;
        }
        if (rt->rejoin) {
            rt->rejoin = false;
            rd_kafka_unsubscribe(rt->rk);
            rd_kafka_topic_partition_list_t *again = consumer_subscription(rt);
            rd_kafka_resp_err_t se = rd_kafka_subscribe(rt->rk, again);
            rd_kafka_topic_partition_list_destroy(again);
            if (se)
                LOOM_ERROR("could not subscribe again", "consumer=%s error=%s", wc->def->name,
                           rd_kafka_err2str(se));
        }
    }
    /* Graceful: the batches in flight finish and their offsets are
     * committed; what was fetched and not finished goes to the next owner. */
    drain(rt, NULL);
    release(rt);
    apply_pool_stop(&rt->pool);
    free(msgs);
    rd_kafka_queue_destroy(q);
    bool closed = consumer_leave(rt, loom_mono_ms() + CONSUMER_CLOSE_MS);
    for (size_t i = 0; i < rt->n_parts; i++) {
        kq_free(&rt->parts[i]->q, msg_destroy);
        free(rt->parts[i]);
    }
    free(rt->parts);
    rt->parts = NULL;
    rt->n_parts = 0;
    if (kafka_bounded(rt->rk, KCALL_DESTROY, closed ? 0 : RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE,
                      DESTROY_WAIT_MS, wc->def->name))
        free(rt);
    report_parts(wc, NULL);
    LOOM_INFO("consumer stopped", "consumer=%s", wc->def->name);
    return NULL;
}
