/*
 * Loom's public API in one place: every header a service, its main.c and its
 * tests may include. These are the headers `cmake --install` installs
 * (component loom_dev, docs/writing-a-service.md); the others of
 * engine/include/loom/ (worker.h, task_runner.h, node.h, pglocal.h, mem.h,
 * sha256.h) are
 * the engine's own and stay in the source tree. A test checks that the
 * installed headers are exactly these.
 *
 * A service usually includes only loom/service.h (and main.c loom/app.h).
 */
#ifndef LOOM_LOOM_H
#define LOOM_LOOM_H

/* An application and its services. */
#include "loom/app.h"     /* loom_app_t, loom_main(): the binary's main.c */
#include "loom/service.h" /* loom_service_t: one service as one descriptor */
#include "loom/version.h" /* LOOM_VERSION, loom_version() */

/* The write side: consumers, commands, events, follow-ups, jobs. */
#include "loom/consumer.h" /* loom_command_t, loom_emit(), loom_publish() */
#include "loom/periodic.h" /* periodic jobs */
#include "loom/replay.h"   /* projections `loom replay` rebuilds */
#include "loom/task.h"     /* headless tasks and oneshot jobs */

/* The read side and HTTP. */
#include "loom/gateway.h" /* routes: loom_route_t, loom_gateway_publish() */
#include "loom/http.h"    /* requests and responses of routes */
#include "loom/op.h"      /* ops: loom_op_t, loom_op_call() */

/* Storage and messages. */
#include "loom/bus.h"      /* the Kafka producer */
#include "loom/db.h"       /* statements, transactions, pools */
#include "loom/envelope.h" /* CloudEvents */
#include "loom/migrate.h"  /* migrations */
#include "loom/topic.h"    /* topic names */

/* Support. */
#include "loom/arena.h"   /* per-message memory */
#include "loom/clock.h"   /* wall and monotonic clocks */
#include "loom/config.h"  /* LOOM_* variables */
#include "loom/error.h"   /* error codes and loom_error_t */
#include "loom/log.h"     /* structured logs */
#include "loom/metrics.h" /* Prometheus metrics */
#include "loom/uuid.h"    /* UUIDv7 */

#endif
