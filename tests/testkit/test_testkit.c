/*
 * The test kit (loom/testkit.h) on a small service of its own, "tally":
 * start (a private PostgreSQL, the mock cluster or LOOM_TEST_KAFKA_BROKERS,
 * the service's migration), publish-and-wait, a rejection, an op call,
 * events of a stream, a follow-up through the outbox, and a clean
 * shutdown: nothing left running or on disk, also when the test process
 * dies without stopping the kit.
 */
#include "loom/testkit.h"
#include "support.h"

#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* ---- the service ---------------------------------------------------------- */

static const loom_db_stmt_t tally_add_stmt = {
    "tally_add",
    "INSERT INTO testkit_tally (name, total) VALUES ($1, $2::bigint) "
    "ON CONFLICT (name) DO UPDATE SET total = testkit_tally.total + EXCLUDED.total "
    "RETURNING total",
    2};

/* tally.add {"name": N, "n": K}: adds K (>= 0) to N's total; "echo": true
 * also publishes tally.add {"name": N-echo, "n": K} through the outbox. */
static int tally_add(loom_msg_t *msg, json_t *data, loom_error_t *err)
{
    const char *name = json_string_value(json_object_get(data, "name"));
    json_t *n = json_object_get(data, "n");
    if (!name || !json_is_integer(n))
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "\"name\" and \"n\" are required");
    if (json_integer_value(n) < 0)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "a tally only grows (n = %lld)",
                              (long long)json_integer_value(n));
    char num[32];
    snprintf(num, sizeof(num), "%lld", (long long)json_integer_value(n));
    const char *p[] = {name, num};
    PGresult *res = NULL;
    int rc = loom_db_exec(loom_msg_db(msg), &tally_add_stmt, p, &res, err);
    if (rc != 0)
        return rc;
    long long total = atoll(PQgetvalue(res, 0, 0));
    PQclear(res);
    char stream[300];
    snprintf(stream, sizeof(stream), "tally-%s", name);
    rc = loom_emit(msg, stream, -1, "tally.added", json_pack("{s:O}", "n", n), err);
    if (rc == 0 && json_is_true(json_object_get(data, "echo"))) {
        char topic[LOOM_TOPIC_MAX], echo[300];
        loom_topic_for_command("tally.add", topic, sizeof(topic));
        snprintf(echo, sizeof(echo), "%s-echo", name);
        rc = loom_publish(msg, topic, echo, "tally.add",
                          json_pack("{s:s, s:O}", "name", echo, "n", n), err);
    }
    if (rc == 0)
        loom_msg_set_result(msg, json_pack("{s:I}", "total", (json_int_t)total));
    return rc;
}

static const loom_command_t tally_commands[] = {{"tally.add", tally_add, NULL}, {0}};

static const loom_db_stmt_t tally_get_stmt = {"tally_get",
                                              "SELECT total FROM testkit_tally WHERE name = $1", 1};

static int tally_get(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                     loom_error_t *err)
{
    (void)ctx;
    const char *name = NULL;
    int rc = loom_op_req_string(req, "name", true, 200, &name, err);
    if (rc != 0)
        return rc;
    const char *p[] = {name};
    PGresult *r = NULL;
    rc = loom_db_exec(db, &tally_get_stmt, p, &r, err);
    if (rc != 0)
        return rc;
    if (PQntuples(r) == 0) {
        PQclear(r);
        return loom_error_set(err, LOOM_CODE_NOT_FOUND, "no tally \"%s\"", name);
    }
    *res = json_pack("{s:s, s:I}", "name", name, "total", (json_int_t)atoll(PQgetvalue(r, 0, 0)));
    PQclear(r);
    return 0;
}

static const loom_op_t tally_get_op = {
    .name = "tally.get", .fn = tally_get, .description = "a tally's total"};
static const loom_op_t *const tally_ops[] = {&tally_get_op, NULL};
static const loom_migration_t tally_migration_items[] = {
    {9300, "testkit_tally",
     "CREATE TABLE testkit_tally (name TEXT PRIMARY KEY, total BIGINT NOT NULL)",
     "DROP TABLE testkit_tally"}};
static const loom_migration_set_t tally_migrations = {tally_migration_items, 1};
static const loom_consumer_def_t tally_consumers[] = {
    {.name = "tally.store", .description = "adds to tallies", .commands = tally_commands}, {0}};
static const loom_service_t tally_service = {.name = "tally",
                                             .description = "counts",
                                             .migrations = &tally_migrations,
                                             .ops = tally_ops,
                                             .consumers = tally_consumers};
static const loom_service_t *const services[] = {&tally_service};

/* ---- the tests ---------------------------------------------------------------- */

static loom_testkit_t *kit;

static void start(void)
{
    loom_error_t err;
    if (loom_testkit_start(services, LOOM_COUNT(services), NULL, &kit, &err) != 0)
        cr_assert_fail("%s", err.message);
}

static void stop(void)
{
    loom_testkit_stop(kit);
    kit = NULL;
}

Test(testkit, publishes_and_waits_until_applied, .init = start, .fini = stop, .timeout = 180)
{
    loom_testkit_outcome_t o;
    cr_assert_eq(loom_testkit_command(kit, "tally.add", "apples",
                                      json_pack("{s:s, s:i}", "name", "apples", "n", 3), &o, NULL),
                 0, "%s", o.error);
    cr_assert_str_eq(o.status, "applied", "%s", o.error);
    cr_assert_eq(json_integer_value(json_object_get(o.result, "total")), 3);
    loom_testkit_outcome_release(&o);
    cr_assert_eq(loom_testkit_command(kit, "tally.add", "apples",
                                      json_pack("{s:s, s:i}", "name", "apples", "n", 4), &o, NULL),
                 0, "%s", o.error);
    cr_assert_eq(json_integer_value(json_object_get(o.result, "total")), 7);
    cr_assert_eq(strlen(o.command_id), 36, "%s", o.command_id);
    loom_testkit_outcome_release(&o);

    /* The events of the stream, in order. */
    loom_error_t err;
    json_t *ev = loom_testkit_events(kit, "tally-apples", &err);
    cr_assert_not_null(ev, "%s", err.message);
    cr_assert_eq(json_array_size(ev), 2);
    for (size_t i = 0; i < 2; i++) {
        json_t *e = json_array_get(ev, i);
        cr_assert_eq(json_integer_value(json_object_get(e, "version")), (json_int_t)i + 1);
        cr_assert_str_eq(json_string_value(json_object_get(e, "type")), "tally.added");
    }
    cr_assert_eq(
        json_integer_value(json_object_get(json_object_get(json_array_get(ev, 1), "data"), "n")),
        4);
    json_decref(ev);
    ev = loom_testkit_events(kit, "tally-pears", &err);
    cr_assert_eq(json_array_size(ev), 0);
    json_decref(ev);
}

Test(testkit, reports_a_rejection_with_its_reason, .init = start, .fini = stop, .timeout = 180)
{
    loom_testkit_outcome_t o;
    cr_assert_eq(loom_testkit_command(kit, "tally.add", "apples",
                                      json_pack("{s:s, s:i}", "name", "apples", "n", -1), &o, NULL),
                 0, "%s", o.error);
    cr_assert_str_eq(o.status, "rejected");
    cr_assert(strstr(o.error, "a tally only grows (n = -1)"), "%s", o.error);
    cr_assert_null(o.result);
    loom_testkit_outcome_release(&o);
    /* A type no consumer knows is rejected too, not left waiting. */
    cr_assert_eq(loom_testkit_command(kit, "tally.subtract", "apples", json_object(), &o, NULL), 0,
                 "%s", o.error);
    cr_assert_str_eq(o.status, "rejected");
    loom_testkit_outcome_release(&o);
    /* Nothing was written. */
    loom_error_t err;
    json_t *req = json_pack("{s:s}", "name", "apples");
    cr_assert_null(loom_testkit_op(kit, "tally.get", req, &err));
    json_decref(req);
    cr_assert(loom_error_is(&err, LOOM_CODE_NOT_FOUND), "%s", err.message);
}

Test(testkit, calls_an_op_and_sees_follow_ups, .init = start, .fini = stop, .timeout = 180)
{
    loom_testkit_outcome_t o;
    cr_assert_eq(loom_testkit_command(
                     kit, "tally.add", "plums",
                     json_pack("{s:s, s:i, s:b}", "name", "plums", "n", 5, "echo", 1), &o, NULL),
                 0, "%s", o.error);
    cr_assert_str_eq(o.status, "applied", "%s", o.error);
    loom_testkit_outcome_release(&o);
    loom_error_t err;
    json_t *req = json_pack("{s:s}", "name", "plums");
    json_t *res = loom_testkit_op(kit, "tally.get", req, &err);
    json_decref(req);
    cr_assert_not_null(res, "%s", err.message);
    cr_assert_eq(json_integer_value(json_object_get(res, "total")), 5);
    json_decref(res);
    /* The follow-up went through the outbox, Kafka and the consumer. */
    json_t *ev = loom_testkit_wait_events(kit, "tally-plums-echo", 1, 0, &err);
    cr_assert_not_null(ev, "%s", err.message);
    cr_assert_eq(json_array_size(ev), 1);
    json_decref(ev);
    /* An op's own errors come back as they are. */
    cr_assert_null(loom_testkit_op(kit, "tally.get", NULL, &err));
    cr_assert(loom_error_is(&err, LOOM_CODE_INVALID_ARGUMENT), "%s", err.message);
    cr_assert_null(loom_testkit_op(kit, "tally.nope", NULL, &err));
    cr_assert(loom_error_is(&err, LOOM_CODE_OP_NOT_FOUND), "%s", err.message);
    /* Waiting for what never comes ends with a timeout, not a hang. */
    cr_assert_null(loom_testkit_wait_events(kit, "tally-never", 1, 300, &err));
    cr_assert(loom_error_is(&err, LOOM_CODE_DEADLINE_EXCEEDED), "%s", err.message);
}

/* The server's pid from its postmaster.pid (0 when there is none). */
static pid_t postmaster_pid(const char *dir)
{
    char path[600];
    snprintf(path, sizeof(path), "%s/pg/data/postmaster.pid", dir);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    long pid = 0;
    if (fscanf(f, "%ld", &pid) != 1)
        pid = 0;
    fclose(f);
    return (pid_t)pid;
}

/* The kit's directory, from its database's data directory setting. */
static void kit_dir(loom_testkit_t *k, char *out, size_t size)
{
    loom_db_t *db = NULL;
    loom_error_t err;
    cr_assert_eq(loom_db_acquire(loom_testkit_pool(k), &db, &err), 0, "%s", err.message);
    PGresult *r = NULL;
    cr_assert_eq(loom_db_query(db, "SHOW data_directory", 0, NULL, &r, &err), 0, "%s", err.message);
    snprintf(out, size, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    loom_db_release(db);
    /* .../loom-testkit-XXXXXX/pg/data -> .../loom-testkit-XXXXXX */
    for (int i = 0; i < 2; i++)
        *strrchr(out, '/') = '\0';
}

/* Whether pid has exited (a zombie has: criterion's runner may be the
 * subreaper that collects the daemonized server). */
static bool exited(pid_t pid)
{
    if (pid <= 0 || kill(pid, 0) != 0)
        return true;
    char path[64], stat_line[512] = "";
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return true;
    size_t n = fread(stat_line, 1, sizeof(stat_line) - 1, f);
    stat_line[n] = '\0';
    fclose(f);
    const char *paren = strrchr(stat_line, ')');
    return paren && paren[1] == ' ' && paren[2] == 'Z';
}

static bool gone(pid_t pid, const char *dir)
{
    struct stat st;
    return exited(pid) && stat(dir, &st) != 0;
}

/* Waits up to 60 s for the server to exit and the directory to go. */
static bool wait_gone(pid_t pid, const char *dir)
{
    for (int i = 0; i < 600 && !gone(pid, dir); i++)
        usleep(100 * 1000);
    return gone(pid, dir);
}

Test(testkit, stops_everything_and_removes_its_directory, .timeout = 180)
{
    start();
    char dir[512];
    kit_dir(kit, dir, sizeof(dir));
    pid_t pm = postmaster_pid(dir);
    cr_assert_gt(pm, 0, "no postmaster.pid in %s", dir);
    cr_assert_eq(kill(pm, 0), 0);
    stop();
    /* stop() waits for it all: nothing is left, at once. */
    struct stat st;
    cr_assert(exited(pm), "server %d still running after stop", (int)pm);
    cr_assert_neq(stat(dir, &st), 0, "%s still there after stop", dir);
    loom_testkit_stop(NULL); /* harmless */
}

Test(testkit, cleans_up_when_the_test_process_dies, .timeout = 240)
{
    /* A child starts a kit, reports where it lives, and dies by SIGKILL
     * without stopping it, as a crashed or timed-out test would. */
    int fds[2];
    cr_assert_eq(pipe(fds), 0);
    pid_t child = fork();
    cr_assert_geq(child, 0);
    if (child == 0) {
        close(fds[0]);
        loom_error_t err;
        loom_testkit_t *k = NULL;
        if (loom_testkit_start(services, LOOM_COUNT(services), NULL, &k, &err) != 0) {
            dprintf(fds[1], "error %s\n", err.message);
            _exit(1);
        }
        char dir[512];
        kit_dir(k, dir, sizeof(dir));
        dprintf(fds[1], "%d %s\n", (int)postmaster_pid(dir), dir);
        close(fds[1]);
        pause();
        _exit(0);
    }
    close(fds[1]);
    char line[700] = "";
    FILE *f = fdopen(fds[0], "r");
    cr_assert_not_null(fgets(line, sizeof(line), f), "the child reported nothing");
    fclose(f);
    int pm = 0;
    char dir[600] = "";
    cr_assert_eq(sscanf(line, "%d %599s", &pm, dir), 2, "%s", line);
    cr_assert_gt(pm, 0, "%s", line);
    cr_assert_eq(kill(pm, 0), 0, "the server is not running: %s", line);
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    cr_assert(wait_gone(pm, dir), "server %d or %s outlived the test process", pm, dir);
}

/* The same on the real broker of the test run (what LOOM_TEST_KAFKA_BROKERS
 * selects), with topics and groups of the kit's own. */
static void start_real(void)
{
    loom_testkit_opts_t o = {.kafka_brokers = loom_test_kafka_brokers()};
    loom_error_t err;
    if (loom_testkit_start(services, LOOM_COUNT(services), &o, &kit, &err) != 0)
        cr_assert_fail("%s", err.message);
}

Test(testkit, works_on_a_real_broker, .init = start_real, .fini = stop, .timeout = 240)
{
    cr_assert_str_eq(loom_testkit_brokers(kit), loom_test_kafka_brokers());
    loom_testkit_outcome_t o;
    cr_assert_eq(loom_testkit_command(
                     kit, "tally.add", "figs",
                     json_pack("{s:s, s:i, s:b}", "name", "figs", "n", 2, "echo", 1), &o, NULL),
                 0, "%s", o.error);
    cr_assert_str_eq(o.status, "applied", "%s", o.error);
    loom_testkit_outcome_release(&o);
    loom_error_t err;
    json_t *ev = loom_testkit_wait_events(kit, "tally-figs-echo", 1, 0, &err);
    cr_assert_not_null(ev, "%s", err.message);
    json_decref(ev);
}
