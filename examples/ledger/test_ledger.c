/*
 * test_ledger.c: the ledger against a private PostgreSQL and Kafka, with
 * Loom's test kit (loom/testkit.h) and nothing else.
 */
#include "ledger.h"
#include "loom/testkit.h"

#include <criterion/criterion.h>
#include <string.h>

static loom_testkit_t *kit;

static void start(void)
{
    static const loom_service_t *const services[] = {&ledger_service};
    loom_error_t err;
    if (loom_testkit_start(services, LOOM_COUNT(services), NULL, &kit, &err) != 0)
        cr_assert_fail("%s", err.message);
}

static void stop(void)
{
    loom_testkit_stop(kit);
}

TestSuite(ledger, .init = start, .fini = stop, .timeout = 180);

/* Sends a command and asserts what became of it; returns its result. */
static json_t *expect(const char *status, const char *type, const char *key, json_t *data)
{
    loom_testkit_outcome_t o;
    cr_assert_eq(loom_testkit_command(kit, type, key, data, &o, NULL), 0, "%s", o.error);
    cr_assert_str_eq(o.status, status, "%s %s: %s", type, key, o.error);
    json_t *result = o.result ? json_incref(o.result) : json_string(o.error);
    loom_testkit_outcome_release(&o);
    return result;
}

static void open_with(const char *id, int amount)
{
    json_decref(expect("applied", "ledger.open", id, json_pack("{s:s}", "id", id)));
    if (amount > 0)
        json_decref(expect("applied", "ledger.deposit", id,
                           json_pack("{s:s, s:i}", "account", id, "amount", amount)));
}

static json_int_t balance(const char *id)
{
    loom_error_t err;
    json_t *req = json_pack("{s:s}", "id", id);
    json_t *acc = loom_testkit_op(kit, "ledger.accounts.get", req, &err);
    json_decref(req);
    cr_assert_not_null(acc, "%s", err.message);
    json_int_t b = json_integer_value(json_object_get(acc, "balance"));
    json_decref(acc);
    return b;
}

Test(ledger, opens_and_deposits)
{
    open_with("alice", 100);
    json_t *r = expect("applied", "ledger.deposit", "alice",
                       json_pack("{s:s, s:i}", "account", "alice", "amount", 20));
    cr_assert_eq(json_integer_value(json_object_get(r, "balance")), 120);
    json_decref(r);
    cr_assert_eq(balance("alice"), 120);

    loom_error_t err;
    json_t *ev = loom_testkit_events(kit, "account-alice", &err);
    cr_assert_not_null(ev, "%s", err.message);
    cr_assert_eq(json_array_size(ev), 3);
    const char *types[] = {"ledger.opened", "ledger.deposited", "ledger.deposited"};
    for (size_t i = 0; i < 3; i++)
        cr_assert_str_eq(json_string_value(json_object_get(json_array_get(ev, i), "type")),
                         types[i]);
    json_decref(ev);
}

Test(ledger, a_transfer_credits_through_a_follow_up_command)
{
    open_with("bob", 50);
    open_with("carol", 0);
    json_t *r = expect(
        "applied", "ledger.transfer", "bob",
        json_pack("{s:s, s:s, s:s, s:i}", "id", "t1", "from", "bob", "to", "carol", "amount", 30));
    cr_assert_eq(json_integer_value(json_object_get(r, "balance")), 20);
    json_decref(r);
    cr_assert_eq(balance("bob"), 20);

    /* The credit is a command of its own, published through the outbox. */
    loom_error_t err;
    json_t *ev = loom_testkit_wait_events(kit, "account-carol", 2, 0, &err);
    cr_assert_not_null(ev, "%s", err.message);
    json_t *credited = json_array_get(ev, 1);
    cr_assert_str_eq(json_string_value(json_object_get(credited, "type")), "ledger.credited");
    cr_assert_eq(json_integer_value(json_object_get(credited, "version")), 2);
    cr_assert_str_eq(
        json_string_value(json_object_get(json_object_get(credited, "data"), "transfer")), "t1");
    json_decref(ev);
    cr_assert_eq(balance("carol"), 30);
}

Test(ledger, rejects_what_it_cannot_apply)
{
    open_with("dave", 10);
    open_with("erin", 0);
    json_t *why = expect(
        "rejected", "ledger.transfer", "dave",
        json_pack("{s:s, s:s, s:s, s:i}", "id", "t2", "from", "dave", "to", "erin", "amount", 11));
    cr_assert(strstr(json_string_value(why), "holds 10, not 11"), "%s", json_string_value(why));
    json_decref(why);
    why = expect("rejected", "ledger.open", "dave", json_pack("{s:s}", "id", "dave"));
    cr_assert(strstr(json_string_value(why), "exists"), "%s", json_string_value(why));
    json_decref(why);
    why = expect("rejected", "ledger.deposit", "zed",
                 json_pack("{s:s, s:i}", "account", "zed", "amount", 1));
    cr_assert(strstr(json_string_value(why), "no account \"zed\""), "%s", json_string_value(why));
    json_decref(why);
    /* Nothing moved: balances and streams are as they were. */
    cr_assert_eq(balance("dave"), 10);
    cr_assert_eq(balance("erin"), 0);
    loom_error_t err;
    json_t *ev = loom_testkit_events(kit, "account-dave", &err);
    cr_assert_eq(json_array_size(ev), 2);
    json_decref(ev);
    json_t *req = json_pack("{s:s}", "id", "zed");
    cr_assert_null(loom_testkit_op(kit, "ledger.accounts.get", req, &err));
    json_decref(req);
    cr_assert(loom_error_is(&err, LOOM_CODE_NOT_FOUND), "%s", err.message);
}
