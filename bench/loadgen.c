/*
 * loadgen.c: an open-loop HTTP/1.1 load generator for bench/run.
 *
 *   bench_loadgen [options] http://127.0.0.1:PORT/PATH
 *     -r RATE     requests per second, on a fixed schedule (required)
 *     -d SECS     length of the schedule (default 5)
 *     -m METHOD   GET or POST (default GET; POST when -b is given)
 *     -b BODY     request body; every "{n}" in it becomes a token unique to
 *                 the request (run id and sequence number)
 *     -H HEADER   an extra header line, "Name: value" (repeatable)
 *     -c CONNS    at most this many keep-alive connections (default 512)
 *     -t SECS     how long to wait for the last answers (default 10)
 *     -p PID      sample VmRSS of PID from /proc every 50 ms; print the most
 *     --quick     a smoke run (-r 200 -d 1, for CTest) against nothing: with
 *                 no URL it starts a tiny server of its own in a thread
 *
 * Request i is due at start + i / RATE. It is sent on an idle connection as
 * soon as one exists (a new one is opened while fewer than CONNS are), and
 * its latency is counted from the time it was DUE, not from when it was sent:
 * a server that falls behind makes the queue, and so the latency, grow, and
 * nothing hides it (no coordinated omission). One thread, epoll, no
 * pipelining. Prints one line of key=value pairs:
 *
 *   offered_rps sent done ok errors timeouts achieved_rps
 *   p50_ms p90_ms p99_ms p999_ms max_ms   (over every answered request)
 *   ok_p50_ms ok_p99_ms                   (over the 2xx answers)
 *   shed_p99_ms                           (over the 503 answers: refusals)
 *   status_NNN=count ...  [rss_max_kib]
 *
 * Exits 0 when every request was answered, 1 otherwise, 2 on bad usage.
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_HEADERS 16
#define BUF_CAP     65536

typedef enum { C_CLOSED, C_CONNECTING, C_IDLE, C_BUSY } cstate_t;

typedef struct conn {
    int fd;
    cstate_t state;
    int64_t idx; /* request in flight */
    char *out;   /* request bytes still to write */
    size_t out_len, out_off;
    char *in; /* answer bytes read */
    size_t in_len;
} conn_t;

static struct {
    struct sockaddr_in addr;
    char host[64];
    const char *path, *method, *body;
    const char *headers[MAX_HEADERS];
    int n_headers;
    double rate, secs, tail_secs;
    int max_conns;
    int rss_pid;
    char run_id[32];
} o;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int usage(void)
{
    fprintf(stderr, "usage: bench_loadgen -r RATE [-d SECS] [-m METHOD] [-b BODY] [-H HEADER]... "
                    "[-c CONNS] [-t SECS] [-p PID] http://127.0.0.1:PORT/PATH\n"
                    "       bench_loadgen --quick\n");
    return 2;
}

static int parse_url(const char *url)
{
    if (strncmp(url, "http://", 7) != 0)
        return -1;
    const char *h = url + 7;
    const char *colon = strchr(h, ':');
    const char *slash = strchr(h, '/');
    if (!colon || (slash && slash < colon) || (size_t)(colon - h) >= sizeof(o.host))
        return -1;
    memcpy(o.host, h, (size_t)(colon - h));
    o.host[colon - h] = '\0';
    if (strcmp(o.host, "localhost") == 0)
        snprintf(o.host, sizeof(o.host), "127.0.0.1");
    int port = atoi(colon + 1);
    if (port <= 0 || port > 65535)
        return -1;
    o.addr.sin_family = AF_INET;
    o.addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, o.host, &o.addr.sin_addr) != 1)
        return -1;
    o.path = slash ? slash : "/";
    return 0;
}

/* The request bytes of request idx (the body's "{n}" made unique). */
static char *build_request(int64_t idx, size_t *len)
{
    char token[64];
    snprintf(token, sizeof(token), "%s-%lld", o.run_id, (long long)idx);
    size_t blen = 0, cap = 1024 + strlen(o.path);
    for (int i = 0; i < o.n_headers; i++)
        cap += strlen(o.headers[i]) + 2;
    char *body = NULL;
    if (o.body) {
        size_t n = 0;
        for (const char *p = o.body; (p = strstr(p, "{n}")); p += 3)
            n++;
        body = malloc(strlen(o.body) + n * strlen(token) + 1);
        char *w = body;
        for (const char *p = o.body; *p;) {
            if (strncmp(p, "{n}", 3) == 0) {
                w += sprintf(w, "%s", token);
                p += 3;
            } else {
                *w++ = *p++;
            }
        }
        *w = '\0';
        blen = (size_t)(w - body);
        cap += blen;
    }
    char *req = malloc(cap);
    int n = snprintf(req, cap, "%s %s HTTP/1.1\r\nHost: %s:%d\r\n", o.method, o.path, o.host,
                     ntohs(o.addr.sin_port));
    for (int i = 0; i < o.n_headers; i++)
        n += snprintf(req + n, cap - (size_t)n, "%s\r\n", o.headers[i]);
    if (body)
        n += snprintf(req + n, cap - (size_t)n,
                      "Content-Type: application/json\r\nContent-Length: %zu\r\n", blen);
    n += snprintf(req + n, cap - (size_t)n, "\r\n");
    if (body) {
        memcpy(req + n, body, blen);
        n += (int)blen;
    }
    free(body);
    *len = (size_t)n;
    return req;
}

/* ---- the run -------------------------------------------------------------------- */

static int ep;
static conn_t *conns;
static int n_open;
static int64_t *lat; /* ns, per answered request */
static int64_t n_lat, n_errors;
static int64_t *lat_ok, *lat_shed; /* the same, of 2xx and of 503 answers */
static int64_t n_ok, n_shed;
static int64_t status_count[600];
static int64_t t0;

static void conn_close(conn_t *c)
{
    if (c->state == C_CLOSED)
        return;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->out);
    c->out = NULL;
    c->in_len = 0;
    c->state = C_CLOSED;
    n_open--;
}

static int conn_open(conn_t *c)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (connect(fd, (struct sockaddr *)&o.addr, sizeof(o.addr)) != 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    c->fd = fd;
    c->state = C_CONNECTING;
    c->in_len = 0;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    n_open++;
    return 0;
}

static void want_out(conn_t *c, bool on)
{
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Writes what is left of the request; -1 when the connection broke. */
static int flush_out(conn_t *c)
{
    while (c->out && c->out_off < c->out_len) {
        ssize_t w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno == EAGAIN) {
            want_out(c, true);
            return 0;
        }
        if (w <= 0)
            return -1;
        c->out_off += (size_t)w;
    }
    free(c->out);
    c->out = NULL;
    want_out(c, false);
    return 0;
}

static void fail_request(conn_t *c)
{
    if (c->state == C_BUSY || (c->state == C_CONNECTING && c->out))
        n_errors++;
    conn_close(c);
}

static void start_request(conn_t *c, int64_t idx)
{
    c->idx = idx;
    c->out = build_request(idx, &c->out_len);
    c->out_off = 0;
    if (c->state == C_CONNECTING)
        return; /* sent once connected */
    c->state = C_BUSY;
    if (flush_out(c) != 0)
        fail_request(c);
}

/* Parses one complete answer at the start of c->in; 0 when more is needed. */
static size_t parse_answer(conn_t *c, int *status, bool *close_after)
{
    if (c->in_len < 12)
        return 0;
    char *end = memmem(c->in, c->in_len, "\r\n\r\n", 4);
    if (!end)
        return 0;
    size_t head = (size_t)(end - c->in) + 4;
    *status = atoi(c->in + 9);
    size_t clen = 0;
    *close_after = false;
    for (char *line = strstr(c->in, "\r\n"); line && line < end; line = strstr(line + 2, "\r\n")) {
        char *l = line + 2;
        if (strncasecmp(l, "Content-Length:", 15) == 0)
            clen = (size_t)strtoull(l + 15, NULL, 10);
        else if (strncasecmp(l, "Connection:", 11) == 0) {
            const char *v = l + 11;
            while (*v == ' ')
                v++;
            *close_after = strncasecmp(v, "close", 5) == 0;
        }
    }
    if (c->in_len < head + clen)
        return 0;
    return head + clen;
}

static void on_readable(conn_t *c)
{
    bool eof = false;
    for (;;) {
        if (c->in_len + 1 >= BUF_CAP) {
            fail_request(c); /* an answer bigger than we expect */
            return;
        }
        ssize_t r = recv(c->fd, c->in + c->in_len, BUF_CAP - 1 - c->in_len, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno == EAGAIN)
            break;
        if (r <= 0) {
            eof = true;
            break;
        }
        c->in_len += (size_t)r;
        c->in[c->in_len] = '\0';
    }
    int status;
    bool close_after;
    size_t used = parse_answer(c, &status, &close_after);
    if (!used) {
        if (eof)
            fail_request(c);
        return;
    }
    if (c->state == C_BUSY) {
        int64_t due = t0 + (int64_t)((double)c->idx * 1e9 / o.rate);
        int64_t l = now_ns() - due;
        lat[n_lat++] = l;
        if (status >= 200 && status < 300)
            lat_ok[n_ok++] = l;
        else if (status == 503)
            lat_shed[n_shed++] = l;
        status_count[status >= 100 && status < 600 ? status : 0]++;
    }
    memmove(c->in, c->in + used, c->in_len - used);
    c->in_len -= used;
    if (close_after || eof)
        conn_close(c);
    else
        c->state = C_IDLE;
}

static int cmp64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

/* The p-quantile of sorted a[0..n), in ms. */
static double pct_of(const int64_t *a, int64_t n, double p)
{
    if (n == 0)
        return 0;
    int64_t i = (int64_t)(p * (double)(n - 1) + 0.5);
    return (double)a[i] / 1e6;
}

static double pct(double p)
{
    return pct_of(lat, n_lat, p);
}

static long rss_kib(int pid)
{
    char path[64], line[256];
    snprintf(path, sizeof(path), "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    long kib = -1;
    while (fgets(line, sizeof(line), f))
        if (strncmp(line, "VmRSS:", 6) == 0)
            kib = strtol(line + 6, NULL, 10);
    fclose(f);
    return kib;
}

static int run(void)
{
    int64_t total = (int64_t)(o.rate * o.secs + 0.5);
    if (total < 1)
        total = 1;
    conns = calloc((size_t)o.max_conns, sizeof(*conns));
    lat = malloc((size_t)total * sizeof(*lat));
    lat_ok = malloc((size_t)total * sizeof(*lat_ok));
    lat_shed = malloc((size_t)total * sizeof(*lat_shed));
    for (int i = 0; i < o.max_conns; i++)
        conns[i].in = malloc(BUF_CAP);
    ep = epoll_create1(EPOLL_CLOEXEC);
    /* Open a few connections before the clock starts. */
    int warm = o.max_conns < 8 ? o.max_conns : 8;
    for (int i = 0; i < warm; i++)
        conn_open(&conns[i]);
    usleep(20000);
    t0 = now_ns() + 1000000;
    int64_t end_sched = t0 + (int64_t)(o.secs * 1e9),
            deadline = end_sched + (int64_t)(o.tail_secs * 1e9);
    int64_t next = 0, rss_next = 0;
    long rss_max = -1;
    int idle_hint = 0;
    struct epoll_event evs[256];
    for (;;) {
        int64_t now = now_ns();
        if (o.rss_pid && now >= rss_next) {
            long k = rss_kib(o.rss_pid);
            if (k > rss_max)
                rss_max = k;
            rss_next = now + 50000000;
        }
        int64_t due = now < t0 ? 0 : (int64_t)((double)(now - t0) * o.rate / 1e9) + 1;
        if (due > total)
            due = total;
        while (next < due) {
            conn_t *c = NULL, *closed = NULL;
            for (int k = 0; k < o.max_conns && !c; k++) {
                conn_t *x = &conns[(idle_hint + k) % o.max_conns];
                if (x->state == C_IDLE || (x->state == C_CONNECTING && !x->out))
                    c = x, idle_hint = (int)(x - conns + 1) % o.max_conns;
                else if (x->state == C_CLOSED && !closed)
                    closed = x;
            }
            if (!c && closed && conn_open(closed) == 0)
                c = closed;
            if (!c)
                break;
            start_request(c, next++);
        }
        if (n_lat + n_errors >= total && next >= total)
            break;
        if (now >= deadline)
            break;
        int64_t wake = next < total ? t0 + (int64_t)((double)next * 1e9 / o.rate) : deadline;
        if (o.rss_pid && wake > rss_next)
            wake = rss_next;
        int64_t wait = wake - now;
        if (next < due) /* queued behind busy connections: wait for an answer */
            wait = 100000000;
        if (wait < 0)
            wait = 0;
        struct timespec ts = {.tv_sec = wait / 1000000000, .tv_nsec = wait % 1000000000};
        static bool no_pwait2;
        int n = no_pwait2 ? -1 : epoll_pwait2(ep, evs, 256, &ts, NULL);
        if (n < 0 && (no_pwait2 || errno == ENOSYS)) { /* kernels before 5.11 */
            no_pwait2 = true;
            n = epoll_wait(ep, evs, 256, (int)((wait + 999999) / 1000000));
        }
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (c->state == C_CLOSED)
                continue;
            if (evs[i].events & (EPOLLERR | EPOLLHUP)) {
                if (!(evs[i].events & EPOLLIN) || c->state != C_BUSY) {
                    fail_request(c);
                    continue;
                }
            }
            if (c->state == C_CONNECTING && (evs[i].events & EPOLLOUT)) {
                int err = 0;
                socklen_t l = sizeof(err);
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
                if (err) {
                    fail_request(c);
                    continue;
                }
                if (c->out) {
                    c->state = C_BUSY;
                    if (flush_out(c) != 0) {
                        fail_request(c);
                        continue;
                    }
                } else {
                    c->state = C_IDLE;
                    want_out(c, false);
                }
            } else if (c->state == C_BUSY && (evs[i].events & EPOLLOUT)) {
                if (flush_out(c) != 0) {
                    fail_request(c);
                    continue;
                }
            }
            if (evs[i].events & EPOLLIN)
                on_readable(c);
        }
    }
    int64_t t_end = now_ns();
    for (int i = 0; i < o.max_conns; i++) {
        conn_close(&conns[i]);
        free(conns[i].in);
    }
    close(ep);
    int64_t timeouts = total - n_lat - n_errors;
    int64_t ok = 0;
    for (int s = 200; s < 300; s++)
        ok += status_count[s];
    qsort(lat, (size_t)n_lat, sizeof(*lat), cmp64);
    qsort(lat_ok, (size_t)n_ok, sizeof(*lat_ok), cmp64);
    qsort(lat_shed, (size_t)n_shed, sizeof(*lat_shed), cmp64);
    double span = (double)((t_end < end_sched ? end_sched : t_end) - t0) / 1e9;
    printf("offered_rps=%.0f sent=%lld done=%lld ok=%lld errors=%lld timeouts=%lld "
           "achieved_rps=%.0f p50_ms=%.2f p90_ms=%.2f p99_ms=%.2f p999_ms=%.2f max_ms=%.2f",
           o.rate, (long long)next, (long long)n_lat, (long long)ok, (long long)n_errors,
           (long long)timeouts, (double)n_lat / span, pct(0.50), pct(0.90), pct(0.99), pct(0.999),
           n_lat ? (double)lat[n_lat - 1] / 1e6 : 0.0);
    printf(" ok_p50_ms=%.2f ok_p99_ms=%.2f shed_p99_ms=%.2f", pct_of(lat_ok, n_ok, 0.50),
           pct_of(lat_ok, n_ok, 0.99), pct_of(lat_shed, n_shed, 0.99));
    for (int s = 0; s < 600; s++)
        if (status_count[s])
            printf(" status_%d=%lld", s, (long long)status_count[s]);
    if (o.rss_pid)
        printf(" rss_max_kib=%ld", rss_max);
    printf("\n");
    fflush(stdout);
    free(lat);
    free(lat_ok);
    free(lat_shed);
    free(conns);
    return timeouts == 0 && n_errors == 0 ? 0 : 1;
}

/* ---- --quick: a tiny keep-alive server in a thread ------------------------------------ */

static void *tiny_server(void *arg)
{
    int lfd = *(int *)arg;
    static const char ans[] = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    int e = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(e, EPOLL_CTL_ADD, lfd, &ev);
    char buf[8192];
    for (;;) {
        struct epoll_event evs[64];
        int n = epoll_wait(e, evs, 64, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
                if (c >= 0) {
                    struct epoll_event ce = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(e, EPOLL_CTL_ADD, c, &ce);
                }
                continue;
            }
            ssize_t r = recv(fd, buf, sizeof(buf), 0);
            if (r <= 0) {
                close(fd);
                continue;
            }
            /* One answer per request head seen (requests are small). */
            for (char *p = buf; (p = memmem(p, (size_t)(buf + r - p), "\r\n\r\n", 4)); p += 4)
                if (send(fd, ans, sizeof(ans) - 1, MSG_NOSIGNAL) < 0)
                    break;
        }
    }
    return NULL;
}

static int quick(void)
{
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t l = sizeof(sa);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(lfd, 128) != 0 ||
        getsockname(lfd, (struct sockaddr *)&sa, &l) != 0)
        return perror("bench_loadgen: listen"), 1;
    pthread_t th;
    pthread_create(&th, NULL, tiny_server, &lfd);
    pthread_detach(th);
    char url[64];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/", ntohs(sa.sin_port));
    parse_url(url);
    o.rate = 200;
    o.secs = 1;
    o.max_conns = 4;
    o.method = "GET";
    o.rss_pid = (int)getpid();
    return run();
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    o.secs = 5;
    o.tail_secs = 10;
    o.max_conns = 512;
    snprintf(o.run_id, sizeof(o.run_id), "lg%lx%x", (unsigned long)time(NULL), (unsigned)getpid());
    const char *url = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--quick") == 0)
            return quick();
        if (a[0] != '-') {
            url = a;
            continue;
        }
        if (i + 1 >= argc || a[1] == '\0' || a[2] != '\0')
            return usage();
        const char *v = argv[++i];
        switch (a[1]) {
        case 'r':
            o.rate = atof(v);
            break;
        case 'd':
            o.secs = atof(v);
            break;
        case 'm':
            o.method = v;
            break;
        case 'b':
            o.body = v;
            break;
        case 'c':
            o.max_conns = atoi(v);
            break;
        case 't':
            o.tail_secs = atof(v);
            break;
        case 'p':
            o.rss_pid = atoi(v);
            break;
        case 'H':
            if (o.n_headers == MAX_HEADERS)
                return usage();
            o.headers[o.n_headers++] = v;
            break;
        default:
            return usage();
        }
    }
    if (!url || parse_url(url) != 0 || o.rate <= 0 || o.secs <= 0 || o.max_conns < 1)
        return usage();
    if (!o.method)
        o.method = o.body ? "POST" : "GET";
    for (const char *m = o.method; *m; m++)
        if (!isupper((unsigned char)*m))
            return usage();
    return run();
}
