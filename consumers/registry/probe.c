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

#include <arpa/inet.h>
#include <ctype.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <uv.h>

/* ---- the allow-list ------------------------------------------------------------------ */

#define ALLOW_ENTRY_MAX 253

typedef struct allow_entry {
    int family; /* AF_INET or AF_INET6: a block; 0: a host-name suffix */
    uint8_t addr[16];
    int prefix;
    char suffix[ALLOW_ENTRY_MAX + 1];
} allow_entry_t;

struct registry_probe_allow {
    allow_entry_t *entries;
    size_t n;
    bool all; /* "*" */
};

void registry_probe_allow_free(registry_probe_allow_t *allow)
{
    if (!allow)
        return;
    free(allow->entries);
    free(allow);
}

/* One entry, trimmed, into e; false when it is none of the three forms. */
static bool allow_entry_parse(const char *s, size_t len, allow_entry_t *e)
{
    char text[ALLOW_ENTRY_MAX + 1];
    if (len == 0 || len > ALLOW_ENTRY_MAX)
        return false;
    memcpy(text, s, len);
    text[len] = '\0';
    memset(e, 0, sizeof(*e));
    char *slash = strchr(text, '/');
    if (slash)
        *slash = '\0';
    if (inet_pton(AF_INET, text, e->addr) == 1) {
        e->family = AF_INET;
        e->prefix = 32;
    } else if (inet_pton(AF_INET6, text, e->addr) == 1) {
        e->family = AF_INET6;
        e->prefix = 128;
    } else if (slash) {
        return false; /* "name/8" */
    }
    if (slash) {
        const char *d = slash + 1;
        int n = 0;
        size_t k = 0;
        for (; d[k] && k < 4; k++) {
            if (!isdigit((unsigned char)d[k]))
                return false;
            n = n * 10 + (d[k] - '0');
        }
        if (k == 0 || d[k] || n > e->prefix)
            return false;
        e->prefix = n;
    }
    if (e->family)
        return true;
    /* A host-name suffix: labels of [a-z0-9_-] joined by dots; a leading
     * dot is allowed and means the same. */
    const char *h = text[0] == '.' ? text + 1 : text;
    size_t hl = strlen(h), label = 0;
    if (hl == 0)
        return false;
    for (size_t i = 0; i < hl; i++) {
        char c = (char)tolower((unsigned char)h[i]);
        if (c == '.') {
            if (label == 0)
                return false;
            label = 0;
        } else if (isalnum((unsigned char)c) || c == '-' || c == '_') {
            label++;
        } else {
            return false;
        }
        e->suffix[i] = c;
    }
    e->suffix[hl] = '\0';
    return label > 0;
}

int registry_probe_allow_parse(const char *text, registry_probe_allow_t **out, loom_error_t *err)
{
    *out = NULL;
    registry_probe_allow_t *a = loom_xcalloc(1, sizeof(*a));
    size_t cap = 1;
    for (const char *c = text ? text : ""; *c; c++)
        cap += *c == ',';
    a->entries = loom_xcalloc(cap, sizeof(allow_entry_t));
    const char *p = text ? text : "";
    for (;;) {
        size_t len = strcspn(p, ",");
        const char *s = p;
        size_t sl = len;
        while (sl > 0 && (*s == ' ' || *s == '\t'))
            s++, sl--;
        while (sl > 0 && (s[sl - 1] == ' ' || s[sl - 1] == '\t'))
            sl--;
        if (sl == 1 && s[0] == '*') {
            a->all = true;
        } else if (!allow_entry_parse(s, sl, &a->entries[a->n])) {
            registry_probe_allow_free(a);
            return loom_error_set(err, LOOM_CODE_CONFIG_INVALID,
                                  "LOOM_REGISTRY_PROBE_ALLOW: \"%.*s\" is not a CIDR block, an "
                                  "address, a host-name suffix or \"*\"",
                                  (int)(sl > 100 ? 100 : sl), s);
        } else {
            a->n++;
        }
        if (!p[len])
            break;
        p += len + 1;
    }
    *out = a;
    return 0;
}

bool registry_probe_allow_valid(const char *text, char *allowed, size_t size)
{
    registry_probe_allow_t *a = NULL;
    loom_error_t err;
    if (registry_probe_allow_parse(text, &a, &err) == 0) {
        registry_probe_allow_free(a);
        return true;
    }
    snprintf(allowed, size,
             "a comma-separated list of CIDR blocks (10.0.0.0/8), addresses, host-name "
             "suffixes (svc.cluster.local) or \"*\"");
    return false;
}

static bool prefix_match(const uint8_t *a, const uint8_t *b, int bits)
{
    int bytes = bits / 8, rest = bits % 8;
    if (memcmp(a, b, (size_t)bytes) != 0)
        return false;
    if (rest == 0)
        return true;
    uint8_t mask = (uint8_t)(0xff << (8 - rest));
    return (a[bytes] & mask) == (b[bytes] & mask);
}

const char *registry_probe_allow_check(const registry_probe_allow_t *allow, const char *host,
                                       const struct sockaddr *addr)
{
    int family = addr->sa_family;
    uint8_t ip[16];
    if (family == AF_INET) {
        memcpy(ip, &((const struct sockaddr_in *)addr)->sin_addr, 4);
    } else if (family == AF_INET6) {
        const struct in6_addr *a6 = &((const struct sockaddr_in6 *)addr)->sin6_addr;
        if (IN6_IS_ADDR_V4MAPPED(a6)) { /* ::ffff:169.254.169.254 is 169.254.169.254 */
            family = AF_INET;
            memcpy(ip, a6->s6_addr + 12, 4);
        } else {
            memcpy(ip, a6->s6_addr, 16);
        }
    } else {
        return "not an IP address";
    }
    static const uint8_t link4[4] = {169, 254, 0, 0};
    static const uint8_t link6[16] = {0xfe, 0x80};
    /* fd00:ec2::254 is fd00:0ec2:0:0:0:0:0:0254 (AWS's IPv6 metadata service) */
    static const uint8_t ec2[16] = {0xfd, 0x00, 0x0e, 0xc2, 0, 0, 0,    0,
                                    0,    0,    0,    0,    0, 0, 0x02, 0x54};
    if (family == AF_INET && prefix_match(ip, link4, 16))
        return "169.254.0.0/16 (link-local, cloud metadata) is never probed";
    if (family == AF_INET6 && (prefix_match(ip, link6, 10) || memcmp(ip, ec2, 16) == 0))
        return "link-local and cloud metadata addresses (fe80::/10, fd00:ec2::254) are never "
               "probed";
    if (!allow || allow->all)
        return NULL;
    for (size_t i = 0; i < allow->n; i++) {
        const allow_entry_t *e = &allow->entries[i];
        if (e->family == family && prefix_match(ip, e->addr, e->prefix))
            return NULL;
    }
    /* A registered name matching a suffix; an IP literal never matches one. */
    struct in6_addr tmp;
    bool literal =
        host && (inet_pton(AF_INET, host, &tmp) == 1 || inet_pton(AF_INET6, host, &tmp) == 1);
    size_t hl = host && !literal ? strlen(host) : 0;
    for (size_t i = 0; hl && i < allow->n; i++) {
        const allow_entry_t *e = &allow->entries[i];
        size_t sl = strlen(e->suffix);
        if (e->family || sl > hl)
            continue;
        if (strcasecmp(host + hl - sl, e->suffix) == 0 && (sl == hl || host[hl - sl - 1] == '.'))
            return NULL;
    }
    return "outside LOOM_REGISTRY_PROBE_ALLOW";
}

/* ---- probes ------------------------------------------------------------------------------ */

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
    const registry_probe_allow_t *allow;
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
    /* The address is known now, names resolved: the allow-list decides
     * before any packet leaves. */
    const char *why = registry_probe_allow_check(s->run->allow, s->p->host, addr);
    if (why) {
        char ip[INET6_ADDRSTRLEN] = "?";
        if (addr->sa_family == AF_INET)
            uv_ip4_name((const struct sockaddr_in *)addr, ip, sizeof(ip));
        else if (addr->sa_family == AF_INET6)
            uv_ip6_name((const struct sockaddr_in6 *)addr, ip, sizeof(ip));
        char text[128];
        snprintf(text, sizeof(text), "not probed: %s: %s", ip, why);
        finish(s, "not_probed", -1, text);
        return;
    }
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
                       .allow = o.allow,
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
