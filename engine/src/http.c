/*
 * http.c: the HTTP/1.1 server core: loops, listeners, connections, the
 * http_parser glue, limits, timeouts and response writing.
 *
 * Each loop is one thread with its own uv_loop_t and its own SO_REUSEPORT
 * listening socket per address. A connection moves through these states:
 *
 *   IDLE      between requests; the idle timer runs
 *   READING   a request is arriving; the header timer runs until its headers
 *             are complete, then the idle timer guards the body
 *   HANDLING  the handler has it; nothing is read (pipelined bytes wait in
 *             the connection's buffer), no timer runs
 *   WRITING   the response is being written; the idle timer guards the write
 *   LINGER    the answer was an error and the connection closes: the write
 *             side is shut down and whatever the client still sends is read
 *             and dropped for a moment, so it gets the answer instead of a
 *             reset
 *   CLOSED    handles are closing; the memory goes in the close callbacks
 *
 * The parser is paused in on_message_complete, so http_parser_execute()
 * returns right after a complete request and the bytes behind it stay
 * unparsed until the response has been written.
 *
 * Sessions (loom_http_session_*) run the same state machine on bytes fed by
 * hand, without sockets, loops or timers; the fuzz target uses them.
 */
#include "loom/http.h"
#include "loom/clock.h"
#include "loom/log.h"
#include "loom/mem.h"
#include "loom/uuid.h"

#include <errno.h>
#include <http_parser.h>
#include <jansson.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define READ_BUF_SIZE (64 * 1024)
/* Bytes a connection buffers, unparsed, while its request is answered. */
#define HELD_INPUT_MAX (64 * 1024)
#define LINGER_MS      1000
#define DRAIN_GRACE_MS 2000
#define LISTEN_BACKLOG 1024
#define ADDR_TEXT_MAX  80

typedef struct loop loop_t;
typedef struct conn conn_t;

typedef enum { C_IDLE, C_READING, C_HANDLING, C_WRITING, C_LINGER, C_CLOSED } cstate_t;

/* A growable byte buffer. */
typedef struct sbuf {
    char *p;
    size_t len, cap;
} sbuf_t;

typedef struct hdr {
    const char *name, *value;
} hdr_t;

typedef struct res_hdr {
    struct res_hdr *next;
    const char *name, *value;
} res_hdr_t;

typedef struct qparam {
    const char *name, *value;
    bool clean; /* decodes to UTF-8 without NUL */
} qparam_t;

struct loom_http_res {
    loom_http_req_t *req;
    int status;
    res_hdr_t *headers, *headers_tail;
    char *body;
    size_t body_len;
    bool close, sent;
};

struct loom_http_req {
    conn_t *conn; /* NULL once detached */
    loop_t *loop; /* NULL for sessions */
    int refs;
    loom_arena_t arena;
    const char *method;
    char *target, *path, *query;
    hdr_t *headers;
    size_t n_headers, cap_headers;
    sbuf_t body;
    int major, minor;
    int64_t start_ns;
    void *data;
    loom_http_detach_fn on_detach;
    void *detach_arg;
    qparam_t *qparams;
    size_t n_qparams;
    bool q_parsed;
    bool dispatched; /* the handler saw it */
    bool done;       /* on_done was called */
    bool head;       /* HEAD: no body bytes on the wire */
    const char *remote;
    loom_http_res_t res;
};

/* What a connection needs from its server or session. */
typedef struct host {
    loom_http_limits_t limits;
    loom_http_handler_fn handler;
    loom_http_done_fn on_done;
    void *opaque;
} host_t;

struct conn {
    loop_t *loop;                  /* NULL: session */
    struct loom_http_session *ses; /* set for sessions */
    const host_t *host;
    uv_tcp_t tcp;
    uv_timer_t timer;
    int closes_pending;
    http_parser parser;
    cstate_t state;
    loom_http_req_t *req; /* being read or answered */
    sbuf_t in;            /* unparsed bytes */
    sbuf_t url, field, value;
    bool in_value;
    bool headers_done;
    size_t header_bytes;
    int fail_status;
    loom_code_t fail_code;
    char fail_msg[200];
    bool keep_alive, eof, reading, counted, write_done;
    conn_t *prev, *next;
    conn_t *written_next; /* in its loop's written list */
    bool written_queued;
    char remote[ADDR_TEXT_MAX];
};

typedef struct post {
    struct post *next;
    loom_http_req_t *req;
    loom_http_post_fn fn;
    void *arg;
} post_t;

struct loop {
    loom_http_server_t *srv;
    uv_loop_t uv;
    uv_async_t wake;
    uv_timer_t drain_timer;
    uv_idle_t written_idle;              /* active while written_head is not empty */
    conn_t *written_head, *written_tail; /* responses written whole, to move on from */
    pthread_t thread;
    bool started;
    void *user; /* what the owner's loop_start returned */
    uv_tcp_t *listeners;
    size_t n_listeners;
    pthread_mutex_t mu; /* guards posts, closed, stop */
    post_t *posts, *posts_tail;
    bool closed, stop;
    conn_t *conns;
    size_t n_conns;
    atomic_int live_reqs;
    bool draining, forced, finishing;
    int64_t drain_deadline;
    time_t date_at;
    char date[40];
    char rbuf[READ_BUF_SIZE];
};

typedef struct addr {
    struct sockaddr_storage ss;
    socklen_t len;
    char text[ADDR_TEXT_MAX];
    int port;
} addr_t;

struct loom_http_server {
    host_t host;
    addr_t *addrs;
    size_t n_addrs;
    loop_t *loops;
    int n_loops;
    atomic_int conns;
    atomic_bool draining;
    bool stopped;
    int64_t stop_timeout_ms;
    void *(*loop_start)(uv_loop_t *loop, void *opaque);
    void (*loop_stop)(uv_loop_t *loop, void *loop_data, void *opaque);
};

struct loom_http_session {
    host_t host;
    conn_t conn;
    loom_http_write_fn write;
    void *write_arg;
};

static http_parser_settings parser_settings;
static pthread_once_t parser_settings_once = PTHREAD_ONCE_INIT;

static void conn_close(conn_t *c);
static void conn_fail(conn_t *c, int status, loom_code_t code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void conn_after_response(conn_t *c);
static void conn_drain(conn_t *c);
static void conn_timer_start(conn_t *c, int64_t ms);
static void loop_maybe_finish(loop_t *l);

/* ---- small helpers ------------------------------------------------------------------ */

static void sb_append(sbuf_t *b, const char *data, size_t len)
{
    if (b->len + len + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + len + 1)
            cap *= 2;
        b->p = loom_xrealloc(b->p, cap);
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, len);
    b->len += len;
    b->p[b->len] = '\0';
}

static void sb_free(sbuf_t *b)
{
    free(b->p);
    memset(b, 0, sizeof(*b));
}

void loom_http_limits_defaults(loom_http_limits_t *l)
{
    if (!l->max_url)
        l->max_url = LOOM_HTTP_DEFAULT_MAX_URL;
    if (!l->max_header_bytes)
        l->max_header_bytes = LOOM_HTTP_DEFAULT_MAX_HEADER_BYTES;
    if (!l->max_headers)
        l->max_headers = LOOM_HTTP_DEFAULT_MAX_HEADERS;
    if (!l->max_body)
        l->max_body = LOOM_HTTP_DEFAULT_MAX_BODY;
    if (!l->max_connections)
        l->max_connections = LOOM_HTTP_DEFAULT_MAX_CONNECTIONS;
    if (!l->header_timeout_ms)
        l->header_timeout_ms = LOOM_HTTP_DEFAULT_HEADER_TIMEOUT;
    if (!l->idle_timeout_ms)
        l->idle_timeout_ms = LOOM_HTTP_DEFAULT_IDLE_TIMEOUT;
}

const char *loom_http_status_text(int status)
{
    switch (status) {
    case 100:
        return "Continue";
    case 200:
        return "OK";
    case 201:
        return "Created";
    case 202:
        return "Accepted";
    case 204:
        return "No Content";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 408:
        return "Request Timeout";
    case 409:
        return "Conflict";
    case 413:
        return "Content Too Large";
    case 414:
        return "URI Too Long";
    case 415:
        return "Unsupported Media Type";
    case 417:
        return "Expectation Failed";
    case 429:
        return "Too Many Requests";
    case 431:
        return "Request Header Fields Too Large";
    case 499:
        return "Client Closed Request";
    case 500:
        return "Internal Server Error";
    case 501:
        return "Not Implemented";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    default:
        return status < 300 ? "OK" : status < 500 ? "Bad Request" : "Internal Server Error";
    }
}

/* "Sun, 06 Nov 1994 08:49:37 GMT", cached per loop for a second. */
static const char *http_date(loop_t *l, char *buf, size_t size)
{
    time_t now = time(NULL);
    char *out = l ? l->date : buf;
    size_t n = l ? sizeof(l->date) : size;
    if (l && l->date_at == now)
        return l->date;
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(out, n, "%a, %d %b %Y %H:%M:%S GMT", &tm);
    if (l)
        l->date_at = now;
    return out;
}

/* ---- requests ----------------------------------------------------------------------- */

static loom_http_req_t *req_new(conn_t *c)
{
    loom_http_req_t *req = loom_xcalloc(1, sizeof(*req));
    req->conn = c;
    req->loop = c->loop;
    req->refs = 1; /* the connection's */
    loom_arena_init(&req->arena, 4096);
    req->method = "-";
    req->target = req->path = "-";
    req->query = "";
    req->start_ns = loom_mono_ns();
    req->remote = c->remote;
    req->res.req = req;
    req->res.status = 200;
    if (c->loop)
        atomic_fetch_add(&c->loop->live_reqs, 1);
    return req;
}

static void req_free(loom_http_req_t *req)
{
    loop_t *l = req->loop;
    free(req->headers);
    sb_free(&req->body);
    free(req->res.body);
    loom_arena_release(&req->arena);
    free(req);
    if (l)
        atomic_fetch_sub(&l->live_reqs, 1);
}

void loom_http_req_ref(loom_http_req_t *req)
{
    req->refs++;
}

void loom_http_req_unref(loom_http_req_t *req)
{
    if (--req->refs > 0)
        return;
    loop_t *l = req->loop;
    req_free(req);
    /* On a loop thread that is shutting down, the last request may be what it
     * waits for. (With cancelled posts this runs on another thread after the
     * loop closed; then finishing is already true and nothing is touched.) */
    if (l && l->draining && !l->closed)
        loop_maybe_finish(l);
}

void loom_http_req_on_detach(loom_http_req_t *req, loom_http_detach_fn fn, void *arg)
{
    req->on_detach = fn;
    req->detach_arg = arg;
}

bool loom_http_req_detached(const loom_http_req_t *req)
{
    return req->conn == NULL;
}

const char *loom_http_req_method(const loom_http_req_t *req)
{
    return req->method;
}

const char *loom_http_req_target(const loom_http_req_t *req)
{
    return req->target;
}

const char *loom_http_req_path(const loom_http_req_t *req)
{
    return req->path;
}

const char *loom_http_req_query_string(const loom_http_req_t *req)
{
    return req->query;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Percent-decodes s[0..n) into the arena; '+' becomes ' ' when plus. A bad
 * escape is kept as it is. */
static char *url_decode(loom_arena_t *a, const char *s, size_t n, bool plus, bool *clean)
{
    char *out = loom_arena_alloc(a, n + 1);
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '%' && i + 2 < n && hexval(s[i + 1]) >= 0 && hexval(s[i + 2]) >= 0) {
            out[o++] = (char)(hexval(s[i + 1]) * 16 + hexval(s[i + 2]));
            i += 2;
        } else if (plus && s[i] == '+') {
            out[o++] = ' ';
        } else {
            out[o++] = s[i];
        }
    }
    out[o] = '\0';
    /* Clean: no NUL decoded (it would cut the value short) and UTF-8. */
    if (clean && (strlen(out) != o || !loom_http_utf8_valid(out, o)))
        *clean = false;
    return out;
}

/* Length of the well-formed UTF-8 sequence at s[0..n) (1-4), or 0 when the
 * bytes there are not one (stray continuation, overlong form, surrogate,
 * above U+10FFFF, cut short). */
static size_t utf8_seq(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    size_t len;
    unsigned min, cp;
    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf) {
        len = 2;
        min = 0x80;
        cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
        len = 3;
        min = 0x800;
        cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4;
        min = 0x10000;
        cp = c & 0x07;
    } else {
        return 0;
    }
    if (n < len)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return len;
}

bool loom_http_utf8_valid(const char *s, size_t len)
{
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < len;) {
        size_t k = utf8_seq(u + i, len - i);
        if (k == 0)
            return false;
        i += k;
    }
    return true;
}

size_t loom_http_utf8_repair(char *s)
{
    unsigned char *u = (unsigned char *)s;
    size_t len = strlen(s), fixed = 0;
    for (size_t i = 0; i < len;) {
        size_t k = utf8_seq(u + i, len - i);
        if (k == 0) {
            u[i++] = '?';
            fixed++;
        } else {
            i += k;
        }
    }
    return fixed;
}

static void parse_query(loom_http_req_t *req)
{
    req->q_parsed = true;
    const char *q = req->query;
    size_t count = 1;
    for (const char *p = q; *p; p++)
        count += *p == '&';
    req->qparams = loom_arena_calloc(&req->arena, count, sizeof(qparam_t));
    while (*q) {
        size_t len = strcspn(q, "&");
        if (len > 0) {
            const char *eq = memchr(q, '=', len);
            size_t nl = eq ? (size_t)(eq - q) : len;
            qparam_t *p = &req->qparams[req->n_qparams++];
            bool clean = true;
            p->name = url_decode(&req->arena, q, nl, true, &clean);
            p->value = eq ? url_decode(&req->arena, eq + 1, len - nl - 1, true, &clean) : "";
            p->clean = clean;
        }
        q += len;
        if (*q == '&')
            q++;
    }
}

const char *loom_http_req_query(loom_http_req_t *req, const char *name)
{
    if (!req->q_parsed)
        parse_query(req);
    for (size_t i = 0; i < req->n_qparams; i++)
        if (strcmp(req->qparams[i].name, name) == 0)
            return req->qparams[i].value;
    return NULL;
}

bool loom_http_req_query_at(loom_http_req_t *req, size_t i, const char **name, const char **value)
{
    if (!req->q_parsed)
        parse_query(req);
    if (i >= req->n_qparams)
        return false;
    *name = req->qparams[i].name;
    *value = req->qparams[i].value;
    return true;
}

const char *loom_http_req_query_unclean(loom_http_req_t *req)
{
    if (!req->q_parsed)
        parse_query(req);
    for (size_t i = 0; i < req->n_qparams; i++)
        if (!req->qparams[i].clean)
            return req->qparams[i].name;
    return NULL;
}

const char *loom_http_req_header(const loom_http_req_t *req, const char *name)
{
    for (size_t i = 0; i < req->n_headers; i++)
        if (strcasecmp(req->headers[i].name, name) == 0)
            return req->headers[i].value;
    return NULL;
}

bool loom_http_req_header_at(const loom_http_req_t *req, size_t i, const char **name,
                             const char **value)
{
    if (i >= req->n_headers)
        return false;
    *name = req->headers[i].name;
    *value = req->headers[i].value;
    return true;
}

const char *loom_http_req_body(const loom_http_req_t *req, size_t *len)
{
    if (len)
        *len = req->body.len;
    return req->body.p ? req->body.p : "";
}

void loom_http_req_version(const loom_http_req_t *req, int *major, int *minor)
{
    *major = req->major;
    *minor = req->minor;
}

const char *loom_http_req_remote(const loom_http_req_t *req)
{
    return req->remote ? req->remote : "";
}

int64_t loom_http_req_start_ns(const loom_http_req_t *req)
{
    return req->start_ns;
}

loom_arena_t *loom_http_req_arena(loom_http_req_t *req)
{
    return &req->arena;
}

uv_loop_t *loom_http_req_loop(loom_http_req_t *req)
{
    return req->loop ? &req->loop->uv : NULL;
}

loom_http_res_t *loom_http_req_res(loom_http_req_t *req)
{
    return &req->res;
}

void *loom_http_req_loop_data(const loom_http_req_t *req)
{
    return req->loop ? req->loop->user : NULL;
}

void *loom_http_req_data(const loom_http_req_t *req)
{
    return req->data;
}

void loom_http_req_set_data(loom_http_req_t *req, void *data)
{
    req->data = data;
}

void loom_http_req_post(loom_http_req_t *req, loom_http_post_fn fn, void *arg)
{
    loop_t *l = req->loop;
    if (!l) {
        fn(req, arg, false);
        return;
    }
    pthread_mutex_lock(&l->mu);
    if (l->closed) {
        pthread_mutex_unlock(&l->mu);
        fn(req, arg, true);
        return;
    }
    post_t *p = loom_xmalloc(sizeof(*p));
    p->next = NULL;
    p->req = req;
    p->fn = fn;
    p->arg = arg;
    if (l->posts_tail)
        l->posts_tail->next = p;
    else
        l->posts = p;
    l->posts_tail = p;
    pthread_mutex_unlock(&l->mu);
    uv_async_send(&l->wake);
}

/* Reports the end of a request once (access log, metrics). */
static void req_report_done(loom_http_req_t *req, const host_t *host)
{
    if (req->done)
        return;
    req->done = true;
    if (host->on_done)
        host->on_done(req, &req->res, host->opaque);
}

/* ---- responses ---------------------------------------------------------------------- */

void loom_http_res_status(loom_http_res_t *res, int status)
{
    res->status = status >= 100 && status <= 999 ? status : 500;
}

int loom_http_res_get_status(const loom_http_res_t *res)
{
    return res->status;
}

void loom_http_res_header(loom_http_res_t *res, const char *name, const char *value)
{
    if (!name || !value || strpbrk(name, "\r\n:") || strpbrk(value, "\r\n") || !*name)
        return;
    res_hdr_t *h = loom_arena_alloc(&res->req->arena, sizeof(*h));
    h->next = NULL;
    h->name = loom_arena_strdup(&res->req->arena, name);
    h->value = loom_arena_strdup(&res->req->arena, value);
    if (res->headers_tail)
        res->headers_tail->next = h;
    else
        res->headers = h;
    res->headers_tail = h;
}

void loom_http_res_body_take(loom_http_res_t *res, char *data, size_t len)
{
    free(res->body);
    res->body = data;
    res->body_len = data ? len : 0;
}

void loom_http_res_body(loom_http_res_t *res, const void *data, size_t len)
{
    char *copy = loom_xmalloc(len + 1);
    if (len)
        memcpy(copy, data, len);
    copy[len] = '\0';
    loom_http_res_body_take(res, copy, len);
}

void loom_http_res_close(loom_http_res_t *res)
{
    res->close = true;
}

bool loom_http_res_sent(const loom_http_res_t *res)
{
    return res->sent;
}

size_t loom_http_res_body_len(const loom_http_res_t *res)
{
    return res->body_len;
}

typedef struct wreq {
    uv_write_t w;
    conn_t *c;
    bool final;
    size_t len;
    char data[];
} wreq_t;

static void on_write(uv_write_t *w, int status)
{
    wreq_t *wr = (wreq_t *)w;
    conn_t *c = wr->c;
    bool final = wr->final;
    free(wr);
    if (c->state == C_CLOSED)
        return;
    if (status < 0) {
        conn_close(c);
        return;
    }
    if (final)
        conn_after_response(c);
}

static void on_written_idle(uv_idle_t *h)
{
    loop_t *l = h->data;
    conn_t *c = l->written_head;
    l->written_head = l->written_tail = NULL;
    uv_idle_stop(&l->written_idle);
    /* A connection closed meanwhile is still allocated: its handles are
     * freed in the closing phase, after this one. */
    while (c) {
        conn_t *next = c->written_next;
        c->written_next = NULL;
        c->written_queued = false;
        if (c->state != C_CLOSED)
            conn_after_response(c);
        c = next;
    }
}

/* A response was written whole at once: the connection moves on (on_done,
 * the next pipelined request) at the start of the loop's next iteration, as
 * it would after a write callback, never inside the code that answered. */
static void conn_written(conn_t *c)
{
    loop_t *l = c->loop;
    c->written_queued = true;
    c->written_next = NULL;
    if (l->written_tail)
        l->written_tail->written_next = c;
    else
        l->written_head = c;
    l->written_tail = c;
    uv_idle_start(&l->written_idle, on_written_idle);
}

/* Takes a closing connection out of its loop's written list. */
static void conn_unwritten(conn_t *c)
{
    loop_t *l = c->loop;
    if (!c->written_queued)
        return;
    c->written_queued = false;
    for (conn_t **p = &l->written_head, *prev = NULL; *p; prev = *p, p = &(*p)->written_next) {
        if (*p != c)
            continue;
        *p = c->written_next;
        if (l->written_tail == c)
            l->written_tail = prev;
        c->written_next = NULL;
        return;
    }
    /* Not in the list: on_written_idle is walking it, from a list it took;
     * its link must stay for the walk, which passes over closed ones. */
}

/* Writes bytes; final marks the end of a response. */
static void conn_write(conn_t *c, const char *head, size_t head_len, const char *body,
                       size_t body_len, bool final)
{
    if (c->ses) {
        if (c->ses->write) {
            c->ses->write(c->ses->write_arg, head, head_len);
            if (body_len)
                c->ses->write(c->ses->write_arg, body, body_len);
        }
        if (final)
            c->write_done = true;
        return;
    }
    /* Most answers fit the socket's buffer: written here, with no copy and
     * no write request (whose completion would also re-arm the socket in
     * epoll); only a remainder goes through uv_write. */
    uv_buf_t bufs[2] = {uv_buf_init((char *)head, (unsigned)head_len),
                        uv_buf_init((char *)body, (unsigned)body_len)};
    int n = uv_try_write((uv_stream_t *)&c->tcp, bufs, body_len ? 2 : 1);
    if (n < 0 && n != UV_EAGAIN) {
        conn_close(c);
        return;
    }
    size_t sent = n > 0 ? (size_t)n : 0;
    if (sent == head_len + body_len) {
        if (final)
            conn_written(c);
        return;
    }
    size_t head_sent = sent < head_len ? sent : head_len;
    size_t body_sent = sent - head_sent;
    wreq_t *wr = loom_xmalloc(sizeof(*wr) + head_len + body_len - sent);
    wr->c = c;
    wr->final = final;
    wr->len = head_len - head_sent + body_len - body_sent;
    memcpy(wr->data, head + head_sent, head_len - head_sent);
    if (body_len > body_sent)
        memcpy(wr->data + head_len - head_sent, body + body_sent, body_len - body_sent);
    uv_buf_t buf = uv_buf_init(wr->data, (unsigned)wr->len);
    int rc = uv_write(&wr->w, (uv_stream_t *)&c->tcp, &buf, 1, on_write);
    if (rc != 0) {
        free(wr);
        conn_close(c);
    }
}

void loom_http_res_send(loom_http_res_t *res)
{
    loom_http_req_t *req = res->req;
    if (res->sent)
        return;
    res->sent = true;
    conn_t *c = req->conn;
    if (!c || c->state == C_CLOSED || c->req != req)
        return; /* the client is gone; the drop was reported at detach */
    if (res->close)
        c->keep_alive = false;
    if (c->loop && c->loop->draining)
        c->keep_alive = false;

    char datebuf[40];
    const char *date = http_date(c->loop, datebuf, sizeof(datebuf));
    size_t cap = 256;
    for (res_hdr_t *h = res->headers; h; h = h->next)
        cap += strlen(h->name) + strlen(h->value) + 4;
    char *head = loom_xmalloc(cap);
    int n = snprintf(head, cap, "HTTP/1.1 %d %s\r\nDate: %s\r\nContent-Length: %zu\r\n%s",
                     res->status, loom_http_status_text(res->status), date, res->body_len,
                     !c->keep_alive                       ? "Connection: close\r\n"
                     : req->major == 1 && req->minor == 0 ? "Connection: keep-alive\r\n"
                                                          : "");
    size_t len = (size_t)n;
    for (res_hdr_t *h = res->headers; h; h = h->next)
        len += (size_t)snprintf(head + len, cap - len, "%s: %s\r\n", h->name, h->value);
    len += (size_t)snprintf(head + len, cap - len, "\r\n");
    c->state = C_WRITING;
    if (c->loop)
        conn_timer_start(c, c->host->limits.idle_timeout_ms);
    conn_write(c, head, len, res->body, req->head ? 0 : res->body_len, true);
    free(head);
}

/* ---- connections -------------------------------------------------------------------- */

static void on_conn_handle_closed(uv_handle_t *h)
{
    conn_t *c = h->data;
    if (--c->closes_pending > 0)
        return;
    loop_t *l = c->loop;
    sb_free(&c->in);
    sb_free(&c->url);
    sb_free(&c->field);
    sb_free(&c->value);
    free(c);
    if (l && l->draining)
        loop_maybe_finish(l);
}

/* Drops the request the connection holds: a request the handler has is
 * detached (reported as 499 when unanswered); one still arriving is freed. */
static void conn_drop_req(conn_t *c)
{
    loom_http_req_t *req = c->req;
    if (!req)
        return;
    c->req = NULL;
    req->conn = NULL;
    if (req->dispatched && !req->res.sent) {
        req->res.status = 499;
        req_report_done(req, c->host);
        if (req->on_detach)
            req->on_detach(req, req->detach_arg);
    }
    loom_http_req_unref(req);
}

static void conn_close(conn_t *c)
{
    if (c->state == C_CLOSED)
        return;
    c->state = C_CLOSED;
    conn_drop_req(c);
    loop_t *l = c->loop;
    if (!l)
        return; /* a session: freed with it */
    conn_unwritten(c);
    if (c->counted)
        atomic_fetch_sub(&l->srv->conns, 1);
    if (c->prev)
        c->prev->next = c->next;
    else
        l->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    l->n_conns--;
    c->closes_pending = 2;
    uv_close((uv_handle_t *)&c->tcp, on_conn_handle_closed);
    uv_close((uv_handle_t *)&c->timer, on_conn_handle_closed);
}

static void on_timer(uv_timer_t *t)
{
    conn_t *c = t->data;
    switch (c->state) {
    case C_READING:
        if (!c->headers_done) {
            conn_fail(c, 408, LOOM_CODE_REQUEST_TIMEOUT,
                      "the request headers did not arrive within %lld ms",
                      (long long)c->host->limits.header_timeout_ms);
            return;
        }
        conn_fail(c, 408, LOOM_CODE_REQUEST_TIMEOUT, "the request body stalled for %lld ms",
                  (long long)c->host->limits.idle_timeout_ms);
        return;
    default:
        conn_close(c);
    }
}

static void conn_timer_start(conn_t *c, int64_t ms)
{
    if (c->loop)
        uv_timer_start(&c->timer, on_timer, (uint64_t)(ms > 0 ? ms : 1), 0);
}

static void conn_timer_stop(conn_t *c)
{
    if (c->loop)
        uv_timer_stop(&c->timer);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)suggested;
    conn_t *c = h->data;
    *buf = uv_buf_init(c->loop->rbuf, READ_BUF_SIZE);
}

static void conn_feed(conn_t *c, const char *data, size_t len);

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    conn_t *c = s->data;
    if (c->state == C_CLOSED)
        return;
    if (nread > 0) {
        if (c->state == C_LINGER)
            return; /* dropped */
        if (c->state == C_READING && c->headers_done)
            conn_timer_start(c, c->host->limits.idle_timeout_ms);
        conn_feed(c, buf->base, (size_t)nread);
        return;
    }
    if (nread == 0)
        return;
    /* EOF or an error. */
    c->eof = true;
    if (c->state == C_HANDLING || c->state == C_WRITING) {
        /* A half-close after the request: answer, then close. */
        uv_read_stop(s);
        c->reading = false;
        if (nread != UV_EOF)
            conn_close(c);
        return;
    }
    conn_close(c);
}

static void conn_read_start(conn_t *c)
{
    if (c->loop && !c->reading && !c->eof && c->state != C_CLOSED) {
        if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0)
            c->reading = true;
    }
}

static void conn_read_stop(conn_t *c)
{
    if (c->loop && c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = false;
    }
}

static void on_shutdown(uv_shutdown_t *sreq, int status)
{
    (void)status;
    conn_t *c = sreq->data;
    free(sreq);
    if (c->state != C_LINGER)
        return;
    if (c->eof) {
        conn_close(c);
        return;
    }
    conn_timer_start(c, LINGER_MS);
    conn_read_start(c);
}

/* The last response was written and the connection closes: shut the write
 * side and read what the client still sends for a moment. */
static void conn_linger(conn_t *c)
{
    conn_drop_req(c);
    if (!c->loop || c->eof) {
        conn_close(c);
        return;
    }
    c->state = C_LINGER;
    conn_timer_stop(c);
    uv_shutdown_t *sreq = loom_xmalloc(sizeof(*sreq));
    sreq->data = c;
    if (uv_shutdown(sreq, (uv_stream_t *)&c->tcp, on_shutdown) != 0) {
        free(sreq);
        conn_close(c);
    }
}

static void conn_after_response(conn_t *c)
{
    loom_http_req_t *req = c->req;
    if (req) {
        req_report_done(req, c->host);
        c->req = NULL;
        req->conn = NULL;
        loom_http_req_unref(req);
    }
    /* After a half-close, requests that came before it and wait in the
     * buffer are still answered. */
    if (!c->keep_alive || (c->eof && (c->in.len == 0 || c->ses)) || c->fail_status) {
        conn_linger(c);
        return;
    }
    c->state = C_IDLE;
    http_parser_pause(&c->parser, 0);
    if (c->ses)
        return; /* the session's feed loop goes on */
    conn_timer_start(c, c->host->limits.idle_timeout_ms);
    conn_drain(c);
    if (c->eof && (c->state == C_IDLE || c->state == C_READING)) {
        conn_linger(c); /* what is left is no whole request, and nothing more comes */
        return;
    }
    if (c->state == C_IDLE || c->state == C_READING)
        conn_read_start(c);
}

/* Answers with a JSON error and closes the connection; the handler never
 * sees this request. */
static void conn_fail(conn_t *c, int status, loom_code_t code, const char *fmt, ...)
{
    if (c->state == C_CLOSED || c->state == C_LINGER || c->state == C_WRITING)
        return;
    char msg[300];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (!c->fail_status) {
        c->fail_status = status;
        c->fail_code = code;
    }
    if (!c->req)
        c->req = req_new(c);
    loom_http_req_t *req = c->req;
    c->keep_alive = false;
    conn_read_stop(c);
    conn_timer_stop(c);
    loom_http_utf8_repair(msg); /* it may echo client bytes */
    char ray[LOOM_UUID_STRLEN + 1];
    loom_uuid_v7_string(ray);
    json_t *body = json_pack("{s:{s:s, s:s, s:s}}", "error", "code", loom_error_codes[code].name,
                             "message", msg, "ray_id", ray);
    char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;
    json_decref(body);
    loom_http_res_t *res = &req->res;
    res->status = status;
    res->headers = res->headers_tail = NULL;
    loom_http_res_header(res, "Content-Type", "application/json");
    loom_http_res_header(res, "X-Ray-Id", ray);
    if (status == 503)
        loom_http_res_header(res, "Retry-After", "1");
    if (text)
        loom_http_res_body_take(res, text, strlen(text));
    res->sent = false;
    res->close = true;
    req->dispatched = false;
    loom_http_res_send(res);
}

/* ---- parser callbacks --------------------------------------------------------------- */

static int cb_message_begin(http_parser *p)
{
    conn_t *c = p->data;
    c->state = C_READING;
    c->headers_done = false;
    c->header_bytes = 0;
    c->in_value = false;
    c->url.len = c->field.len = c->value.len = 0;
    if (!c->req)
        c->req = req_new(c);
    conn_timer_start(c, c->host->limits.header_timeout_ms);
    return 0;
}

static int cb_url(http_parser *p, const char *at, size_t len)
{
    conn_t *c = p->data;
    if (c->url.len + len > c->host->limits.max_url) {
        conn_fail(c, 414, LOOM_CODE_URI_TOO_LONG, "the request target is longer than %zu bytes",
                  c->host->limits.max_url);
        return -1;
    }
    c->header_bytes += len;
    sb_append(&c->url, at, len);
    return 0;
}

static int too_many_headers(conn_t *c)
{
    conn_fail(c, 431, LOOM_CODE_HEADERS_TOO_LARGE,
              "the request headers are over %zu bytes or %d lines",
              c->host->limits.max_header_bytes, c->host->limits.max_headers);
    return -1;
}

/* Stores the header pair collected so far. */
static int finish_header(conn_t *c)
{
    loom_http_req_t *req = c->req;
    if ((int)req->n_headers >= c->host->limits.max_headers)
        return too_many_headers(c);
    if (req->n_headers == req->cap_headers) {
        req->cap_headers = req->cap_headers ? req->cap_headers * 2 : 16;
        req->headers = loom_xrealloc(req->headers, req->cap_headers * sizeof(hdr_t));
    }
    hdr_t *h = &req->headers[req->n_headers++];
    h->name = loom_arena_strndup(&req->arena, c->field.p ? c->field.p : "", c->field.len);
    /* Values keep no trailing whitespace (http_parser strips the leading). */
    size_t vl = c->value.len;
    while (vl > 0 && (c->value.p[vl - 1] == ' ' || c->value.p[vl - 1] == '\t'))
        vl--;
    h->value = loom_arena_strndup(&req->arena, c->value.p ? c->value.p : "", vl);
    c->field.len = c->value.len = 0;
    c->in_value = false;
    return 0;
}

static int cb_header_field(http_parser *p, const char *at, size_t len)
{
    conn_t *c = p->data;
    c->header_bytes += len;
    if (c->header_bytes > c->host->limits.max_header_bytes)
        return too_many_headers(c);
    if (c->in_value && finish_header(c) != 0)
        return -1;
    sb_append(&c->field, at, len);
    return 0;
}

static int cb_header_value(http_parser *p, const char *at, size_t len)
{
    conn_t *c = p->data;
    c->header_bytes += len;
    if (c->header_bytes > c->host->limits.max_header_bytes)
        return too_many_headers(c);
    c->in_value = true;
    sb_append(&c->value, at, len);
    return 0;
}

/* Splits the target into path and query. */
static void set_target(loom_http_req_t *req, const char *url, size_t len)
{
    req->target = loom_arena_strndup(&req->arena, url, len);
    const char *p = req->target;
    if (strncasecmp(p, "http://", 7) == 0 || strncasecmp(p, "https://", 8) == 0) {
        p = strchr(p, ':') + 3;
        p += strcspn(p, "/?#");
    }
    size_t plen = strcspn(p, "?#");
    req->path = plen ? loom_arena_strndup(&req->arena, p, plen) : "/";
    if (p[plen] == '?') {
        const char *q = p + plen + 1;
        req->query = loom_arena_strndup(&req->arena, q, strcspn(q, "#"));
    }
}

static int cb_headers_complete(http_parser *p)
{
    conn_t *c = p->data;
    loom_http_req_t *req = c->req;
    if (c->in_value && finish_header(c) != 0)
        return -1;
    c->headers_done = true;
    req->method = http_method_str((enum http_method)p->method);
    req->head = p->method == HTTP_HEAD;
    req->major = p->http_major;
    req->minor = p->http_minor;
    set_target(req, c->url.p ? c->url.p : "", c->url.len);
    if (p->http_major != 1 || p->http_minor > 1) {
        conn_fail(c, 400, LOOM_CODE_MALFORMED_REQUEST, "HTTP/%d.%d is not supported; use HTTP/1.1",
                  p->http_major, p->http_minor);
        return -1;
    }
    if (p->method == HTTP_CONNECT || req->path[0] != '/') {
        conn_fail(c, 400, LOOM_CODE_MALFORMED_REQUEST,
                  "the request target must be a path starting with '/'");
        return -1;
    }
    if ((p->flags & F_CONTENTLENGTH) && p->content_length > c->host->limits.max_body) {
        conn_fail(c, 413, LOOM_CODE_PAYLOAD_TOO_LARGE, "the request body is over %zu bytes",
                  c->host->limits.max_body);
        return -1;
    }
    if (p->http_minor == 1 && !loom_http_req_header(req, "Host")) {
        conn_fail(c, 400, LOOM_CODE_MALFORMED_REQUEST, "an HTTP/1.1 request needs a Host header");
        return -1;
    }
    const char *expect = loom_http_req_header(req, "Expect");
    if (expect) {
        if (strcasecmp(expect, "100-continue") != 0) {
            conn_fail(c, 417, LOOM_CODE_EXPECTATION_FAILED, "unsupported Expect: %.100s", expect);
            return -1;
        }
        bool body_follows =
            (p->flags & F_CHUNKED) || ((p->flags & F_CONTENTLENGTH) && p->content_length > 0);
        if (body_follows && (p->http_major > 1 || p->http_minor >= 1)) {
            static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
            conn_write(c, cont, sizeof(cont) - 1, NULL, 0, false);
            if (c->state == C_CLOSED) /* the client is gone: the request with it */
                return -1;
        }
    }
    if ((p->flags & F_CONTENTLENGTH) && p->content_length > 0) {
        /* Room for the whole body at once (it is within the limit). */
        size_t want = (size_t)p->content_length + 1;
        req->body.p = loom_xrealloc(req->body.p, want);
        req->body.cap = want;
    }
    conn_timer_start(c, c->host->limits.idle_timeout_ms);
    return 0;
}

static int cb_body(http_parser *p, const char *at, size_t len)
{
    conn_t *c = p->data;
    loom_http_req_t *req = c->req;
    if (req->body.len + len > c->host->limits.max_body) {
        conn_fail(c, 413, LOOM_CODE_PAYLOAD_TOO_LARGE, "the request body is over %zu bytes",
                  c->host->limits.max_body);
        return -1;
    }
    sb_append(&req->body, at, len);
    return 0;
}

/* A chunk's size is known before its data: refuse one over the limit at once
 * (a size of 7fffffffffffffff would otherwise be read until max_body). */
static int cb_chunk_header(http_parser *p)
{
    conn_t *c = p->data;
    loom_http_req_t *req = c->req;
    if (p->content_length > c->host->limits.max_body - req->body.len) {
        conn_fail(c, 413, LOOM_CODE_PAYLOAD_TOO_LARGE, "the request body is over %zu bytes",
                  c->host->limits.max_body);
        return -1;
    }
    return 0;
}

static int cb_message_complete(http_parser *p)
{
    conn_t *c = p->data;
    c->keep_alive = http_should_keep_alive(p) && !p->upgrade;
    c->state = C_HANDLING;
    http_parser_pause(p, 1);
    return 0;
}

static void init_parser_settings(void)
{
    memset(&parser_settings, 0, sizeof(parser_settings));
    parser_settings.on_message_begin = cb_message_begin;
    parser_settings.on_url = cb_url;
    parser_settings.on_header_field = cb_header_field;
    parser_settings.on_header_value = cb_header_value;
    parser_settings.on_headers_complete = cb_headers_complete;
    parser_settings.on_body = cb_body;
    parser_settings.on_chunk_header = cb_chunk_header;
    parser_settings.on_message_complete = cb_message_complete;
}

/* Hands a complete request to the handler. */
static void conn_dispatch(conn_t *c)
{
    loom_http_req_t *req = c->req;
    /* Reading goes on while the request is answered (see conn_feed): stopping
     * and restarting it would cost two epoll_ctl calls per request. */
    conn_timer_stop(c);
    if (!req->body.p)
        sb_append(&req->body, "", 0);
    req->dispatched = true;
    loom_http_req_ref(req); /* the handler may answer and drop it at once */
    c->host->handler(req, &req->res, c->host->opaque);
    loom_http_req_unref(req);
}

/* True when data starts with a method-like token and a space ("QUERY /"):
 * a method http_parser does not know, which is 501, not garbage (400). */
static bool method_token(const char *data, size_t len)
{
    size_t i = 0;
    while (i < len && i < 32 &&
           ((data[i] >= 'A' && data[i] <= 'Z') || data[i] == '-' || data[i] == '_'))
        i++;
    return i > 0 && i < len && data[i] == ' ';
}

/* Parses data; returns the bytes consumed. May dispatch a request or fail. */
static size_t conn_parse(conn_t *c, const char *data, size_t len)
{
    size_t n = http_parser_execute(&c->parser, &parser_settings, data, len);
    if (c->fail_status || c->state == C_CLOSED || c->state == C_WRITING || c->state == C_LINGER)
        return len;
    enum http_errno e = HTTP_PARSER_ERRNO(&c->parser);
    if (e == HPE_PAUSED) {
        conn_dispatch(c);
        return n;
    }
    if (e != HPE_OK) {
        if (e == HPE_HEADER_OVERFLOW)
            too_many_headers(c);
        else if (e == HPE_INVALID_METHOD && method_token(data, len))
            conn_fail(c, 501, LOOM_CODE_METHOD_NOT_ALLOWED,
                      "the request method is not one this server implements");
        else
            conn_fail(c, 400, LOOM_CODE_MALFORMED_REQUEST, "malformed HTTP request: %s",
                      http_errno_description(e));
        return len;
    }
    return n;
}

/* Parses what waits in the connection's buffer while it can take requests. */
static void conn_drain(conn_t *c)
{
    while ((c->state == C_IDLE || c->state == C_READING) && c->in.len > 0) {
        size_t n = conn_parse(c, c->in.p, c->in.len);
        if (c->state == C_CLOSED)
            return;
        if (n >= c->in.len) {
            c->in.len = 0;
        } else {
            memmove(c->in.p, c->in.p + n, c->in.len - n);
            c->in.len -= n;
        }
        if (n == 0)
            break;
    }
}

static void conn_feed(conn_t *c, const char *data, size_t len)
{
    if (c->in.len > 0 || (c->state != C_IDLE && c->state != C_READING)) {
        sb_append(&c->in, data, len);
        conn_drain(c);
        /* While a request is answered, what arrives waits in the buffer;
         * past HELD_INPUT_MAX the connection reads no further until the
         * answer is written (conn_after_response starts reading again). */
        if (c->state != C_IDLE && c->state != C_READING && c->state != C_CLOSED &&
            c->in.len >= HELD_INPUT_MAX)
            conn_read_stop(c);
        return;
    }
    size_t n = conn_parse(c, data, len);
    if (c->state != C_CLOSED && n < len)
        sb_append(&c->in, data + n, len - n);
}

static void conn_init(conn_t *c, const host_t *host)
{
    pthread_once(&parser_settings_once, init_parser_settings);
    c->host = host;
    c->state = C_IDLE;
    http_parser_init(&c->parser, HTTP_REQUEST);
    c->parser.data = c;
}

/* ---- loops -------------------------------------------------------------------------- */

static void loop_close_cb(uv_handle_t *h)
{
    (void)h;
}

/* Closes the loop's own handles once nothing is left to wait for. */
static void loop_maybe_finish(loop_t *l)
{
    if (l->finishing || !l->draining)
        return;
    if (l->n_conns > 0)
        return;
    if (atomic_load(&l->live_reqs) > 0 && !l->forced)
        return;
    l->finishing = true;
    pthread_mutex_lock(&l->mu);
    l->closed = true;
    post_t *p = l->posts;
    l->posts = l->posts_tail = NULL;
    pthread_mutex_unlock(&l->mu);
    while (p) {
        post_t *next = p->next;
        p->fn(p->req, p->arg, true);
        free(p);
        p = next;
    }
    if (l->srv->loop_stop)
        l->srv->loop_stop(&l->uv, l->user, l->srv->host.opaque);
    l->user = NULL;
    uv_close((uv_handle_t *)&l->wake, loop_close_cb);
    uv_close((uv_handle_t *)&l->drain_timer, loop_close_cb);
    uv_close((uv_handle_t *)&l->written_idle, loop_close_cb);
}

static void on_drain_timer(uv_timer_t *t)
{
    loop_t *l = t->data;
    if (!l->forced && l->n_conns > 0) {
        /* The deadline: close what is left, then give kept requests a
         * moment to see their cancellation. */
        for (conn_t *c = l->conns, *next; c; c = next) {
            next = c->next;
            conn_close(c);
        }
        uv_timer_start(&l->drain_timer, on_drain_timer, DRAIN_GRACE_MS, 0);
        return;
    }
    l->forced = true;
    loop_maybe_finish(l);
}

static void on_listener_closed(uv_handle_t *h)
{
    (void)h;
}

static void loop_begin_drain(loop_t *l)
{
    if (l->draining)
        return;
    l->draining = true;
    for (size_t i = 0; i < l->n_listeners; i++)
        uv_close((uv_handle_t *)&l->listeners[i], on_listener_closed);
    for (conn_t *c = l->conns, *next; c; c = next) {
        next = c->next;
        if (c->state == C_HANDLING || c->state == C_WRITING)
            c->keep_alive = false; /* answer, then close */
        else if (c->state != C_LINGER)
            conn_close(c);
    }
    int64_t left = l->srv->stop_timeout_ms;
    uv_timer_start(&l->drain_timer, on_drain_timer, (uint64_t)(left > 0 ? left : 0), 0);
    loop_maybe_finish(l);
}

static void on_wake(uv_async_t *a)
{
    loop_t *l = a->data;
    pthread_mutex_lock(&l->mu);
    post_t *p = l->posts;
    l->posts = l->posts_tail = NULL;
    bool stop = l->stop;
    pthread_mutex_unlock(&l->mu);
    while (p) {
        post_t *next = p->next;
        p->fn(p->req, p->arg, false);
        free(p);
        p = next;
    }
    if (stop)
        loop_begin_drain(l);
}

static void on_connection(uv_stream_t *server, int status)
{
    loop_t *l = server->data;
    if (status < 0) {
        LOOM_WARN("could not accept a connection", "error=%s", uv_strerror(status));
        return;
    }
    conn_t *c = loom_xcalloc(1, sizeof(*c));
    conn_init(c, &l->srv->host);
    c->loop = l;
    uv_tcp_init(&l->uv, &c->tcp);
    uv_timer_init(&l->uv, &c->timer);
    c->tcp.data = c->timer.data = c;
    c->next = l->conns;
    if (l->conns)
        l->conns->prev = c;
    l->conns = c;
    l->n_conns++;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
        conn_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    struct sockaddr_storage ss;
    int sl = sizeof(ss);
    if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &sl) == 0) {
        char host[64] = "";
        int port = 0;
        if (ss.ss_family == AF_INET) {
            struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
            uv_ip4_name(sin, host, sizeof(host));
            port = ntohs(sin->sin_port);
            snprintf(c->remote, sizeof(c->remote), "%s:%d", host, port);
        } else if (ss.ss_family == AF_INET6) {
            struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
            uv_ip6_name(sin6, host, sizeof(host));
            port = ntohs(sin6->sin6_port);
            snprintf(c->remote, sizeof(c->remote), "[%s]:%d", host, port);
        }
    }
    int open = atomic_fetch_add(&l->srv->conns, 1) + 1;
    c->counted = true;
    if (open > l->srv->host.limits.max_connections || l->draining) {
        conn_fail(c, 503, l->draining ? LOOM_CODE_SHUTTING_DOWN : LOOM_CODE_TOO_MANY_CONNECTIONS,
                  l->draining ? "the gateway is shutting down"
                              : "the gateway holds its maximum of %d connections",
                  l->srv->host.limits.max_connections);
        return;
    }
    /* A new connection owes a request at once: a client that connects and
     * stays silent is dropped like one that sends its headers too slowly. */
    conn_timer_start(c, l->srv->host.limits.header_timeout_ms);
    conn_read_start(c);
}

static void walk_close(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

static void *loop_main(void *arg)
{
    loop_t *l = arg;
    if (l->srv->loop_start)
        l->user = l->srv->loop_start(&l->uv, l->srv->host.opaque);
    uv_run(&l->uv, UV_RUN_DEFAULT);
    /* Anything still open is a bug elsewhere; close it so the thread can end. */
    uv_walk(&l->uv, walk_close, NULL);
    uv_run(&l->uv, UV_RUN_DEFAULT);
    return NULL;
}

/* ---- listeners ---------------------------------------------------------------------- */

/* Parses "host:port" / "[v6]:port" and resolves it. */
static int parse_addr(const char *spec, size_t len, addr_t *a, loom_error_t *err)
{
    char buf[300], host[256], port[16];
    if (len == 0 || len >= sizeof(buf))
        return loom_error_set(err, LOOM_CODE_CONFIG_INVALID, "invalid listen address \"%.*s\"",
                              (int)(len > 200 ? 200 : len), spec);
    memcpy(buf, spec, len);
    buf[len] = '\0';
    char *colon = strrchr(buf, ':');
    if (!colon || colon == buf || !colon[1])
        return loom_error_set(err, LOOM_CODE_CONFIG_INVALID,
                              "invalid listen address \"%s\": expected host:port", buf);
    *colon = '\0';
    snprintf(port, sizeof(port), "%s", colon + 1);
    if (buf[0] == '[') {
        size_t hl = strlen(buf);
        if (hl < 3 || buf[hl - 1] != ']')
            return loom_error_set(err, LOOM_CODE_CONFIG_INVALID, "invalid listen address \"%.*s\"",
                                  (int)len, spec);
        snprintf(host, sizeof(host), "%.*s", (int)(hl - 2), buf + 1);
    } else {
        snprintf(host, sizeof(host), "%s", buf);
    }
    char *end = NULL;
    long pn = strtol(port, &end, 10);
    if (*end || pn < 0 || pn > 65535)
        return loom_error_set(err, LOOM_CODE_CONFIG_INVALID,
                              "invalid listen address \"%.*s\": bad port", (int)len, spec);
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *ai = NULL;
    int gai = getaddrinfo(host, port, &hints, &ai);
    if (gai != 0 || !ai)
        return loom_error_set(err, LOOM_CODE_CONFIG_INVALID, "could not resolve \"%s\": %s", host,
                              gai_strerror(gai));
    memcpy(&a->ss, ai->ai_addr, ai->ai_addrlen);
    a->len = ai->ai_addrlen;
    a->port = (int)pn;
    freeaddrinfo(ai);
    return 0;
}

static void addr_set_port(addr_t *a, int port)
{
    if (a->ss.ss_family == AF_INET)
        ((struct sockaddr_in *)&a->ss)->sin_port = htons((uint16_t)port);
    else
        ((struct sockaddr_in6 *)&a->ss)->sin6_port = htons((uint16_t)port);
    a->port = port;
}

static void addr_format(addr_t *a)
{
    char host[64] = "";
    if (a->ss.ss_family == AF_INET) {
        uv_ip4_name((struct sockaddr_in *)&a->ss, host, sizeof(host));
        snprintf(a->text, sizeof(a->text), "%s:%d", host, a->port);
    } else {
        uv_ip6_name((struct sockaddr_in6 *)&a->ss, host, sizeof(host));
        snprintf(a->text, sizeof(a->text), "[%s]:%d", host, a->port);
    }
}

/* A bound, listening socket; reuseport lets the loops share the address. */
static int listen_socket(addr_t *a, bool reuseport, int *out, loom_error_t *err)
{
    int fd = socket(a->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return loom_error_set(err, LOOM_CODE_INTERNAL, "could not create a socket: %s",
                              strerror(errno));
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (reuseport)
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
    if (a->ss.ss_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    if (bind(fd, (struct sockaddr *)&a->ss, a->len) != 0 || listen(fd, LISTEN_BACKLOG) != 0) {
        int e = errno;
        close(fd);
        addr_format(a);
        return loom_error_set(err, LOOM_CODE_CONFIG_INVALID, "could not listen on \"%s\": %s",
                              a->text, strerror(e));
    }
    if (a->port == 0) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        getsockname(fd, (struct sockaddr *)&ss, &sl);
        addr_set_port(a, ss.ss_family == AF_INET ? ntohs(((struct sockaddr_in *)&ss)->sin_port)
                                                 : ntohs(((struct sockaddr_in6 *)&ss)->sin6_port));
    }
    *out = fd;
    return 0;
}

/* ---- the server --------------------------------------------------------------------- */

static void server_destroy(loom_http_server_t *srv)
{
    for (int i = 0; i < srv->n_loops; i++) {
        loop_t *l = &srv->loops[i];
        if (l->uv.data) {
            uv_loop_close(&l->uv);
            pthread_mutex_destroy(&l->mu);
        }
        free(l->listeners);
    }
    free(srv->loops);
    free(srv->addrs);
    free(srv);
}

int loom_http_server_start(const loom_http_opts_t *opts, loom_http_server_t **out,
                           loom_error_t *err)
{
    if (!opts || !opts->handler || !opts->listen || !*opts->listen)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "an HTTP server needs a listen address and a handler");
    /* A peer that closes early must not kill the process with SIGPIPE. */
    signal(SIGPIPE, SIG_IGN);
    loom_http_server_t *srv = loom_xcalloc(1, sizeof(*srv));
    srv->host.limits = opts->limits;
    loom_http_limits_defaults(&srv->host.limits);
    srv->host.handler = opts->handler;
    srv->host.on_done = opts->on_done;
    srv->host.opaque = opts->opaque;
    srv->loop_start = opts->loop_start;
    srv->loop_stop = opts->loop_stop;
    int threads = opts->threads > 0 ? opts->threads : (int)uv_available_parallelism();
    if (threads < 1)
        threads = 1;
    if (threads > 64)
        threads = 64;

    /* Addresses. */
    size_t cap = 1;
    for (const char *p = opts->listen; *p; p++)
        cap += *p == ',';
    srv->addrs = loom_xcalloc(cap, sizeof(addr_t));
    for (const char *p = opts->listen; *p;) {
        size_t len = strcspn(p, ",");
        if (parse_addr(p, len, &srv->addrs[srv->n_addrs], err) != 0) {
            server_destroy(srv);
            return LOOM_ECONFIG;
        }
        srv->n_addrs++;
        p += len;
        if (*p == ',')
            p++;
    }

    /* Sockets: one per loop and address. A fixed port is first probed
     * without SO_REUSEPORT, so a port another process holds is an error
     * rather than silently shared. */
    int *fds = loom_xcalloc(srv->n_addrs * (size_t)threads, sizeof(int));
    size_t nfds = 0;
    int rc = 0;
    for (size_t a = 0; a < srv->n_addrs && rc == 0; a++) {
        addr_t *ad = &srv->addrs[a];
        if (ad->port != 0) {
            int probe = -1;
            rc = listen_socket(ad, false, &probe, err);
            if (rc != 0)
                break;
            close(probe);
        }
        for (int t = 0; t < threads && rc == 0; t++) {
            rc = listen_socket(ad, true, &fds[nfds], err);
            if (rc == 0)
                nfds++;
        }
        addr_format(ad);
    }
    if (rc != 0) {
        for (size_t i = 0; i < nfds; i++)
            close(fds[i]);
        free(fds);
        server_destroy(srv);
        return LOOM_ECONFIG;
    }

    srv->loops = loom_xcalloc((size_t)threads, sizeof(loop_t));
    srv->n_loops = threads;
    for (int t = 0; t < threads; t++) {
        loop_t *l = &srv->loops[t];
        l->srv = srv;
        uv_loop_init(&l->uv);
        l->uv.data = l;
        pthread_mutex_init(&l->mu, NULL);
        uv_async_init(&l->uv, &l->wake, on_wake);
        l->wake.data = l;
        uv_timer_init(&l->uv, &l->drain_timer);
        l->drain_timer.data = l;
        uv_idle_init(&l->uv, &l->written_idle);
        l->written_idle.data = l;
        l->listeners = loom_xcalloc(srv->n_addrs, sizeof(uv_tcp_t));
        for (size_t a = 0; a < srv->n_addrs; a++) {
            uv_tcp_t *lt = &l->listeners[l->n_listeners];
            uv_tcp_init(&l->uv, lt);
            lt->data = l;
            int fd = fds[a * (size_t)threads + (size_t)t];
            int e = uv_tcp_open(lt, fd);
            if (e == 0)
                e = uv_listen((uv_stream_t *)lt, LISTEN_BACKLOG, on_connection);
            if (e != 0) {
                LOOM_ERROR("could not listen", "addr=%s error=%s", srv->addrs[a].text,
                           uv_strerror(e));
                close(fd);
            }
            l->n_listeners++;
        }
    }
    free(fds);
    for (int t = 0; t < threads; t++) {
        loop_t *l = &srv->loops[t];
        if (pthread_create(&l->thread, NULL, loop_main, l) != 0) {
            LOOM_ERROR("could not start an HTTP loop thread");
            continue;
        }
        l->started = true;
    }
    for (size_t a = 0; a < srv->n_addrs; a++)
        LOOM_INFO("http listening", "addr=%s loops=%d", srv->addrs[a].text, threads);
    *out = srv;
    return 0;
}

size_t loom_http_server_naddrs(const loom_http_server_t *srv)
{
    return srv->n_addrs;
}

const char *loom_http_server_addr(const loom_http_server_t *srv, size_t i)
{
    return i < srv->n_addrs ? srv->addrs[i].text : NULL;
}

int loom_http_server_port(const loom_http_server_t *srv, size_t i)
{
    return i < srv->n_addrs ? srv->addrs[i].port : 0;
}

bool loom_http_server_draining(const loom_http_server_t *srv)
{
    return atomic_load(&srv->draining);
}

int loom_http_server_connections(const loom_http_server_t *srv)
{
    return atomic_load(&srv->conns);
}

void loom_http_server_stop(loom_http_server_t *srv, int64_t timeout_ms)
{
    if (!srv || srv->stopped)
        return;
    srv->stopped = true;
    srv->stop_timeout_ms = timeout_ms > 0 ? timeout_ms : 0;
    atomic_store(&srv->draining, true);
    for (int t = 0; t < srv->n_loops; t++) {
        loop_t *l = &srv->loops[t];
        pthread_mutex_lock(&l->mu);
        l->stop = true;
        pthread_mutex_unlock(&l->mu);
        uv_async_send(&l->wake);
    }
    for (int t = 0; t < srv->n_loops; t++)
        if (srv->loops[t].started)
            pthread_join(srv->loops[t].thread, NULL);
    LOOM_INFO("http server stopped");
}

void loom_http_server_free(loom_http_server_t *srv)
{
    if (!srv)
        return;
    loom_http_server_stop(srv, 0);
    server_destroy(srv);
}

/* ---- sessions ----------------------------------------------------------------------- */

loom_http_session_t *loom_http_session_new(const loom_http_limits_t *limits,
                                           loom_http_handler_fn handler, loom_http_done_fn on_done,
                                           void *opaque, loom_http_write_fn write, void *write_arg)
{
    loom_http_session_t *s = loom_xcalloc(1, sizeof(*s));
    if (limits)
        s->host.limits = *limits;
    loom_http_limits_defaults(&s->host.limits);
    s->host.handler = handler;
    s->host.on_done = on_done;
    s->host.opaque = opaque;
    s->write = write;
    s->write_arg = write_arg;
    conn_init(&s->conn, &s->host);
    s->conn.ses = s;
    return s;
}

bool loom_http_session_feed(loom_http_session_t *s, const char *data, size_t len)
{
    conn_t *c = &s->conn;
    if (c->state == C_CLOSED || c->state == C_LINGER)
        return false;
    if (len == 0) {
        c->eof = true;
        if (c->state == C_IDLE || c->state == C_READING)
            conn_close(c);
    } else {
        sb_append(&c->in, data, len);
    }
    for (;;) {
        if (c->write_done) {
            c->write_done = false;
            conn_after_response(c);
            continue;
        }
        if ((c->state == C_IDLE || c->state == C_READING) && c->in.len > 0) {
            size_t before = c->in.len;
            conn_drain(c);
            if (c->write_done || c->in.len != before)
                continue;
        }
        break;
    }
    return c->state != C_CLOSED && c->state != C_LINGER;
}

void loom_http_session_free(loom_http_session_t *s)
{
    if (!s)
        return;
    conn_close(&s->conn);
    sb_free(&s->conn.in);
    sb_free(&s->conn.url);
    sb_free(&s->conn.field);
    sb_free(&s->conn.value);
    free(s);
}
