/*
 * The op table and dispatcher without a database: registration rules, lookup
 * by name, the context a handler sees, request validation, errors that name
 * the op, deadlines of ops whose own C code is slow, and the metrics every
 * call records. The database side is in tests/integration/test_ops.c.
 */
#include "loom/clock.h"
#include "loom/op.h"

#include <criterion/criterion.h>
#include <pthread.h>
#include <string.h>

static const char *seen_ray;
static const char *seen_op;
static int64_t seen_remaining;
static bool seen_scope;
static int slow_runs;

static int echo(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                loom_error_t *err)
{
    (void)err;
    cr_assert_null(db);
    seen_ray = ctx->ray_id;
    seen_op = ctx->op->name;
    seen_remaining = loom_op_ctx_remaining_ms(ctx);
    seen_scope = loom_op_ctx_has_scope(ctx, "ops:read");
    *res = json_deep_copy(req);
    return 0;
}

static int validate(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                    loom_error_t *err)
{
    (void)ctx;
    (void)db;
    static const char *const keys[] = {"name", NULL};
    const char *name;
    int rc = loom_op_req_check_keys(req, keys, err);
    if (rc == 0)
        rc = loom_op_req_string(req, "name", true, 8, &name, err);
    if (rc != 0)
        return rc;
    *res = json_pack("{s:s}", "hello", name);
    return 0;
}

static int slow(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                loom_error_t *err)
{
    (void)ctx;
    (void)db;
    (void)req;
    (void)err;
    slow_runs++;
    loom_sleep_ms(150);
    *res = json_object(); /* produced too late: must be dropped, not leaked */
    return 0;
}

static int silent_failure(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                          loom_error_t *err)
{
    (void)ctx;
    (void)db;
    (void)req;
    (void)res;
    (void)err;
    return LOOM_EIO;
}

static int no_result(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                     loom_error_t *err)
{
    (void)ctx;
    (void)db;
    (void)req;
    (void)res;
    (void)err;
    return 0;
}

static const loom_op_t op_echo = {"test.echo", echo, 0, "echo the request", LOOM_OP_NO_DB};
static const loom_op_t op_validate = {"test.validate", validate, 0, "greet", LOOM_OP_NO_DB};
static const loom_op_t op_slow = {"test.slow", slow, 50, "too slow", LOOM_OP_NO_DB};
static const loom_op_t op_silent = {"test.silent", silent_failure, 0, "fail", LOOM_OP_NO_DB};
static const loom_op_t op_no_result = {"test.no_result", no_result, 0, "nothing", LOOM_OP_NO_DB};
static const loom_op_t op_needs_db = {"test.needs_db", echo, 0, "needs a database", 0};
static const loom_op_t *const ops[] = {&op_validate, &op_slow,      &op_echo,
                                       &op_silent,   &op_no_result, &op_needs_db};
#define N_OPS (sizeof(ops) / sizeof(ops[0]))

static loom_op_table_t *table;
static loom_metrics_t *metrics;
static loom_op_runtime_t rt;

static void setup(void)
{
    table = loom_op_table_new();
    loom_error_t err;
    cr_assert_eq(loom_op_table_add(table, ops, N_OPS, &err), 0, "%s", err.message);
    metrics = loom_metrics_new();
    loom_op_runtime_init(&rt, table, NULL, metrics);
}

static void teardown(void)
{
    loom_metrics_free(metrics);
    loom_op_table_free(table);
}

TestSuite(op, .init = setup, .fini = teardown);

static int many_fn(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                   loom_error_t *err)
{
    (void)ctx;
    (void)db;
    (void)req;
    (void)err;
    *res = json_object();
    return 0;
}

Test(op, lookup_by_name_and_listing_in_name_order)
{
    cr_assert_eq(loom_op_find(table, "test.echo"), &op_echo);
    cr_assert_eq(loom_op_find(table, "test.validate"), &op_validate);
    cr_assert_null(loom_op_find(table, "test.ech"));
    cr_assert_null(loom_op_find(table, "test.echoo"));
    cr_assert_null(loom_op_find(table, ""));
    cr_assert_eq(loom_op_table_count(table), N_OPS);
    for (size_t i = 1; i < N_OPS; i++)
        cr_assert_lt(strcmp(loom_op_table_at(table, i - 1)->name, loom_op_table_at(table, i)->name),
                     0);
    cr_assert_null(loom_op_table_at(table, N_OPS));
}

/* The index is rebuilt with each batch of ops; names that share their first
 * and last bytes (what the index hashes) are still told apart. */
Test(op, lookup_finds_every_op_of_a_large_table_added_in_batches)
{
    enum { N = 300 };
    static char names[N][48];
    static loom_op_t many[N];
    const loom_op_t *ptrs[N];
    for (int i = 0; i < N; i++) {
        snprintf(names[i], sizeof(names[i]), "svc%d.things_%03d_middle.get", i % 3, i);
        many[i] = (loom_op_t){.name = names[i], .fn = many_fn, .description = "many"};
        ptrs[i] = &many[i];
    }
    loom_op_table_t *t = loom_op_table_new();
    loom_error_t err;
    for (int i = 0; i < N; i += 100)
        cr_assert_eq(loom_op_table_add(t, ptrs + i, 100, &err), 0, "%s", err.message);
    cr_assert_eq(loom_op_table_count(t), N);
    for (int i = 0; i < N; i++)
        cr_assert_eq(loom_op_find(t, names[i]), &many[i], "%s", names[i]);
    cr_assert_null(loom_op_find(t, "svc0.things_000_middle.ge"));
    cr_assert_null(loom_op_find(t, "svc0.things_000_middlex.get"));
    cr_assert_null(loom_op_find(t, "svc9.things_000_middle.get"));
    cr_assert_eq(loom_op_table_add(t, ptrs + 7, 1, &err), LOOM_EINVAL, "a duplicate was added");
    loom_op_table_free(t);
}

Test(op, registration_rejects_bad_names_duplicates_and_missing_handlers)
{
    const char *bad_names[] = {"", "Upper.case", "a..b", ".a", "a.", "a b", "a-b", "a/b"};
    for (size_t i = 0; i < sizeof(bad_names) / sizeof(bad_names[0]); i++) {
        loom_op_t bad = {bad_names[i], echo, 0, "x", LOOM_OP_NO_DB};
        const loom_op_t *one[] = {&bad};
        loom_error_t err;
        cr_assert_neq(loom_op_table_add(table, one, 1, &err), 0, "accepted \"%s\"", bad_names[i]);
        cr_assert_str_eq(err.code, "INVALID_ARGUMENT");
        cr_assert(strstr(err.message, "invalid op name"), "%s", err.message);
    }
    cr_assert(loom_op_name_valid("messages.get_batch"));
    cr_assert(loom_op_name_valid("v2"));

    loom_error_t err;
    const loom_op_t *dup[] = {&op_echo};
    cr_assert_neq(loom_op_table_add(table, dup, 1, &err), 0);
    cr_assert(strstr(err.message, "\"test.echo\" is registered twice"), "%s", err.message);

    loom_op_t twin = {"test.twin", echo, 0, "x", LOOM_OP_NO_DB};
    const loom_op_t *twice[] = {&twin, &twin};
    cr_assert_neq(loom_op_table_add(table, twice, 2, &err), 0);
    cr_assert_null(loom_op_find(table, "test.twin"), "a failed add adds nothing");

    loom_op_t nofn = {"test.nofn", NULL, 0, "x", 0};
    const loom_op_t *one[] = {&nofn};
    cr_assert_neq(loom_op_table_add(table, one, 1, &err), 0);
    cr_assert(strstr(err.message, "needs a handler or a statement"), "%s", err.message);

    /* A statement op: a statement, bind and result, and no handler too. */
    static const loom_db_stmt_t nine = {"test_nine", "SELECT 1", 9};
    static const loom_op_stmt_t too_many = {&nine, NULL, NULL};
    loom_op_t many = {.name = "test.many", .stmt = &too_many};
    one[0] = &many;
    cr_assert_neq(loom_op_table_add(table, one, 1, &err), 0);
    cr_assert(strstr(err.message, "at most 8 parameters"), "%s", err.message);
    static const loom_db_stmt_t sel = {"test_sel", "SELECT 1", 0};
    static const loom_op_stmt_t no_result = {&sel, NULL, NULL};
    loom_op_t both = {.name = "test.both", .fn = echo, .stmt = &no_result};
    one[0] = &both;
    cr_assert_neq(loom_op_table_add(table, one, 1, &err), 0);
    cr_assert(strstr(err.message, "and not both"), "%s", err.message);
    cr_assert_eq(loom_op_table_count(table), N_OPS);
}

Test(op, call_by_name_gives_the_handler_its_context)
{
    const char *scopes[] = {"ops:read", NULL};
    loom_op_ctx_t ctx = {.rt = &rt, .caller = "tester", .scopes = scopes};
    json_t *req = json_pack("{s:i}", "k", 1);
    json_t *res = NULL;
    loom_error_t err;
    cr_assert_eq(loom_op_call(&ctx, "test.echo", req, &res, &err), 0, "%s", err.message);
    cr_assert(json_equal(req, res));
    cr_assert_null(err.code);
    cr_assert_eq(strlen(seen_ray), 36, "a ray id is made when the caller has none");
    cr_assert_str_eq(seen_op, "test.echo");
    cr_assert(seen_remaining > 4000 && seen_remaining <= LOOM_OP_DEFAULT_TIMEOUT_MS, "%lld",
              (long long)seen_remaining);
    cr_assert(seen_scope);
    cr_assert_null(ctx.op, "ctx->op is only set while the handler runs");
    json_decref(res);

    /* The caller's ray id is kept; a NULL request is {}. */
    ctx.ray_id = "ray-1";
    cr_assert_eq(loom_op_call(&ctx, "test.echo", NULL, &res, &err), 0);
    cr_assert_str_eq(seen_ray, "ray-1");
    cr_assert(json_is_object(res) && json_object_size(res) == 0);
    json_decref(res);
    json_decref(req);
}

Test(op, unknown_name_is_not_found_naming_the_op)
{
    loom_op_ctx_t ctx = {.rt = &rt};
    json_t *res = (json_t *)1;
    loom_error_t err;
    int rc = loom_op_call(&ctx, "test.nope", NULL, &res, &err);
    cr_assert_eq(rc, LOOM_ENOENT);
    cr_assert_null(res);
    cr_assert_str_eq(err.code, "OP_NOT_FOUND");
    cr_assert_eq(err.cls, LOOM_ERR_NOT_FOUND);
    cr_assert_eq(loom_error_class_http_status(err.cls), 404);
    cr_assert_eq(loom_error_class_exit_status(err.cls), 6);
    cr_assert_str_eq(err.message, "unknown op \"test.nope\"");
    cr_assert_eq(loom_metrics_value(rt.calls, (const char *[]){"_unknown", "OP_NOT_FOUND"}), 1,
                 "unknown names share one series");
}

Test(op, bad_request_payloads_are_bad_request)
{
    loom_op_ctx_t ctx = {.rt = &rt};
    json_t *res = NULL;
    loom_error_t err;
    json_t *arr = json_pack("[i]", 1);
    cr_assert_neq(loom_op_call(&ctx, "test.validate", arr, &res, &err), 0);
    cr_assert_str_eq(err.code, "INVALID_JSON");
    cr_assert_eq(err.cls, LOOM_ERR_BAD_REQUEST);
    cr_assert(strstr(err.message, "op \"test.validate\" takes a JSON object"), "%s", err.message);
    json_decref(arr);

    struct {
        const char *json;
        const char *message;
    } cases[] = {
        {"{}", "missing field \"name\""},
        {"{\"name\":3}", "field \"name\" must be a string"},
        {"{\"name\":\"\"}", "field \"name\" must be 1 to 8 bytes long"},
        {"{\"name\":\"much too long\"}", "field \"name\" must be 1 to 8 bytes long"},
        {"{\"name\":\"ann\",\"extra\":true}", "unknown field \"extra\""},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        json_t *req = json_loads(cases[i].json, 0, NULL);
        cr_assert_neq(loom_op_call(&ctx, "test.validate", req, &res, &err), 0, "%s", cases[i].json);
        cr_assert_null(res);
        cr_assert_str_eq(err.code, "INVALID_ARGUMENT");
        cr_assert_eq(err.cls, LOOM_ERR_BAD_REQUEST);
        cr_assert_str_eq(err.message, cases[i].message);
        json_decref(req);
    }
    json_t *req = json_pack("{s:s}", "name", "ann");
    cr_assert_eq(loom_op_call(&ctx, "test.validate", req, &res, &err), 0);
    cr_assert_str_eq(json_string_value(json_object_get(res, "hello")), "ann");
    json_decref(res);
    json_decref(req);
    cr_assert_eq(loom_metrics_value(rt.calls, (const char *[]){"test.validate", "ok"}), 1);
    cr_assert_eq(
        loom_metrics_value(rt.calls, (const char *[]){"test.validate", "INVALID_ARGUMENT"}), 5);
}

Test(op, c_code_past_the_timeout_is_a_timeout_and_its_result_dropped)
{
    loom_op_ctx_t ctx = {.rt = &rt};
    json_t *res = NULL;
    loom_error_t err;
    int64_t t0 = loom_mono_ms();
    cr_assert_eq(loom_op_call(&ctx, "test.slow", NULL, &res, &err), LOOM_ETIMEDOUT);
    cr_assert_geq(loom_mono_ms() - t0, 150);
    cr_assert_null(res);
    cr_assert_str_eq(err.code, "DEADLINE_EXCEEDED");
    cr_assert_eq(err.cls, LOOM_ERR_TIMEOUT);
    cr_assert(err.retriable);
    cr_assert(strstr(err.message, "op \"test.slow\" did not finish within its timeout of 50 ms"),
              "%s", err.message);
    cr_assert_eq(loom_metrics_value(rt.duration, (const char *[]){"test.slow"}), 1);
}

Test(op, a_deadline_already_passed_does_not_run_the_op)
{
    slow_runs = 0;
    loom_op_ctx_t ctx = {.rt = &rt, .deadline_mono_ms = loom_mono_ms() - 1};
    json_t *res = NULL;
    loom_error_t err;
    cr_assert_neq(loom_op_call(&ctx, "test.slow", NULL, &res, &err), 0);
    cr_assert_str_eq(err.code, "DEADLINE_EXCEEDED");
    cr_assert(strstr(err.message, "the caller's deadline"), "%s", err.message);
    cr_assert_eq(slow_runs, 0);
}

Test(op, handler_contract_violations_are_internal_errors_naming_the_op)
{
    loom_op_ctx_t ctx = {.rt = &rt};
    json_t *res = NULL;
    loom_error_t err;
    cr_assert_neq(loom_op_call(&ctx, "test.silent", NULL, &res, &err), 0);
    cr_assert_str_eq(err.code, "INTERNAL");
    cr_assert(strstr(err.message, "op \"test.silent\" failed"), "%s", err.message);
    cr_assert_neq(loom_op_call(&ctx, "test.no_result", NULL, &res, &err), 0);
    cr_assert_str_eq(err.code, "INTERNAL");
    cr_assert(strstr(err.message, "op \"test.no_result\" returned no result"), "%s", err.message);
    cr_assert_neq(loom_op_call(&ctx, "test.needs_db", NULL, &res, &err), 0);
    cr_assert_str_eq(err.code, "INTERNAL");
    cr_assert(strstr(err.message, "needs a database"), "%s", err.message);
    cr_assert_neq(loom_op_call(NULL, "test.echo", NULL, &res, &err), 0);
    cr_assert_str_eq(err.code, "INVALID_ARGUMENT");
}

static void *call_many(void *arg)
{
    (void)arg;
    json_t *req = json_pack("{s:s}", "name", "x");
    for (int i = 0; i < 2000; i++) {
        loom_op_ctx_t ctx = {.rt = &rt};
        json_t *res = NULL;
        loom_error_t err;
        if (loom_op_call(&ctx, i % 2 ? "test.validate" : "test.nope", req, &res, &err) == 0)
            json_decref(res);
    }
    json_decref(req);
    return NULL;
}

Test(op, concurrent_calls_count_exactly)
{
    pthread_t t[4];
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, call_many, NULL);
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    cr_assert_eq(loom_metrics_value(rt.calls, (const char *[]){"_unknown", "OP_NOT_FOUND"}), 4000);
    cr_assert_eq(loom_metrics_value(rt.calls, (const char *[]){"test.validate", "ok"}), 4000);
}
