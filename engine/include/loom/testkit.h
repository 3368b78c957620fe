/*
 * The test kit: a service's tests against a real PostgreSQL and Kafka, in a
 * few lines (docs/writing-a-service.md, "Test it").
 *
 *   static loom_testkit_t *kit;
 *   static void start(void)
 *   {
 *       static const loom_service_t *const services[] = {&ledger_service};
 *       loom_error_t err;
 *       if (loom_testkit_start(services, LOOM_COUNT(services), NULL, &kit, &err) != 0)
 *           cr_assert_fail("%s", err.message);
 *   }
 *   static void stop(void) { loom_testkit_stop(kit); }
 *   TestSuite(ledger, .init = start, .fini = stop, .timeout = 120);
 *
 *   Test(ledger, opens_an_account)
 *   {
 *       loom_testkit_outcome_t o;
 *       loom_testkit_command(kit, "ledger.open", "acc-1", json_pack("{s:s}", "id", "acc-1"),
 *                            &o, NULL);
 *       cr_assert_str_eq(o.status, "applied", "%s", o.error);
 *       ...
 *       loom_testkit_outcome_release(&o);
 *   }
 *
 * loom_testkit_start() starts a private PostgreSQL (initdb in a temporary
 * directory, a free loopback port: the code of `loom dev`), applies the
 * migrations of the engine and of the services, starts a Kafka (librdkafka's
 * mock cluster in the process; a real broker when LOOM_TEST_KAFKA_BROKERS is
 * set, on topics and consumer groups named for this kit alone), and runs the
 * services' consumers and the outbox relay in the process, as `loom worker`
 * does. loom_testkit_stop() stops all of it and removes the directory. A
 * watcher process does the same when the test process ends without calling
 * it (a crash, a timeout, an abort), so no server outlives a test.
 *
 * Everything waits with a deadline and reports a timeout as an error; none
 * of it asserts, so it works with any test framework (criterion's .init and
 * .fini above run also when a test fails). One kit at a time per process:
 * the kit sets the process's topic prefix. Criterion runs each test in a
 * process of its own, so each test gets a fresh kit.
 */
#ifndef LOOM_TESTKIT_H
#define LOOM_TESTKIT_H

#include "loom/db.h"
#include "loom/error.h"
#include "loom/service.h"

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

typedef struct loom_testkit loom_testkit_t;

typedef struct loom_testkit_opts {
    const char *kafka_brokers; /* NULL: LOOM_TEST_KAFKA_BROKERS, else the mock cluster */
    int partitions;            /* of every topic; 0: 3 */
    int64_t timeout_ms;        /* default wait of the calls below; 0: 60000 */
} loom_testkit_opts_t;

/* Starts everything for `services` (the engine's own service comes first by
 * itself). opts may be NULL. On failure nothing is left running and err says
 * what failed (initdb, a migration, the broker...). */
int loom_testkit_start(const loom_service_t *const *services, size_t n_services,
                       const loom_testkit_opts_t *opts, loom_testkit_t **out, loom_error_t *err);
/* Stops the consumers (gracefully), Kafka and PostgreSQL, and removes the
 * directory. NULL and a second call do nothing. */
void loom_testkit_stop(loom_testkit_t *kit);

/* The private database (a libpq URL), the Kafka bootstrap servers, and a pool
 * on the database for a test's own queries (borrowed). */
const char *loom_testkit_database_url(const loom_testkit_t *kit);
const char *loom_testkit_brokers(const loom_testkit_t *kit);
loom_db_pool_t *loom_testkit_pool(loom_testkit_t *kit);

/* What became of a command. */
typedef struct loom_testkit_outcome {
    char command_id[40]; /* the CloudEvent id */
    char status[16];     /* "applied", "rejected", "parked"; "" when not known */
    json_t *result;      /* applied: loom_msg_set_result()'s value (owned), or NULL */
    char error[LOOM_ERROR_MESSAGE_MAX]; /* rejected: the handler's error; a failed
                                         * wait: why */
} loom_testkit_outcome_t;

void loom_testkit_outcome_release(loom_testkit_outcome_t *o);

/* Publishes a command of `type` with data (stolen) on the topic its command
 * table routes it to, keyed by key (NULL: the command id), and waits for the
 * broker. *id (40 bytes, may be NULL) gets the command id. */
int loom_testkit_publish(loom_testkit_t *kit, const char *type, const char *key, json_t *data,
                         char *id, loom_error_t *err);
/* Waits until a consumer applied, rejected or parked the command `id`
 * (retries go on meanwhile) and fills *o. LOOM_ETIMEDOUT after timeout_ms
 * (0: the kit's default). */
int loom_testkit_wait(loom_testkit_t *kit, const char *id, int64_t timeout_ms,
                      loom_testkit_outcome_t *o, loom_error_t *err);
/* Publishes and waits: 0 whether the command was applied or rejected (look
 * at o->status); an error when it could not be published or did not settle
 * in time (o->error says which, and err too when not NULL). */
int loom_testkit_command(loom_testkit_t *kit, const char *type, const char *key, json_t *data,
                         loom_testkit_outcome_t *o, loom_error_t *err);

/* Calls the op `name` as the gateway would (a READ ONLY transaction, the
 * op's timeout) with req (borrowed; NULL means {}). The result (new), or
 * NULL with err filled, with the op's own error code. */
json_t *loom_testkit_op(loom_testkit_t *kit, const char *name, const json_t *req,
                        loom_error_t *err);

/* The events of a stream in version order, as a JSON array of
 * {"version": N, "type": T, "data": {...}, "causation_id": ID}; [] for a
 * stream without events. NULL with err filled when the query fails. */
json_t *loom_testkit_events(loom_testkit_t *kit, const char *stream_id, loom_error_t *err);
/* Waits until the stream holds at least n events (for the effects of
 * follow-up commands, which the test did not publish), then returns them as
 * loom_testkit_events() does. NULL with LOOM_ETIMEDOUT after timeout_ms. */
json_t *loom_testkit_wait_events(loom_testkit_t *kit, const char *stream_id, size_t n,
                                 int64_t timeout_ms, loom_error_t *err);

#endif
