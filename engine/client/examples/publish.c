/*
 * loom_client_example: publishes one command with libloom-client.
 *
 *   loom_client_example BROKERS TYPE KEY JSON
 *   loom_client_example localhost:9092 orders.place order-1 '{"qty":2}'
 *
 * Prints the command id and where it landed, or the error on stderr and
 * exits 1. LOOM_TOPIC_PREFIX (default "loom") sets the topic prefix:
 * the command goes to <prefix>.cmd.<SERVICE>, the service being the type up to
 * its first dot.
 */
#include <loom/client.h>

#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s BROKERS TYPE KEY JSON\n", argv[0]);
        return 2;
    }
    const char *timeout = getenv("LOOM_CLIENT_TIMEOUT_MS");
    loom_client_opts_t opts = {
        .brokers = argv[1],
        .topic_prefix = getenv("LOOM_TOPIC_PREFIX"),
        .site = "example",
        .message_timeout_ms = timeout ? atoll(timeout) : 0,
    };
    char errbuf[512];
    loom_client_t *c;
    if (loom_client_new(&opts, &c, errbuf, sizeof(errbuf)) != 0) {
        fprintf(stderr, "error: %s\n", errbuf);
        return 1;
    }
    loom_client_result_t res;
    int rc = loom_client_publish_wait(c, argv[2], argv[3], argv[4], 0, &res);
    if (rc != 0) {
        fprintf(stderr, "error: %s: %s\n", res.error.code, res.error.message);
        loom_client_free(c);
        return 1;
    }
    printf("id=%s topic=%s partition=%d offset=%lld\n", res.id, res.topic, (int)res.partition,
           (long long)res.offset);
    loom_client_free(c);
    return 0;
}
