/*
 * Steering commands a consumer is stuck on (docs/console.md, README
 * "Commands"): park gives up retrying one, so its partition moves on;
 * replay sends a parked or rejected one again. `loom commands park|replay`
 * and the engine's own commands engine.park_command and
 * engine.replay_command (published by POST /v1/commands/{id}/park and
 * /replay) share these statements.
 */
#ifndef LOOM_COMMAND_ADMIN_H
#define LOOM_COMMAND_ADMIN_H

#include "loom/consumer.h"
#include "loom/db.h"
#include "loom/error.h"

#include <libpq-fe.h>

/* Marks the retrying rows of command id (of consumer, or every consumer when
 * NULL) parked. *rows gets one row per parked consumer: (consumer). */
int loom_command_park(loom_db_t *db, const char *id, const char *consumer, PGresult **rows,
                      loom_error_t *err);

/* Marks the parked and rejected rows of command id that kept their message
 * retrying again, so the consumer's dedup lets the command through once
 * more, and returns what to send: (consumer, topic, stream_id, headers as
 * JSON text, payload as bytea text), one row per consumer. */
int loom_command_replay_take(loom_db_t *db, const char *id, const char *consumer, PGresult **rows,
                             loom_error_t *err);

/* The engine's consumer "engine.commands", which applies engine.park_command
 * and engine.replay_command ({"id", "consumer"?}); a replay goes out through
 * the outbox, in the same transaction that marks the command retrying. */
extern const loom_consumer_def_t loom_engine_consumers[];

#endif
