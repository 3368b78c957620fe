/*
 * Consumers: the write side of Loom (docs/architecture.md, "Consumers").
 *
 * A consumer is a name, the topics it reads and a handler. The worker runs
 * each consumer in its own Kafka consumer group ("loom.<name>"), takes up to
 * batch_size messages of one partition, and applies them in ONE database
 * transaction together with their loom_commands rows (the dedup record and
 * status); the Kafka offset is committed only after that transaction commits.
 * A redelivered message finds its row and is skipped.
 *
 * A handler returns 0, or an error: a 4xx class (bad_request, not_found,
 * conflict, ...) rejects the command for good (status "rejected", never
 * retried); anything else is transient and retried forever with capped
 * exponential backoff and jitter, pausing only that partition.
 */
#ifndef LOOM_CONSUMER_H
#define LOOM_CONSUMER_H

#include "loom/arena.h"
#include "loom/config.h"
#include "loom/db.h"
#include "loom/envelope.h"
#include "loom/error.h"
#include "loom/topic.h"

#include <jansson.h>
#include <stdint.h>

typedef struct loom_msg loom_msg_t;

/* Applies one command. Runs inside the batch's transaction; may run again
 * (retries, batch isolation), so it must only write through loom_msg_db(),
 * loom_msg_add_row(), loom_emit() and loom_publish(). */
typedef int (*loom_handler_fn)(loom_msg_t *msg, loom_error_t *err);

/* A handler for one command type: data is the command's JSON object. */
typedef int (*loom_command_fn)(loom_msg_t *msg, json_t *data, loom_error_t *err);
/*
 * One entry of a consumer's command table. The table is the one place that
 * says which command types a consumer applies and where they travel: the
 * worker subscribes to the topics of its commands, `loom migrate up` creates
 * them, and publishers route each type with loom_topic_for_command().
 */
typedef struct loom_command {
    const char *type; /* CloudEvent type, "messages.put_batch" */
    loom_command_fn fn;
    const char *topic; /* NULL: "loom.cmd.<service>" (the type up to its first
                        * dot). Set it only for an aggregate whose order is
                        * independent of the service's other commands. */
} loom_command_t;

typedef struct loom_consumer_def {
    const char *name;          /* "messages.store"; the group is "loom.<name>" */
    const char *const *topics; /* NULL-terminated; NULL: the topics of `commands` */
    loom_handler_fn handler;   /* NULL: loom_msg_dispatch() over `commands` */
    int batch_size;            /* messages per transaction; 0: 100 */
    const char *description;
    const loom_command_t *commands; /* the command table (see above), ending
                                     * with an empty entry */
} loom_consumer_def_t;

/*
 * The topics a consumer reads, as Kafka names under the configured prefix:
 * its `topics` when set, else each distinct topic of its commands. Writes at
 * most max names into out; returns how many there are.
 */
size_t loom_consumer_topics(const loom_consumer_def_t *def, char (*out)[LOOM_TOPIC_MAX],
                            size_t max);
/* Declares the routes of every command of defs that names its own topic, so
 * loom_topic_for_command() finds them. false (with err) when one type is
 * routed to two topics. */
int loom_consumer_routes_register(const loom_consumer_def_t *defs, size_t n, loom_error_t *err);

/* The transaction's connection (borrowed). */
loom_db_t *loom_msg_db(loom_msg_t *msg);
/* The decoded command (borrowed). */
const loom_ce_t *loom_msg_event(const loom_msg_t *msg);
/* The data parsed as JSON (borrowed, cached); NULL with INVALID_JSON set. */
json_t *loom_msg_json(loom_msg_t *msg, loom_error_t *err);
/* Memory that lives until the message is handled. */
loom_arena_t *loom_msg_arena(loom_msg_t *msg);
/* 1 on the first try, then 2, 3... */
int loom_msg_attempt(const loom_msg_t *msg);
/* Kafka coordinates of the message. */
const char *loom_msg_topic(const loom_msg_t *msg);
int32_t loom_msg_partition(const loom_msg_t *msg);
int64_t loom_msg_offset(const loom_msg_t *msg);
/* The worker's configuration (service settings such as retention); NULL
 * when the worker was started without one. */
const loom_config_t *loom_msg_config(const loom_msg_t *msg);

/* A consumer's handler in one call: parses the data as a JSON object and
 * calls the entry of `cmds` (n of them) for the command's type; anything
 * else is rejected with INVALID_ARGUMENT / INVALID_JSON. */
int loom_msg_dispatch(loom_msg_t *msg, const loom_command_t *cmds, size_t n, loom_error_t *err);
/* The entries of a command table (up to its empty entry). */
size_t loom_commands_count(const loom_command_t *cmds);
/* Sets the command's result, stored in loom_commands.result (steals). */
void loom_msg_set_result(loom_msg_t *msg, json_t *result);

/*
 * Adds a row to a multi-row statement that runs once for the whole batch,
 * when the batch is written (with the engine's own rows, in one round trip).
 * stmt takes one array per column, for example
 *   INSERT INTO ledger (id, amount) SELECT * FROM unnest($1::text[], $2::bigint[])
 * and values holds stmt->nparams values (NULL: SQL NULL). Use it for writes
 * whose result the handler does not need: it saves a round trip per command.
 * The rows are not visible to statements run by the handlers of the same
 * batch. A row the database refuses fails its own command, as a handler's
 * error would.
 */
int loom_msg_add_row(loom_msg_t *msg, const loom_db_stmt_t *stmt, const char *const *values,
                     loom_error_t *err);

/*
 * Appends an event to stream_id in the command's transaction. expected_version
 * is the version the caller last saw (0 for a new stream) or -1 to append
 * whatever the stream holds. A stream that moved on fails with
 * VERSION_CONFLICT. data is stolen. Events of one batch are written with one
 * statement when the batch commits.
 */
int loom_emit(loom_msg_t *msg, const char *stream_id, int64_t expected_version, const char *type,
              json_t *data, loom_error_t *err);

/* Publishes a follow-up message through the outbox, in the command's
 * transaction: a CloudEvent of `type` with data (stolen), key, caused by this
 * command (causationid) and with its rayid. The outbox relay sends it. */
int loom_publish(loom_msg_t *msg, const char *topic, const char *key, const char *type,
                 json_t *data, loom_error_t *err);

/*
 * Applies msgs (one partition's, in offset order) with def on pool exactly as
 * a worker would, but without a Kafka consumer: nothing is paused or
 * rewound. For the Kafka fuzz target (tests/fuzz/fuzz_kafka.c). The messages
 * need a topic (rkt). Returns the offset a worker would commit (every message
 * before it has its outcome recorded), or -1 when none.
 */
int64_t loom_consumer_apply_offline(loom_db_pool_t *pool, const loom_consumer_def_t *def,
                                    rd_kafka_message_t **msgs, size_t n);

#endif
