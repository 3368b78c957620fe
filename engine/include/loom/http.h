/*
 * The HTTP/1.1 server core of the gateway: listeners, event loops,
 * connections, request parsing, limits and response writing.
 *
 * Requests are parsed by Node's http_parser (Debian's libhttp-parser-dev,
 * 2.9.4), which handles keep-alive, pipelining, Content-Length and chunked
 * bodies. The server runs `threads` libuv loops, one per thread, each
 * accepting on its own SO_REUSEPORT socket of every listen address, so the
 * kernel spreads connections over the loops and a loop never shares a
 * connection with another.
 *
 * A connection handles one request at a time: while a request is being
 * answered, what the client sends meanwhile waits unparsed in the
 * connection's buffer (once 64 KiB wait there, the connection reads no
 * further until the answer is written), and a pipelined request is parsed
 * only once the previous response has been written. Responses therefore
 * leave in request order, and a client that sends without reading cannot
 * make the server buffer more than one response.
 *
 * Limits answer with a status and close the connection: request line longer
 * than max_url (414), headers over max_header_bytes or max_headers (431),
 * body over max_body (413), an unknown Expect (417), anything http_parser
 * rejects (400), headers not complete within header_timeout (408; a
 * slowloris client is dropped), more than max_connections open (503 with
 * Retry-After). A new connection that sends nothing within header_timeout,
 * a keep-alive connection silent for idle_timeout, or a body or a response
 * write stalled that long, is closed.
 *
 * Handlers run on the loop thread of their connection and must not block.
 * A handler either answers at once (loom_http_res_send) or keeps the request
 * (loom_http_req_ref) and answers later on the same thread, typically from a
 * function posted with loom_http_req_post() by another thread.
 */
#ifndef LOOM_HTTP_H
#define LOOM_HTTP_H

#include "loom/arena.h"
#include "loom/error.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

typedef struct loom_http_server loom_http_server_t;
typedef struct loom_http_req loom_http_req_t;
typedef struct loom_http_res loom_http_res_t;

/* Limits; a zero field takes the default in brackets. */
typedef struct loom_http_limits {
    size_t max_url;            /* request target bytes [8192] -> 414 */
    size_t max_header_bytes;   /* request line + header bytes [16384] -> 431 */
    int max_headers;           /* header lines [100] -> 431 */
    size_t max_body;           /* body bytes, after de-chunking [4 MiB] -> 413 */
    int max_connections;       /* open connections, all loops [10000] -> 503 */
    int64_t header_timeout_ms; /* first byte of a request to end of its headers [10000] -> 408 */
    int64_t idle_timeout_ms;   /* keep-alive idle, stalled body or write [60000] -> close */
} loom_http_limits_t;

/* Defaults of loom_http_limits_t. */
#define LOOM_HTTP_DEFAULT_MAX_URL          8192
#define LOOM_HTTP_DEFAULT_MAX_HEADER_BYTES 16384
#define LOOM_HTTP_DEFAULT_MAX_HEADERS      100
#define LOOM_HTTP_DEFAULT_MAX_BODY         (4u << 20)
#define LOOM_HTTP_DEFAULT_MAX_CONNECTIONS  10000
#define LOOM_HTTP_DEFAULT_HEADER_TIMEOUT   10000
#define LOOM_HTTP_DEFAULT_IDLE_TIMEOUT     60000

/* Fills the zero fields of limits with the defaults. */
void loom_http_limits_defaults(loom_http_limits_t *limits);

/*
 * Called on the loop thread for every complete request. The handler answers
 * through res now or later (see the top of this file).
 */
typedef void (*loom_http_handler_fn)(loom_http_req_t *req, loom_http_res_t *res, void *opaque);

/*
 * Called on the loop thread once per request when it is over: its response
 * was written, or it was dropped (client gone: status 499), or the core
 * answered it itself (400, 408, 413, 414, 417, 431, 503; then the handler
 * never saw it). For access logs and metrics.
 */
typedef void (*loom_http_done_fn)(loom_http_req_t *req, loom_http_res_t *res, void *opaque);

/*
 * Called on the loop thread when the connection of a request the handler
 * kept is closed before it was answered (client gone, forced shutdown). The
 * owner stops the timers it runs for the request; answers sent later are
 * dropped.
 */
typedef void (*loom_http_detach_fn)(loom_http_req_t *req, void *arg);

typedef struct loom_http_opts {
    const char *listen; /* "host:port[,host:port...]"; port 0 picks a free one */
    int threads;        /* event loops; 0: one per core */
    loom_http_limits_t limits;
    loom_http_handler_fn handler; /* required */
    loom_http_done_fn on_done;    /* may be NULL */
    void *opaque;                 /* passed to handler, on_done and the loop hooks */
    /* Per-loop state of the owner (both may be NULL). loop_start runs on
     * each loop's thread before it serves; what it returns is the loop's
     * data (loom_http_req_loop_data). loop_stop runs on that thread once the
     * loop has drained (every request over, or the stop's deadline passed:
     * then requests the owner still holds are to be cancelled), and must
     * close every handle loop_start opened on the loop. */
    void *(*loop_start)(uv_loop_t *loop, void *opaque);
    void (*loop_stop)(uv_loop_t *loop, void *loop_data, void *opaque);
} loom_http_opts_t;

/*
 * Binds every listen address (one SO_REUSEPORT socket per loop and address)
 * and starts the loops. Fails, with nothing started, when an address cannot
 * be parsed or bound (the message names it). The options' pointers must
 * outlive the server.
 */
int loom_http_server_start(const loom_http_opts_t *opts, loom_http_server_t **out,
                           loom_error_t *err);

/* The bound addresses, in the order given: "127.0.0.1:43817" (port 0
 * replaced by the actual port); borrowed. */
size_t loom_http_server_naddrs(const loom_http_server_t *srv);
const char *loom_http_server_addr(const loom_http_server_t *srv, size_t i);
int loom_http_server_port(const loom_http_server_t *srv, size_t i);

/*
 * Graceful stop: stop accepting, close idle connections, let requests in
 * progress finish and write their answers (with Connection: close) until
 * timeout_ms, then close what is left. Joins the loop threads. Idempotent.
 * Requests still kept by their owners after that are cancelled through
 * loom_http_req_post (see there).
 */
void loom_http_server_stop(loom_http_server_t *srv, int64_t timeout_ms);
/* Stops (with timeout 0 when not stopped yet) and frees the server. */
void loom_http_server_free(loom_http_server_t *srv);

/* True once loom_http_server_stop() was called (for readiness checks). */
bool loom_http_server_draining(const loom_http_server_t *srv);
/* Connections open now, over all loops. */
int loom_http_server_connections(const loom_http_server_t *srv);

/* ---- requests (loop thread only, unless said otherwise) ---------------------------- */

/* "GET", "POST", ... (static string). */
const char *loom_http_req_method(const loom_http_req_t *req);
/* The request target as sent ("/v1/ops/x?wait=5s"). */
const char *loom_http_req_target(const loom_http_req_t *req);
/* The path of the target, not decoded, without query and fragment ("/v1/ops/x").
 * An absolute-form target ("http://host/p") gives its path ("/p"). */
const char *loom_http_req_path(const loom_http_req_t *req);
/* The raw query string without '?' ("" when none). */
const char *loom_http_req_query_string(const loom_http_req_t *req);
/* The first value of a query parameter, percent- and '+'-decoded; NULL when
 * absent, "" for "?name" or "?name=". Borrowed (request arena). */
const char *loom_http_req_query(loom_http_req_t *req, const char *name);
/* Query parameters by index (decoded), for iteration; false past the end. */
bool loom_http_req_query_at(loom_http_req_t *req, size_t i, const char **name, const char **value);
/* The name of the first query parameter whose name or value does not decode
 * to clean text (a %00, or bytes that are not UTF-8); NULL when all do. That
 * name may itself be unclean: repair a copy before echoing it. */
const char *loom_http_req_query_unclean(loom_http_req_t *req);
/* The first header of that name (case-insensitive); NULL when absent. */
const char *loom_http_req_header(const loom_http_req_t *req, const char *name);
/* Headers by index, for iteration; false past the end. */
bool loom_http_req_header_at(const loom_http_req_t *req, size_t i, const char **name,
                             const char **value);
/* The body (NUL-terminated, possibly empty) and its length. */
const char *loom_http_req_body(const loom_http_req_t *req, size_t *len);
/* "HTTP/1.1" -> 1 and 1. */
void loom_http_req_version(const loom_http_req_t *req, int *major, int *minor);
/* The peer address "127.0.0.1:51234" ("" for sessions). */
const char *loom_http_req_remote(const loom_http_req_t *req);
/* Monotonic nanoseconds when the request's first byte arrived. */
int64_t loom_http_req_start_ns(const loom_http_req_t *req);
/* Memory freed with the request. */
loom_arena_t *loom_http_req_arena(loom_http_req_t *req);
/* The libuv loop the request lives on (NULL for sessions), for timers. */
uv_loop_t *loom_http_req_loop(loom_http_req_t *req);
/* The request's response. */
loom_http_res_t *loom_http_req_res(loom_http_req_t *req);
/* A pointer for the handler's own state (NULL until set). */
void *loom_http_req_data(const loom_http_req_t *req);
void loom_http_req_set_data(loom_http_req_t *req, void *data);

/* What the server's loop_start returned for the request's loop (NULL for
 * sessions and without loop_start). */
void *loom_http_req_loop_data(const loom_http_req_t *req);

/* Keeps the request alive after the handler returned; every ref needs an
 * unref. The request is freed when the last reference goes. */
void loom_http_req_ref(loom_http_req_t *req);
void loom_http_req_unref(loom_http_req_t *req);
/* Sets the function called when the connection goes before the answer. */
void loom_http_req_on_detach(loom_http_req_t *req, loom_http_detach_fn fn, void *arg);
/* True when the connection went away (answers are dropped). */
bool loom_http_req_detached(const loom_http_req_t *req);

/*
 * Runs fn(req, arg, false) on the request's loop thread, soon. Thread-safe:
 * this is how other threads (a worker pool, the Kafka delivery thread) hand a
 * result back. When the loop has already stopped (a forced shutdown) fn runs
 * at once on the calling thread with cancelled = true and must then only
 * release what it holds (loom_http_req_unref is allowed). Never fails.
 */
typedef void (*loom_http_post_fn)(loom_http_req_t *req, void *arg, bool cancelled);
void loom_http_req_post(loom_http_req_t *req, loom_http_post_fn fn, void *arg);

/* ---- responses ---------------------------------------------------------------------- */

/* The status (default 200). */
void loom_http_res_status(loom_http_res_t *res, int status);
int loom_http_res_get_status(const loom_http_res_t *res);
/* Adds a header (name and value copied; CR and LF in them are refused). The
 * core writes Date, Content-Length and Connection itself. */
void loom_http_res_header(loom_http_res_t *res, const char *name, const char *value);
/* Sets the body (copied). */
void loom_http_res_body(loom_http_res_t *res, const void *data, size_t len);
/* Sets the body, taking a malloc'ed buffer. */
void loom_http_res_body_take(loom_http_res_t *res, char *data, size_t len);
/* Closes the connection after this response. */
void loom_http_res_close(loom_http_res_t *res);
/* Sends the response; once. On a detached request it only marks it sent. */
void loom_http_res_send(loom_http_res_t *res);
bool loom_http_res_sent(const loom_http_res_t *res);
/* Bytes of the body sent. */
size_t loom_http_res_body_len(const loom_http_res_t *res);
/* The reason phrase of a status ("Not Found"). */
const char *loom_http_status_text(int status);

/* ---- UTF-8 (what JSON answers may carry) ------------------------------------------- */

/* True when s[0..len) is well-formed UTF-8 (no overlong forms, surrogates
 * or code points above U+10FFFF). */
bool loom_http_utf8_valid(const char *s, size_t len);
/* Replaces, in place, every byte of s that is not part of a well-formed
 * UTF-8 sequence with '?', so that text echoing client bytes can always be
 * sent as JSON. Returns how many bytes it replaced. */
size_t loom_http_utf8_repair(char *s);

/* ---- sessions: the same connection logic without sockets (fuzzing, tests) ---------- */

typedef struct loom_http_session loom_http_session_t;
/* Receives the bytes the server would write. */
typedef void (*loom_http_write_fn)(void *arg, const char *data, size_t len);

/* A connection fed by loom_http_session_feed(); handlers must answer at once
 * (no timers, no posting). limits may be NULL (defaults). */
loom_http_session_t *loom_http_session_new(const loom_http_limits_t *limits,
                                           loom_http_handler_fn handler, loom_http_done_fn on_done,
                                           void *opaque, loom_http_write_fn write, void *write_arg);
/* Feeds bytes from the client; len 0 is the end of input. Returns false once
 * the server side has closed the connection. */
bool loom_http_session_feed(loom_http_session_t *s, const char *data, size_t len);
void loom_http_session_free(loom_http_session_t *s);

#endif
