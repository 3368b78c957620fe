/* Error model: return codes, classes mapped to HTTP and exit statuses, the catalogue. */
#include "loom/error.h"

#include <criterion/criterion.h>
#include <string.h>

Test(error, errno_names_and_descriptions)
{
    cr_assert_str_eq(loom_err_name(LOOM_EINVAL), "EINVAL");
    cr_assert_str_eq(loom_strerror(LOOM_EINVAL), "invalid argument");
    cr_assert_str_eq(loom_err_name(LOOM_EPARSE), "EPARSE");
    cr_assert_str_eq(loom_strerror(0), "success");
    cr_assert_str_eq(loom_strerror(12345), "unknown error");
    cr_assert_str_eq(loom_err_name(-1), "EUNKNOWN");
    cr_assert(LOOM_EINVAL < 0 && LOOM_EPARSE < 0);
}

Test(error, classes_map_to_the_http_statuses_of_the_design)
{
    struct {
        loom_error_class_t cls;
        const char *name;
        int http;
    } want[] = {
        {LOOM_ERR_BAD_REQUEST, "bad_request", 400}, {LOOM_ERR_UNAUTHORIZED, "unauthorized", 401},
        {LOOM_ERR_FORBIDDEN, "forbidden", 403},     {LOOM_ERR_NOT_FOUND, "not_found", 404},
        {LOOM_ERR_CONFLICT, "conflict", 409},       {LOOM_ERR_TOO_LARGE, "too_large", 413},
        {LOOM_ERR_TOO_MANY, "too_many", 429},       {LOOM_ERR_INTERNAL, "internal", 500},
        {LOOM_ERR_UNAVAILABLE, "unavailable", 503}, {LOOM_ERR_TIMEOUT, "timeout", 504},
    };
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        cr_expect_eq(loom_error_class_http_status(want[i].cls), want[i].http, "%s", want[i].name);
        cr_expect_str_eq(loom_error_class_name(want[i].cls), want[i].name);
    }
}

Test(error, every_error_class_has_its_own_nonzero_exit_status)
{
    for (int a = LOOM_ERR_BAD_REQUEST; a < LOOM_ERR__CLASS_COUNT; a++) {
        cr_expect_neq(loom_error_class_exit_status(a), 0);
        cr_expect_neq(loom_error_class_exit_status(a), 2, "2 is reserved for usage errors");
        for (int b = a + 1; b < LOOM_ERR__CLASS_COUNT; b++)
            cr_expect_neq(loom_error_class_exit_status(a), loom_error_class_exit_status(b));
    }
}

Test(error, set_fills_class_code_message_and_retriable)
{
    loom_error_t err;
    loom_error_clear(&err);
    cr_assert_null(err.code);
    int rc = loom_error_set(&err, LOOM_CODE_OP_NOT_FOUND, "unknown op \"%s\"", "x.y");
    cr_assert_eq(rc, LOOM_ENOENT);
    cr_assert_eq(err.cls, LOOM_ERR_NOT_FOUND);
    cr_assert_str_eq(err.code, "OP_NOT_FOUND");
    cr_assert_str_eq(err.message, "unknown op \"x.y\"");
    cr_assert_not(err.retriable);

    rc = loom_error_set(&err, LOOM_CODE_SERIALIZATION_FAILURE, "conflict");
    cr_assert_eq(rc, LOOM_ERETRY);
    cr_assert(err.retriable);
    cr_assert_eq(loom_error_class_http_status(err.cls), 503);

    /* A NULL err still yields the code. */
    cr_assert_eq(loom_error_set(NULL, LOOM_CODE_DEADLINE_EXCEEDED, "late"), LOOM_ETIMEDOUT);
}

Test(error, catalogue_codes_are_upper_snake_and_unique)
{
    for (size_t i = 0; i < LOOM_CODE__COUNT; i++) {
        const char *n = loom_error_codes[i].name;
        cr_assert_gt(strlen(n), 2);
        for (const char *p = n; *p; p++)
            cr_assert((*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '_', "%s", n);
        cr_assert_gt(strlen(loom_error_codes[i].summary), 5, "%s has no summary", n);
        for (size_t j = i + 1; j < LOOM_CODE__COUNT; j++)
            cr_assert_str_neq(n, loom_error_codes[j].name);
        cr_assert_eq(loom_error_code_find(n), &loom_error_codes[i]);
    }
    cr_assert_null(loom_error_code_find("NO_SUCH_CODE"));
}

Test(error, message_is_truncated_not_overflowed)
{
    loom_error_t err;
    char big[4 * LOOM_ERROR_MESSAGE_MAX];
    memset(big, 'x', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    loom_error_set(&err, LOOM_CODE_INTERNAL, "%s", big);
    cr_assert_eq(strlen(err.message), LOOM_ERROR_MESSAGE_MAX - 1);
}

Test(error, codes_are_compared_by_identity)
{
    loom_error_t err;
    loom_error_set(&err, LOOM_CODE_QUEUE_FULL, "queue full");
    cr_assert(loom_error_is(&err, LOOM_CODE_QUEUE_FULL));
    cr_assert_not(loom_error_is(&err, LOOM_CODE_INTERNAL));
    /* A string equal to the name is not the code: only the catalogue's own. */
    char name[] = "QUEUE_FULL";
    err.code = name;
    cr_assert_not(loom_error_is(&err, LOOM_CODE_QUEUE_FULL));
    loom_error_clear(&err);
    cr_assert_not(loom_error_is(&err, LOOM_CODE_QUEUE_FULL));
    cr_assert_not(loom_error_is(NULL, LOOM_CODE_QUEUE_FULL));
    static const loom_error_code_t mine = {"MINE", LOOM_ERR_CONFLICT, false, "a service's"};
    loom_error_setc(&err, &mine, "x");
    cr_assert(loom_error_isc(&err, &mine));
    cr_assert_not(loom_error_is(&err, LOOM_CODE_ALREADY_EXISTS));
}
