/*
 * cli_replay.c: `loom replay PROJECTION`, rebuilding a read model from the
 * event log.
 */
#include "cli.h"
#include "loom/clock.h"

#include <stdio.h>
#include <string.h>

static int cmd_replay(cli_ctx_t *ctx, int argc, char **argv)
{
    if (argc != 2 || argv[1][0] == '-')
        return argc > 2    ? cli_usage_error("replay", "unexpected argument '%s'", argv[2])
               : argc == 2 ? cli_usage_error("replay", "unknown option '%s'", argv[1])
                           : cli_usage_error("replay", "missing the projection to rebuild");
    const loom_projection_t *p = NULL;
    for (size_t i = 0; i < ctx->app->n_projections; i++)
        if (strcmp(ctx->app->projections[i].name, argv[1]) == 0)
            p = &ctx->app->projections[i];
    if (!p) {
        fprintf(stderr, "loom replay: unknown projection '%s'; known:", argv[1]);
        for (size_t i = 0; i < ctx->app->n_projections; i++)
            fprintf(stderr, " %s", ctx->app->projections[i].name);
        fprintf(stderr, " (see 'loom replay --help')\n");
        return LOOM_EXIT_USAGE;
    }
    loom_db_pool_t *pool = NULL;
    int rc = cli_open_db(ctx, "replay", 1, &pool);
    if (rc != 0)
        return rc;
    loom_error_t err;
    int64_t n = 0, t0 = loom_mono_ms();
    rc = loom_replay(pool, p, &n, &err);
    loom_db_pool_free(pool);
    if (rc != 0)
        return cli_fail("replay", "could not rebuild %s: %s", p->name, err.message);
    printf("rebuilt %s from %lld event%s in %.1f s\n", p->name, (long long)n, n == 1 ? "" : "s",
           (double)(loom_mono_ms() - t0) / 1000.0);
    return LOOM_EXIT_OK;
}

const cli_command_t cli_replay_command = {
    "replay", "rebuild a read model from the event log",
    "usage: loom replay PROJECTION\n"
    "\n"
    "Empties the read model PROJECTION and applies every one of its events from\n"
    "loom_events in the order they were recorded, in one transaction: readers see\n"
    "the old rows until the new ones are complete. Projections of this build:\n"
    "  messages   the messages table\n"
    "\n"
    "Needs LOOM_DATABASE_URL.\n",
    true, cmd_replay};
