/*
 * op_http.c: calling an op on a running gateway, POST {url}/v1/ops/{name}.
 *
 * A deliberately small HTTP/1.1 client over a plain TCP socket: one request
 * per connection ("Connection: close"), a body read by Content-Length, by
 * chunked transfer coding or up to EOF, and one deadline for everything. It
 * keeps libcurl out of the engine; TLS belongs to a proxy in front of the
 * gateway.
 */
#include "loom/clock.h"
#include "loom/mem.h"
#include "loom/op.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#define DEFAULT_TIMEOUT_MS 30000
#define MAX_RESPONSE       (64u << 20)

typedef struct url {
    char host[256]; /* without brackets */
    char port[8];
    char prefix[512]; /* "" or "/something", no trailing slash */
    char authority[300];
} url_t;

static int parse_url(const char *s, url_t *u, loom_error_t *err)
{
    memset(u, 0, sizeof(*u));
    if (strncmp(s, "http://", 7) != 0)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "invalid URL \"%.200s\": expected http://host[:port][/prefix]%s", s,
                              strncmp(s, "https://", 8) == 0
                                  ? " (https is served by a proxy in front of the gateway)"
                                  : "");
    const char *p = s + 7;
    size_t alen = strcspn(p, "/?#");
    const char *path = p + alen;
    if (alen == 0 || alen >= sizeof(u->authority) || *path == '?' || *path == '#' ||
        strlen(path) >= sizeof(u->prefix))
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "invalid URL \"%.200s\": expected http://host[:port][/prefix]", s);
    snprintf(u->authority, sizeof(u->authority), "%.*s", (int)alen, p);
    const char *port = NULL;
    if (p[0] == '[') {
        const char *close = memchr(p, ']', alen);
        if (!close)
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "invalid URL \"%.200s\"", s);
        snprintf(u->host, sizeof(u->host), "%.*s", (int)(close - p - 1), p + 1);
        if (close + 1 < p + alen) {
            if (close[1] != ':')
                return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "invalid URL \"%.200s\"", s);
            port = close + 2;
        }
    } else {
        const char *colon = memchr(p, ':', alen);
        size_t hlen = colon ? (size_t)(colon - p) : alen;
        snprintf(u->host, sizeof(u->host), "%.*s", (int)hlen, p);
        if (colon)
            port = colon + 1;
    }
    if (port) {
        size_t plen = (size_t)(p + alen - port);
        bool ok = plen >= 1 && plen <= 5;
        for (size_t i = 0; ok && i < plen; i++)
            ok = port[i] >= '0' && port[i] <= '9';
        if (!ok || atoi(port) < 1 || atoi(port) > 65535)
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                                  "invalid URL \"%.200s\": bad port", s);
        snprintf(u->port, sizeof(u->port), "%.*s", (int)plen, port);
    } else {
        snprintf(u->port, sizeof(u->port), "80");
    }
    if (!u->host[0])
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "invalid URL \"%.200s\": no host",
                              s);
    snprintf(u->prefix, sizeof(u->prefix), "%s", path);
    size_t n = strlen(u->prefix);
    while (n > 0 && u->prefix[n - 1] == '/')
        u->prefix[--n] = '\0';
    return 0;
}

static int wait_fd(int fd, short events, int64_t deadline)
{
    for (;;) {
        int64_t left = deadline - loom_mono_ms();
        if (left <= 0)
            return LOOM_ETIMEDOUT;
        struct pollfd pfd = {.fd = fd, .events = events};
        int r = poll(&pfd, 1, left > 60000 ? 60000 : (int)left);
        if (r > 0)
            return 0;
        if (r < 0 && errno != EINTR)
            return LOOM_EIO;
    }
}

static int dial(const url_t *u, int64_t deadline, int *out, loom_error_t *err)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    struct addrinfo *ai = NULL;
    int gai = getaddrinfo(u->host, u->port, &hints, &ai);
    if (gai != 0)
        return loom_error_set(err, LOOM_CODE_GATEWAY_UNAVAILABLE, "could not resolve \"%s\": %s",
                              u->host, gai_strerror(gai));
    int last = ECONNREFUSED;
    bool timed_out = false;
    for (struct addrinfo *a = ai; a; a = a->ai_next) {
        int fd =
            socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
        if (fd < 0) {
            last = errno;
            continue;
        }
        int rc = connect(fd, a->ai_addr, a->ai_addrlen);
        if (rc != 0 && errno == EINPROGRESS) {
            if (wait_fd(fd, POLLOUT, deadline) != 0) {
                timed_out = true;
                close(fd);
                break;
            }
            int so = 0;
            socklen_t sl = sizeof(so);
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &so, &sl);
            rc = so ? -1 : 0;
            errno = so;
        }
        if (rc == 0) {
            freeaddrinfo(ai);
            *out = fd;
            return 0;
        }
        last = errno;
        close(fd);
    }
    freeaddrinfo(ai);
    if (timed_out)
        return loom_error_set(err, LOOM_CODE_DEADLINE_EXCEEDED,
                              "could not connect to \"%s\" before the deadline", u->authority);
    return loom_error_set(err, LOOM_CODE_GATEWAY_UNAVAILABLE, "could not connect to \"%s\": %s",
                          u->authority, strerror(last));
}

static int send_all(int fd, const char *buf, size_t len, int64_t deadline, loom_error_t *err)
{
    while (len > 0) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n > 0) {
            buf += n;
            len -= (size_t)n;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
            if (wait_fd(fd, POLLOUT, deadline) != 0)
                return loom_error_set(err, LOOM_CODE_DEADLINE_EXCEEDED,
                                      "could not send the request before the deadline");
            continue;
        }
        return loom_error_set(err, LOOM_CODE_GATEWAY_UNAVAILABLE, "could not send the request: %s",
                              strerror(errno));
    }
    return 0;
}

/* Decodes a chunked body in place. Returns the decoded length, -1 when more
 * input is needed, -2 when it is malformed. */
static long dechunk(const char *in, size_t len, char *out)
{
    size_t i = 0, o = 0;
    for (;;) {
        const char *eol = memmem(in + i, len - i, "\r\n", 2);
        if (!eol)
            return -1;
        char *end = NULL;
        errno = 0;
        unsigned long size = strtoul(in + i, &end, 16);
        if (end == in + i || errno || (*end != ';' && *end != '\r') || size > MAX_RESPONSE)
            return -2;
        i = (size_t)(eol - in) + 2;
        if (size == 0) {
            /* Trailers end with an empty line. */
            for (;;) {
                const char *t = memmem(in + i, len - i, "\r\n", 2);
                if (!t)
                    return -1;
                if (t == in + i)
                    return (long)o;
                i = (size_t)(t - in) + 2;
            }
        }
        if (len - i < size + 2)
            return -1;
        memmove(out + o, in + i, size);
        o += size;
        i += size;
        if (in[i] != '\r' || in[i + 1] != '\n')
            return -2;
        i += 2;
    }
}

/* Finds a header's value in the header block (case-insensitive name). */
static const char *header(const char *head, size_t head_len, const char *name, size_t *vlen)
{
    size_t nl = strlen(name);
    const char *p = memmem(head, head_len, "\r\n", 2);
    while (p && p + 2 < head + head_len) {
        p += 2;
        const char *eol = memmem(p, (size_t)(head + head_len - p), "\r\n", 2);
        size_t ll = eol ? (size_t)(eol - p) : (size_t)(head + head_len - p);
        if (ll > nl && strncasecmp(p, name, nl) == 0 && p[nl] == ':') {
            const char *v = p + nl + 1;
            const char *ve = p + ll;
            while (v < ve && (*v == ' ' || *v == '\t'))
                v++;
            while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t'))
                ve--;
            *vlen = (size_t)(ve - v);
            return v;
        }
        p = eol;
    }
    return NULL;
}

typedef struct response {
    char *buf;
    size_t len, cap;
} response_t;

static int bad_response(loom_error_t *err, const url_t *u, const char *why)
{
    return loom_error_set(err, LOOM_CODE_GATEWAY_BAD_RESPONSE, "bad response from \"%s\": %s",
                          u->authority, why);
}

/* Parses what was read so far. Returns 0 when the response is complete (body
 * decoded in place), 1 when more input is needed, or an error. */
static int parse_response(response_t *r, bool eof, const url_t *u, int *status, char **body,
                          size_t *body_len, loom_error_t *err)
{
    const char *end = r->len ? memmem(r->buf, r->len, "\r\n\r\n", 4) : NULL;
    if (!end)
        return eof ? bad_response(err, u, "connection closed before the headers ended") : 1;
    size_t head_len = (size_t)(end - r->buf) + 2;
    int major = 0, minor = 0, code = 0;
    if (sscanf(r->buf, "HTTP/%d.%d %3d", &major, &minor, &code) != 3 || major != 1 || code < 100 ||
        code > 599)
        return bad_response(err, u, "not an HTTP/1.x status line");
    char *b = r->buf + head_len + 2;
    size_t avail = r->len - head_len - 2;
    size_t vlen;
    const char *te = header(r->buf, head_len, "Transfer-Encoding", &vlen);
    const char *cl = header(r->buf, head_len, "Content-Length", &vlen);
    if (te && vlen == 7 && strncasecmp(te, "chunked", 7) == 0) {
        long n = dechunk(b, avail, b);
        if (n == -2)
            return bad_response(err, u, "malformed chunked body");
        if (n == -1)
            return eof ? bad_response(err, u, "connection closed inside the chunked body") : 1;
        *body_len = (size_t)n;
    } else if (cl) {
        char *e = NULL;
        unsigned long n = strtoul(cl, &e, 10);
        if (e == cl || n > MAX_RESPONSE)
            return bad_response(err, u, "bad Content-Length");
        if (avail < n)
            return eof ? bad_response(err, u, "connection closed before the body ended") : 1;
        *body_len = n;
    } else {
        if (!eof)
            return 1;
        *body_len = avail;
    }
    *status = code;
    *body = b;
    return 0;
}

int loom_op_call_http(const char *base_url, const char *token, const loom_op_ctx_t *ctx,
                      const char *name, const json_t *req, int *status, json_t **body,
                      loom_error_t *err)
{
    if (body)
        *body = NULL;
    if (!base_url || !name || !status || !body)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "loom_op_call_http needs a URL, an op name, status and body");
    if (!loom_op_name_valid(name))
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "invalid op name \"%.*s\"",
                              LOOM_OP_NAME_MAX, name);
    if (req && !json_is_object(req))
        return loom_error_set(err, LOOM_CODE_INVALID_JSON,
                              "op \"%s\" takes a JSON object as its request", name);
    if (token && strpbrk(token, "\r\n"))
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "the API token has a line break");
    url_t u;
    int rc = parse_url(base_url, &u, err);
    if (rc != 0)
        return rc;
    int64_t deadline = ctx && ctx->deadline_mono_ms > 0 ? ctx->deadline_mono_ms
                                                        : loom_mono_ms() + DEFAULT_TIMEOUT_MS;
    const char *ray = ctx && ctx->ray_id && !strpbrk(ctx->ray_id, "\r\n") ? ctx->ray_id : NULL;

    json_t *empty = req ? NULL : json_object();
    char *payload = json_dumps(req ? req : empty, JSON_COMPACT);
    json_decref(empty);
    if (!payload)
        return loom_error_set(err, LOOM_CODE_INVALID_JSON, "could not encode the request");
    char *request = loom_xasprintf("POST %s/v1/ops/%s HTTP/1.1\r\n"
                                   "Host: %s\r\n"
                                   "User-Agent: loom\r\n"
                                   "Accept: application/json\r\n"
                                   "Content-Type: application/json\r\n"
                                   "Content-Length: %zu\r\n"
                                   "%s%s%s"
                                   "%s%s%s"
                                   "Connection: close\r\n"
                                   "\r\n"
                                   "%s",
                                   u.prefix, name, u.authority, strlen(payload),
                                   token ? "Authorization: Bearer " : "", token ? token : "",
                                   token ? "\r\n" : "", ray ? "X-Ray-Id: " : "", ray ? ray : "",
                                   ray ? "\r\n" : "", payload);
    free(payload);

    int fd = -1;
    rc = dial(&u, deadline, &fd, err);
    if (rc == 0)
        rc = send_all(fd, request, strlen(request), deadline, err);
    free(request);
    if (rc != 0) {
        if (fd >= 0)
            close(fd);
        return rc;
    }

    response_t r = {0};
    char *b = NULL;
    size_t blen = 0;
    bool eof = false;
    for (;;) {
        rc = parse_response(&r, eof, &u, status, &b, &blen, err);
        if (rc <= 0)
            break;
        if (r.len > MAX_RESPONSE) {
            rc = bad_response(err, &u, "response over 64 MiB");
            break;
        }
        if (r.cap - r.len < 4096) {
            r.cap = r.cap ? r.cap * 2 : 16384;
            r.buf = loom_xrealloc(r.buf, r.cap + 1);
        }
        ssize_t n = recv(fd, r.buf + r.len, r.cap - r.len, 0);
        if (n > 0) {
            r.len += (size_t)n;
            r.buf[r.len] = '\0';
        } else if (n == 0) {
            eof = true;
        } else if (errno == EAGAIN || errno == EINTR) {
            if (wait_fd(fd, POLLIN, deadline) != 0) {
                rc = loom_error_set(err, LOOM_CODE_DEADLINE_EXCEEDED,
                                    "no complete answer from \"%s\" before the deadline",
                                    u.authority);
                break;
            }
        } else {
            rc = loom_error_set(err, LOOM_CODE_GATEWAY_UNAVAILABLE, "connection to \"%s\" lost: %s",
                                u.authority, strerror(errno));
            break;
        }
    }
    close(fd);
    if (rc == 0) {
        json_error_t jerr;
        *body = blen ? json_loadb(b, blen, JSON_DECODE_ANY, &jerr) : NULL;
        if (!*body && (*status < 200 || *status > 299)) {
            loom_error_clear(err); /* an error status whose body is not JSON (a proxy's page) */
        } else if (!*body) {
            char why[300];
            snprintf(why, sizeof(why), "HTTP %d with a body that is not JSON%s%s", *status,
                     blen ? ": " : " (empty)", blen ? jerr.text : "");
            rc = bad_response(err, &u, why);
        } else {
            loom_error_clear(err);
        }
    }
    free(r.buf);
    return rc;
}
