/*
 * probe.c: TCP health probes of service instances, many at once, on a libuv
 * loop of the caller's thread.
 *
 * Each probe holds one slot: a timer for its timeout and a TCP handle for
 * its connection (plus a getaddrinfo request while a host name is being
 * resolved on libuv's thread pool). At most max_in_flight slots exist, so at
 * most that many sockets are open; when a slot's handles are closed it takes
 * the next probe. Nothing here blocks: the loop waits in epoll for
 * connections, timers and resolutions together, and a thousand unreachable
 * instances cost max_in_flight sockets and about n / max_in_flight timeouts
 * of wall time.
 *
 * A slot is finished once (finish()); its handles are then closed, and it is
 * reused only after the last close callback and the resolution callback (if
 * one was pending) have run, as libuv requires.
 */
#include "registry.h"

#include "loom/log.h"
#include "loom/mem.h"

#include <stdio.h>
#include <string.h>
#include <uv.h>

typedef struct probe_run probe_run_t;

typedef struct slot {
    uv_timer_t timer;
    uv_tcp_t tcp;
    uv_connect_t connect;
    uv_getaddrinfo_t gai;
    probe_run_t *run;
    registry_probe_t *p;
    uint64_t connect_start_ns;
    int open_handles; /* handles not yet closed */
    bool resolving;   /* a getaddrinfo callback is still to come */
    bool tcp_open;    /* tcp was initialised and is not closed yet */
    bool done;
} slot_t;

struct probe_run {
    uv_loop_t loop;
    registry_probe_t *probes;
    size_t n, next;
    int64_t timeout_ms, degraded_ms;
    int in_flight, peak;
};

static void slot_start(slot_t *s);

static void slot_release(slot_t *s)
{
    if (!s->done || s->open_handles > 0 || s->resolving)
        return;
    s->run->in_flight--;
    s->p = NULL;
    s->done = false; /* idle: a stray call must not release it twice */
    slot_start(s);   /* the next probe, if any */
}

static void on_close(uv_handle_t *h)
{
    slot_t *s = h->data;
    if (h == (uv_handle_t *)&s->tcp)
        s->tcp_open = false;
    s->open_handles--;
    slot_release(s);
}

/* Records the result and closes the slot's handles (the connect callback, if
 * pending, then runs with UV_ECANCELED and is ignored). */
static void finish(slot_t *s, const char *status, int64_t connect_ms, const char *details)
{
    if (s->done)
        return;
    s->done = true;
    s->p->status = status;
    s->p->connect_ms = connect_ms;
    snprintf(s->p->details, sizeof(s->p->details), "%s", details ? details : "");
    if (s->resolving)
        uv_cancel((uv_req_t *)&s->gai); /* may fail if running; its callback comes anyway */
    uv_close((uv_handle_t *)&s->timer, on_close);
    if (s->tcp_open)
        uv_close((uv_handle_t *)&s->tcp, on_close);
}

static void on_timeout(uv_timer_t *t)
{
    slot_t *s = t->data;
    char text[64];
    snprintf(text, sizeof(text), "no connection within %lld ms", (long long)s->run->timeout_ms);
    finish(s, "unreachable", -1, text);
}

static void on_connect(uv_connect_t *req, int status)
{
    slot_t *s = req->data;
    if (s->done)
        return;
    if (status < 0) {
        finish(s, "unreachable", -1, uv_strerror(status));
        return;
    }
    int64_t ms = (int64_t)((uv_hrtime() - s->connect_start_ns) / 1000000);
    if (ms > s->run->degraded_ms) {
        char text[64];
        snprintf(text, sizeof(text), "connected in %lld ms", (long long)ms);
        finish(s, "degraded", ms, text);
    } else {
        finish(s, "healthy", ms, NULL);
    }
}

static void connect_to(slot_t *s, const struct sockaddr *addr)
{
    uv_tcp_init(&s->run->loop, &s->tcp);
    s->tcp.data = s;
    s->tcp_open = true;
    s->open_handles++;
    s->connect.data = s;
    s->connect_start_ns = uv_hrtime();
    int rc = uv_tcp_connect(&s->connect, &s->tcp, addr, on_connect);
    if (rc < 0) {
        char text[96];
        snprintf(text, sizeof(text), "could not probe: %s", uv_strerror(rc));
        /* Out of descriptors or memory is our problem, not the instance's. */
        bool local = rc == UV_EMFILE || rc == UV_ENFILE || rc == UV_ENOBUFS || rc == UV_ENOMEM;
        finish(s, local ? NULL : "unreachable", -1, local ? text : uv_strerror(rc));
    }
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    slot_t *s = req->data;
    s->resolving = false;
    if (s->done) { /* timed out meanwhile */
        uv_freeaddrinfo(res);
        slot_release(s);
        return;
    }
    if (status < 0 || !res) {
        char text[128];
        snprintf(text, sizeof(text), "could not resolve the host: %s",
                 uv_strerror(status < 0 ? status : UV_EAI_NONAME));
        finish(s, "unreachable", -1, text);
    } else {
        connect_to(s, res->ai_addr);
    }
    uv_freeaddrinfo(res);
}

/* Takes the next probe, if any is left. */
static void slot_start(slot_t *s)
{
    probe_run_t *run = s->run;
    if (run->next >= run->n)
        return;
    registry_probe_t *p = &run->probes[run->next++];
    s->p = p;
    s->done = false;
    s->resolving = false;
    s->open_handles = 0;
    s->tcp_open = false;
    p->status = NULL;
    p->connect_ms = -1;
    p->details[0] = '\0';
    if (++run->in_flight > run->peak)
        run->peak = run->in_flight;

    uv_timer_init(&run->loop, &s->timer);
    s->timer.data = s;
    s->open_handles++;
    uv_timer_start(&s->timer, on_timeout, (uint64_t)run->timeout_ms, 0);

    char port[16];
    snprintf(port, sizeof(port), "%d", p->port);
    struct sockaddr_in a4;
    struct sockaddr_in6 a6;
    if (!p->host || p->port < 1 || p->port > 65535) {
        finish(s, "unreachable", -1, "no host and port to probe");
    } else if (uv_ip4_addr(p->host, p->port, &a4) == 0) {
        connect_to(s, (const struct sockaddr *)&a4);
    } else if (uv_ip6_addr(p->host, p->port, &a6) == 0) {
        connect_to(s, (const struct sockaddr *)&a6);
    } else {
        struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
        s->gai.data = s;
        s->resolving = true;
        int rc = uv_getaddrinfo(&run->loop, &s->gai, on_resolved, p->host, port, &hints);
        if (rc < 0) {
            char text[128];
            snprintf(text, sizeof(text), "could not resolve the host: %s", uv_strerror(rc));
            s->resolving = false;
            finish(s, "unreachable", -1, text);
        }
    }
}

int registry_probe_run(registry_probe_t *probes, size_t n, registry_probe_opts_t *opts,
                       loom_error_t *err)
{
    registry_probe_opts_t o = opts ? *opts : (registry_probe_opts_t){0};
    probe_run_t run = {.probes = probes,
                       .n = n,
                       .timeout_ms = o.timeout_ms > 0 ? o.timeout_ms : REGISTRY_PROBE_TIMEOUT_MS,
                       .degraded_ms =
                           o.degraded_ms > 0 ? o.degraded_ms : REGISTRY_PROBE_DEGRADED_MS};
    size_t max = o.max_in_flight > 0 ? (size_t)o.max_in_flight : REGISTRY_PROBE_MAX_IN_FLIGHT;
    if (n == 0)
        return 0;
    int rc = uv_loop_init(&run.loop);
    if (rc < 0)
        return loom_error_set(err, LOOM_CODE_INTERNAL, "could not start the probe loop: %s",
                              uv_strerror(rc));
    size_t nslots = n < max ? n : max;
    slot_t *slots = loom_xcalloc(nslots, sizeof(*slots));
    for (size_t i = 0; i < nslots; i++) {
        slots[i].run = &run;
        slot_start(&slots[i]);
    }
    uv_run(&run.loop, UV_RUN_DEFAULT);
    rc = uv_loop_close(&run.loop);
    if (rc != 0) /* a handle left open would be a bug above */
        LOOM_ERROR("registry probe loop left handles open", "error=%s", uv_strerror(rc));
    free(slots);
    if (opts)
        opts->peak_in_flight = run.peak;
    return 0;
}
