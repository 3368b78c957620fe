/*
 * worker.c: starts and stops the consumer threads and the outbox relay.
 */
#include "worker_int.h"
#include "loom/clock.h"
#include "loom/log.h"
#include "loom/mem.h"

#include <stdlib.h>
#include <string.h>

/* A LOOM_* number of the configuration; dflt when it is unset or 0. */
static int64_t cfg_num(const loom_config_t *cfg, const char *name, int64_t dflt)
{
    const loom_config_value_t *v = loom_config_get(cfg, name);
    return v && v->raw && v->num > 0 ? v->num : dflt;
}

int loom_worker_start(const loom_worker_opts_t *opts, loom_worker_t **out, loom_error_t *err)
{
    if (!opts || !opts->brokers || !opts->pool)
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                              "a worker needs Kafka brokers and a database pool");
    loom_worker_t *w = loom_xcalloc(1, sizeof(*w));
    w->opts = *opts;
    if (w->opts.retry_base_ms <= 0)
        w->opts.retry_base_ms = 100;
    if (w->opts.retry_max_ms <= 0)
        w->opts.retry_max_ms = 30000;
    if (w->opts.stall_after_ms <= 0)
        w->opts.stall_after_ms = 30000;
    if (w->opts.apply_threads <= 0)
        w->opts.apply_threads = opts->cfg ? opts->cfg->worker_apply_threads : 4;
    if (w->opts.apply_threads <= 0)
        w->opts.apply_threads = 4;
    const loom_config_t *cfg = opts->cfg;
    if (w->opts.key_concurrency <= 0)
        w->opts.key_concurrency = cfg ? (int)cfg_num(cfg, "LOOM_WORKER_KEY_CONCURRENCY", 256) : 256;
    if (w->opts.max_pending <= 0)
        w->opts.max_pending = cfg ? (int)cfg_num(cfg, "LOOM_WORKER_MAX_PENDING", 10000) : 10000;
    w->max_pending_bytes = cfg ? cfg_num(cfg, "LOOM_WORKER_MAX_PENDING_BYTES", 8 << 20) : 8 << 20;
    if (w->opts.lock_timeout_ms <= 0)
        w->opts.lock_timeout_ms = cfg ? cfg_num(cfg, "LOOM_WORKER_LOCK_TIMEOUT", 5000) : 5000;
    if (w->opts.park_after_ms == 0)
        w->opts.park_after_ms = cfg ? cfg_num(cfg, "LOOM_WORKER_PARK_AFTER", -1) : -1;
    if (!w->opts.group_prefix)
        w->opts.group_prefix = "loom.";
    if (opts->metrics) {
        static const char *const ct[] = {"consumer", "topic", "outcome", NULL};
        static const char *const ctp[] = {"consumer", "topic", "partition", NULL};
        static const char *const c[] = {"consumer", NULL};
        w->m_messages = loom_metrics_counter(
            opts->metrics, "loom_consumer_messages_total",
            "Messages handled by consumers, by outcome (applied, skipped, rejected, retried).", ct);
        w->m_lag = loom_metrics_gauge(opts->metrics, "loom_consumer_lag",
                                      "Messages waiting in a partition (high watermark minus "
                                      "position).",
                                      ctp);
        w->m_stalled = loom_metrics_gauge(
            opts->metrics, "loom_consumer_stalled_partitions",
            "Partitions whose lag stays above zero while no message arrives.", c);
        w->m_retrying = loom_metrics_gauge(
            opts->metrics, "loom_consumer_retrying_partitions",
            "Partitions paused on a command that fails transiently (stuck commands).", c);
        w->m_relayed = loom_metrics_counter(opts->metrics, "loom_outbox_relayed_total",
                                            "Outbox messages sent to Kafka.", NULL);
    }
    w->n_consumers = opts->n_consumers;
    w->consumers = loom_xcalloc(w->n_consumers + 1, sizeof(*w->consumers));
    for (size_t i = 0; i < w->n_consumers; i++) {
        worker_consumer_t *c = &w->consumers[i];
        c->w = w;
        c->def = &opts->consumers[i];
        pthread_mutex_init(&c->report_mu, NULL);
        if (pthread_create(&c->thread, NULL, loom__consumer_run, c) != 0) {
            loom_worker_stop(w);
            loom_worker_free(w);
            return loom_error_set(err, LOOM_CODE_INTERNAL, "could not start a consumer thread");
        }
        c->started = true;
    }
    if (opts->producer) {
        if (pthread_create(&w->relay_thread, NULL, loom__outbox_relay_run, w) != 0) {
            loom_worker_stop(w);
            loom_worker_free(w);
            return loom_error_set(err, LOOM_CODE_INTERNAL, "could not start the outbox relay");
        }
        w->relay_started = true;
    }
    LOOM_INFO("worker started", "consumers=%zu outbox_relay=%s", w->n_consumers,
              opts->producer ? "on" : "off");
    *out = w;
    return 0;
}

void loom_worker_stop(loom_worker_t *w)
{
    if (!w || w->stopped)
        return;
    atomic_store(&w->stop, 1);
    for (size_t i = 0; i < w->n_consumers; i++)
        if (w->consumers[i].started)
            pthread_join(w->consumers[i].thread, NULL);
    if (w->relay_started)
        pthread_join(w->relay_thread, NULL);
    w->stopped = true;
    LOOM_INFO("worker stopped", "applied=%lld rejected=%lld retries=%lld",
              (long long)atomic_load(&w->applied), (long long)atomic_load(&w->rejected),
              (long long)atomic_load(&w->retries));
}

void loom_worker_free(loom_worker_t *w)
{
    if (!w)
        return;
    loom_worker_stop(w);
    for (size_t i = 0; i < w->n_consumers; i++) {
        json_decref(w->consumers[i].parts);
        pthread_mutex_destroy(&w->consumers[i].report_mu);
    }
    free(w->consumers);
    free(w);
}

const char *const loom__outcome_names[OUT_N] = {
    [OUT_APPLIED] = "applied", [OUT_REJECTED] = "rejected", [OUT_RETRIED] = "retried",
    [OUT_SKIPPED] = "skipped", [OUT_PARKED] = "parked",     [OUT_EXPIRED] = "expired"};

json_t *loom_worker_report(loom_worker_t *w)
{
    int64_t now = loom_now_us();
    double secs = w->reported_us > 0 ? (double)(now - w->reported_us) / 1e6 : 0;
    json_t *list = json_array();
    for (size_t i = 0; i < w->n_consumers; i++) {
        worker_consumer_t *c = &w->consumers[i];
        json_t *counts = json_object(), *rates = json_object();
        for (int k = 0; k < OUT_N; k++) {
            long long n = atomic_load_explicit(&c->outcomes[k], memory_order_relaxed);
            json_object_set_new(counts, loom__outcome_names[k], json_integer(n));
            /* Per second since the last report: a rate needs two of them. */
            if (secs > 0.5)
                json_object_set_new(rates, loom__outcome_names[k],
                                    json_real((double)(n - c->reported[k]) / secs));
            c->reported[k] = n;
        }
        pthread_mutex_lock(&c->report_mu);
        json_t *parts = c->parts ? json_deep_copy(c->parts) : json_array();
        pthread_mutex_unlock(&c->report_mu);
        json_array_append_new(list,
                              json_pack("{s:s, s:o, s:o, s:o}", "name", c->def->name, "counts",
                                        counts, "per_s", rates, "partitions", parts));
    }
    w->reported_us = now;
    return json_pack("{s:o}", "consumers", list);
}

void loom_worker_stats(loom_worker_t *w, loom_worker_stats_t *out)
{
    out->applied = atomic_load(&w->applied);
    out->skipped = atomic_load(&w->skipped);
    out->unprobed = atomic_load(&w->unprobed);
    out->reprobed = atomic_load(&w->reprobed);
    out->rejected = atomic_load(&w->rejected);
    out->retries = atomic_load(&w->retries);
    out->relayed = atomic_load(&w->relayed);
    out->stalls = atomic_load(&w->stalls);
    out->parked = atomic_load(&w->parked);
    out->expired = atomic_load(&w->expired);
}
