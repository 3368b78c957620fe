/*
 * Configuration: every variable with a good value, a bad value and unset;
 * errors are one line naming the variable, the value and what is allowed;
 * secrets are redacted; LOOM_KAFKA_* passes through to librdkafka.
 */
#include "loom/config.h"
#include "loom/error.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

typedef struct {
    const char *name;
    const char *good;
    const char *bad;
    const char *allowed_hint; /* a piece of the error text */
} case_t;

static const case_t cases[] = {
    {"LOOM_DATABASE_URL", "postgresql://loom@127.0.0.1:5432/loom", "postgresql://h:notaport/x",
     "libpq"},
    {"LOOM_DATABASE_READ_URL", "host=replica port=5432 dbname=loom", "host=a bogus_key=1", "libpq"},
    {"LOOM_DATABASE_POOL_SIZE", "16", "0", "from 1 to 256"},
    {"LOOM_WORKER_APPLY_THREADS", "2", "65", "from 1 to 64"},
    {"LOOM_WORKER_KEY_CONCURRENCY", "64", "0", "from 1 to 100000"},
    {"LOOM_WORKER_MAX_PENDING", "5000", "99", "from 100 to 1000000"},
    {"LOOM_WORKER_MAX_PENDING_BYTES", "4194304", "1000", "from 1048576"},
    {"LOOM_WORKER_LOCK_TIMEOUT", "2s", "forever", "duration"},
    {"LOOM_WORKER_PARK_AFTER", "10m", "1ms", "from 1s"},
    {"LOOM_COMMANDS_RETENTION", "30d", "30m", "from 1h"},
    {"LOOM_WORKER_LISTEN", "0.0.0.0:9091", "9091", "host:port"},
    {"LOOM_KAFKA_BROKERS", "127.0.0.1:9092,kafka-2:9093", "kafka:", "host:port"},
    {"LOOM_KAFKA_PARTITIONS", "24", "twelve", "from 1 to 10000"},
    {"LOOM_KAFKA_REPLICATION_FACTOR", "3", "-1", "from 0 to 32"},
    {"LOOM_KAFKA_MIN_INSYNC_REPLICAS", "2", "33", "from 0 to 32"},
    {"LOOM_TOPIC_PREFIX", "staging-eu", "Staging.EU", "a-z, 0-9"},
    {"LOOM_API_LISTEN", "0.0.0.0:8080,[::1]:8081", "localhost:99999", "host:port"},
    {"LOOM_API_THREADS", "4", "-1", "from 0 to 64"},
    {"LOOM_API_MAX_BODY", "1048576", "1k", "from 1024 to 1073741824"},
    {"LOOM_API_MAX_CONNECTIONS", "512", "0", "from 1 to 1000000"},
    {"LOOM_API_RATE_LIMIT", "100", "-1", "from 0 to 1000000"},
    {"LOOM_API_RATE_BURST", "200", "x", "from 0 to 10000000"},
    {"LOOM_API_MAX_WAITERS", "500", "0", "from 1 to 1000000"},
    {"LOOM_API_MAX_QUEUE", "2048", "x", "from 1 to 1000000"},
    {"LOOM_API_ACCESS_LOG", "off", "no", "one of on, off"},
    {"LOOM_API_OP_PIPELINE", "off", "yes", "one of on, off"},
    {"LOOM_API_WAIT_TARGET", "20ms", "fast", "duration"},
    {"LOOM_API_HEADER_TIMEOUT", "5s", "5", "duration"},
    {"LOOM_API_IDLE_TIMEOUT", "2m", "forever", "duration"},
    {"LOOM_NODE_ID", "0191B2C4-7E1F-7A3B-9C1D-2E3F4A5B6C7D", "node-1", "UUID"},
    {"LOOM_SITE_NAME", "eu-west-1", "EU West", "a-z, 0-9"},
    {"LOOM_SITE_KEY", "s3cret", "", "non-empty"},
    {"LOOM_LOG_LEVEL", "debug", "verbose", "one of debug, info, warn, error"},
    {"LOOM_LOG_FORMAT", "json", "xml", "one of text, json"},
    {"LOOM_API_TOKENS_FILE", "/etc/hostname", "/nonexistent/tokens", "readable file"},
    {"LOOM_API_TOKEN", "tok_0123456789abcdef", "", "non-empty"},
    {"LOOM_DEV_DIR", "/tmp/loom-dev", "", "non-empty"},
    {"LOOM_SHUTDOWN_TIMEOUT", "1m30s", "30 seconds", "duration"},
};
#define N_CASES (sizeof(cases) / sizeof(cases[0]))

static int load1(loom_config_t *cfg, const char *entry, char *errbuf, size_t n)
{
    char *env[] = {(char *)entry, NULL};
    return loom_config_load(cfg, env, NULL, 0, errbuf, n);
}

Test(config, every_engine_variable_has_a_case)
{
    for (size_t i = 0; i < loom_config_engine_nvars; i++) {
        bool found = false;
        for (size_t j = 0; j < N_CASES; j++)
            found |= strcmp(cases[j].name, loom_config_engine_vars[i].name) == 0;
        cr_expect(found, "%s has no test case", loom_config_engine_vars[i].name);
        cr_expect_gt(strlen(loom_config_engine_vars[i].help), 5);
    }
}

Test(config, good_values_load)
{
    for (size_t i = 0; i < N_CASES; i++) {
        char entry[256], errbuf[512] = "";
        snprintf(entry, sizeof(entry), "%s=%s", cases[i].name, cases[i].good);
        loom_config_t cfg;
        cr_assert_eq(load1(&cfg, entry, errbuf, sizeof(errbuf)), 0, "%s: %s", entry, errbuf);
        const loom_config_value_t *v = loom_config_get(&cfg, cases[i].name);
        cr_assert_not_null(v);
        cr_assert(v->from_env);
        cr_assert_str_eq(v->raw, cases[i].good);
        loom_config_release(&cfg);
    }
}

Test(config, bad_values_stop_with_one_line_naming_variable_value_and_allowed)
{
    for (size_t i = 0; i < N_CASES; i++) {
        char entry[256], errbuf[512] = "";
        snprintf(entry, sizeof(entry), "%s=%s", cases[i].name, cases[i].bad);
        loom_config_t cfg;
        cr_assert_eq(load1(&cfg, entry, errbuf, sizeof(errbuf)), LOOM_ECONFIG, "%s loaded", entry);
        char head[300];
        bool secret = strcmp(cases[i].name, "LOOM_SITE_KEY") == 0 ||
                      strcmp(cases[i].name, "LOOM_API_TOKEN") == 0;
        snprintf(head, sizeof(head), "invalid %s=\"%s\": expected ", cases[i].name,
                 secret ? "[redacted]" : cases[i].bad);
        cr_expect(strncmp(errbuf, head, strlen(head)) == 0, "got: %s", errbuf);
        cr_expect(strstr(errbuf, cases[i].allowed_hint), "%s lacks \"%s\"", errbuf,
                  cases[i].allowed_hint);
        cr_expect_null(strchr(errbuf, '\n'), "more than one line: %s", errbuf);
    }
}

Test(config, missing_values_take_defaults)
{
    loom_config_t cfg;
    char errbuf[256];
    char *env[] = {NULL};
    cr_assert_eq(loom_config_load(&cfg, env, NULL, 0, errbuf, sizeof(errbuf)), 0);
    cr_assert_null(cfg.database_url);
    cr_assert_null(cfg.database_read_url);
    cr_assert_null(cfg.kafka_brokers);
    cr_assert_null(cfg.site_key);
    cr_assert_null(cfg.api_tokens_file);
    cr_assert_eq(cfg.database_pool_size, 8);
    cr_assert_eq(cfg.kafka_partitions, 12);
    cr_assert_str_eq(cfg.api_listen, "127.0.0.1:8080");
    cr_assert_str_eq(cfg.site_name, "local");
    cr_assert_str_eq(cfg.log_level, "info");
    cr_assert_str_eq(cfg.log_format, "text");
    cr_assert_str_eq(cfg.dev_dir, "./.loom");
    cr_assert_eq(cfg.shutdown_timeout_ms, 30000);
    cr_assert_eq(strlen(cfg.node_id), 36, "a random node id when unset");
    loom_config_release(&cfg);
}

Test(config, typed_fields_follow_the_environment)
{
    char *env[] = {"LOOM_DATABASE_POOL_SIZE=3", "LOOM_SHUTDOWN_TIMEOUT=1m30s",
                   "LOOM_NODE_ID=0191B2C4-7E1F-7A3B-9C1D-2E3F4A5B6C7D", NULL};
    loom_config_t cfg;
    char errbuf[256];
    cr_assert_eq(loom_config_load(&cfg, env, NULL, 0, errbuf, sizeof(errbuf)), 0, "%s", errbuf);
    cr_assert_eq(cfg.database_pool_size, 3);
    cr_assert_eq(cfg.shutdown_timeout_ms, 90000);
    cr_assert_str_eq(cfg.node_id, "0191b2c4-7e1f-7a3b-9c1d-2e3f4a5b6c7d");
    loom_config_release(&cfg);
}

Test(config, secrets_are_redacted_in_errors_and_print)
{
    char *env[] = {"LOOM_DATABASE_URL=postgresql://app:hunter2@db:5432/loom",
                   "LOOM_DATABASE_READ_URL=host=replica password=hunter3 dbname=loom",
                   "LOOM_SITE_KEY=hunter4",
                   "LOOM_KAFKA_SASL_PASSWORD=hunter5",
                   "LOOM_KAFKA_SASL_MECHANISMS=PLAIN",
                   NULL};
    loom_config_t cfg;
    char errbuf[256];
    cr_assert_eq(loom_config_load(&cfg, env, NULL, 0, errbuf, sizeof(errbuf)), 0, "%s", errbuf);
    char *out = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&out, &len);
    loom_config_print(&cfg, f);
    fclose(f);
    cr_assert_null(strstr(out, "hunter"), "a secret leaked:\n%s", out);
    cr_assert(strstr(out, "LOOM_DATABASE_URL=postgresql://app:[redacted]@db:5432/loom"), "%s", out);
    cr_assert(strstr(out, "password=[redacted]"), "%s", out);
    cr_assert(strstr(out, "LOOM_KAFKA_SASL_MECHANISMS=PLAIN"), "%s", out);
    cr_assert(strstr(out, "librdkafka sasl.mechanisms"), "%s", out);
    free(out);
    loom_config_release(&cfg);

    char *bad[] = {"LOOM_SITE_KEY=", NULL};
    cr_assert_neq(loom_config_load(&cfg, bad, NULL, 0, errbuf, sizeof(errbuf)), 0);
    char *bad_url[] = {"LOOM_DATABASE_URL=postgresql://app:hunter2@db:notaport/x", NULL};
    cr_assert_neq(loom_config_load(&cfg, bad_url, NULL, 0, errbuf, sizeof(errbuf)), 0);
    cr_assert_null(strstr(errbuf, "hunter2"), "%s", errbuf);
}

Test(config, kafka_properties_pass_through_and_are_checked_by_librdkafka)
{
    char *env[] = {"LOOM_KAFKA_SASL_MECHANISMS=SCRAM-SHA-512",
                   "LOOM_KAFKA_SOCKET_KEEPALIVE_ENABLE=true", NULL};
    loom_config_t cfg;
    char errbuf[512];
    cr_assert_eq(loom_config_load(&cfg, env, NULL, 0, errbuf, sizeof(errbuf)), 0, "%s", errbuf);
    cr_assert_eq(cfg.n_kafka_props, 2);
    cr_assert_str_eq(cfg.kafka_props[0].key, "sasl.mechanisms");
    cr_assert_str_eq(cfg.kafka_props[0].value, "SCRAM-SHA-512");
    cr_assert_str_eq(cfg.kafka_props[1].key, "socket.keepalive.enable");
    loom_config_release(&cfg);

    char *bad[] = {"LOOM_KAFKA_NO_SUCH_PROPERTY=1", NULL};
    cr_assert_eq(loom_config_load(&cfg, bad, NULL, 0, errbuf, sizeof(errbuf)), LOOM_ECONFIG);
    cr_assert(strstr(errbuf, "invalid LOOM_KAFKA_NO_SUCH_PROPERTY=\"1\""), "%s", errbuf);
    cr_assert(strstr(errbuf, "no.such.property"), "%s", errbuf);

    char *badval[] = {"LOOM_KAFKA_SOCKET_KEEPALIVE_ENABLE=perhaps", NULL};
    cr_assert_eq(loom_config_load(&cfg, badval, NULL, 0, errbuf, sizeof(errbuf)), LOOM_ECONFIG);
    cr_assert(strstr(errbuf, "LOOM_KAFKA_SOCKET_KEEPALIVE_ENABLE"), "%s", errbuf);
}

Test(config, unknown_loom_variables_are_listed)
{
    char *env[] = {"LOOM_DATABSE_URL=x", "PATH=/bin", "LOOM_TEST_DATABASE_URL=y", NULL};
    loom_config_t cfg;
    char errbuf[256];
    cr_assert_eq(loom_config_load(&cfg, env, NULL, 0, errbuf, sizeof(errbuf)), 0);
    cr_assert_eq(cfg.n_unknown, 1);
    cr_assert_str_eq(cfg.unknown[0], "LOOM_DATABSE_URL");
    loom_config_release(&cfg);
}

Test(config, services_add_variables_with_the_same_checks)
{
    static const loom_config_var_t extra[] = {
        {"LOOM_MESSAGES_RETENTION", LOOM_CFG_DURATION, "168h", NULL, 1000, 3650LL * 86400000, false,
         "how long messages are kept"},
    };
    char *env[] = {NULL};
    loom_config_t cfg;
    char errbuf[256];
    cr_assert_eq(loom_config_load(&cfg, env, extra, 1, errbuf, sizeof(errbuf)), 0);
    cr_assert_eq(loom_config_get(&cfg, "LOOM_MESSAGES_RETENTION")->num, 168LL * 3600 * 1000);
    loom_config_release(&cfg);

    char *bad[] = {"LOOM_MESSAGES_RETENTION=10ms", NULL};
    cr_assert_eq(loom_config_load(&cfg, bad, extra, 1, errbuf, sizeof(errbuf)), LOOM_ECONFIG);
    cr_assert(strstr(errbuf, "from 1s to 87600h"), "%s", errbuf);
}
