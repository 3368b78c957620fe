/*
 * cli.c: the `loom` command line: dispatch, help, version and `loom config`.
 *
 * Every command prints its own --help; unknown commands and bad flags give
 * one line on stderr and exit status 2; an invalid LOOM_* variable gives one
 * line naming it and exit status 78.
 */
#include "cli.h"
#include "loom/envelope.h"
#include "loom/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

extern char **environ;

static int cmd_config(cli_ctx_t *ctx, int argc, char **argv);
static int cmd_version(cli_ctx_t *ctx, int argc, char **argv);

static const cli_command_t config_command = {
    "config", "print the effective configuration (secrets redacted)",
    "usage: loom config\n"
    "\n"
    "Prints every LOOM_* variable with its effective value and where it came from\n"
    "(environment, default, unset). Passwords and keys are redacted. Fails with one\n"
    "line naming the variable when a value is invalid.\n",
    true, cmd_config};

static const cli_command_t version_command = {"version", "print the version",
                                              "usage: loom version\n", false, cmd_version};

static const cli_command_t *const commands[] = {
    &cli_dev_command,       /* everything in one process */
    &cli_api_command,       /* the HTTP gateway */
    &cli_worker_command,    /* consumers, outbox relay, periodic jobs */
    &cli_broker_command,    /* the embedded Kafka alone */
    &cli_publish_command,   /* commands from the shell */
    &cli_commands_command,  /* see and steer commands */
    &cli_consumers_command, /* partitions, owners, lag */
    &cli_op_command,        /* call an op */
    &cli_nodes_command,     /* nodes and heartbeats */
    &cli_replay_command,    /* rebuild a read model */
    &cli_run_command,       /* oneshot jobs */
    &cli_new_command,       /* a new service's files */
    &cli_migrate_command,   /* schema and topics */
    &config_command,        /* effective configuration */
    &version_command,       /* version */
};
#define N_COMMANDS (sizeof(commands) / sizeof(commands[0]))

static void print_main_help(const loom_app_t *app, FILE *out)
{
    fprintf(out,
            "usage: %s <command> [arguments]\n"
            "\n"
            "Loom is a message-driven service engine: writes are commands on Kafka applied to\n"
            "Postgres by workers, reads are operations.\n"
            "\n"
            "commands:\n",
            app->name);
    for (size_t i = 0; i < N_COMMANDS; i++)
        fprintf(out, "  %-10s %s\n", commands[i]->name, commands[i]->summary);
    fprintf(out,
            "\n"
            "Run '%s <command> --help' for a command's arguments. Configuration comes from\n"
            "LOOM_* environment variables: '%s config' shows them.\n",
            app->name, app->name);
}

int cli_usage_error(const char *cmd, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "loom%s%s: ", cmd ? " " : "", cmd ? cmd : "");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, " (see 'loom%s%s --help')\n", cmd ? " " : "", cmd ? cmd : "");
    return LOOM_EXIT_USAGE;
}

int cli_fail(const char *cmd, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "loom %s: ", cmd);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    return LOOM_EXIT_FAILURE;
}

void cli_setup_logging(const loom_config_t *cfg)
{
    loom_log_level_t level = LOOM_LOG_INFO;
    loom_log_format_t format = LOOM_LOG_TEXT;
    loom_log_level_parse(cfg->log_level, &level);
    loom_log_format_parse(cfg->log_format, &format);
    loom_log_setup(level, format);
    loom_log_set_node(cfg->node_id);
    loom_topic_prefix_set(loom_config_get(cfg, "LOOM_TOPIC_PREFIX")->raw);
    for (size_t i = 0; i < cfg->n_unknown; i++)
        LOOM_WARN("ignoring unknown variable", "name=%s", cfg->unknown[i]);
}

int cli_open_db(cli_ctx_t *ctx, const char *cmd, int size, loom_db_pool_t **pool)
{
    if (!ctx->cfg.database_url) {
        fprintf(stderr,
                "loom %s: LOOM_DATABASE_URL is not set (or run 'loom dev', which "
                "starts its own Postgres)\n",
                cmd);
        return LOOM_EXIT_CONFIG;
    }
    loom_error_t err;
    loom_db_pool_opts_t opts = {.size = size, .application_name = "loom"};
    if (loom_db_pool_new(ctx->cfg.database_url, &opts, pool, &err) != 0)
        return cli_fail(cmd, "%s", err.message);
    return 0;
}

static int cmd_config(cli_ctx_t *ctx, int argc, char **argv)
{
    if (argc > 1)
        return cli_usage_error("config", "unexpected argument '%s'", argv[1]);
    loom_config_print(&ctx->cfg, stdout);
    return LOOM_EXIT_OK;
}

static int cmd_version(cli_ctx_t *ctx, int argc, char **argv)
{
    if (argc > 1)
        return cli_usage_error("version", "unexpected argument '%s'", argv[1]);
    printf("%s %s\n", ctx->app->name, ctx->app->version);
    return LOOM_EXIT_OK;
}

static int run_command(int argc, char **argv, const loom_app_t *app);

static bool wants_help(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0)
            break;
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0)
            return true;
    }
    return false;
}

static const cli_command_t *find_command(const char *name)
{
    for (size_t i = 0; i < N_COMMANDS; i++)
        if (strcmp(commands[i]->name, name) == 0)
            return commands[i];
    return NULL;
}

int loom_main(int argc, char **argv, loom_app_t *app)
{
    loom_error_t berr;
    if (loom_app_build(app, &berr) != 0) {
        fprintf(stderr, "%s: %s\n", app->name ? app->name : "loom", berr.message);
        loom_app_release(app);
        return LOOM_EXIT_CONFIG;
    }
    int rc = run_command(argc, argv, app);
    loom_app_release(app);
    return rc;
}

static int run_command(int argc, char **argv, const loom_app_t *app)
{
    if (argc < 2) {
        print_main_help(app, stderr);
        return LOOM_EXIT_USAGE;
    }
    const char *name = argv[1];
    if (strcmp(name, "--help") == 0 || strcmp(name, "-h") == 0) {
        print_main_help(app, stdout);
        return LOOM_EXIT_OK;
    }
    if (strcmp(name, "--version") == 0)
        name = "version";
    if (strcmp(name, "help") == 0) {
        if (argc < 3) {
            print_main_help(app, stdout);
            return LOOM_EXIT_OK;
        }
        const cli_command_t *c = find_command(argv[2]);
        if (!c)
            return cli_usage_error(NULL, "unknown command '%s'", argv[2]);
        fputs(c->usage, stdout);
        return LOOM_EXIT_OK;
    }
    if (name[0] == '-')
        return cli_usage_error(NULL, "unknown option '%s'", name);
    const cli_command_t *c = find_command(name);
    if (!c)
        return cli_usage_error(NULL, "unknown command '%s'", name);
    if (wants_help(argc - 1, argv + 1)) {
        fputs(c->usage, stdout);
        return LOOM_EXIT_OK;
    }

    cli_ctx_t ctx = {.app = app};
    if (c->needs_config) {
        char errbuf[1024];
        if (loom_config_load(&ctx.cfg, environ, app->config_vars, app->n_config_vars, errbuf,
                             sizeof(errbuf)) != 0) {
            fprintf(stderr, "loom %s: %s\n", c->name, errbuf);
            return LOOM_EXIT_CONFIG;
        }
        cli_setup_logging(&ctx.cfg);
    }
    int rc = c->run(&ctx, argc - 1, argv + 1);
    if (c->needs_config)
        loom_config_release(&ctx.cfg);
    return rc;
}
