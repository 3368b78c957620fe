/*
 * The dedup lookup of the apply path uses the primary key whatever the
 * statistics say (engine/src/worker_int.h, LOOM_SQL_COMMANDS_DEDUP): one
 * index probe per message id, on a fresh never-analyzed loom_commands (empty,
 * and with 20,000 rows) as after ANALYZE, with custom and with generic plans.
 * So does the gateway's ?wait status lookup (engine/src/gateway_int.h,
 * LOOM_SQL_WAIT_STATUS), on loom_commands_by_message, and the relative event
 * append (LOOM_SQL_EVENTS_APPEND_RELATIVE), whose subquery reads each
 * stream's last version from loom_events_pkey, and the read of one stream's
 * version (LOOM_SQL_STREAM_VERSION). All four are planned once
 * per connection (plan_once): the generic plan made on an empty table is the
 * one they keep. EXPLAIN runs on the very statement texts the consumer and
 * the gateway prepare.
 *
 * The plain `message_id = ANY(...)` forms these replaced planned a scan of
 * every row (of the consumer, for the dedup lookup) on a table that was
 * never analyzed.
 */
#include "support.h"
#include "../../engine/src/gateway_int.h"
#include "../../engine/src/worker_int.h"

#include <criterion/criterion.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char url[512];

static void setup(void)
{
    loom_test_db_create_migrated(url, sizeof(url));
    /* Nothing may analyze the table behind the test's back. */
    loom_test_sql(url, "ALTER TABLE loom_commands SET (autovacuum_enabled = false)");
    loom_test_sql(url, "ALTER TABLE loom_events SET (autovacuum_enabled = false)");
}

TestSuite(dedup_plan, .init = setup, .timeout = 180);

static PGconn *connect_db(void)
{
    PGconn *c = PQconnectdb(url);
    cr_assert_eq(PQstatus(c), CONNECTION_OK, "%s", PQerrorMessage(c));
    return c;
}

static void exec_ok(PGconn *c, const char *sql)
{
    PGresult *r = PQexec(c, sql);
    ExecStatusType st = PQresultStatus(r);
    cr_assert(st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK, "%s: %s", sql, PQerrorMessage(c));
    PQclear(r);
}

/* '{m1,m2,...}' for ids from..to, as an SQL literal (ids are plain words). */
static char *ids_literal(int from, int to)
{
    size_t cap = 16 + (size_t)(to - from + 1) * 16, n = 0;
    char *s = malloc(cap);
    n += (size_t)snprintf(s + n, cap - n, "'{");
    for (int i = from; i <= to; i++)
        n += (size_t)snprintf(s + n, cap - n, "%sm%d", i > from ? "," : "", i);
    snprintf(s + n, cap - n, "}'");
    return s;
}

/* The statements under test: the consumer's dedup lookup (consumer, ids) and
 * the gateway's ?wait status lookup (ids). */
typedef struct lookup {
    const char *sql;
    int nparams;
    const char *index;  /* what the plan must show: the index, or any index scan */
    const char *before; /* parameters before the ids in EXECUTE */
    const char *after;  /* and after them */
    const char *probe;  /* the condition of the probe, per id */
} lookup_t;

static const lookup_t dedup = {LOOM_SQL_COMMANDS_DEDUP, 2, "Index Scan using", "'bench', ", "",
                               "message_id = u.id"};
static const lookup_t wait_status = {LOOM_SQL_WAIT_STATUS, 1, "loom_commands_by_message", "", "",
                                     "message_id = u.id"};
/* 200 appends to streams m1..m200, each the first of its batch (r = 1). */
static const lookup_t append = {
    LOOM_SQL_EVENTS_APPEND_RELATIVE,
    7,
    "Index Only Scan Backward using loom_events_pkey",
    "",
    ", array_fill(1::bigint, ARRAY[200]), array_fill('e'::text, ARRAY[200]), "
    "array_fill('t'::text, ARRAY[200]), array_fill('{}'::text, ARRAY[200]), "
    "array_fill(NULL::text, ARRAY[200]), array_fill(NULL::text, ARRAY[200])",
    "stream_id = u.s"};
/* A stream's version before an append that expects one (the "ids" are one
 * stream's name here). */
static const lookup_t stream_version = {
    LOOM_SQL_STREAM_VERSION, 1, "Index Only Scan Backward using loom_events_pkey", "", "",
    "stream_id = "};

/* The plan of a statement for 200 ids under plan_cache_mode `mode`, as one
 * string. */
static char *plan_of(const lookup_t *l, const char *mode)
{
    PGconn *c = connect_db();
    char set[96];
    snprintf(set, sizeof(set), "SET plan_cache_mode = %s", mode);
    exec_ok(c, set);
    PGresult *r = PQprepare(c, "lookup", l->sql, l->nparams, NULL);
    cr_assert_eq(PQresultStatus(r), PGRES_COMMAND_OK, "%s", PQerrorMessage(c));
    PQclear(r);
    char *ids = ids_literal(1, 200);
    size_t qlen = strlen(ids) + strlen(l->after) + 128;
    char *q = malloc(qlen);
    snprintf(q, qlen, "EXPLAIN EXECUTE lookup(%s%s%s)", l->before, ids, l->after);
    r = PQexec(c, q);
    cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "%s", PQerrorMessage(c));
    size_t cap = 1, len = 0;
    for (int i = 0; i < PQntuples(r); i++)
        cap += strlen(PQgetvalue(r, i, 0)) + 1;
    char *plan = calloc(1, cap);
    for (int i = 0; i < PQntuples(r); i++)
        len += (size_t)snprintf(plan + len, cap - len, "%s\n", PQgetvalue(r, i, 0));
    PQclear(r);
    free(q);
    free(ids);
    PQfinish(c);
    return plan;
}

/* Every way the plan could reach loom_commands is a probe of one id. The
 * dedup lookup's key is unique: a plain index scan. The status lookup's
 * index is not, and a bitmap scan of it per id is a probe too. */
static void assert_probes_of(const lookup_t *l, const char *when)
{
    const char *modes[] = {"force_custom_plan", "force_generic_plan", "auto"};
    for (size_t i = 0; i < sizeof(modes) / sizeof(modes[0]); i++) {
        char *plan = plan_of(l, modes[i]);
        cr_assert_not_null(strstr(plan, l->index), "%s, %s: no \"%s\":\n%s", when, modes[i],
                           l->index, plan);
        cr_assert_null(strstr(plan, "Seq Scan"), "%s, %s: a sequential scan:\n%s", when, modes[i],
                       plan);
        if (l == &dedup)
            cr_assert_null(strstr(plan, "Bitmap"), "%s, %s: a bitmap scan:\n%s", when, modes[i],
                           plan);
        cr_assert_not_null(strstr(plan, l->probe),
                           "%s, %s: the index is not probed per id (%s):\n%s", when, modes[i],
                           l->probe, plan);
        cr_assert_null(strstr(plan, "Hash"), "%s, %s: a hash join:\n%s", when, modes[i], plan);
        free(plan);
    }
}

static void assert_probes(const char *when)
{
    assert_probes_of(&dedup, when);
    assert_probes_of(&wait_status, when);
    assert_probes_of(&append, when);
    assert_probes_of(&stream_version, when);
}

static void assert_never_analyzed(void)
{
    cr_assert_eq(loom_test_sql_ll(url, "SELECT count(*) FROM pg_stat_user_tables "
                                       "WHERE relname IN ('loom_commands', 'loom_events') "
                                       "AND last_analyze IS NULL AND last_autoanalyze IS NULL"),
                 2, "loom_commands or loom_events was analyzed");
    cr_assert_eq(loom_test_sql_ll(url, "SELECT count(*) FROM pg_stats "
                                       "WHERE tablename IN ('loom_commands', 'loom_events')"),
                 0, "loom_commands or loom_events has statistics");
}

/* Rows m1..mN of consumer 'bench' (and 'other' for every third id, so the
 * consumer condition matters); statuses cycle through the four finished ones
 * and 'retrying', which the lookup must not return. */
static void fill(int n)
{
    char q[1024];
    snprintf(q, sizeof(q),
             "INSERT INTO loom_commands (consumer, message_id, type, stream_id, topic, "
             "kafka_partition, kafka_offset, status, digest) "
             "SELECT c, 'm' || g, 'test.credit', 'acct-' || (g %% 1000), 't', 0, g, "
             "(ARRAY['applied','rejected','parked','expired','retrying'])[1 + g %% 5], "
             "md5(g::text) FROM generate_series(1, %d) g, "
             "unnest(CASE WHEN g %% 3 = 0 THEN ARRAY['bench','other'] ELSE ARRAY['bench'] END) c",
             n);
    loom_test_sql(url, q);
    /* Streams m1..m(N/4) of 4 events each. */
    snprintf(q, sizeof(q),
             "INSERT INTO loom_events (stream_id, version, event_id, type, data) "
             "SELECT 'm' || (1 + g / 4), 1 + g %% 4, 'e' || g, 'test.credited', '{}' "
             "FROM generate_series(0, %d) g",
             n - 1);
    loom_test_sql(url, q);
}

Test(dedup_plan, probes_the_primary_key_on_an_empty_never_analyzed_table)
{
    assert_never_analyzed();
    assert_probes("empty, never analyzed");
}

Test(dedup_plan, probes_the_primary_key_with_20k_rows_never_analyzed)
{
    fill(20000);
    assert_never_analyzed();
    assert_probes("20,000 rows, never analyzed");
    loom_test_sql(url, "ANALYZE loom_commands, loom_events");
    assert_probes("20,000 rows, analyzed");
}

/* The rewritten lookup answers what the plain form answers. */
Test(dedup_plan, finds_the_finished_commands_and_only_them)
{
    fill(1000);
    char *ids = ids_literal(990, 1010);
    char q[1024];
    snprintf(q, sizeof(q),
             "SELECT string_agg(message_id || ':' || status, ',' ORDER BY message_id) FROM (%s) d",
             LOOM_SQL_COMMANDS_DEDUP);
    PGconn *c = connect_db();
    const char *p[] = {"bench", NULL};
    size_t len = strlen(ids);
    char *arr = strndup(ids + 1, len - 2); /* without the quotes */
    p[1] = arr;
    PGresult *r = PQexecParams(c, q, 2, NULL, p, NULL, NULL, 0);
    cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "%s", PQerrorMessage(c));
    char *got = strdup(PQgetvalue(r, 0, 0));
    PQclear(r);
    snprintf(q, sizeof(q),
             "SELECT string_agg(message_id || ':' || status, ',' ORDER BY message_id) "
             "FROM loom_commands WHERE consumer = $1 AND message_id = ANY($2::text[]) "
             "AND status IN ('applied', 'rejected', 'parked', 'expired')");
    r = PQexecParams(c, q, 2, NULL, p, NULL, NULL, 0);
    cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "%s", PQerrorMessage(c));
    cr_assert_str_eq(got, PQgetvalue(r, 0, 0));
    /* m990..m1000 exist (m994 and m999 are retrying), m1001.. do not. */
    cr_assert_str_eq(got, "m1000:applied,m990:applied,m991:rejected,m992:parked,m993:expired,"
                          "m995:applied,m996:rejected,m997:parked,m998:expired");
    PQclear(r);
    PQfinish(c);
    free(got);
    free(arr);
    free(ids);
}
