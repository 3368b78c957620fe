/*
 * cli_publish.c: `loom publish TOPIC JSON` and `loom publish TOPIC -`
 * (NDJSON on stdin): commands from the shell or a script, as CloudEvents in
 * Kafka binary mode, each acknowledged by the broker.
 */
#include "cli.h"
#include "loom/bus.h"
#include "loom/clock.h"
#include "loom/log.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define LINE_MAX_BYTES (4 * 1024 * 1024)

typedef struct pub_state {
    atomic_long acked;
    atomic_long failed;
    char last_error[LOOM_ERROR_MESSAGE_MAX];
} pub_state_t;

static void on_delivery(void *opaque, const loom_error_t *err, int32_t partition, int64_t offset)
{
    (void)partition;
    (void)offset;
    pub_state_t *st = opaque;
    if (err) {
        atomic_fetch_add(&st->failed, 1);
        snprintf(st->last_error, sizeof(st->last_error), "%s", err->message);
    } else {
        atomic_fetch_add(&st->acked, 1);
    }
}

/* Builds the event for one input document: a whole CloudEvent when it has
 * "specversion", otherwise the data of a new one. */
static int build_event(cli_ctx_t *ctx, const char *topic, const char *type, const char *text,
                       size_t len, loom_arena_t *arena, loom_ce_t *ce, loom_error_t *err)
{
    json_error_t jerr;
    json_t *doc = json_loadb(text, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &jerr);
    if (!doc)
        return loom_error_set(err, LOOM_CODE_INVALID_JSON, "not valid JSON: %s (column %d)",
                              jerr.text, jerr.column);
    bool whole = json_is_object(doc) && json_object_get(doc, "specversion");
    json_decref(doc);
    if (whole)
        return loom_ce_decode_json(text, len, arena, ce, err);
    const char *t = type;
    if (!t)
        t = strstr(topic, ".cmd.") ? strstr(topic, ".cmd.") + 5 : topic;
    loom_ce_init(ce, arena, ctx->cfg.site_name, ctx->cfg.node_id, t);
    ce->data = loom_arena_strndup(arena, text, len);
    ce->data_len = len;
    return 0;
}

static int publish_one(cli_ctx_t *ctx, loom_producer_t *p, const char *topic, const char *key,
                       const char *type, const char *text, size_t len, pub_state_t *st,
                       loom_error_t *err)
{
    loom_arena_t arena;
    loom_arena_init(&arena, 0);
    loom_ce_t ce;
    int rc = build_event(ctx, topic, type, text, len, &arena, &ce, err);
    const char *k = key ? key : ce.id;
    for (int tries = 0; rc == 0; tries++) {
        rc = loom_producer_send(p, topic, k, strlen(k), &ce, on_delivery, st, err);
        if (rc == 0 || !loom_error_is(err, LOOM_CODE_QUEUE_FULL) || tries > 6000)
            break;
        loom_sleep_ms(10); /* the queue drains as the broker acknowledges */
        rc = 0;
    }
    loom_arena_release(&arena);
    return rc;
}

static int cmd_publish(cli_ctx_t *ctx, int argc, char **argv)
{
    const char *topic = NULL, *input = NULL, *key = NULL, *type = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--key") == 0 && i + 1 < argc)
            key = argv[++i];
        else if (strcmp(argv[i], "--type") == 0 && i + 1 < argc)
            type = argv[++i];
        else if (argv[i][0] == '-' && argv[i][1] != '\0')
            return cli_usage_error("publish", "unknown option '%s'", argv[i]);
        else if (!topic)
            topic = argv[i];
        else if (!input)
            input = argv[i];
        else
            return cli_usage_error("publish", "unexpected argument '%s'", argv[i]);
    }
    if (!topic || !input)
        return cli_usage_error("publish", "needs a topic and a JSON document (or - for stdin)");
    int rc = cli_need_brokers(ctx, "publish");
    if (rc != 0)
        return rc;

    loom_error_t err;
    loom_producer_t *p = NULL;
    loom_producer_opts_t popts = {.brokers = ctx->cfg.kafka_brokers, .cfg = &ctx->cfg};
    if (loom_producer_new(&popts, &p, &err) != 0)
        return cli_fail("publish", "%s", err.message);
    pub_state_t st = {0};
    long sent = 0, bad = 0;
    int64_t t0 = loom_mono_ms();

    if (strcmp(input, "-") != 0) {
        if (publish_one(ctx, p, topic, key, type, input, strlen(input), &st, &err) != 0) {
            loom_producer_free(p);
            return cli_fail("publish", "%s", err.message);
        }
        sent = 1;
    } else {
        bool tty = isatty(2);
        char *line = NULL;
        size_t cap = 0;
        ssize_t n;
        long lineno = 0;
        int64_t next_progress = t0 + 500;
        while ((n = getline(&line, &cap, stdin)) >= 0) {
            lineno++;
            while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
                line[--n] = '\0';
            if (n == 0)
                continue;
            if (n > LINE_MAX_BYTES) {
                fprintf(stderr, "loom publish: line %ld: longer than %d bytes, skipped\n", lineno,
                        LINE_MAX_BYTES);
                bad++;
                continue;
            }
            if (publish_one(ctx, p, topic, key, type, line, (size_t)n, &st, &err) != 0) {
                fprintf(stderr, "loom publish: line %ld: %s\n", lineno, err.message);
                bad++;
                continue;
            }
            sent++;
            if (tty && loom_mono_ms() >= next_progress) {
                fprintf(stderr, "\rpublished %ld, acknowledged %ld, failed %ld", sent,
                        atomic_load(&st.acked), atomic_load(&st.failed) + bad);
                next_progress = loom_mono_ms() + 500;
            }
        }
        free(line);
        if (tty)
            fputc('\n', stderr);
    }
    if (loom_producer_flush(p, ctx->cfg.shutdown_timeout_ms) != 0)
        fprintf(stderr, "loom publish: %d message(s) not acknowledged within %lld ms\n",
                loom_producer_in_flight(p), (long long)ctx->cfg.shutdown_timeout_ms);
    loom_producer_free(p);
    long acked = atomic_load(&st.acked);
    long failed = sent + bad - acked; /* refused, undelivered or unreadable */
    double secs = (double)(loom_mono_ms() - t0) / 1000.0;
    printf("published %ld message%s to %s in %.1fs (%.0f/s), %ld failed\n", acked,
           acked == 1 ? "" : "s", topic, secs, secs > 0 ? (double)acked / secs : 0.0, failed);
    if (atomic_load(&st.failed) > 0)
        fprintf(stderr, "loom publish: last delivery error: %s\n", st.last_error);
    return acked == sent && bad == 0 ? LOOM_EXIT_OK : LOOM_EXIT_FAILURE;
}

const cli_command_t cli_publish_command = {
    "publish", "publish commands to a topic (JSON, or NDJSON on stdin)",
    "usage: loom publish [--key KEY] [--type TYPE] TOPIC JSON\n"
    "       loom publish [--key KEY] [--type TYPE] TOPIC -\n"
    "\n"
    "Publishes a command as a CloudEvent in Kafka binary mode and waits until the\n"
    "broker acknowledged it. With '-' every line of stdin is one JSON document\n"
    "(NDJSON); a progress line is shown on a terminal and a summary at the end.\n"
    "\n"
    "A document with a \"specversion\" member is taken as a whole CloudEvent (JSON\n"
    "event format) and published with its id. Any other JSON document becomes the\n"
    "data of a new event: id a new UUIDv7, source loom://SITE/NODE, type TYPE or\n"
    "the topic without its <prefix>.cmd. part.\n"
    "\n"
    "  --key KEY    Kafka key (the stream id); default the event id\n"
    "  --type TYPE  CloudEvents type of new events\n"
    "\n"
    "Exits 1 when any message was not acknowledged. Needs LOOM_KAFKA_BROKERS.\n",
    true, cmd_publish};
