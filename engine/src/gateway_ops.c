/*
 * gateway_ops.c: calling ops from route handlers.
 *
 * A statement op runs on the request's own loop, pipelined on the loop's
 * connection (gateway_pipe.c). Any other op goes through loom_op_call(),
 * which blocks on the database, so it never runs on an event loop: the
 * request goes to the gateway's worker threads with the caller's slug,
 * scopes and ray id, and the answer comes back to the request's loop through
 * loom_http_req_post().
 */
#include "gateway_int.h"
#include "loom/mem.h"

#include <stdlib.h>
#include <string.h>

void gw_op_task_free(gw_op_task_t *t)
{
    json_decref(t->op_req);
    json_decref(t->result);
    free(t->json);
    free(t);
}

void gw_op_attach(loom_http_req_t *req, gw_op_task_t *t)
{
    gw_req_t *g = gw_req(req);
    t->token = g ? g->token : NULL;
    t->ray_id = g ? g->ray_id : NULL;
    t->task.req = req;
    if (g)
        g->async = true;
}

loom_op_ctx_t gw_op_ctx(const gw_op_task_t *t)
{
    return (loom_op_ctx_t){.rt = t->gw->opts.ops,
                           .ray_id = t->ray_id,
                           .caller = t->token ? t->token->slug : NULL,
                           .scopes = t->token ? (const char *const *)t->token->scopes : NULL};
}

static void op_run(gw_task_t *task)
{
    gw_op_task_t *t = (gw_op_task_t *)task;
    if (atomic_load(&t->gw->stopping)) {
        t->rc = loom_error_set(&t->err, LOOM_CODE_SHUTTING_DOWN, "the gateway is shutting down");
        return;
    }
    loom_op_ctx_t ctx = gw_op_ctx(t);
    loom_error_clear(&t->err);
    t->rc = loom_op_call(&ctx, t->name, t->op_req, &t->result, &t->err);
}

static void op_done(loom_http_req_t *req, void *arg, bool cancelled)
{
    gw_op_task_t *t = arg;
    t->fin(req, t, cancelled || loom_http_req_detached(req));
    loom_http_req_unref(req);
}

void gw_op_start(loom_http_req_t *req, gw_op_task_t *t)
{
    gw_op_attach(req, t);
    t->task.run = op_run;
    t->task.done = op_done;
    gw_task_submit(t->gw, &t->task);
}

/* The fin of the public helpers: hand the result to the callback. */
static void call_fin(loom_http_req_t *req, gw_op_task_t *t, bool cancelled)
{
    if (!cancelled && t->rc == 0 && t->json) {
        /* A stored JSON document, sent as it is (gateway_pipe.c). */
        loom_http_res_t *res = loom_http_req_res(req);
        loom_http_res_status(res, 200);
        loom_http_res_header(res, "Content-Type", "application/json");
        loom_http_res_body_take(res, t->json, t->json_len);
        t->json = NULL;
        loom_http_res_send(res);
    } else if (!cancelled)
        t->cb(req, loom_http_req_res(req), t->rc, t->result, t->rc ? &t->err : NULL, t->arg);
    gw_op_task_free(t);
}

static int answer_cb(loom_http_req_t *req, loom_http_res_t *res, int rc, json_t *result,
                     const loom_error_t *err, void *arg)
{
    (void)arg;
    if (rc != 0)
        return loom_gateway_fail(req, res, err);
    return loom_gateway_reply(req, res, 200, json_incref(result));
}

static int gw_op_call(loom_http_req_t *req, loom_http_res_t *res, const char *name, json_t *op_req,
                      loom_gateway_op_cb cb, void *arg, bool answers_result);

int loom_gateway_op_call(loom_http_req_t *req, loom_http_res_t *res, const char *name,
                         json_t *op_req, loom_gateway_op_cb cb, void *arg)
{
    return gw_op_call(req, res, name, op_req, cb, arg, false);
}

static int gw_op_call(loom_http_req_t *req, loom_http_res_t *res, const char *name, json_t *op_req,
                      loom_gateway_op_cb cb, void *arg, bool answers_result)
{
    gw_req_t *g = gw_req(req);
    loom_error_t err;
    if (!g || !g->gw->opts.ops || !cb) {
        json_decref(op_req);
        loom_error_set(&err, LOOM_CODE_INTERNAL, "this gateway runs no ops");
        return loom_gateway_fail(req, res, &err);
    }
    if (!name || strlen(name) > LOOM_OP_NAME_MAX) {
        json_decref(op_req);
        loom_error_set(&err, LOOM_CODE_OP_NOT_FOUND, "unknown op \"%.*s\"", LOOM_OP_NAME_MAX,
                       name ? name : "");
        return loom_gateway_fail(req, res, &err);
    }
    gw_op_task_t *t = loom_xcalloc(1, sizeof(*t));
    t->gw = g->gw;
    snprintf(t->name, sizeof(t->name), "%s", name);
    t->op_req = op_req;
    t->fin = call_fin;
    t->cb = cb;
    t->arg = arg;
    t->answers_result = answers_result;
    if (gw_pipe_call(req, t))
        return 0;
    if (gw_queue_full(g->gw)) {
        gw_op_task_free(t);
        return gw_shed(req, res, "queue");
    }
    loom_metrics_counter_inc(g->gw->op_paths, (const char *[]){"thread"});
    gw_op_start(req, t);
    return 0;
}

int loom_gateway_op_authorize(loom_http_req_t *req, const char *name, loom_error_t *err)
{
    gw_req_t *g = gw_req(req);
    const loom_op_t *op = g && g->gw->opts.ops && name && loom_op_name_valid(name)
                              ? loom_op_find(g->gw->opts.ops->table, name)
                              : NULL;
    if (!op)
        return loom_error_set(err, LOOM_CODE_OP_NOT_FOUND, "unknown op \"%.*s\"", LOOM_OP_NAME_MAX,
                              name ? name : "");
    char scope[LOOM_OP_SCOPE_MAX + 16];
    loom_op_scope(op, scope, sizeof(scope));
    if (!loom_gateway_has_scope(req, scope))
        return loom_error_set(err, LOOM_CODE_PERMISSION_DENIED,
                              "op %s needs the scope \"%s\", which the token of \"%s\" does not "
                              "hold",
                              op->name, scope, loom_gateway_caller(req));
    return 0;
}

int loom_gateway_op_answer(loom_http_req_t *req, loom_http_res_t *res, const char *name,
                           json_t *op_req)
{
    return gw_op_call(req, res, name, op_req, answer_cb, NULL, true);
}
