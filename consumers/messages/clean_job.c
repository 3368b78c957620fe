/*
 * clean_job.c: the retention clean of the messages service, a periodic job:
 * every LOOM_MESSAGES_CLEAN_INTERVAL one node publishes a messages.clean
 * command for what is older than LOOM_MESSAGES_RETENTION.
 */
#include "messages.h"

int messages_clean_job(loom_job_ctx_t *ctx, loom_error_t *err)
{
    const loom_config_value_t *v = loom_config_get(loom_job_config(ctx), "LOOM_MESSAGES_RETENTION");
    json_int_t retention = v && v->raw ? (json_int_t)v->num : 168LL * 3600 * 1000;
    return loom_job_publish(ctx, "messages.clean", NULL,
                            json_pack("{s:I}", "older_than_ms", retention), err);
}
