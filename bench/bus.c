/*
 * bus.c: publish rate through Loom's producer (CloudEvents envelope, headers,
 * delivery reports) against a raw librdkafka producer with the same settings
 * and payload, on the same broker, in the same run.
 *
 *   bench_bus BROKERS [MESSAGES] [PAYLOAD_BYTES]
 *
 * Prints one line per figure and the ratio Loom / raw; then the CPU time the
 * process spent per message (all its threads, librdkafka's included), which
 * on a shared, busy machine says more about the envelope's cost than a rate
 * that moves with the other processes' load. Both producers get the same
 * configuration and serve their delivery reports from a thread of their own.
 * Last, the raw producer once more with the envelope's headers on every
 * message (headers_only_*): the share of the headers in the envelope's cost.
 */
#include "loom/bus.h"
#include "loom/clock.h"
#include "loom/uuid.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

static atomic_long acked, failed;
static double last_cpu_s; /* CPU seconds of the last rate measured */

static double cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_stime.tv_sec +
           ((double)ru.ru_utime.tv_usec + (double)ru.ru_stime.tv_usec) / 1e6;
}

static void on_delivery(void *opaque, const loom_error_t *err, int32_t p, int64_t o)
{
    (void)opaque;
    (void)p;
    (void)o;
    if (err)
        atomic_fetch_add(&failed, 1);
    else
        atomic_fetch_add(&acked, 1);
}

static void raw_dr(rd_kafka_t *rk, const rd_kafka_message_t *rkm, void *opaque)
{
    (void)rk;
    (void)opaque;
    if (rkm->err)
        atomic_fetch_add(&failed, 1);
    else
        atomic_fetch_add(&acked, 1);
}

struct poller {
    rd_kafka_t *rk;
    atomic_int stop;
};

/* Serves the raw producer's delivery reports from a thread of its own, as
 * Loom's producer does: the sending thread only produces. */
static void *raw_poll_thread(void *arg)
{
    struct poller *pl = arg;
    while (!atomic_load(&pl->stop))
        rd_kafka_poll(pl->rk, 100);
    return NULL;
}

/* A raw librdkafka producer with the configuration Loom's producer gets
 * (bootstrap, log level, Nagle off; then Loom's defaults: idempotence,
 * acks=all, queue bound, lz4, message.max.bytes, linger 5 ms). With hdrs,
 * every message carries a copy of them (the envelope's headers, made
 * beforehand), to tell their cost apart from the rest of the envelope. */
static double raw_rate(const char *brokers, const char *topic, long n, const char *payload,
                       const rd_kafka_headers_t *hdrs)
{
    char errstr[256];
    rd_kafka_conf_t *conf = loom_kafka_conf_new(brokers, NULL, errstr, sizeof(errstr));
    const char *kv[][2] = {{"enable.idempotence", "true"},
                           {"acks", "all"},
                           {"queue.buffering.max.messages", "100000"},
                           {"compression.codec", "lz4"},
                           {"message.max.bytes", LOOM_KAFKA_MESSAGE_MAX},
                           {"linger.ms", "5"}};
    for (size_t i = 0; conf && i < sizeof(kv) / sizeof(kv[0]); i++)
        rd_kafka_conf_set(conf, kv[i][0], kv[i][1], NULL, 0);
    rd_kafka_t *rk = NULL;
    if (conf) {
        rd_kafka_conf_set_dr_msg_cb(conf, raw_dr);
        rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    }
    if (!rk) {
        fprintf(stderr, "bench_bus: %s\n", errstr);
        exit(1);
    }
    atomic_store(&acked, 0);
    atomic_store(&failed, 0);
    struct poller pl = {.rk = rk};
    pthread_t th;
    if (pthread_create(&th, NULL, raw_poll_thread, &pl) != 0) {
        fprintf(stderr, "bench_bus: could not start the poll thread\n");
        exit(1);
    }
    size_t plen = strlen(payload);
    double c0 = cpu_s();
    int64_t t0 = loom_mono_ns();
    for (long i = 0; i < n; i++) {
        char key[40];
        loom_uuid_v7_string(key);
        rd_kafka_headers_t *h = hdrs ? rd_kafka_headers_copy(hdrs) : NULL;
        for (;;) {
            rd_kafka_resp_err_t e =
                rd_kafka_producev(rk, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_KEY(key, strlen(key)),
                                  RD_KAFKA_V_VALUE((void *)payload, plen), RD_KAFKA_V_HEADERS(h),
                                  RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END);
            if (e == RD_KAFKA_RESP_ERR_NO_ERROR)
                break;
            loom_sleep_ms(1); /* queue full: the poll thread drains it */
        }
    }
    rd_kafka_flush(rk, 120000);
    double secs = (double)(loom_mono_ns() - t0) / 1e9;
    last_cpu_s = cpu_s() - c0;
    atomic_store(&pl.stop, 1);
    pthread_join(th, NULL);
    rd_kafka_destroy(rk);
    if (atomic_load(&acked) != n)
        fprintf(stderr, "bench_bus: raw: %ld of %ld acknowledged\n", atomic_load(&acked), n);
    return (double)atomic_load(&acked) / secs;
}

static double loom_rate(const char *brokers, const char *topic, long n, const char *payload)
{
    loom_producer_t *p;
    loom_error_t err;
    loom_producer_opts_t o = {.brokers = brokers};
    if (loom_producer_new(&o, &p, &err) != 0) {
        fprintf(stderr, "bench_bus: %s\n", err.message);
        exit(1);
    }
    atomic_store(&acked, 0);
    atomic_store(&failed, 0);
    loom_arena_t a;
    loom_arena_init(&a, 0);
    double c0 = cpu_s();
    int64_t t0 = loom_mono_ns();
    for (long i = 0; i < n; i++) {
        loom_ce_t ce;
        loom_ce_init(&ce, &a, "bench", "bench", "bench.publish");
        ce.data = payload;
        ce.data_len = strlen(payload);
        while (loom_producer_send(p, topic, ce.id, strlen(ce.id), &ce, on_delivery, NULL, &err) !=
               0)
            loom_sleep_ms(1);
        loom_arena_reset(&a);
    }
    loom_producer_flush(p, 120000);
    double secs = (double)(loom_mono_ns() - t0) / 1e9;
    last_cpu_s = cpu_s() - c0;
    loom_producer_free(p);
    loom_arena_release(&a);
    if (atomic_load(&acked) != n)
        fprintf(stderr, "bench_bus: loom: %ld of %ld acknowledged\n", atomic_load(&acked), n);
    return (double)atomic_load(&acked) / secs;
}

int main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--help") == 0) {
        fprintf(stderr, "usage: bench_bus BROKERS [MESSAGES] [PAYLOAD_BYTES]\n");
        return 2;
    }
    const char *brokers = argv[1];
    long n = argc > 2 ? atol(argv[2]) : 200000;
    int size = argc > 3 ? atoi(argv[3]) : 200;
    char *payload = malloc((size_t)size + 1);
    snprintf(payload, (size_t)size + 1, "{\"pad\":\"");
    for (int i = (int)strlen(payload); i < size - 2; i++)
        payload[i] = 'x';
    payload[size - 2] = '"';
    payload[size - 1] = '}';
    payload[size] = '\0';
    char t1[64], t2[64];
    snprintf(t1, sizeof(t1), "bench.raw.%lld", (long long)loom_now_ms());
    snprintf(t2, sizeof(t2), "bench.loom.%lld", (long long)loom_now_ms());
    /* The envelope's headers of one message, for the raw producer that
     * sends them (made once; each message gets a copy). */
    loom_arena_t ha;
    loom_arena_init(&ha, 0);
    loom_ce_t hce;
    loom_ce_init(&hce, &ha, "bench", "bench", "bench.publish");
    rd_kafka_headers_t *hdrs = loom_ce_headers(&hce);
    /* BENCH_BUS_ONLY=raw|loom|headers runs one half alone (to profile it). */
    const char *only = getenv("BENCH_BUS_ONLY");
    bool do_raw = !only || strcmp(only, "raw") == 0;
    bool do_loom = !only || strcmp(only, "loom") == 0;
    bool do_hdrs = !only || strcmp(only, "headers") == 0;
    /* warm up the connection and topic metadata */
    if (do_raw || do_hdrs)
        raw_rate(brokers, t1, n / 20 + 1, payload, NULL);
    if (do_loom)
        loom_rate(brokers, t2, n / 20 + 1, payload);
    double raw = do_raw ? raw_rate(brokers, t1, n, payload, NULL) : 0;
    double raw_cpu = last_cpu_s;
    double lm = do_loom ? loom_rate(brokers, t2, n, payload) : 0;
    double lm_cpu = last_cpu_s;
    double hd = do_hdrs ? raw_rate(brokers, t1, n, payload, hdrs) : 0;
    double hd_cpu = last_cpu_s;
    printf("publish_raw_msgs_per_s %.0f\n", raw);
    printf("publish_loom_msgs_per_s %.0f\n", lm);
    printf("publish_ratio %.2f\n", raw > 0 ? lm / raw : 0);
    printf("publish_raw_cpu_us_per_msg %.2f\n", raw_cpu * 1e6 / (double)n);
    printf("publish_loom_cpu_us_per_msg %.2f\n", lm_cpu * 1e6 / (double)n);
    printf("publish_cpu_ratio %.2f\n", lm_cpu > 0 ? raw_cpu / lm_cpu : 0);
    /* The raw producer carrying the envelope's headers: what the headers
     * cost by themselves (copying, serializing and compressing them). */
    printf("headers_only_msgs_per_s %.0f\n", hd);
    printf("headers_only_cpu_us_per_msg %.2f\n", hd_cpu * 1e6 / (double)n);
    printf("headers_only_cpu_ratio %.2f\n", lm_cpu > 0 ? hd_cpu / lm_cpu : 0);
    rd_kafka_headers_destroy(hdrs);
    loom_arena_release(&ha);
    free(payload);
    return 0;
}
