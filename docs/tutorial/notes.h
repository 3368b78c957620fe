/* notes.h: what the notes service hands to cmd/loom/main.c. */
#ifndef NOTES_H
#define NOTES_H

#include "loom/consumer.h"
#include "loom/gateway.h"
#include "loom/op.h"

int notes_store(loom_msg_t *msg, loom_error_t *err);
extern const char *const notes_topics[];
extern const loom_op_t notes_get_op;
extern const loom_route_t notes_routes[];
extern const char notes_migration_sql[];

#endif
