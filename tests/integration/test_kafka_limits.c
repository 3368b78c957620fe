/*
 * test_kafka_limits.c: Kafka's real size limit on the write path.
 *
 * A production broker keeps message.max.bytes at its default (1048588 bytes,
 * about 1 MiB) while the gateway accepts bodies up to LOOM_API_MAX_BODY
 * (4 MiB). The command topic here is created on the real broker of the
 * harness with that stock limit (the topic's max.message.bytes, which is what
 * a topic inherits from a stock broker), and `loom api` runs as a process:
 * a write under LOOM_API_MAX_BODY but over the topic's limit must get 413
 * PAYLOAD_TOO_LARGE naming the limit, not a 5xx and not a silent drop, and a
 * small write still goes through.
 */
#include "http_client.h"
#include "support.h"
#include "loom/clock.h"
#include "loom/envelope.h"
#include "loom/mem.h"
#include "loom/pglocal.h"

#include <criterion/criterion.h>
#include <librdkafka/rdkafka.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Kafka's default message.max.bytes (and so a topic's max.message.bytes). */
#define STOCK_MAX_MESSAGE_BYTES "1048588"

static void create_topic_with_stock_limit(const char *brokers, const char *topic)
{
    char errbuf[512];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    cr_assert_eq(rd_kafka_conf_set(conf, "bootstrap.servers", brokers, errbuf, sizeof(errbuf)),
                 RD_KAFKA_CONF_OK);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errbuf, sizeof(errbuf));
    cr_assert_not_null(rk, "%s", errbuf);
    rd_kafka_NewTopic_t *nt = rd_kafka_NewTopic_new(topic, 2, -1, errbuf, sizeof(errbuf));
    cr_assert_not_null(nt, "%s", errbuf);
    cr_assert_eq(rd_kafka_NewTopic_set_config(nt, "max.message.bytes", STOCK_MAX_MESSAGE_BYTES), 0);
    rd_kafka_queue_t *q = rd_kafka_queue_new(rk);
    rd_kafka_CreateTopics(rk, &nt, 1, NULL, q);
    rd_kafka_event_t *ev = rd_kafka_queue_poll(q, 60000);
    cr_assert_not_null(ev, "no answer to CreateTopics");
    cr_assert_eq(rd_kafka_event_error(ev), 0, "%s", rd_kafka_event_error_string(ev));
    size_t n = 0;
    const rd_kafka_topic_result_t **res =
        rd_kafka_CreateTopics_result_topics(rd_kafka_event_CreateTopics_result(ev), &n);
    cr_assert_eq(n, 1);
    cr_assert_eq(rd_kafka_topic_result_error(res[0]), 0, "%s",
                 rd_kafka_topic_result_error_string(res[0]));
    rd_kafka_event_destroy(ev);
    rd_kafka_queue_destroy(q);
    rd_kafka_NewTopic_destroy(nt);
    rd_kafka_destroy(rk);
}

/* A batchPut body of about `bytes` bytes: one message with a long random
 * text (the producer compresses with lz4: repeated bytes would shrink). */
static char *put_body(const char *id, size_t bytes)
{
    static const char alnum[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    char *text = loom_xcalloc(1, bytes + 1);
    for (size_t i = 0; i < bytes; i++)
        text[i] = alnum[rand() % 62];
    char *body = loom_xasprintf("{\"msgs\":[{\"id\":\"%s\",\"source\":\"urn:t\",\"specversion\":"
                                "\"1.0\",\"type\":\"t.big\",\"data\":{\"text\":\"%s\"}}]}",
                                id, text);
    free(text);
    return body;
}

Test(kafka_limits, a_write_over_the_topics_stock_limit_gets_413_naming_it, .timeout = 300)
{
    const char *brokers = loom_test_kafka_brokers();
    char url[768], dir[128], tokens[300], alog[300];
    loom_test_db_create(url, sizeof(url));
    snprintf(dir, sizeof(dir), "/tmp/loom-limits-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    chmod(dir, 0755);
    static const char *token = "limits-token-0123456789";
    snprintf(tokens, sizeof(tokens), "%s/tokens", dir);
    loom_test_token_t t[] = {{token, "limits *"}};
    loom_test_tokens_file(tokens, t, 1);

    char prefix[64];
    loom_test_topic_prefix("lim", prefix, sizeof(prefix));
    /* The topic the gateway publishes messages.put_batch to, made before
     * `loom migrate up` (which then leaves it as it is). */
    loom_topic_prefix_set(prefix);
    char topic[300];
    loom_topic_for_command("messages.put_batch", topic, sizeof(topic));
    create_topic_with_stock_limit(brokers, topic);

    int port = loom_free_port();
    char e_db[800], e_k[300], e_p[128], e_l[64], e_t[400];
    snprintf(e_db, sizeof(e_db), "LOOM_DATABASE_URL=%s", url);
    snprintf(e_k, sizeof(e_k), "LOOM_KAFKA_BROKERS=%s", brokers);
    snprintf(e_p, sizeof(e_p), "LOOM_TOPIC_PREFIX=%s", prefix);
    snprintf(e_l, sizeof(e_l), "LOOM_API_LISTEN=127.0.0.1:%d", port);
    snprintf(e_t, sizeof(e_t), "LOOM_API_TOKENS_FILE=%s", tokens);
    const char *env[] = {e_db, e_k, e_p, e_l, e_t, "LOOM_KAFKA_PARTITIONS=2", NULL};
    const char *mig[] = {loom_test_bin(), "migrate", "up", NULL};
    char *out = NULL, *errs = NULL;
    cr_assert_eq(loom_test_run(mig, env, &out, &errs), 0, "loom migrate up: %s", errs);
    free(out);
    free(errs);
    snprintf(alog, sizeof(alog), "%s/api.log", dir);
    const char *aargv[] = {loom_test_bin(), "api", NULL};
    pid_t api = loom_test_spawn_logged(aargv, env, alog);
    cr_assert(loom_test_http_wait_status(port, "/readyz", 200, 60000) == 200,
              "loom api not ready (log %s)", alog);

    /* 2 MiB: under LOOM_API_MAX_BODY (4 MiB), over the topic's 1 MiB. */
    char *big = put_body("big-1", 2u << 20);
    loom_test_http_res_t res = {0};
    loom_test_http(port, "POST", "/v1/messages:batchPut", token, NULL, big, &res);
    free(big);
    cr_assert_eq(res.status, 413, "%d %.300s (log %s)", res.status, res.body, alog);
    cr_assert_str_eq(loom_test_http_error_code(&res), "PAYLOAD_TOO_LARGE", "%.300s", res.body);
    const char *msg =
        json_string_value(json_object_get(json_object_get(res.json, "error"), "message"));
    cr_assert(msg && strstr(msg, "max.message.bytes") && strstr(msg, "1048588") &&
                  strstr(msg, topic),
              "%s", msg ? msg : res.body);
    cr_assert(!json_is_true(json_object_get(json_object_get(res.json, "error"), "retriable")),
              "%.300s", res.body);
    loom_test_http_res_free(&res);

    /* Just under the limit still goes through, and so does a small write. */
    char *fits = put_body("fits-1", 900u << 10);
    loom_test_http(port, "POST", "/v1/messages:batchPut", token, NULL, fits, &res);
    free(fits);
    cr_assert_eq(res.status, 202, "%d %.300s", res.status, res.body);
    loom_test_http_res_free(&res);
    char *small = put_body("small-1", 100);
    loom_test_http(port, "POST", "/v1/messages:batchPut", token, NULL, small, &res);
    free(small);
    cr_assert_eq(res.status, 202, "%d %.300s", res.status, res.body);
    loom_test_http_res_free(&res);

    kill(api, SIGTERM);
    cr_assert_eq(loom_test_wait(api, 60000), 0, "log %s", alog);
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        cr_log_warn("could not remove %s", dir);
}
