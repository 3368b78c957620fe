/*
 * Both Kafka endpoints of the harness answer real Kafka protocol through
 * librdkafka: the in-process mock cluster and a real Apache Kafka broker.
 * A message with CloudEvents-style headers goes in and comes back out of a
 * consumer group unchanged.
 */
#include "support.h"
#include "loom/clock.h"

#include <criterion/criterion.h>
#include <string.h>

static rd_kafka_t *new_client(rd_kafka_type_t type, const char *brokers, const char *group)
{
    char errstr[512];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    cr_assert_eq(rd_kafka_conf_set(conf, "bootstrap.servers", brokers, errstr, sizeof(errstr)),
                 RD_KAFKA_CONF_OK, "%s", errstr);
    rd_kafka_conf_set(conf, "log_level", "4", NULL, 0);
    if (type == RD_KAFKA_PRODUCER) {
        cr_assert_eq(rd_kafka_conf_set(conf, "enable.idempotence", "true", errstr, sizeof(errstr)),
                     RD_KAFKA_CONF_OK, "%s", errstr);
        rd_kafka_conf_set(conf, "acks", "all", NULL, 0);
    } else {
        rd_kafka_conf_set(conf, "group.id", group, NULL, 0);
        rd_kafka_conf_set(conf, "auto.offset.reset", "earliest", NULL, 0);
        rd_kafka_conf_set(conf, "enable.auto.commit", "false", NULL, 0);
    }
    rd_kafka_t *rk = rd_kafka_new(type, conf, errstr, sizeof(errstr));
    cr_assert_not_null(rk, "%s", errstr);
    return rk;
}

static const char *header(rd_kafka_message_t *rkm, const char *name, char *buf, size_t size)
{
    rd_kafka_headers_t *hdrs = NULL;
    const void *val;
    size_t len;
    if (rd_kafka_message_headers(rkm, &hdrs) != RD_KAFKA_RESP_ERR_NO_ERROR ||
        rd_kafka_header_get_last(hdrs, name, &val, &len) != RD_KAFKA_RESP_ERR_NO_ERROR)
        return NULL;
    snprintf(buf, size, "%.*s", (int)len, (const char *)val);
    return buf;
}

static void round_trip(const char *brokers)
{
    char topic[96], group[96];
    loom_test_unique_name("loom.test.roundtrip", topic, sizeof(topic));
    loom_test_unique_name("loom.test.group", group, sizeof(group));

    rd_kafka_t *producer = new_client(RD_KAFKA_PRODUCER, brokers, NULL);
    const char *payload = "{\"hello\":\"world\"}";
    rd_kafka_resp_err_t err =
        rd_kafka_producev(producer, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_KEY("stream-1", 8),
                          RD_KAFKA_V_VALUE((void *)payload, strlen(payload)),
                          RD_KAFKA_V_HEADER("ce_specversion", "1.0", -1),
                          RD_KAFKA_V_HEADER("ce_id", "0191b2c4-7e1f-7a3b-9c1d-2e3f4a5b6c7d", -1),
                          RD_KAFKA_V_HEADER("ce_type", "test.round_trip", -1),
                          RD_KAFKA_V_HEADER("content-type", "application/json", -1),
                          RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END);
    cr_assert_eq(err, RD_KAFKA_RESP_ERR_NO_ERROR, "%s", rd_kafka_err2str(err));
    err = rd_kafka_flush(producer, 60000);
    cr_assert_eq(err, RD_KAFKA_RESP_ERR_NO_ERROR, "flush: %s", rd_kafka_err2str(err));
    rd_kafka_destroy(producer);

    rd_kafka_t *consumer = new_client(RD_KAFKA_CONSUMER, brokers, group);
    rd_kafka_poll_set_consumer(consumer);
    rd_kafka_topic_partition_list_t *subs = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(subs, topic, RD_KAFKA_PARTITION_UA);
    cr_assert_eq(rd_kafka_subscribe(consumer, subs), RD_KAFKA_RESP_ERR_NO_ERROR);
    rd_kafka_topic_partition_list_destroy(subs);

    rd_kafka_message_t *got = NULL;
    int64_t deadline = loom_mono_ms() + 60000;
    while (!got && loom_mono_ms() < deadline) {
        rd_kafka_message_t *rkm = rd_kafka_consumer_poll(consumer, 500);
        if (!rkm)
            continue;
        if (rkm->err) {
            rd_kafka_message_destroy(rkm);
            continue;
        }
        got = rkm;
    }
    cr_assert_not_null(got, "no message came back from %s within 60 s", brokers);
    cr_assert_str_eq(rd_kafka_topic_name(got->rkt), topic);
    cr_assert_eq(got->key_len, 8);
    cr_assert_eq(memcmp(got->key, "stream-1", 8), 0);
    cr_assert_eq(got->len, strlen(payload));
    cr_assert_eq(memcmp(got->payload, payload, got->len), 0);
    char buf[128];
    cr_assert_str_eq(header(got, "ce_id", buf, sizeof(buf)),
                     "0191b2c4-7e1f-7a3b-9c1d-2e3f4a5b6c7d");
    cr_assert_str_eq(header(got, "ce_type", buf, sizeof(buf)), "test.round_trip");
    cr_assert_str_eq(header(got, "content-type", buf, sizeof(buf)), "application/json");
    cr_assert_eq(rd_kafka_commit_message(consumer, got, 0), RD_KAFKA_RESP_ERR_NO_ERROR);
    rd_kafka_message_destroy(got);
    rd_kafka_consumer_close(consumer);
    rd_kafka_destroy(consumer);
}

Test(kafka, mock_cluster_round_trip, .timeout = 120)
{
    rd_kafka_mock_cluster_t *mc;
    const char *bootstraps;
    rd_kafka_t *owner = loom_test_mock_cluster(3, &mc, &bootstraps);
    round_trip(bootstraps);
    rd_kafka_mock_cluster_destroy(mc);
    rd_kafka_destroy(owner);
}

Test(kafka, real_apache_kafka_broker_round_trip, .timeout = 180)
{
    round_trip(loom_test_kafka_brokers());
}

Test(kafka, real_broker_answers_metadata, .timeout = 60)
{
    rd_kafka_t *rk = new_client(RD_KAFKA_PRODUCER, loom_test_kafka_brokers(), NULL);
    const struct rd_kafka_metadata *md = NULL;
    rd_kafka_resp_err_t err = rd_kafka_metadata(rk, 1, NULL, &md, 30000);
    cr_assert_eq(err, RD_KAFKA_RESP_ERR_NO_ERROR, "%s", rd_kafka_err2str(err));
    cr_assert_eq(md->broker_cnt, 1);
    cr_assert_str_eq(md->brokers[0].host, "127.0.0.1");
    rd_kafka_metadata_destroy(md);
    rd_kafka_destroy(rk);
}
