/*
 * error.c: the one list of return codes, the error classes with their HTTP and
 * exit statuses, and the engine's catalogue of user-visible error codes.
 */
#include "loom/error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static const struct {
    const char *name;
    const char *desc;
} errno_table[] = {
#define X(name, desc) {#name, desc},
    LOOM_ERRNO_MAP(X)
#undef X
};

static int errno_index(int code)
{
    int i = code - (int)LOOM__ERRNO_FIRST - 1;
    if (i < 0 || i >= (int)(sizeof(errno_table) / sizeof(errno_table[0])))
        return -1;
    return i;
}

const char *loom_strerror(int code)
{
    if (code == 0)
        return "success";
    int i = errno_index(code);
    return i < 0 ? "unknown error" : errno_table[i].desc;
}

const char *loom_err_name(int code)
{
    if (code == 0)
        return "OK";
    int i = errno_index(code);
    return i < 0 ? "EUNKNOWN" : errno_table[i].name;
}

static const struct {
    const char *label;
    int http;
    int exit;
} class_table[] = {
#define X(name, label, http, exit) {label, http, exit},
    LOOM_ERROR_CLASS_MAP(X)
#undef X
};

const char *loom_error_class_name(loom_error_class_t cls)
{
    return (unsigned)cls < LOOM_ERR__CLASS_COUNT ? class_table[cls].label : "internal";
}

int loom_error_class_http_status(loom_error_class_t cls)
{
    return (unsigned)cls < LOOM_ERR__CLASS_COUNT ? class_table[cls].http : 500;
}

int loom_error_class_exit_status(loom_error_class_t cls)
{
    return (unsigned)cls < LOOM_ERR__CLASS_COUNT ? class_table[cls].exit : 1;
}

const loom_error_code_t loom_error_codes[LOOM_CODE__COUNT] = {
#define X(name, cls, retriable, summary) {#name, LOOM_ERR_##cls, retriable, summary},
    LOOM_ERROR_CODE_MAP(X)
#undef X
};

void loom_error_clear(loom_error_t *err)
{
    if (!err)
        return;
    err->cls = LOOM_ERR_NONE;
    err->code = NULL;
    err->retriable = false;
    err->message[0] = '\0';
    err->sqlstate[0] = '\0';
    err->constraint[0] = '\0';
}

int loom_error_class_errno(loom_error_class_t cls)
{
    switch (cls) {
    case LOOM_ERR_NONE:
        return 0;
    case LOOM_ERR_BAD_REQUEST:
        return LOOM_EINVAL;
    case LOOM_ERR_UNAUTHORIZED:
    case LOOM_ERR_FORBIDDEN:
        return LOOM_EPERM;
    case LOOM_ERR_NOT_FOUND:
        return LOOM_ENOENT;
    case LOOM_ERR_CONFLICT:
        return LOOM_ECONFLICT;
    case LOOM_ERR_TOO_LARGE:
        return LOOM_ETOOBIG;
    case LOOM_ERR_TOO_MANY:
    case LOOM_ERR_UNAVAILABLE:
        return LOOM_ERETRY;
    case LOOM_ERR_TIMEOUT:
        return LOOM_ETIMEDOUT;
    case LOOM_ERR_INTERNAL:
    case LOOM_ERR__CLASS_COUNT:
        break;
    }
    return LOOM_EIO;
}

static int error_vset(loom_error_t *err, const loom_error_code_t *code, const char *fmt, va_list ap)
{
    if (err) {
        err->cls = code->cls;
        err->code = code->name;
        err->retriable = code->retriable;
        vsnprintf(err->message, sizeof(err->message), fmt, ap);
        err->sqlstate[0] = '\0';
        err->constraint[0] = '\0';
    }
    return loom_error_class_errno(code->cls);
}

int loom_error_set(loom_error_t *err, loom_code_t code, const char *fmt, ...)
{
    if ((unsigned)code >= LOOM_CODE__COUNT)
        code = LOOM_CODE_INTERNAL;
    va_list ap;
    va_start(ap, fmt);
    int rc = error_vset(err, &loom_error_codes[code], fmt, ap);
    va_end(ap);
    return rc;
}

int loom_error_setc(loom_error_t *err, const loom_error_code_t *code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = error_vset(err, code ? code : &loom_error_codes[LOOM_CODE_INTERNAL], fmt, ap);
    va_end(ap);
    return rc;
}

bool loom_error_is(const loom_error_t *err, loom_code_t code)
{
    return err && (unsigned)code < LOOM_CODE__COUNT && err->code == loom_error_codes[code].name;
}

bool loom_error_isc(const loom_error_t *err, const loom_error_code_t *code)
{
    return err && code && err->code == code->name;
}

const loom_error_code_t *loom_error_code_find(const char *name)
{
    for (size_t i = 0; i < LOOM_CODE__COUNT; i++)
        if (strcmp(loom_error_codes[i].name, name) == 0)
            return &loom_error_codes[i];
    return NULL;
}

loom_error_class_t loom_error_class_from_http(int status)
{
    if (status >= 200 && status < 300)
        return LOOM_ERR_NONE;
    for (int c = LOOM_ERR_BAD_REQUEST; c < LOOM_ERR__CLASS_COUNT; c++)
        if (class_table[c].http == status)
            return (loom_error_class_t)c;
    return status >= 400 && status < 500 ? LOOM_ERR_BAD_REQUEST : LOOM_ERR_INTERNAL;
}
