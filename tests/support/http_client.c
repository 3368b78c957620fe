/*
 * http_client.c: see http_client.h.
 */
#include "http_client.h"
#include "loom/clock.h"
#include "loom/mem.h"

#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

loom_test_http_conn_t *loom_test_http_try_open(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    cr_assert_geq(fd, 0);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sin, sizeof(sin)) != 0) {
        close(fd);
        return NULL;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    loom_test_http_conn_t *c = loom_xcalloc(1, sizeof(*c));
    c->fd = fd;
    return c;
}

loom_test_http_conn_t *loom_test_http_open(int port)
{
    loom_test_http_conn_t *c = loom_test_http_try_open(port);
    cr_assert_not_null(c, "could not connect to 127.0.0.1:%d: %s", port, strerror(errno));
    return c;
}

void loom_test_http_close(loom_test_http_conn_t *c)
{
    if (!c)
        return;
    close(c->fd);
    free(c->buf);
    free(c);
}

bool loom_test_http_send(loom_test_http_conn_t *c, const char *data, size_t len)
{
    while (len > 0) {
        ssize_t n = send(c->fd, data, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return false;
        data += n;
        len -= (size_t)n;
    }
    return true;
}

bool loom_test_http_sends(loom_test_http_conn_t *c, const char *text)
{
    return loom_test_http_send(c, text, strlen(text));
}

/* Reads more bytes; false on timeout or EOF. */
static bool fill(loom_test_http_conn_t *c, int64_t deadline)
{
    if (c->eof)
        return false;
    int64_t left = deadline - loom_mono_ms();
    if (left <= 0)
        return false;
    struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
    int r = poll(&pfd, 1, (int)left);
    if (r <= 0)
        return false;
    if (c->cap - c->len < 65536) {
        c->cap = c->cap ? c->cap * 2 : 131072;
        c->buf = loom_xrealloc(c->buf, c->cap + 1);
    }
    ssize_t n = recv(c->fd, c->buf + c->len, c->cap - c->len, 0);
    if (n <= 0) {
        c->eof = true;
        return false;
    }
    c->len += (size_t)n;
    c->buf[c->len] = '\0';
    return true;
}

static void consume(loom_test_http_conn_t *c, size_t n)
{
    memmove(c->buf, c->buf + n, c->len - n);
    c->len -= n;
    if (c->buf)
        c->buf[c->len] = '\0';
}

bool loom_test_http_read(loom_test_http_conn_t *c, int timeout_ms, loom_test_http_res_t *res)
{
    memset(res, 0, sizeof(*res));
    int64_t deadline = loom_mono_ms() + timeout_ms;
    char *end;
    while (!(c->buf && (end = strstr(c->buf, "\r\n\r\n"))))
        if (!fill(c, deadline))
            return false;
    size_t head_len = (size_t)(end - c->buf) + 2;
    res->head = loom_xstrndup(c->buf, head_len);
    if (sscanf(res->head, "HTTP/1.%*d %d", &res->status) != 1) {
        res->status = -1;
        return false;
    }
    char v[32];
    size_t body_len = 0;
    if (loom_test_http_header(res, "Content-Length", v, sizeof(v)))
        body_len = strtoul(v, NULL, 10);
    size_t total = head_len + 2 + body_len;
    while (c->len < total)
        if (!fill(c, deadline))
            return false;
    res->body = loom_xstrndup(c->buf + head_len + 2, body_len);
    res->body_len = body_len;
    consume(c, total);
    json_error_t jerr;
    res->json = body_len ? json_loadb(res->body, body_len, JSON_DECODE_ANY, &jerr) : NULL;
    return true;
}

bool loom_test_http_closed(loom_test_http_conn_t *c, int timeout_ms)
{
    int64_t deadline = loom_mono_ms() + timeout_ms;
    while (!c->eof) {
        c->len = 0;
        if (!fill(c, deadline) && !c->eof)
            return false;
    }
    return true;
}

const char *loom_test_http_header(const loom_test_http_res_t *res, const char *name, char *buf,
                                  size_t size)
{
    size_t nl = strlen(name);
    const char *p = res->head ? strstr(res->head, "\r\n") : NULL;
    while (p && p[2]) {
        p += 2;
        const char *eol = strstr(p, "\r\n");
        if (!eol)
            break;
        if (strncasecmp(p, name, nl) == 0 && p[nl] == ':') {
            const char *val = p + nl + 1;
            while (*val == ' ')
                val++;
            snprintf(buf, size, "%.*s", (int)(eol - val), val);
            return buf;
        }
        p = eol;
    }
    return NULL;
}

void loom_test_http_res_free(loom_test_http_res_t *res)
{
    free(res->head);
    free(res->body);
    json_decref(res->json);
    memset(res, 0, sizeof(*res));
}

void loom_test_http(int port, const char *method, const char *path, const char *token,
                    const char *headers, const char *body, loom_test_http_res_t *res)
{
    loom_test_http_conn_t *c = loom_test_http_open(port);
    char *req = loom_xasprintf("%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s%s%s%s"
                               "Content-Length: %zu\r\n\r\n%s",
                               method, path, token ? "Authorization: Bearer " : "",
                               token ? token : "", token ? "\r\n" : "", headers ? headers : "",
                               body ? strlen(body) : 0, body ? body : "");
    cr_assert(loom_test_http_sends(c, req), "could not send %s %s", method, path);
    free(req);
    cr_assert(loom_test_http_read(c, 30000, res), "no response to %s %s", method, path);
    loom_test_http_close(c);
}

int loom_test_http_get_status(int port, const char *path, int timeout_ms, char **body)
{
    loom_test_http_conn_t *c = loom_test_http_try_open(port);
    if (!c)
        return -1;
    char *req = loom_xasprintf("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", path);
    loom_test_http_res_t res = {0};
    int status = -1;
    if (loom_test_http_sends(c, req) && loom_test_http_read(c, timeout_ms, &res)) {
        status = res.status;
        if (body)
            *body = loom_xstrdup(res.body ? res.body : "");
    }
    loom_test_http_res_free(&res);
    loom_test_http_close(c);
    free(req);
    return status;
}

int loom_test_http_wait_status(int port, const char *path, int want, int timeout_ms)
{
    int64_t end = loom_mono_ms() + timeout_ms;
    int status;
    while ((status = loom_test_http_get_status(port, path, 10000, NULL)) != want &&
           loom_mono_ms() < end)
        loom_sleep_ms(100);
    return status;
}

const char *loom_test_http_error_code(const loom_test_http_res_t *res)
{
    const char *code =
        json_string_value(json_object_get(json_object_get(res->json, "error"), "code"));
    return code ? code : "";
}
