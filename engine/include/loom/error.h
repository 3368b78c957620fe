/*
 * Loom's error model.
 *
 * Two layers, as in libuv and librdkafka:
 *
 *  - Functions that can fail return an int: 0, or a negative LOOM_E* code from
 *    the one list below. loom_strerror() and loom_err_name() describe it.
 *  - Where a caller must decide what to tell a user or whether to retry, the
 *    function also fills a loom_error_t: a class (which maps to an HTTP status
 *    and to an exit code), a stable UPPER_SNAKE code from a catalogue, a
 *    message in the PostgreSQL style and a retriable flag.
 *
 * Every code a user can see is listed in a catalogue (loom_error_codes[] for
 * the engine, one array per service) and documented in docs/errors.md; a test
 * fails when the two differ.
 */
#ifndef LOOM_ERROR_H
#define LOOM_ERROR_H

#include <stdbool.h>
#include <stddef.h>

/* Negative return codes: X(name, description). */
#define LOOM_ERRNO_MAP(X)                     \
    X(EINVAL, "invalid argument")             \
    X(ENOMEM, "out of memory")                \
    X(ENOENT, "not found")                    \
    X(EEXIST, "already exists")               \
    X(ETIMEDOUT, "timed out")                 \
    X(ECANCELED, "canceled")                  \
    X(EIO, "input/output error")              \
    X(ECONFIG, "invalid configuration")       \
    X(EDB, "database error")                  \
    X(EDBCONN, "database connection lost")    \
    X(ERETRY, "transient failure, try again") \
    X(EKAFKA, "kafka error")                  \
    X(EQUEUEFULL, "queue full")               \
    X(ECHECKSUM, "checksum mismatch")         \
    X(ECONFLICT, "conflict")                  \
    X(ETOOBIG, "too large")                   \
    X(EPERM, "not permitted")                 \
    X(ESHUTDOWN, "shutting down")             \
    X(EPARSE, "could not parse input")

typedef enum {
    LOOM_OK = 0,
#define LOOM__ERRNO_ENUM(name, desc) LOOM_##name,
    LOOM__ERRNO_FIRST = -1000,
    LOOM_ERRNO_MAP(LOOM__ERRNO_ENUM)
#undef LOOM__ERRNO_ENUM
        LOOM__ERRNO_END
} loom_errno_t;

/* Returns a static description of a LOOM_E* code ("unknown error" otherwise). */
const char *loom_strerror(int code);
/* Returns the static name of a LOOM_E* code, e.g. "EINVAL". */
const char *loom_err_name(int code);

/*
 * Error classes: X(name, label, http status, exit status of `loom op`).
 * The HTTP status and the exit status come from here and nowhere else.
 */
#define LOOM_ERROR_CLASS_MAP(X)             \
    X(NONE, "none", 200, 0)                 \
    X(BAD_REQUEST, "bad_request", 400, 3)   \
    X(UNAUTHORIZED, "unauthorized", 401, 4) \
    X(FORBIDDEN, "forbidden", 403, 5)       \
    X(NOT_FOUND, "not_found", 404, 6)       \
    X(CONFLICT, "conflict", 409, 7)         \
    X(TOO_LARGE, "too_large", 413, 8)       \
    X(TOO_MANY, "too_many", 429, 9)         \
    X(INTERNAL, "internal", 500, 1)         \
    X(UNAVAILABLE, "unavailable", 503, 10)  \
    X(TIMEOUT, "timeout", 504, 11)

typedef enum {
#define LOOM__CLASS_ENUM(name, label, http, exit) LOOM_ERR_##name,
    LOOM_ERROR_CLASS_MAP(LOOM__CLASS_ENUM)
#undef LOOM__CLASS_ENUM
        LOOM_ERR__CLASS_COUNT
} loom_error_class_t;

const char *loom_error_class_name(loom_error_class_t cls);
int loom_error_class_http_status(loom_error_class_t cls);
int loom_error_class_exit_status(loom_error_class_t cls);

/* One entry of an error-code catalogue. */
typedef struct loom_error_code {
    const char *name; /* stable UPPER_SNAKE code, e.g. "OP_NOT_FOUND" */
    loom_error_class_t cls;
    bool retriable;
    const char *summary; /* one line for docs/errors.md */
} loom_error_code_t;

/* The engine's codes: X(NAME, class, retriable, summary). */
#define LOOM_ERROR_CODE_MAP(X)                                                                    \
    X(INVALID_ARGUMENT, BAD_REQUEST, false, "A field or argument of the request is invalid.")     \
    X(INVALID_JSON, BAD_REQUEST, false, "The request body is not valid JSON of the right shape.") \
    X(UNAUTHENTICATED, UNAUTHORIZED, false, "No API token, or a token that is not known.")        \
    X(PERMISSION_DENIED, FORBIDDEN, false, "The token lacks the scope this call needs.")          \
    X(NOT_FOUND, NOT_FOUND, false, "The thing asked for does not exist.")                         \
    X(OP_NOT_FOUND, NOT_FOUND, false, "No operation of that name is registered.")                 \
    X(COMMAND_NOT_FOUND, NOT_FOUND, false, "No command with that id is recorded.")                \
    X(VERSION_CONFLICT, CONFLICT, false,                                                          \
      "An event stream moved on since it was read (optimistic concurrency).")                     \
    X(ALREADY_EXISTS, CONFLICT, false, "The thing to create exists already.")                     \
    X(PAYLOAD_TOO_LARGE, TOO_LARGE, false, "The request is over a size or count limit.")          \
    X(RATE_LIMITED, TOO_MANY, true, "Too many requests; retry later.")                            \
    X(INTERNAL, INTERNAL, false, "An unexpected failure inside Loom; the log has the details.")   \
    X(DB_ERROR, INTERNAL, false, "The database refused a statement.")                             \
    X(DB_REJECTED, BAD_REQUEST, false,                                                            \
      "The database refused the data for good (SQLSTATE class 22, 23 or 54).")                    \
    X(DB_BUSY, UNAVAILABLE, true,                                                                 \
      "The database is short of a resource or a lock (SQLSTATE class 53, 55P03); retry later.")   \
    X(READ_ONLY_VIOLATION, INTERNAL, false,                                                       \
      "An operation tried to write; operations are read-only.")                                   \
    X(MIGRATION_CHECKSUM_MISMATCH, INTERNAL, false,                                               \
      "An applied migration file was changed after it was applied.")                              \
    X(CONFIG_INVALID, INTERNAL, false, "A LOOM_* variable has a value that is not allowed.")      \
    X(DB_UNAVAILABLE, UNAVAILABLE, true, "The database cannot be reached.")                       \
    X(SERIALIZATION_FAILURE, UNAVAILABLE, true,                                                   \
      "The database aborted a transaction that conflicted with another (40001/40P01).")           \
    X(BROKER_UNAVAILABLE, UNAVAILABLE, true, "Kafka cannot be reached.")                          \
    X(QUEUE_FULL, UNAVAILABLE, true, "The local producer queue is full; retry later.")            \
    X(SHUTTING_DOWN, UNAVAILABLE, true, "The process is shutting down.")                          \
    X(GATEWAY_UNAVAILABLE, UNAVAILABLE, true,                                                     \
      "The gateway given to `loom op --url` cannot be reached.")                                  \
    X(GATEWAY_BAD_RESPONSE, INTERNAL, false,                                                      \
      "The gateway answered with something other than HTTP with a JSON body.")                    \
    X(DEADLINE_EXCEEDED, TIMEOUT, true, "The call did not finish before its deadline.")           \
    X(COMMAND_REJECTED, BAD_REQUEST, false,                                                       \
      "A consumer rejected the command for good; the message gives its reason.")                  \
    X(COMMAND_EXPIRED, TIMEOUT, false,                                                            \
      "The command's deadline (ce_deadline) had passed when a worker took it: not applied.")      \
    X(MALFORMED_REQUEST, BAD_REQUEST, false,                                                      \
      "The request is not valid HTTP/1.1; the gateway closes the connection.")                    \
    X(METHOD_NOT_ALLOWED, BAD_REQUEST, false,                                                     \
      "The path exists but not for this method; sent as HTTP 405 with `Allow`.")                  \
    X(EXPECTATION_FAILED, BAD_REQUEST, false,                                                     \
      "An `Expect` header other than 100-continue; sent as HTTP 417.")                            \
    X(REQUEST_TIMEOUT, BAD_REQUEST, false,                                                        \
      "The request headers did not arrive in time; sent as HTTP 408, connection closed.")         \
    X(URI_TOO_LONG, TOO_LARGE, false, "The request target is over the limit; sent as HTTP 414.")  \
    X(HEADERS_TOO_LARGE, TOO_LARGE, false,                                                        \
      "The request headers are over the size or count limit; sent as HTTP 431.")                  \
    X(TOO_MANY_CONNECTIONS, UNAVAILABLE, true,                                                    \
      "The gateway holds its maximum of open connections; retry later.")                          \
    X(OVERLOADED, UNAVAILABLE, true,                                                              \
      "The gateway holds its maximum of waiting requests or queued calls; retry later.")

typedef enum {
#define LOOM__CODE_ENUM(name, cls, retriable, summary) LOOM_CODE_##name,
    LOOM_ERROR_CODE_MAP(LOOM__CODE_ENUM)
#undef LOOM__CODE_ENUM
        LOOM_CODE__COUNT
} loom_code_t;

/* The engine's catalogue, indexed by loom_code_t. */
extern const loom_error_code_t loom_error_codes[LOOM_CODE__COUNT];

#define LOOM_ERROR_MESSAGE_MAX 512

/* A described error. Embed it on the stack; it owns no heap memory. */
typedef struct loom_error {
    loom_error_class_t cls;
    const char *code; /* static string from a catalogue; NULL when no error */
    bool retriable;
    char message[LOOM_ERROR_MESSAGE_MAX];
    /* From the database, when it refused a statement: the SQLSTATE and the
     * constraint it names ("" when none), for callers that must tell one
     * refusal from another without reading the message. */
    char sqlstate[6];
    char constraint[64];
} loom_error_t;

/* Clears err (err may be NULL). */
void loom_error_clear(loom_error_t *err);

/* Fills err from an engine code and a printf-style message; returns a LOOM_E*
 * code that matches the class (so `return loom_error_set(...)` reads well).
 * err may be NULL, then only the return value is computed. */
int loom_error_set(loom_error_t *err, loom_code_t code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Same, from any catalogue entry (a service's own codes). */
int loom_error_setc(loom_error_t *err, const loom_error_code_t *code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Whether err carries the engine's code (compared by identity: codes are the
 * catalogue's own strings, so no name is compared as text). */
bool loom_error_is(const loom_error_t *err, loom_code_t code);
/* Whether err carries code, an entry of a service's catalogue. */
bool loom_error_isc(const loom_error_t *err, const loom_error_code_t *code);

/* Looks an engine code up by name; NULL when unknown. */
const loom_error_code_t *loom_error_code_find(const char *name);

/* The LOOM_E* code that best matches an error class. */
int loom_error_class_errno(loom_error_class_t cls);

/* The class whose HTTP status is `status`; other 4xx map to bad_request,
 * other statuses of 500 and above to internal, 2xx to none. */
loom_error_class_t loom_error_class_from_http(int status);

/* A service's own error codes: an array of loom_error_code_t with a name for
 * messages. Services hand theirs to the engine in loom_app_t; docs/errors.md
 * lists the engine's codes and every catalogue's. */
typedef struct loom_error_catalogue {
    const char *service; /* "messages" */
    const loom_error_code_t *codes;
    size_t count;
} loom_error_catalogue_t;

#endif
