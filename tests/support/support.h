/*
 * Test support: the shared fixtures the CTest run starts (a private Postgres
 * and a real Apache Kafka broker), per-test databases, a librdkafka mock
 * cluster, and running the loom binary as a user would.
 */
#ifndef LOOM_TEST_SUPPORT_H
#define LOOM_TEST_SUPPORT_H

#include "loom/db.h"

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

/* Value of a fixture setting: the environment first, then the state file the
 * fixture wrote (build/tests/testenv/env). NULL when neither has it. */
const char *loom_test_env(const char *name);

/* URL of the shared test Postgres's admin database (LOOM_TEST_DATABASE_URL:
 * set it to run the suite against another server, such as a CockroachDB
 * node); aborts the test with a clear message when the fixture is not
 * running. */
const char *loom_test_pg_url(void);
/* Bootstrap address of the real Kafka broker fixture (same rules). */
const char *loom_test_kafka_brokers(void);

/* Creates a fresh, empty database on the test server and writes its URL. */
void loom_test_db_create(char *url, size_t size);
/* Same, with the engine migrations applied. */
void loom_test_db_create_migrated(char *url, size_t size);
/* Opens a pool on url (aborts the test on failure). */
loom_db_pool_t *loom_test_pool(const char *url, int size);
/* The same, read-only (as the gateway's ops read). */
loom_db_pool_t *loom_test_read_pool(const char *url, int size);
/* Runs SQL on a fresh connection and returns the first column of the first
 * row as a new string ("" when there is no row); aborts on error. */
char *loom_test_sql_value(const char *url, const char *sql);
/* The first column of the first row as a number (0 when there is none). */
long long loom_test_sql_ll(const char *url, const char *sql);
/* Polls sql every 100 ms until it returns want or timeout_ms passes; returns
 * the last value seen. */
long long loom_test_wait_for(const char *url, const char *sql, long long want, int timeout_ms);
/* Runs SQL (no result expected); aborts on error. */
void loom_test_sql(const char *url, const char *sql);

/* A librdkafka mock cluster with `brokers` brokers; the returned handle owns
 * it: call rd_kafka_mock_cluster_destroy(*mc), then rd_kafka_destroy().
 * *bootstraps is borrowed from the cluster. */
rd_kafka_t *loom_test_mock_cluster(int brokers, rd_kafka_mock_cluster_t **mc,
                                   const char **bootstraps);

/* A unique name with a prefix: "prefix_<pid>_<n>_<rand>". */
void loom_test_unique_name(const char *prefix, char *out, size_t size);
/* The same with '-' for '_' ("prefix-<pid>-<n>-<rand>"), as a topic prefix
 * (LOOM_TOPIC_PREFIX takes a-z, 0-9 and -) of a test's own. */
void loom_test_topic_prefix(const char *prefix, char *out, size_t size);

/* Writes an API tokens file (LOOM_API_TOKENS_FILE) at path: one line per
 * {token, "slug scope[,scope...]"} pair, the token as its SHA-256. */
typedef struct loom_test_token {
    const char *token;
    const char *slug_scopes;
} loom_test_token_t;
void loom_test_tokens_file(const char *path, const loom_test_token_t *tokens, size_t n);

/* Path of the built loom binary. */
const char *loom_test_bin(void);

/* Runs argv with extra environment entries (NAME=value, NULL-terminated list,
 * added to the current environment); captures stdout and stderr (new strings)
 * and returns the exit status (or 128+signal). */
int loom_test_run(const char *const argv[], const char *const env[], char **out, char **err);

/* Starts argv in the background with stdout+stderr to a pipe; returns the pid
 * and the read end in *fd. */
pid_t loom_test_spawn(const char *const argv[], const char *const env[], int *fd);
/* Reads from fd until `needle` appears or timeout_ms passes; keeps what was
 * read in *buf (new string). Returns true when found. */
bool loom_test_read_until(int fd, const char *needle, int timeout_ms, char **buf);
/* Waits for pid up to timeout_ms; returns the exit status, 128+signal, or -1
 * on timeout (then the process is killed). */
int loom_test_wait(pid_t pid, int timeout_ms);

/* The test consumer "test.ledger" (tests/support/test_consumer.c). */
#include "loom/consumer.h"
#include "loom/migrate.h"
extern const loom_consumer_def_t loom_test_consumers[];
extern const size_t loom_test_n_consumers;
int loom_test_ledger_handler(loom_msg_t *msg, loom_error_t *err);
/* Engine migrations plus the test tables. */
loom_migration_set_t loom_test_migrations(void);
/* The test table alone (version 9001), for a service descriptor. */
extern const loom_migration_t loom_test_ledger_migration;
/* The test consumer under names of its own, so that tests running at once
 * keep apart: consumer "test.ledger.<suffix>" reading topic
 * "loom.cmd.test.credit.<suffix>", suffix a unique name with a prefix
 * (loom_test_unique_name). def points into the struct: do not copy it. */
typedef struct loom_test_ledger {
    char suffix[64];
    char topic[160];
    char name[128];
    const char *topics[2];
    loom_consumer_def_t def;
} loom_test_ledger_t;
void loom_test_ledger_init(loom_test_ledger_t *l, const char *prefix);
/* Path of the loom_test_app binary (loom with the test consumer). */
const char *loom_test_app_bin(void);

/* ---- the test worker: a consumer worker started in the test's process ---- */

#include "loom/bus.h"
#include "loom/worker.h"

/* What loom_test_worker_start made: the worker's own pool, its relay producer
 * (NULL unless asked for) and the worker. All NULL when not started. */
typedef struct loom_test_worker {
    loom_db_pool_t *pool;
    loom_producer_t *relay;
    loom_worker_t *w;
} loom_test_worker_t;

/* A producer on brokers with the default options; aborts the test on failure. */
loom_producer_t *loom_test_producer(const char *brokers);
/* Queues a test.credit command ({"account", "amount"} plus the JSON members
 * in extra, when not NULL) keyed by account, with id as its CloudEvents id
 * (NULL: a fresh one); waits while the producer's queue is full. Aborts the
 * test on any other failure. */
void loom_test_credit(loom_producer_t *p, const char *topic, const char *id, const char *account,
                      long amount, const char *extra);
/* Publishes the same command (a full queue is a failure here), then waits up
 * to 60 s for the broker to take it; returns the partition it went to. */
int32_t loom_test_credit_sync(loom_producer_t *p, const char *topic, const char *id,
                              const char *account, long amount, const char *extra);

/* The usual options of a test worker: one consumer, def, on brokers, its
 * failing partitions retried after 50 ms backing off to 500 ms. */
loom_worker_opts_t loom_test_worker_opts(const char *brokers, const loom_consumer_def_t *def);
/* Starts a worker with options o on a new pool of pool_size connections to
 * url (o.pool is set here). With relay, a new producer on o.brokers (default
 * options) is made first and becomes o.producer: the worker relays its outbox
 * through it, and the test may publish with it too. Aborts the test on failure. */
void loom_test_worker_start(loom_test_worker_t *tw, const char *url, int pool_size, bool relay,
                            loom_worker_opts_t o);
/* Frees the worker, then its relay and its pool; does nothing for what was
 * not started, and leaves *tw all NULL (so it may be started again). */
void loom_test_worker_stop(loom_test_worker_t *tw);

/* ---- chaos suite helpers (tests/chaos) ---- */

/* A fresh database with the engine migrations and the test tables
 * (test_ledger, test_blocks); writes its URL. */
void loom_test_db_create_ledger(char *url, size_t size);
/* Applies the engine migrations and the test tables to the database at url. */
void loom_test_migrate_ledger(const char *url);
/* Creates topic with `partitions` partitions on brokers; aborts on failure. */
void loom_test_kafka_topic(const char *brokers, const char *topic, int partitions);
/* Starts argv in the background with stdout and stderr appended to log_path
 * (created when missing) and stdin from /dev/null; returns the pid. Nothing to drain, so a
 * long-running process never blocks on a full pipe. */
pid_t loom_test_spawn_logged(const char *const argv[], const char *const env[],
                             const char *log_path);

#endif
