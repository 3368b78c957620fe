/*
 * consumer.c: one consumer's loop: fetch, apply a partition's batch in one
 * transaction with its dedup rows, commit offsets after the database, and
 * retry transient failures forever while only that partition waits.
 *
 * Partitions are independent: the batches of different partitions run at
 * once on the consumer's apply threads (LOOM_WORKER_APPLY_THREADS, each with
 * its own transaction), while each partition's batches stay in order. Offsets
 * are committed when every batch of a fetch is done.
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
 */
#include "worker_int.h"
#include "loom/clock.h"
#include "loom/log.h"
#include "loom/mem.h"
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
    char fallback_id[160]; /* for messages without a usable ce_id */
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

static const loom_db_stmt_t stmt_stream_version = {
    "loom_events_stream_version",
    "SELECT coalesce(max(version), 0) FROM loom_events WHERE stream_id = $1", 1};

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
    if (m->decoded && m->ce.id)
        return m->ce.id;
    if (!m->fallback_id[0])
        snprintf(m->fallback_id, sizeof(m->fallback_id), "kafka:%s:%" PRId32 ":%" PRId64,
                 rd_kafka_topic_name(m->rkm->rkt), m->rkm->partition, m->rkm->offset);
    return m->fallback_id;
}

static const loom_db_stmt_t stmt_dedup = {
    "loom_commands_dedup",
    "SELECT message_id FROM loom_commands WHERE consumer = $1 AND message_id = ANY($2::text[]) "
    "AND status IN ('applied', 'rejected', 'parked')",
    2};

static const loom_db_stmt_t stmt_commands_applied = {
    "loom_commands_applied",
    "INSERT INTO loom_commands (consumer, message_id, type, stream_id, topic, kafka_partition, "
    "kafka_offset, status, attempts, result, ray_id, causation_id) "
    "SELECT $1, u.m, u.t, u.s, $2, $3, u.o, 'applied', u.a, u.r::jsonb, u.ray, u.c "
    "FROM unnest($4::text[], $5::text[], $6::text[], $7::bigint[], $8::int[], $9::text[], "
    "$10::text[], $11::text[]) AS u(m, t, s, o, a, r, ray, c) "
    "ON CONFLICT (consumer, message_id) DO UPDATE SET status = 'applied', "
    "attempts = greatest(loom_commands.attempts + 1, EXCLUDED.attempts), "
    "result = EXCLUDED.result, last_error = NULL, headers = NULL, payload = NULL, "
    "kafka_partition = EXCLUDED.kafka_partition, kafka_offset = EXCLUDED.kafka_offset, "
    "updated_at = now() "
    "WHERE loom_commands.status = 'retrying' RETURNING message_id",
    11};

/* JSON travels as text[] and is cast per row: CockroachDB has no jsonb[]. */
static const loom_db_stmt_t stmt_events = {
    "loom_events_append",
    "INSERT INTO loom_events (stream_id, version, event_id, type, data, ray_id, causation_id) "
    "SELECT u.s, u.v, u.id, u.t, u.d::jsonb, u.ray, u.c FROM unnest($1::text[], $2::bigint[], "
    "$3::text[], $4::text[], $5::text[], $6::text[], $7::text[]) AS u(s, v, id, t, d, ray, c)",
    7};

/* Appends numbered after the stream's stored version: each row's subquery
 * sees the table as the statement began, so rows of one stream in one
 * statement get base + 1, base + 2, ... from their relative numbers. */
static const loom_db_stmt_t stmt_events_append = {
    "loom_events_append_relative",
    "INSERT INTO loom_events (stream_id, version, event_id, type, data, ray_id, causation_id) "
    "SELECT u.s, coalesce((SELECT max(e.version) FROM loom_events e WHERE e.stream_id = u.s), 0) "
    "+ u.r, u.id, u.t, u.d::jsonb, u.ray, u.c "
    "FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], "
    "$7::text[]) AS u(s, r, id, t, d, ray, c)",
    7};

static const loom_db_stmt_t stmt_outbox = {
    "loom_outbox_add",
    "INSERT INTO loom_outbox (topic, msg_key, headers, payload) "
    "SELECT u.t, u.k, u.h::jsonb, u.p FROM unnest($1::text[], $2::text[], $3::text[], "
    "$4::bytea[]) AS u(t, k, h, p)",
    4};

typedef struct apply_arg {
    batch_t *b;
    size_t from, to;   /* messages [from, to) */
    size_t failed;     /* index of the message whose handler failed */
    loom_error_t herr; /* its error */
    bool handler_failed;
} apply_arg_t;

static int flush_rows(batch_t *b, size_t from, size_t to, loom_error_t *err)
{
    worker_consumer_t *wc = b->wc;
    loom_db_array_t ids = {0}, types = {0}, streams = {0}, offs = {0}, atts = {0}, results = {0},
                    rays = {0}, causes = {0};
    loom_db_array_t *all[] = {&ids, &types, &streams, &offs, &atts, &results, &rays, &causes};
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
        loom_db_array_add(&causes, m->ce.causationid);
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
                           loom_db_array_str(&causes)};
        PGresult *res = NULL;
        rc = loom_db_exec(b->db, &stmt_commands_applied, p, &res, err);
        if (rc == 0 && (size_t)PQntuples(res) != expected)
            /* Another worker applied one of these meanwhile (a rebalance):
             * undo ours; the retry finds its row and skips it. */
            rc = loom_error_set(err, LOOM_CODE_SERIALIZATION_FAILURE,
                                "%zu of %zu commands were applied concurrently",
                                expected - (size_t)PQntuples(res), expected);
        PQclear(res);
    }
    /* Another writer took a version we counted on: run the batch again. */
    if (rc != 0 && loom_error_is(err, LOOM_CODE_ALREADY_EXISTS) &&
        strstr(err->message, "loom_events_pkey"))
        rc = loom_error_set(err, LOOM_CODE_SERIALIZATION_FAILURE,
                            "event stream written concurrently: %s", err->message);
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        loom_db_array_free(all[i]);
    return rc;
}

static int apply_body(loom_db_t *db, void *arg, loom_error_t *err)
{
    apply_arg_t *a = arg;
    batch_t *b = a->b;
    worker_consumer_t *wc = b->wc;
    b->db = db;
    reset_attempt(b);
    a->handler_failed = false;

    /* Dedup: which of these were handled already? */
    loom_db_array_t ids = {0};
    loom_db_array_reset(&ids);
    for (size_t i = a->from; i < a->to; i++) {
        b->msgs[i].done = false;
        loom_db_array_add(&ids, msg_id(&b->msgs[i]));
    }
    const char *p[] = {wc->def->name, loom_db_array_str(&ids)};
    PGresult *res = NULL;
    int rc = loom_db_exec(db, &stmt_dedup, p, &res, err);
    loom_db_array_free(&ids);
    if (rc != 0)
        return rc;
    for (int r = 0; r < PQntuples(res); r++)
        for (size_t i = a->from; i < a->to; i++)
            if (strcmp(PQgetvalue(res, r, 0), msg_id(&b->msgs[i])) == 0)
                b->msgs[i].done = true;
    PQclear(res);
    /* The same command twice in one batch (a producer retry, a replay): the
     * first copy is applied, the others are skipped. */
    for (size_t i = a->from; i < a->to; i++)
        for (size_t j = a->from; j < i && !b->msgs[i].done; j++)
            if (strcmp(msg_id(&b->msgs[i]), msg_id(&b->msgs[j])) == 0)
                b->msgs[i].done = true;

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
    rc = flush_rows(b, a->from, a->to, err);
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
    "kafka_offset, status, attempts, last_error, ray_id, headers, payload, causation_id) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 1, $9, $10, $11::jsonb, $12::bytea, $13) "
    "ON CONFLICT (consumer, message_id) DO UPDATE SET status = EXCLUDED.status, "
    "attempts = loom_commands.attempts + 1, last_error = EXCLUDED.last_error, "
    "headers = EXCLUDED.headers, payload = EXCLUDED.payload, updated_at = now() "
    "WHERE loom_commands.status = 'retrying'",
    13};

static char *headers_json(rd_kafka_message_t *rkm)
{
    json_t *o = json_object();
    rd_kafka_headers_t *hdrs = NULL;
    if (rd_kafka_message_headers(rkm, &hdrs) == RD_KAFKA_RESP_ERR_NO_ERROR) {
        const char *name;
        const void *val;
        size_t len;
        for (size_t i = 0; rd_kafka_header_get_all(hdrs, i, &name, &val, &len) == 0; i++) {
            json_t *s = json_stringn(val ? val : "", val ? len : 0);
            if (s)
                json_object_set_new(o, name, s);
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
} record_arg_t;

static int record_body(loom_db_t *db, void *arg, loom_error_t *err)
{
    record_arg_t *r = arg;
    loom_msg_t *m = r->m;
    char part[16], off[32];
    snprintf(part, sizeof(part), "%" PRId32, m->rkm->partition);
    snprintf(off, sizeof(off), "%" PRId64, m->rkm->offset);
    char *hdrs = headers_json(m->rkm);
    char *bytea = bytea_hex(m->rkm->payload ? m->rkm->payload : "", m->rkm->len);
    const char *p[] = {r->b->wc->def->name,
                       msg_id(m),
                       m->decoded && m->ce.type ? m->ce.type : "unknown",
                       m->decoded ? m->ce.key : NULL,
                       rd_kafka_topic_name(m->rkm->rkt),
                       part,
                       off,
                       r->status,
                       r->error,
                       m->decoded ? m->ce.rayid : NULL,
                       hdrs,
                       bytea,
                       m->decoded ? m->ce.causationid : NULL};
    int rc = loom_db_exec(db, &stmt_record, p, NULL, err);
    free(hdrs);
    free(bytea);
    return rc;
}

static void record(batch_t *b, loom_msg_t *m, const char *status, const char *error)
{
    record_arg_t r = {b, m, status, error};
    loom_error_t err;
    loom_tx_opts_t o = {.max_attempts = 2};
    if (loom_tx_run(b->wc->w->opts.pool, &o, record_body, &r, &err) != 0)
        LOOM_WARN("could not record command status", "consumer=%s message_id=%s status=%s error=%s",
                  b->wc->def->name, msg_id(m), status, err.message);
}

/* ---- metrics ------------------------------------------------------------------------ */

static void count(worker_consumer_t *wc, const char *topic, const char *outcome, long long n)
{
    if (n <= 0 || !wc->w->m_messages)
        return;
    const char *labels[] = {wc->def->name, topic, outcome};
    loom_metrics_counter_add(wc->w->m_messages, labels, (double)n);
}

/* ---- partitions ------------------------------------------------------------------- */

typedef struct part_state {
    char topic[256];
    int32_t partition;
    bool paused;
    int64_t resume_at; /* mono ms */
    int64_t retry_offset;
    int attempts;          /* failures of the message at retry_offset */
    int64_t commit_offset; /* next offset to commit (all before it applied); -1 none */
    int64_t committed;     /* what the group coordinator confirmed; -1 unknown */
    bool committed_asked;  /* committed was asked for (-1 then: none, start of log) */
    int64_t sent;          /* last offset sent in an asynchronous commit */
    int64_t sent_ms;       /* and when (mono ms) */
    int64_t last_msg_ms;
    bool stalled;
} part_state_t;

typedef struct consumer_rt {
    worker_consumer_t *wc;
    rd_kafka_t *rk;
    part_state_t *parts;
    size_t n_parts, cap_parts;
    bool commit_failing; /* the last offset commit failed (logged once) */
    int stall_cursor;    /* where the next stall check starts asking the broker */
} consumer_rt_t;

/* ---- apply threads ------------------------------------------------------------------ */

/* One partition's share of a fetch, applied in batches of batch_size. */
typedef struct apply_task {
    part_state_t *ps;
    rd_kafka_message_t **msgs;
    size_t n;
} apply_task_t;

typedef struct apply_pool {
    consumer_rt_t *rt;
    size_t batch_size;
    pthread_t *threads;
    int n_threads;
    pthread_mutex_t mu;
    pthread_cond_t work, done;
    apply_task_t *tasks;
    size_t n_tasks, next, finished;
    uint64_t round; /* bumped for each set of tasks */
    bool quit;
} apply_pool_t;

static void batch_run(consumer_rt_t *rt, rd_kafka_message_t **msgs, size_t n, part_state_t *ps);

static void task_run(apply_pool_t *ap, apply_task_t *t)
{
    /* A partition held by a failure skips the rest (it is rewound and
     * fetched again). */
    for (size_t from = 0; from < t->n && !t->ps->paused; from += ap->batch_size)
        batch_run(ap->rt, t->msgs + from,
                  t->n - from < ap->batch_size ? t->n - from : ap->batch_size, t->ps);
}

/* Takes tasks until none is left; called with ap->mu held, returns with it. */
static void take_tasks(apply_pool_t *ap)
{
    while (ap->next < ap->n_tasks) {
        apply_task_t *t = &ap->tasks[ap->next++];
        pthread_mutex_unlock(&ap->mu);
        task_run(ap, t);
        pthread_mutex_lock(&ap->mu);
        if (++ap->finished == ap->n_tasks)
            pthread_cond_signal(&ap->done);
    }
}

static void *apply_thread(void *arg)
{
    apply_pool_t *ap = arg;
    uint64_t seen = 0;
    pthread_mutex_lock(&ap->mu);
    for (;;) {
        while (!ap->quit && ap->round == seen)
            pthread_cond_wait(&ap->work, &ap->mu);
        if (ap->quit)
            break;
        seen = ap->round;
        take_tasks(ap);
    }
    pthread_mutex_unlock(&ap->mu);
    return NULL;
}

/* The calling thread is one of the appliers: n - 1 threads are started. */
static void apply_pool_start(apply_pool_t *ap, consumer_rt_t *rt, int n, size_t batch_size)
{
    memset(ap, 0, sizeof(*ap));
    ap->rt = rt;
    ap->batch_size = batch_size;
    pthread_mutex_init(&ap->mu, NULL);
    pthread_cond_init(&ap->work, NULL);
    pthread_cond_init(&ap->done, NULL);
    ap->threads = loom_xcalloc((size_t)(n > 1 ? n - 1 : 1), sizeof(pthread_t));
    for (int i = 0; i < n - 1; i++) {
        if (pthread_create(&ap->threads[ap->n_threads], NULL, apply_thread, ap) != 0) {
            LOOM_WARN("could not start an apply thread", "consumer=%s threads=%d",
                      rt->wc->def->name, ap->n_threads + 1);
            break;
        }
        ap->n_threads++;
    }
}

/* Applies every task and returns when all are done. */
static void apply_pool_run(apply_pool_t *ap, apply_task_t *tasks, size_t n)
{
    if (n == 0)
        return;
    if (n == 1 || ap->n_threads == 0) {
        for (size_t i = 0; i < n; i++)
            task_run(ap, &tasks[i]);
        return;
    }
    pthread_mutex_lock(&ap->mu);
    ap->tasks = tasks;
    ap->n_tasks = n;
    ap->next = 0;
    ap->finished = 0;
    ap->round++;
    pthread_cond_broadcast(&ap->work);
    take_tasks(ap);
    while (ap->finished < ap->n_tasks)
        pthread_cond_wait(&ap->done, &ap->mu);
    ap->tasks = NULL;
    ap->n_tasks = ap->next = ap->finished = 0;
    pthread_mutex_unlock(&ap->mu);
}

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

static part_state_t *part_find(consumer_rt_t *rt, const char *topic, int32_t partition)
{
    for (size_t i = 0; i < rt->n_parts; i++)
        if (rt->parts[i].partition == partition && strcmp(rt->parts[i].topic, topic) == 0)
            return &rt->parts[i];
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
    part_state_t *ps = &rt->parts[rt->n_parts++];
    memset(ps, 0, sizeof(*ps));
    snprintf(ps->topic, sizeof(ps->topic), "%s", topic);
    ps->partition = partition;
    ps->retry_offset = -1;
    ps->commit_offset = -1;
    ps->committed = -1;
    ps->sent = -1;
    ps->last_msg_ms = loom_mono_ms();
    return ps;
}

static void part_remove(consumer_rt_t *rt, const char *topic, int32_t partition)
{
    part_state_t *ps = part_find(rt, topic, partition);
    if (ps)
        *ps = rt->parts[--rt->n_parts];
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

/* The applied offsets the coordinator has not confirmed (a new list). An
 * asynchronous commit sent less than a second ago may still be answered:
 * with `all` false, it is not sent again yet. */
static rd_kafka_topic_partition_list_t *unconfirmed_offsets(consumer_rt_t *rt, bool all)
{
    int64_t now = loom_mono_ms();
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new((int)rt->n_parts + 1);
    for (size_t i = 0; i < rt->n_parts; i++) {
        part_state_t *ps = &rt->parts[i];
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

/* Commits every partition's applied offset the coordinator has not
 * confirmed; a synchronous commit (revoke) sends all of them. */
static void commit_offsets(consumer_rt_t *rt, bool sync)
{
    rd_kafka_topic_partition_list_t *l = unconfirmed_offsets(rt, sync);
    if (l->cnt > 0) {
        rd_kafka_resp_err_t e = rd_kafka_commit(rt->rk, l, sync ? 0 : 1);
        if (sync || e)
            commit_result(rt, e, l);
    }
    rd_kafka_topic_partition_list_destroy(l);
}

/* Rewinds a partition to `offset` and pauses it until the backoff is over. */
static void part_hold(consumer_rt_t *rt, part_state_t *ps, int64_t offset, const char *why)
{
    loom_worker_t *w = rt->wc->w;
    if (ps->retry_offset == offset)
        ps->attempts++;
    else {
        ps->retry_offset = offset;
        ps->attempts = 1;
    }
    int64_t delay = loom_backoff_ms(ps->attempts - 1, w->opts.retry_base_ms, w->opts.retry_max_ms);
    ps->paused = true;
    ps->resume_at = loom_mono_ms() + delay;
    atomic_fetch_add(&w->retries, 1);
    count(rt->wc, ps->topic, "retried", 1);
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(l, ps->topic, ps->partition)->offset = offset;
    rd_kafka_pause_partitions(rt->rk, l);
    rd_kafka_error_t *e = rd_kafka_seek_partitions(rt->rk, l, 5000);
    if (e) {
        LOOM_WARN("could not rewind partition", "consumer=%s topic=%s partition=%d error=%s",
                  rt->wc->def->name, ps->topic, ps->partition, rd_kafka_error_string(e));
        rd_kafka_error_destroy(e);
    }
    rd_kafka_topic_partition_list_destroy(l);
    LOOM_WARN("command failed, will retry",
              "consumer=%s topic=%s partition=%d offset=%lld "
              "attempt=%d retry_in_ms=%lld error=%s",
              rt->wc->def->name, ps->topic, ps->partition, (long long)offset, ps->attempts,
              (long long)delay, why);
}

static void part_resume_due(consumer_rt_t *rt)
{
    int64_t now = loom_mono_ms();
    for (size_t i = 0; i < rt->n_parts; i++) {
        part_state_t *ps = &rt->parts[i];
        if (!ps->paused || now < ps->resume_at)
            continue;
        rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
        rd_kafka_topic_partition_list_add(l, ps->topic, ps->partition);
        rd_kafka_resume_partitions(rt->rk, l);
        rd_kafka_topic_partition_list_destroy(l);
        ps->paused = false;
        ps->last_msg_ms = now;
    }
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

/* Applies msgs (all of one partition, in offset order). */
static void apply_partition(consumer_rt_t *rt, batch_t *b, part_state_t *ps)
{
    worker_consumer_t *wc = rt->wc;
    loom_worker_t *w = wc->w;
    for (size_t i = 0; i < b->n; i++) {
        loom_msg_t *m = &b->msgs[i];
        m->attempt = (ps->retry_offset == m->rkm->offset ? ps->attempts : 0) + 1;
    }
    apply_arg_t a = {.b = b, .from = 0, .to = b->n};
    loom_error_t err;
    loom_tx_opts_t o = {.max_attempts = 3, .stop = NULL};
    int rc = loom_tx_run(w->opts.pool, &o, apply_body, &a, &err);
    if (rc == 0) {
        size_t done = 0;
        for (size_t i = 0; i < b->n; i++)
            done += b->msgs[i].done;
        atomic_fetch_add(&w->applied, (long long)(b->n - done));
        atomic_fetch_add(&w->skipped, (long long)done);
        count(wc, ps->topic, "applied", (long long)(b->n - done));
        count(wc, ps->topic, "skipped", (long long)done);
        ps->commit_offset = b->msgs[b->n - 1].rkm->offset + 1;
        ps->retry_offset = -1;
        ps->attempts = 0;
        return;
    }
    if (!a.handler_failed || b->n == 1) {
        if (a.handler_failed && is_permanent(&a.herr)) {
            loom_msg_t *m = &b->msgs[a.failed];
            record(b, m, "rejected", a.herr.message);
            atomic_fetch_add(&w->rejected, 1);
            count(wc, ps->topic, "rejected", 1);
            LOOM_WARN("command rejected", "consumer=%s message_id=%s code=%s error=%s",
                      wc->def->name, msg_id(m), a.herr.code, a.herr.message);
            ps->commit_offset = b->msgs[b->n - 1].rkm->offset + 1;
            ps->retry_offset = -1;
            return;
        }
        /* Transient: hold the partition at the first message not applied. */
        loom_msg_t *m = &b->msgs[a.handler_failed ? a.failed : 0];
        record(b, m, "retrying", err.message);
        part_hold(rt, ps, m->rkm->offset, err.message);
        return;
    }
    /* Isolate: one message at a time. */
    LOOM_INFO("batch failed, applying its commands one by one",
              "consumer=%s topic=%s partition=%d messages=%zu error=%s", wc->def->name, ps->topic,
              ps->partition, b->n, err.message);
    for (size_t i = 0; i < b->n; i++) {
        apply_arg_t one = {.b = b, .from = i, .to = i + 1};
        loom_tx_opts_t o1 = {.max_attempts = 3};
        rc = loom_tx_run(w->opts.pool, &o1, apply_body, &one, &err);
        loom_msg_t *m = &b->msgs[i];
        if (rc == 0) {
            atomic_fetch_add(&w->applied, m->done ? 0 : 1);
            atomic_fetch_add(&w->skipped, m->done ? 1 : 0);
            count(wc, ps->topic, m->done ? "skipped" : "applied", 1);
            ps->commit_offset = m->rkm->offset + 1;
            continue;
        }
        if (one.handler_failed && is_permanent(&one.herr)) {
            record(b, m, "rejected", one.herr.message);
            atomic_fetch_add(&w->rejected, 1);
            count(wc, ps->topic, "rejected", 1);
            LOOM_WARN("command rejected", "consumer=%s message_id=%s code=%s error=%s",
                      wc->def->name, msg_id(m), one.herr.code, one.herr.message);
            ps->commit_offset = m->rkm->offset + 1;
            continue;
        }
        record(b, m, "retrying", err.message);
        part_hold(rt, ps, m->rkm->offset, err.message);
        return;
    }
    ps->retry_offset = -1;
    ps->attempts = 0;
}

static void batch_run(consumer_rt_t *rt, rd_kafka_message_t **msgs, size_t n, part_state_t *ps)
{
    loom_worker_t *w = rt->wc->w;
    batch_t b;
    memset(&b, 0, sizeof(b));
    b.wc = rt->wc;
    b.site = w->opts.cfg ? w->opts.cfg->site_name : "local";
    b.node = w->opts.cfg ? w->opts.cfg->node_id : "worker";
    loom_arena_init(&b.arena, 64 * 1024);
    loom_arena_init(&b.scratch, 16 * 1024);
    b.msgs = loom_xcalloc(n, sizeof(*b.msgs));
    b.n = n;
    for (size_t i = 0; i < n; i++) {
        loom_msg_t *m = &b.msgs[i];
        m->batch = &b;
        m->rkm = msgs[i];
        loom_error_clear(&m->decode_err);
        m->decoded = loom_ce_decode(msgs[i], &b.arena, &m->ce, &m->decode_err) == 0;
    }
    apply_partition(rt, &b, ps);
    for (size_t i = 0; i < n; i++) {
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

/* ---- stall detection ---------------------------------------------------------------- */

/* Time a stall check may spend asking the broker, so the loop (and every
 * command waiting in it) is never held long: partitions not asked this time
 * are asked at the next checks, in turn. */
#define STALL_CHECK_BUDGET_MS  50
#define STALL_QUERY_TIMEOUT_MS 500

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
    int stalled = 0, retrying = 0, next_cursor = rt->stall_cursor;
    for (int k = 0; k < assigned->cnt; k++) {
        int i = (rt->stall_cursor + k) % assigned->cnt;
        rd_kafka_topic_partition_t *tp = &assigned->elems[i];
        part_state_t *ps = part_get(rt, tp->topic, tp->partition);
        int64_t lo = 0, hi = 0;
        bool idle = !ps->paused && now - ps->last_msg_ms >= w->opts.stall_after_ms;
        /* Cached watermarks are free; an idle partition gets a fresh answer
         * while the budget lasts. */
        bool ask = idle && loom_mono_ms() < budget_end;
        rd_kafka_resp_err_t e =
            ask ? rd_kafka_query_watermark_offsets(rt->rk, tp->topic, tp->partition, &lo, &hi,
                                                   STALL_QUERY_TIMEOUT_MS)
                : rd_kafka_get_watermark_offsets(rt->rk, tp->topic, tp->partition, &lo, &hi);
        if (ask)
            next_cursor = i + 1;
        if (e != RD_KAFKA_RESP_ERR_NO_ERROR || hi < 0)
            continue;
        int64_t pos = tp->offset >= 0 ? tp->offset : ps->committed;
        if (pos < 0)
            pos = lo;
        int64_t lag = hi > pos ? hi - pos : 0;
        if (w->m_lag) {
            char part[16];
            snprintf(part, sizeof(part), "%d", (int)tp->partition);
            const char *labels[] = {name, tp->topic, part};
            loom_metrics_gauge_set(w->m_lag, labels, (double)lag);
        }
        retrying += ps->paused;
        if (idle && lag > 0 && !ps->stalled) {
            ps->stalled = true;
            atomic_fetch_add(&w->stalls, 1);
            LOOM_WARN("partition lag is not shrinking: messages wait but none arrive",
                      "consumer=%s topic=%s partition=%d lag=%lld idle_ms=%lld", name, tp->topic,
                      tp->partition, (long long)lag, (long long)(now - ps->last_msg_ms));
        } else if (lag == 0) {
            ps->stalled = false;
        }
        stalled += ps->stalled;
    }
    const char *labels[] = {name};
    loom_metrics_gauge_set(w->m_stalled, labels, stalled);
    loom_metrics_gauge_set(w->m_retrying, labels, retrying);
    rt->stall_cursor = assigned->cnt > 0 ? next_cursor % assigned->cnt : 0;
    rd_kafka_topic_partition_list_destroy(assigned);
}

/* ---- the loop ------------------------------------------------------------------------ */

static void rebalance_cb(rd_kafka_t *rk, rd_kafka_resp_err_t e,
                         rd_kafka_topic_partition_list_t *parts, void *opaque)
{
    consumer_rt_t *rt = opaque;
    if (e == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        for (int i = 0; i < parts->cnt; i++)
            part_remove(rt, parts->elems[i].topic, parts->elems[i].partition);
        rd_kafka_assign(rk, parts);
        LOOM_INFO("partitions assigned", "consumer=%s count=%d", rt->wc->def->name, parts->cnt);
    } else {
        commit_offsets(rt, true);
        for (int i = 0; i < parts->cnt; i++)
            part_remove(rt, parts->elems[i].topic, parts->elems[i].partition);
        rd_kafka_assign(rk, NULL);
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
         * partition, 64 MiB) would let a lagging worker hold far more
         * memory than a few batches need. */
        {"queued.min.messages", "10000"},
        {"queued.max.messages.kbytes", "16384"},
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
    rd_kafka_topic_partition_list_t *l = unconfirmed_offsets(rt, true);
    if (l->cnt > 0 && rd_kafka_commit_queue(rt->rk, l, cq, NULL, NULL) == 0) {
        for (bool done = false; !done && loom_mono_ms() < until;) {
            rd_kafka_event_t *ev = rd_kafka_queue_poll(cq, 100);
            if (ev && rd_kafka_event_type(ev) == RD_KAFKA_EVENT_OFFSET_COMMIT) {
                commit_result(rt, rd_kafka_event_error(ev),
                              rd_kafka_event_topic_partition_list(ev));
                done = true;
            }
            rd_kafka_event_destroy(ev);
        }
    }
    rd_kafka_topic_partition_list_destroy(l);
    bool closed = false;
    rd_kafka_error_t *e = rd_kafka_consumer_close_queue(rt->rk, cq);
    if (e) {
        LOOM_WARN("could not leave the consumer group", "consumer=%s error=%s", rt->wc->def->name,
                  rd_kafka_error_string(e));
        rd_kafka_error_destroy(e);
    } else {
        while (!(closed = rd_kafka_consumer_closed(rt->rk)) && loom_mono_ms() < until) {
            rd_kafka_event_t *ev = rd_kafka_queue_poll(cq, 100);
            /* The offsets are committed above: a revocation only unassigns. */
            if (ev && rd_kafka_event_type(ev) == RD_KAFKA_EVENT_REBALANCE)
                rd_kafka_assign(rt->rk, NULL);
            rd_kafka_event_destroy(ev);
        }
        if (!closed)
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
    consumer_rt_t rt = {.wc = wc};
    rt.rk = consumer_new(&rt);
    if (!rt.rk)
        return NULL;
    rd_kafka_topic_partition_list_t *subs = consumer_subscription(&rt);
    rd_kafka_resp_err_t e = rd_kafka_subscribe(rt.rk, subs);
    rd_kafka_topic_partition_list_destroy(subs);
    if (e) {
        LOOM_ERROR("could not subscribe", "consumer=%s error=%s", wc->def->name,
                   rd_kafka_err2str(e));
        rd_kafka_destroy(rt.rk);
        return NULL;
    }
    LOOM_INFO("consumer started", "consumer=%s group=%s%s", wc->def->name, w->opts.group_prefix,
              wc->def->name);
    int batch_size = wc->def->batch_size > 0 ? wc->def->batch_size : 100;
    rd_kafka_queue_t *q = rd_kafka_queue_get_consumer(rt.rk);
    /* Fetch several batches' worth at once: split by partition, each
     * partition's share then fills its transactions. */
    size_t fetch_max = (size_t)batch_size * 8 < 4000 ? (size_t)batch_size * 8 : 4000;
    rd_kafka_message_t **msgs = loom_xcalloc(fetch_max, sizeof(*msgs));
    rd_kafka_message_t **group_msgs = loom_xcalloc(fetch_max, sizeof(*msgs));
    int64_t check_every = w->opts.stall_after_ms / 2 < 5000 ? w->opts.stall_after_ms / 2 : 5000;
    int64_t next_stall_check = loom_mono_ms() + check_every;
    apply_pool_t ap;
    apply_pool_start(&ap, &rt, w->opts.apply_threads > 0 ? w->opts.apply_threads : 1,
                     (size_t)batch_size);
    apply_task_t *tasks = loom_xcalloc(fetch_max, sizeof(*tasks));
    bool *used = loom_xcalloc(fetch_max, sizeof(bool));

    while (!atomic_load(&w->stop)) {
        part_resume_due(&rt);
        /* Wait for one message, then take what else is already fetched:
         * rd_kafka_consume_batch_queue() alone would wait for a full batch
         * or its timeout, a delay every command would pay at low load. */
        ssize_t n = 0;
        rd_kafka_message_t *first = rd_kafka_consumer_poll(rt.rk, 200);
        if (first) {
            msgs[n++] = first;
            ssize_t more = rd_kafka_consume_batch_queue(q, 0, msgs + 1, fetch_max - 1);
            if (more > 0)
                n += more;
        }
        /* Split by partition, keeping each partition's order: one task each,
         * with its messages side by side in group_msgs. */
        memset(used, 0, fetch_max * sizeof(bool));
        size_t n_tasks = 0, k = 0;
        for (ssize_t i = 0; i < n; i++) {
            rd_kafka_message_t *rkm = msgs[i];
            if (used[i])
                continue;
            used[i] = true;
            if (rkm->err) {
                if (rkm->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
                    LOOM_WARN("consumer error", "consumer=%s error=%s", wc->def->name,
                              rd_kafka_message_errstr(rkm));
                rd_kafka_message_destroy(rkm);
                continue;
            }
            apply_task_t *t = &tasks[n_tasks++];
            t->msgs = group_msgs + k;
            group_msgs[k++] = rkm;
            for (ssize_t j = i + 1; j < n; j++) {
                if (!used[j] && !msgs[j]->err && msgs[j]->partition == rkm->partition &&
                    msgs[j]->rkt == rkm->rkt) {
                    group_msgs[k++] = msgs[j];
                    used[j] = true;
                }
            }
            t->n = (size_t)(group_msgs + k - t->msgs);
            t->ps = part_get(&rt, rd_kafka_topic_name(rkm->rkt), rkm->partition);
            t->ps->last_msg_ms = loom_mono_ms();
            t->ps->stalled = false;
        }
        apply_pool_run(&ap, tasks, n_tasks);
        for (size_t j = 0; j < k; j++)
            rd_kafka_message_destroy(group_msgs[j]);
        commit_offsets(&rt, false);
        if (loom_mono_ms() >= next_stall_check) {
            check_stalls(&rt);
            next_stall_check = loom_mono_ms() + check_every;
        }
    }
    apply_pool_stop(&ap);
    free(tasks);
    free(used);
    /* Graceful: the batches in flight are done; commit and leave the group. */
    free(msgs);
    free(group_msgs);
    rd_kafka_queue_destroy(q);
    bool closed = consumer_leave(&rt, loom_mono_ms() + CONSUMER_CLOSE_MS);
    rd_kafka_destroy_flags(rt.rk, closed ? 0 : RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE);
    free(rt.parts);
    LOOM_INFO("consumer stopped", "consumer=%s", wc->def->name);
    return NULL;
}
