/*
 * gateway_limit.c: per-caller rate limits of the gateway (LOOM_API_RATE_LIMIT,
 * LOOM_API_RATE_BURST): one token bucket per caller, keyed by the token's
 * slug, or by the remote address (without the port) for requests that bring
 * no valid token.
 *
 * A bucket holds up to burst tokens and gains `rate` a second; a request
 * takes one, and with none left it is answered 429 with Retry-After (the
 * whole seconds until a token is back). The table is bounded: when it holds
 * max_keys callers, buckets that have refilled completely (their callers
 * idle long enough to be as good as new) are dropped; if none has, new
 * callers share one overflow bucket, so a flood of new addresses cannot grow
 * memory or escape the limit.
 *
 * It also holds the gateway's overload bounds, which protect the process
 * rather than share it between callers: at most max_waiters ?wait requests
 * at once (LOOM_API_MAX_WAITERS) and at most max_queue op calls queued for
 * the worker threads (LOOM_API_MAX_QUEUE). Past a bound a request is refused
 * at once with 503 OVERLOADED and Retry-After, before anything is published
 * or queued: a queue that only grows turns every answer late, while a quick
 * refusal lets the client back off and keeps the requests that were taken
 * fast.
 *
 * The ?wait bound also adapts (LOOM_API_WAIT_TARGET): a fixed bound of N
 * waiters, when the workers apply R commands a second, lets each wait grow
 * to about N / R seconds, so with the default 128 and a machine that applies
 * 900 a second every answer takes some 140 ms. While more than one in ten of
 * the requests that ended in the last 100 ms were held longer than the
 * target, the bound comes down (multiplicatively, to LOOM_GATEWAY_MIN_WAITERS at the lowest);
 * while they are faster it goes back up. The waits then stay near the target
 * and the excess is refused in microseconds. The bound falls faster than it
 * rises (a tenth against a sixteenth), as adaptive concurrency limits do.
 * Only waits that ended with their command's outcome are judged: one that
 * ran out, or whose client left, counts as on time, so a stopped consumer
 * does not bring the bound down for the commands of every other one.
 *
 * The bound is for waits that are slow because too many are held. So a slow
 * window lowers it only when the waiters filled at least half of it: on a
 * busy machine whose waits are long at a load it answers, a bound of 16
 * would cap the rate at 16 / wait and refuse what it could answer. And a
 * machine whose unloaded waits come near the target (the quickest wait that
 * ended while at most 1/32 of the maximum were held, over the last 10
 * s) is judged against three times that instead: the target cannot be met
 * there by refusing.
 */
#include "gateway_int.h"
#include "loom/clock.h"
#include "loom/mem.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BUCKETS 4096

typedef struct entry {
    struct entry *next;
    double tokens;
    int64_t at_ns;
    char key[];
} entry_t;

struct loom_rate_limiter {
    pthread_mutex_t mu;
    double rate, burst;
    size_t n, max_keys;
    entry_t *table[BUCKETS];
    entry_t overflow;
};

loom_rate_limiter_t *loom_rate_limiter_new(int rate, int burst, size_t max_keys)
{
    if (rate <= 0)
        return NULL;
    loom_rate_limiter_t *l = loom_xcalloc(1, sizeof(*l));
    pthread_mutex_init(&l->mu, NULL);
    l->rate = rate;
    l->burst = burst > 0 ? burst : rate;
    l->max_keys = max_keys ? max_keys : 100000;
    l->overflow.tokens = l->burst;
    return l;
}

void loom_rate_limiter_free(loom_rate_limiter_t *l)
{
    if (!l)
        return;
    for (size_t i = 0; i < BUCKETS; i++)
        for (entry_t *e = l->table[i], *next; e; e = next) {
            next = e->next;
            free(e);
        }
    pthread_mutex_destroy(&l->mu);
    free(l);
}

static void refill(const loom_rate_limiter_t *l, entry_t *e, int64_t now_ns)
{
    if (now_ns > e->at_ns) {
        e->tokens += (double)(now_ns - e->at_ns) * l->rate / 1e9;
        if (e->tokens > l->burst)
            e->tokens = l->burst;
    }
    e->at_ns = now_ns > e->at_ns ? now_ns : e->at_ns;
}

/* Drops the buckets that are full again; mu held. */
static void sweep(loom_rate_limiter_t *l, int64_t now_ns)
{
    for (size_t i = 0; i < BUCKETS; i++) {
        entry_t **pp = &l->table[i];
        while (*pp) {
            refill(l, *pp, now_ns);
            if ((*pp)->tokens >= l->burst) {
                entry_t *gone = *pp;
                *pp = gone->next;
                free(gone);
                l->n--;
            } else {
                pp = &(*pp)->next;
            }
        }
    }
}

bool loom_rate_limiter_take(loom_rate_limiter_t *l, const char *key, int64_t now_ns,
                            int *retry_after_s)
{
    if (!l)
        return true;
    uint32_t h = 2166136261u;
    for (const char *c = key; *c; c++)
        h = (h ^ (unsigned char)*c) * 16777619u;
    pthread_mutex_lock(&l->mu);
    entry_t **pp = &l->table[h % BUCKETS];
    while (*pp && strcmp((*pp)->key, key) != 0)
        pp = &(*pp)->next;
    entry_t *e = *pp;
    if (!e) {
        if (l->n >= l->max_keys)
            sweep(l, now_ns);
        if (l->n >= l->max_keys) {
            e = &l->overflow;
        } else {
            size_t kl = strlen(key);
            e = loom_xcalloc(1, sizeof(*e) + kl + 1);
            memcpy(e->key, key, kl + 1);
            e->tokens = l->burst;
            e->at_ns = now_ns;
            e->next = l->table[h % BUCKETS];
            l->table[h % BUCKETS] = e;
            l->n++;
        }
    }
    refill(l, e, now_ns);
    bool ok = e->tokens >= 1.0;
    if (ok) {
        e->tokens -= 1.0;
    } else if (retry_after_s) {
        double wait = (1.0 - e->tokens) / l->rate;
        int s = (int)wait;
        *retry_after_s = s < wait ? s + 1 : s;
        if (*retry_after_s < 1)
            *retry_after_s = 1;
    }
    pthread_mutex_unlock(&l->mu);
    return ok;
}

void loom_rate_limiter_key(const char *slug, const char *remote, char *out, size_t size)
{
    if (slug) {
        snprintf(out, size, "token:%s", slug);
        return;
    }
    /* "1.2.3.4:5678" or "[::1]:5678": the address without the port. */
    const char *r = remote ? remote : "";
    size_t len = strlen(r);
    const char *colon = strrchr(r, ':');
    if (r[0] == '[') {
        const char *close = strchr(r, ']');
        r++;
        len = close ? (size_t)(close - r) : strlen(r);
    } else if (colon) {
        len = (size_t)(colon - r);
    }
    snprintf(out, size, "addr:%.*s", (int)len, r);
}

/* ---- overload bounds ---------------------------------------------------------------- */

void gw_limits_init(loom_gateway_t *gw)
{
    gw->max_waiters = gw->opts.max_waiters > 0 ? gw->opts.max_waiters : LOOM_GATEWAY_MAX_WAITERS;
    gw->max_queue = gw->opts.max_queue > 0 ? gw->opts.max_queue : LOOM_GATEWAY_MAX_QUEUE;
    int64_t target =
        gw->opts.wait_target_ms ? gw->opts.wait_target_ms : LOOM_GATEWAY_WAIT_TARGET_MS;
    gw_wait_limit_init(&gw->wait_limit, gw->max_waiters, LOOM_GATEWAY_MIN_WAITERS, target);
    atomic_init(&gw->waiters, 0);
    atomic_init(&gw->admissions, 0);
    atomic_init(&gw->queued, 0);
    static const char *const what_labels[] = {"bound", NULL};
    gw->shed = loom_metrics_counter(
        gw->metrics, "loom_http_shed_total",
        "Requests refused with 503 OVERLOADED because the gateway held its maximum, by bound "
        "(waiters: LOOM_API_MAX_WAITERS; queue: LOOM_API_MAX_QUEUE).",
        what_labels);
    gw->waiters_gauge = loom_metrics_gauge(gw->metrics, "loom_http_waiters",
                                           "?wait requests held by the gateway.", NULL);
    gw->wait_limit.gauge = loom_metrics_gauge(
        gw->metrics, "loom_http_waiters_limit",
        "?wait requests the gateway holds at most now (LOOM_API_MAX_WAITERS, lowered while "
        "more than one wait in ten takes longer than LOOM_API_WAIT_TARGET).",
        NULL);
    loom_metrics_gauge_set(gw->wait_limit.gauge, NULL, gw->max_waiters);
    gw->wait_ticks =
        loom_metrics_counter(gw->metrics, "loom_http_wait_ticks_total",
                             "Rounds of the ?wait poller that had requests waiting.", NULL);
    gw->wait_queries = loom_metrics_counter(
        gw->metrics, "loom_http_wait_queries_total",
        "Database queries of the ?wait poller (each reads the status of many commands).", NULL);
}

void gw_wait_limit_init(gw_wait_limit_t *l, int max, int min, int64_t target_ms)
{
    memset(l, 0, sizeof(*l));
    pthread_mutex_init(&l->mu, NULL);
    l->max = max;
    l->min = min < max ? min : max;
    l->limit = max;
    if (target_ms > 3600 * 1000LL)
        target_ms = 3600 * 1000LL;
    l->target_ns = target_ms > 0 ? target_ms * 1000000 : 0;
    l->judge_ns = l->target_ns;
    l->light_min_ns = -1;
    for (int i = 0; i < GW_WAIT_BASE_WINDOWS; i++)
        l->base[i] = -1;
    atomic_init(&l->now, max);
}

void gw_wait_limit_destroy(gw_wait_limit_t *l)
{
    pthread_mutex_destroy(&l->mu);
}

int64_t gw_wait_limit_judge(gw_wait_limit_t *l)
{
    pthread_mutex_lock(&l->mu);
    int64_t j = l->judge_ns;
    pthread_mutex_unlock(&l->mu);
    return j;
}

/* A window ended: its quickest light wait, when it had one, joins the base
 * (the last GW_WAIT_BASE_WINDOWS windows that had one: under steady load
 * with none, the base stays rather than expiring), and the judge follows the
 * base; mu held. */
static void base_update(gw_wait_limit_t *l)
{
    if (l->light_min_ns < 0)
        return;
    l->base[l->base_i] = l->light_min_ns;
    l->base_i = (l->base_i + 1) % GW_WAIT_BASE_WINDOWS;
    l->light_min_ns = -1;
    int64_t base = -1;
    for (int i = 0; i < GW_WAIT_BASE_WINDOWS; i++)
        if (l->base[i] >= 0 && (base < 0 || l->base[i] < base))
            base = l->base[i];
    int64_t j = base > 0 ? GW_WAIT_BASE_FACTOR * base : 0;
    l->judge_ns = j > l->target_ns ? j : l->target_ns;
}

int gw_wait_limit_done(gw_wait_limit_t *l, int64_t held_ns, int64_t now_ns, int held, int crowd)
{
    if (!l->target_ns)
        return l->max;
    pthread_mutex_lock(&l->mu);
    if (!l->window_ns)
        l->window_ns = now_ns;
    l->n++;
    if (held_ns > l->judge_ns)
        l->slow++;
    if (held > l->peak)
        l->peak = held;
    /* An unloaded wait: so few held (itself among them) while it waited
     * that no queue of waiters made it longer. */
    int light = l->max / 32 > 1 ? l->max / 32 : 1;
    if (held_ns > 0 && crowd <= light && (l->light_min_ns < 0 || held_ns < l->light_min_ns))
        l->light_min_ns = held_ns;
    /* A window ends with a request that ended after it; one with fewer than
     * four requests says too little and runs on. */
    if (now_ns - l->window_ns >= GW_WAIT_WINDOW_MS * 1000000LL && l->n >= 4) {
        /* More than one in ten took longer than the judge: the bound comes
         * down if the waiters filled half of it; with fewer held, their
         * number is not what made them slow. */
        if (l->slow * 10 > l->n) {
            if (l->peak * 2 >= (int)l->limit)
                l->limit = l->limit * 0.9 > l->min ? l->limit * 0.9 : l->min;
        } else {
            l->limit = l->limit + l->limit / 16 < l->max ? l->limit + l->limit / 16 : l->max;
        }
        l->window_ns = now_ns;
        l->n = 0;
        l->slow = 0;
        l->peak = 0;
        base_update(l);
        if ((int)l->limit != atomic_load(&l->now)) {
            atomic_store(&l->now, (int)l->limit);
            loom_metrics_gauge_set(l->gauge, NULL, (int)l->limit);
        }
    }
    int now = atomic_load(&l->now);
    pthread_mutex_unlock(&l->mu);
    return now;
}

bool gw_waiter_admit(loom_gateway_t *gw, int *held, int64_t *seq)
{
    int n = atomic_fetch_add(&gw->waiters, 1);
    if (n >= atomic_load(&gw->wait_limit.now)) {
        atomic_fetch_sub(&gw->waiters, 1);
        return false;
    }
    *held = n + 1;
    *seq = atomic_fetch_add(&gw->admissions, 1);
    return true;
}

void gw_waiter_release(loom_gateway_t *gw, int64_t held_ns, int held_at_admit, int64_t seq)
{
    int held = atomic_fetch_sub(&gw->waiters, 1);
    if (held_ns < 0)
        return;
    /* Held when it came, plus every one admitted after it: at least the
     * most held at once while it waited. */
    int64_t later = atomic_load(&gw->admissions) - seq - 1;
    int64_t crowd = held_at_admit + (later > 0 ? later : 0);
    gw_wait_limit_done(&gw->wait_limit, held_ns, loom_mono_ns(),
                       held > held_at_admit ? held : held_at_admit,
                       crowd < INT32_MAX ? (int)crowd : INT32_MAX);
}

bool gw_queue_full(loom_gateway_t *gw)
{
    return atomic_load(&gw->queued) >= gw->max_queue;
}

int gw_shed(loom_http_req_t *req, loom_http_res_t *res, const char *what)
{
    gw_req_t *g = gw_req(req);
    loom_gateway_t *gw = g->gw;
    bool waiters = strcmp(what, "waiters") == 0;
    loom_metrics_counter_inc(gw->shed, (const char *[]){what});
    loom_error_t err;
    if (waiters)
        loom_error_set(&err, LOOM_CODE_OVERLOADED,
                       "the gateway holds as many ?wait requests as it can answer in time (%d "
                       "now; LOOM_API_MAX_WAITERS %d, LOOM_API_WAIT_TARGET %lld ms); nothing was "
                       "published, retry later",
                       atomic_load(&gw->wait_limit.now), gw->max_waiters,
                       (long long)(gw->wait_limit.target_ns / 1000000));
    else
        loom_error_set(&err, LOOM_CODE_OVERLOADED,
                       "the gateway holds its maximum of %d queued calls (LOOM_API_MAX_QUEUE); "
                       "retry later",
                       gw->max_queue);
    err.retriable = true; /* loom_gateway_fail adds Retry-After */
    return loom_gateway_fail(req, res, &err);
}
