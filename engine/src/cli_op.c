/*
 * cli_op.c: `loom op`: call an op in-process or on a gateway, list the ops,
 * list the error codes.
 *
 * A result goes to stdout as JSON; a failure goes to stderr as one line
 * {"error":{"code","message","ray_id"}} and the exit status is the one of the
 * error's class (error.h), so scripts can tell "not found" from "timeout"
 * without parsing text.
 */
#include "cli.h"
#include "loom/clock.h"
#include "loom/log.h"
#include "loom/op.h"
#include "loom/uuid.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct op_args {
    bool list, errors, pretty, compact;
    const char *url;
    const char *timeout;
    const char *name;
    const char *json;
} op_args_t;

static int parse_args(int argc, char **argv, op_args_t *a)
{
    memset(a, 0, sizeof(*a));
    bool options = true;
    for (int i = 1; i < argc; i++) {
        const char *s = argv[i];
        if (options && strcmp(s, "--") == 0) {
            options = false;
        } else if (options && strcmp(s, "--list") == 0) {
            a->list = true;
        } else if (options && strcmp(s, "--errors") == 0) {
            a->errors = true;
        } else if (options && strcmp(s, "--pretty") == 0) {
            a->pretty = true;
        } else if (options && strcmp(s, "--compact") == 0) {
            a->compact = true;
        } else if (options && (strcmp(s, "--url") == 0 || strcmp(s, "--timeout") == 0)) {
            if (i + 1 >= argc)
                return cli_usage_error("op", "%s needs a value", s);
            *(s[2] == 'u' ? &a->url : &a->timeout) = argv[++i];
        } else if (options && strncmp(s, "--url=", 6) == 0) {
            a->url = s + 6;
        } else if (options && strncmp(s, "--timeout=", 10) == 0) {
            a->timeout = s + 10;
        } else if (options && s[0] == '-' && s[1] != '\0') {
            return cli_usage_error("op", "unknown option '%s'", s);
        } else if (!a->name) {
            a->name = s;
        } else if (!a->json) {
            a->json = s;
        } else {
            return cli_usage_error("op", "unexpected argument '%s'", s);
        }
    }
    if (a->list + a->errors > 1 || ((a->list || a->errors) && (a->name || a->url)))
        return cli_usage_error("op", "--list and --errors take no other arguments");
    if (!a->list && !a->errors && !a->name)
        return cli_usage_error("op", "missing op name (see 'loom op --list')");
    if (a->pretty && a->compact)
        return cli_usage_error("op", "--pretty and --compact exclude each other");
    return 0;
}

static void print_list(const loom_op_table_t *table)
{
    size_t width = 4;
    for (size_t i = 0; i < loom_op_table_count(table); i++) {
        size_t n = strlen(loom_op_table_at(table, i)->name);
        width = n > width ? n : width;
    }
    printf("%-*s  %-8s %s\n", (int)width, "NAME", "TIMEOUT", "DESCRIPTION");
    for (size_t i = 0; i < loom_op_table_count(table); i++) {
        const loom_op_t *op = loom_op_table_at(table, i);
        char timeout[32];
        loom_duration_format(op->timeout_ms > 0 ? op->timeout_ms : LOOM_OP_DEFAULT_TIMEOUT_MS,
                             timeout, sizeof(timeout));
        printf("%-*s  %-8s %s\n", (int)width, op->name, timeout,
               op->description ? op->description : "");
    }
}

static void print_code(const loom_error_code_t *c)
{
    printf("%-28s %-12s %4d %4d  %-9s %s\n", c->name, loom_error_class_name(c->cls),
           loom_error_class_http_status(c->cls), loom_error_class_exit_status(c->cls),
           c->retriable ? "yes" : "no", c->summary);
}

static void print_errors(const loom_app_t *app)
{
    printf("%-28s %-12s %4s %4s  %-9s %s\n", "CODE", "CLASS", "HTTP", "EXIT", "RETRIABLE",
           "MEANING");
    for (size_t i = 0; i < LOOM_CODE__COUNT; i++)
        print_code(&loom_error_codes[i]);
    for (size_t k = 0; k < app->n_error_catalogues; k++)
        for (size_t i = 0; i < app->error_catalogues[k].count; i++)
            print_code(&app->error_catalogues[k].codes[i]);
}

/* One line on stderr; returns the exit status of the class. */
static int print_error(const loom_error_t *err, const char *ray_id)
{
    json_t *e = json_pack("{s:s, s:s}", "code", err->code ? err->code : "INTERNAL", "message",
                          err->message);
    if (e && ray_id)
        json_object_set_new(e, "ray_id", json_string(ray_id));
    json_t *doc = json_pack("{s:o}", "error", e);
    char *line = doc ? json_dumps(doc, JSON_COMPACT) : NULL;
    fprintf(stderr, "%s\n", line ? line : "{\"error\":{\"code\":\"INTERNAL\"}}");
    free(line);
    json_decref(doc);
    return loom_error_class_exit_status(err->cls);
}

static void print_json(const json_t *v, FILE *out, bool pretty)
{
    json_dumpf(v, out, JSON_ENCODE_ANY | (pretty ? JSON_INDENT(2) : JSON_COMPACT));
    fputc('\n', out);
    fflush(out);
}

static int read_request(const char *arg, json_t **req, loom_error_t *err)
{
    *req = NULL;
    if (!arg)
        return 0;
    json_error_t jerr;
    if (strcmp(arg, "-") == 0)
        *req = json_loadf(stdin, JSON_DECODE_ANY, &jerr);
    else
        *req = json_loads(arg, JSON_DECODE_ANY, &jerr);
    if (!*req)
        return loom_error_set(err, LOOM_CODE_INVALID_JSON,
                              "the request is not valid JSON: %s (line %d, column %d)", jerr.text,
                              jerr.line, jerr.column);
    return 0;
}

/* The code to report for an HTTP error status that came without a body. */
static loom_code_t class_code(loom_error_class_t cls)
{
    switch (cls) {
    case LOOM_ERR_BAD_REQUEST:
        return LOOM_CODE_INVALID_ARGUMENT;
    case LOOM_ERR_UNAUTHORIZED:
        return LOOM_CODE_UNAUTHENTICATED;
    case LOOM_ERR_FORBIDDEN:
        return LOOM_CODE_PERMISSION_DENIED;
    case LOOM_ERR_NOT_FOUND:
        return LOOM_CODE_NOT_FOUND;
    case LOOM_ERR_CONFLICT:
        return LOOM_CODE_ALREADY_EXISTS;
    case LOOM_ERR_TOO_LARGE:
        return LOOM_CODE_PAYLOAD_TOO_LARGE;
    case LOOM_ERR_TOO_MANY:
        return LOOM_CODE_RATE_LIMITED;
    case LOOM_ERR_UNAVAILABLE:
        return LOOM_CODE_GATEWAY_UNAVAILABLE;
    case LOOM_ERR_TIMEOUT:
        return LOOM_CODE_DEADLINE_EXCEEDED;
    default:
        return LOOM_CODE_INTERNAL;
    }
}

static int call_remote(cli_ctx_t *cli, const op_args_t *a, loom_op_ctx_t *ctx, const json_t *req,
                       bool pretty)
{
    const loom_config_value_t *tok = loom_config_get(&cli->cfg, "LOOM_API_TOKEN");
    int status = 0;
    json_t *body = NULL;
    loom_error_t err;
    if (loom_op_call_http(a->url, tok ? tok->raw : NULL, ctx, a->name, req, &status, &body, &err) !=
        0)
        return print_error(&err, ctx->ray_id);
    loom_error_class_t cls = loom_error_class_from_http(status);
    int rc = LOOM_EXIT_OK;
    if (cls == LOOM_ERR_NONE) {
        print_json(body, stdout, pretty);
    } else if (json_is_object(json_object_get(body, "error"))) {
        /* The gateway's error body, as it sent it. */
        print_json(body, stderr, false);
        rc = loom_error_class_exit_status(cls);
    } else {
        /* No Loom error body (a proxy answered?): the class's usual code. */
        loom_error_t e;
        loom_error_set(&e, class_code(cls), "the gateway answered HTTP %d without an error body",
                       status);
        e.cls = cls;
        rc = print_error(&e, ctx->ray_id);
    }
    json_decref(body);
    return rc;
}

static int call_local(cli_ctx_t *cli, const op_args_t *a, loom_op_ctx_t *ctx,
                      const loom_op_table_t *table, const json_t *req, bool pretty)
{
    const loom_op_t *op = loom_op_find(table, a->name);
    loom_db_pool_t *pool = NULL;
    loom_error_t err;
    if (op && !(op->flags & LOOM_OP_NO_DB)) {
        const char *url =
            cli->cfg.database_read_url ? cli->cfg.database_read_url : cli->cfg.database_url;
        if (!url) {
            fprintf(stderr, "loom op: LOOM_DATABASE_URL is not set (or LOOM_DATABASE_READ_URL)\n");
            return LOOM_EXIT_CONFIG;
        }
        /* Read-only at the session level too: even an op that ends the
         * engine's transaction cannot write through this pool. */
        loom_db_pool_opts_t opts = {.size = 1, .read_only = true, .application_name = "loom op"};
        if (loom_db_pool_new(url, &opts, &pool, &err) != 0)
            return print_error(&err, ctx->ray_id);
    }
    loom_op_runtime_t rt;
    loom_op_runtime_init(&rt, table, pool, NULL);
    ctx->rt = &rt;
    json_t *res = NULL;
    int rc = loom_op_call(ctx, a->name, req, &res, &err);
    if (rc == 0) {
        print_json(res, stdout, pretty);
        json_decref(res);
    } else {
        rc = print_error(&err, ctx->ray_id);
    }
    loom_db_pool_free(pool);
    return rc;
}

static int cmd_op(cli_ctx_t *cli, int argc, char **argv)
{
    op_args_t a;
    int rc = parse_args(argc, argv, &a);
    if (rc != 0)
        return rc;
    int64_t timeout_ms = 0;
    if (a.timeout && (loom_duration_parse_ms(a.timeout, &timeout_ms) != 0 || timeout_ms <= 0))
        return cli_usage_error("op", "--timeout takes a duration such as 500ms or 5s, not '%s'",
                               a.timeout);
    /* Log lines would interleave with the JSON on stderr: only on request. */
    const loom_config_value_t *lvl = loom_config_get(&cli->cfg, "LOOM_LOG_LEVEL");
    if (lvl && !lvl->from_env)
        loom_log_level = LOOM_LOG_OFF;

    loom_op_table_t *table = loom_op_table_new();
    loom_error_t err;
    if (loom_op_table_add(table, cli->app->ops, cli->app->n_ops, &err) != 0) {
        loom_op_table_free(table);
        return cli_fail("op", "%s", err.message);
    }
    if (a.list || a.errors) {
        if (a.list)
            print_list(table);
        else
            print_errors(cli->app);
        loom_op_table_free(table);
        return LOOM_EXIT_OK;
    }

    bool pretty = a.pretty || (!a.compact && isatty(STDOUT_FILENO));
    loom_op_ctx_t ctx = {.caller = "cli"};
    loom_uuid_v7_string(ctx.ray_buf);
    ctx.ray_id = ctx.ray_buf;
    if (timeout_ms > 0)
        ctx.deadline_mono_ms = loom_mono_ms() + timeout_ms;
    json_t *req = NULL;
    if (read_request(a.json, &req, &err) != 0)
        rc = print_error(&err, ctx.ray_id);
    else if (a.url)
        rc = call_remote(cli, &a, &ctx, req, pretty);
    else
        rc = call_local(cli, &a, &ctx, table, req, pretty);
    json_decref(req);
    loom_op_table_free(table);
    return rc;
}

const cli_command_t cli_op_command = {
    "op", "call an operation (a read) by name and print its JSON result",
    "usage: loom op NAME [JSON | -]\n"
    "       loom op --url URL NAME [JSON | -]\n"
    "       loom op --list\n"
    "       loom op --errors\n"
    "\n"
    "Calls an operation (a read) by name and prints its JSON result: indented when\n"
    "stdout is a terminal, on one line otherwise. The request is a JSON object given\n"
    "as an argument, or read from stdin with '-'; without one it is {}.\n"
    "\n"
    "By default the op runs in this process against LOOM_DATABASE_READ_URL when it\n"
    "is set, else LOOM_DATABASE_URL, in a READ ONLY transaction. With --url it runs\n"
    "on a gateway: POST URL/v1/ops/NAME, with LOOM_API_TOKEN as the bearer token.\n"
    "\n"
    "options:\n"
    "  --url URL      call the op on a running gateway (http://host:port[/prefix])\n"
    "  --timeout DUR  give up after DUR (500ms, 5s, ...); default the op's own timeout\n"
    "  --pretty       indent the result even when stdout is not a terminal\n"
    "  --compact      print the result on one line even on a terminal\n"
    "  --list         list the ops with their timeouts and descriptions\n"
    "  --errors       list every error code with its class, HTTP status and exit status\n"
    "\n"
    "A failed call prints {\"error\":{\"code\",\"message\",\"ray_id\"}} on one line to stderr\n"
    "and exits with the status of the error's class (docs/errors.md):\n"
    "  3 bad_request   4 unauthorized   5 forbidden   6 not_found   7 conflict\n"
    "  8 too_large     9 too_many       1 internal   10 unavailable 11 timeout\n"
    "Usage errors exit 2; an invalid LOOM_* variable exits 78.\n"
    "\n"
    "examples:\n"
    "  loom op engine.nodes.list\n"
    "  loom op engine.commands.get '{\"id\":\"0191b2c4-7e1f-7a3b-9c1d-2e3f4a5b6c7d\"}'\n"
    "  echo '{\"role\":\"worker\"}' | loom op --url http://127.0.0.1:8080 engine.nodes.list -\n",
    true, cmd_op};
