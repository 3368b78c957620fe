/*
 * A raw-socket HTTP/1.1 client for the gateway tests: it sends exactly the
 * bytes a test writes (pipelined requests, chunked bodies, a slowloris
 * trickle, garbage) and reads responses one at a time off the connection.
 */
#ifndef LOOM_TEST_HTTP_CLIENT_H
#define LOOM_TEST_HTTP_CLIENT_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

typedef struct loom_test_http_conn {
    int fd;
    char *buf; /* bytes read and not consumed yet */
    size_t len, cap;
    bool eof;
} loom_test_http_conn_t;

typedef struct loom_test_http_res {
    int status;
    char *head; /* status line and headers, NUL-terminated */
    char *body; /* NUL-terminated */
    size_t body_len;
    json_t *json; /* the body parsed, or NULL */
} loom_test_http_res_t;

/* Connects to 127.0.0.1:port; aborts the test on failure. */
loom_test_http_conn_t *loom_test_http_open(int port);
/* Connects; returns NULL when refused. */
loom_test_http_conn_t *loom_test_http_try_open(int port);
void loom_test_http_close(loom_test_http_conn_t *c);
/* Sends all bytes (aborts the test on failure). Returns false when the
 * peer has closed. */
bool loom_test_http_send(loom_test_http_conn_t *c, const char *data, size_t len);
bool loom_test_http_sends(loom_test_http_conn_t *c, const char *text);
/* Reads one response (Content-Length body; 1xx responses too). Returns false
 * on timeout or when the connection closed first. */
bool loom_test_http_read(loom_test_http_conn_t *c, int timeout_ms, loom_test_http_res_t *res);
/* True when the server closes the connection within timeout_ms (bytes
 * arriving meanwhile are dropped). */
bool loom_test_http_closed(loom_test_http_conn_t *c, int timeout_ms);
/* A header's value (copied into buf); NULL when absent. */
const char *loom_test_http_header(const loom_test_http_res_t *res, const char *name, char *buf,
                                  size_t size);
void loom_test_http_res_free(loom_test_http_res_t *res);

/* One request on a fresh connection: token (NULL: none), extra headers
 * ("Name: value\r\n..."; NULL: none), body (NULL: none). Aborts the test
 * when no response arrives within 30 s. */
void loom_test_http(int port, const char *method, const char *path, const char *token,
                    const char *headers, const char *body, loom_test_http_res_t *res);

/* GET path on a fresh connection, for a server that may not listen yet: the
 * status, or -1 when the connection is refused or no answer comes within
 * timeout_ms. With body, *body is set to a new string of the answer's body
 * (left alone when there is no answer). */
int loom_test_http_get_status(int port, const char *path, int timeout_ms, char **body);
/* Asks GET path (each try waiting up to 10 s for its answer, tries 100 ms
 * apart) until it answers want or timeout_ms passes; returns the last status
 * (-1: no answer), so want when it came. */
int loom_test_http_wait_status(int port, const char *path, int want, int timeout_ms);

/* The error code of a JSON error body ("" when none). */
const char *loom_test_http_error_code(const loom_test_http_res_t *res);

#endif
