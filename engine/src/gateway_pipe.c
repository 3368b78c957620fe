/*
 * gateway_pipe.c: statement ops run on the event loops, pipelined.
 *
 * Each HTTP loop of the gateway keeps one PostgreSQL connection of its own,
 * non-blocking and in libpq's pipeline mode, watched by the loop itself. A
 * call of a statement op (loom_op_stmt_t) is bound on the loop and its
 * statement queued on that connection; just before the loop next waits for
 * I/O, every statement queued meanwhile goes to the server in one write,
 * ended by one Sync. The results come back in the order sent, and each is
 * made into its answer on the loop: no thread and no hand-off per call, and
 * the server reads many statements per wake-up.
 *
 * The session is read-only (SET default_transaction_read_only = on comes
 * first on every new connection, and a connection whose SET fails is not
 * used), it is opened without blocking the loop (PQconnectStartParams), and
 * it carries the statement_timeout of the op being called: a SET goes ahead
 * of a call only when the value changes.
 *
 * What the pipe does not take goes to the gateway's worker threads, which
 * run loom_op_call() as for any other op:
 *   - calls while the connection is being opened or is down;
 *   - calls when PIPE_MAX_CALLS are in flight, or when the oldest call in
 *     flight has waited PIPE_STALL_MS; the calls already queued behind such
 *     a call go to the threads too (their results, when they come, are
 *     dropped), so one slow statement holds only itself;
 *   - calls whose statement failed with a transient error (the threads retry
 *     them), and calls aborted because an earlier statement of the same Sync
 *     failed.
 * When the connection breaks, or a call in flight passes its deadline by
 * PIPE_LOST_MS without an answer, the calls in flight go to the threads (a
 * read runs again safely) and the loop reconnects after PIPE_RECONNECT_MS.
 */
#include "gateway_int.h"
#include "loom/clock.h"
#include "loom/log.h"
#include "loom/mem.h"

#include <libpq-fe.h>
#include <stdlib.h>
#include <string.h>

#define PIPE_MAX_CALLS          256
#define PIPE_STALL_MS           20
#define PIPE_LOST_MS            2000
#define PIPE_RECONNECT_MS       1000
#define PIPE_CHECK_MS           250
#define PIPE_CONNECT_TIMEOUT_MS 5000

/* E_DROPPED: a call handed to the threads while its statement was queued
 * behind a slow one; its result, when it comes, is thrown away. */
typedef enum { E_CALL, E_SET, E_PREPARE, E_SYNC, E_DROPPED } entry_kind_t;

/* Something sent on the connection whose result is still to be read. */
typedef struct entry {
    struct entry *next;
    entry_kind_t kind;
    PGresult *res;              /* its result, once read; NULL until then */
    const loom_db_stmt_t *stmt; /* E_PREPARE */
    gw_op_task_t *t;            /* E_CALL: the call */
    loom_op_ctx_t ctx;          /* E_CALL */
    int64_t start_ns;           /* E_CALL */
    int64_t session_timeout_ms; /* E_SET of statement_timeout: the value; 0 other SETs */
    uint64_t gen;               /* E_SET: the pipe's set_gen when it was sent */
} entry_t;

typedef enum { P_DOWN, P_CONNECTING, P_READY, P_STOPPED } pipe_state_t;

struct gw_pipe {
    loom_gateway_t *gw;
    uv_loop_t *loop;
    pipe_state_t state;
    PGconn *pg;
    uv_poll_t *poll; /* watches PQsocket(pg); a new one when the socket changes */
    int poll_fd, poll_events;
    uv_prepare_t sync; /* sends the Sync of what this turn queued */
    uv_timer_t timer;  /* reconnects; looks for calls lost in flight */
    uv_timer_t stall;  /* while calls are in flight: one slow statement? */
    int handles_open;  /* sync, timer and stall, until closed */
    bool sync_pending; /* statements queued since the last Sync */
    entry_t *head, *tail;
    int calls; /* E_CALL entries in flight */
    const loom_db_stmt_t **prepared;
    size_t n_prepared, cap_prepared;
    int64_t session_timeout_ms; /* what the last SET sent asks; -1: not known */
    uint64_t set_gen;           /* SETs sent */
    int64_t connect_start_ms;
    bool warned;
};

static void pipe_down(gw_pipe_t *p, const char *why);
static void on_sync(uv_prepare_t *h);
static void on_stall(uv_timer_t *h);

/* ---- finishing calls ---------------------------------------------------------------- */

static void call_count(gw_pipe_t *p, const char *path)
{
    loom_metrics_counter_inc(p->gw->op_paths, (const char *[]){path});
}

/* Gives a call to the worker threads. */
static void call_to_threads(gw_pipe_t *p, entry_t *e)
{
    loom_http_req_t *req = e->t->task.req;
    if (loom_http_req_detached(req)) {
        e->t->fin(req, e->t, true); /* nobody waits for it */
    } else {
        call_count(p, "thread");
        gw_op_start(req, e->t); /* takes its own reference */
    }
    loom_http_req_unref(req);
    free(e);
}

/* The op's result is its first column as it is (loom_op_stmt_t.json_column),
 * and that column holds what looks like a JSON object or array in UTF-8:
 * the answer can be those bytes, with no parsing and printing again. */
static bool json_document(const loom_op_t *op, const PGresult *rows, size_t *len)
{
    if (!op->stmt->json_column || PQntuples(rows) < 1 || PQnfields(rows) < 1 ||
        PQgetisnull(rows, 0, 0))
        return false;
    const char *v = PQgetvalue(rows, 0, 0);
    size_t n = (size_t)PQgetlength(rows, 0, 0), i = 0;
    while (i < n && (v[i] == ' ' || v[i] == '\n' || v[i] == '\t' || v[i] == '\r'))
        i++;
    if (i == n || (v[i] != '{' && v[i] != '[') || !loom_http_utf8_valid(v, n))
        return false;
    *len = n;
    return true;
}

/* Hands a call whose t->rc (and t->err or t->result) is set to its route,
 * on the loop, as op_done would after a worker ran it. */
static void call_finish(gw_pipe_t *p, entry_t *e)
{
    loom_http_req_t *req = e->t->task.req;
    call_count(p, "loop");
    e->t->fin(req, e->t, loom_http_req_detached(req));
    loom_http_req_unref(req);
    free(e);
}

/* Makes a call's answer from its statement's rows (NULL: it failed with
 * *err) and hands it over. */
static void call_answer(gw_pipe_t *p, entry_t *e, const PGresult *rows, loom_error_t *err)
{
    gw_op_task_t *t = e->t;
    json_t *result = NULL;
    size_t len = 0;
    if (rows && t->answers_result && json_document(e->ctx.op, rows, &len)) {
        t->rc = loom_op_stmt_end_sent(&e->ctx, e->start_ns, err);
        if (t->rc == 0) {
            t->json = loom_xmalloc(len + 1);
            memcpy(t->json, PQgetvalue(rows, 0, 0), len + 1);
            t->json_len = len;
        }
    } else {
        t->rc = loom_op_stmt_end(&e->ctx, t->op_req, rows, e->start_ns, &result, err);
    }
    t->result = result;
    if (t->rc != 0)
        t->err = *err;
    call_finish(p, e);
}

/* ---- the connection --------------------------------------------------------------- */

static void on_poll(uv_poll_t *h, int status, int events);

static void poll_closed(uv_handle_t *h)
{
    free(h);
}

static void poll_close(gw_pipe_t *p)
{
    if (p->poll) {
        uv_poll_stop(p->poll);
        uv_close((uv_handle_t *)p->poll, poll_closed);
        p->poll = NULL;
    }
    p->poll_fd = -1;
    p->poll_events = 0;
}

/* Watches the connection's socket for events (a new handle when the
 * socket changed, as it may while connecting). */
static int poll_watch(gw_pipe_t *p, int events)
{
    int fd = PQsocket(p->pg);
    if (fd < 0)
        return -1;
    if (p->poll && fd != p->poll_fd)
        poll_close(p);
    if (!p->poll) {
        p->poll = loom_xcalloc(1, sizeof(*p->poll));
        if (uv_poll_init(p->loop, p->poll, fd) != 0) {
            free(p->poll);
            p->poll = NULL;
            return -1;
        }
        p->poll->data = p;
        p->poll_fd = fd;
        p->poll_events = 0;
    }
    if (events != p->poll_events) {
        if (uv_poll_start(p->poll, events, on_poll) != 0)
            return -1;
        p->poll_events = events;
    }
    return 0;
}

static void prepared_forget(gw_pipe_t *p, const loom_db_stmt_t *stmt)
{
    for (size_t i = 0; i < p->n_prepared; i++)
        if (p->prepared[i] == stmt) {
            p->prepared[i] = p->prepared[--p->n_prepared];
            return;
        }
}

static bool prepared_has(const gw_pipe_t *p, const loom_db_stmt_t *stmt)
{
    for (size_t i = 0; i < p->n_prepared; i++)
        if (p->prepared[i] == stmt)
            return true;
    return false;
}

static void entry_push(gw_pipe_t *p, entry_t *e)
{
    e->next = NULL;
    if (p->tail)
        p->tail->next = e;
    else
        p->head = e;
    p->tail = e;
    if (e->kind == E_CALL) {
        p->calls++;
        if (!uv_is_active((uv_handle_t *)&p->stall))
            uv_timer_start(&p->stall, on_stall, PIPE_STALL_MS, 0);
    }
    if (e->kind != E_SYNC && !p->sync_pending) {
        p->sync_pending = true;
        uv_prepare_start(&p->sync, on_sync);
    }
}

static entry_t *entry_pop(gw_pipe_t *p)
{
    entry_t *e = p->head;
    p->head = e->next;
    if (!p->head)
        p->tail = NULL;
    if (e->kind == E_CALL)
        p->calls--;
    return e;
}

/* Queues a SET with a Sync of its own, so that it commits alone: in a
 * group with a statement that then fails, the rollback would undo it.
 * False when libpq refused it (the connection is broken). */
static bool send_set(gw_pipe_t *p, const char *sql, int64_t timeout_ms)
{
    if (!PQsendQueryParams(p->pg, sql, 0, NULL, NULL, NULL, NULL, 0))
        return false;
    entry_t *e = loom_xcalloc(1, sizeof(*e));
    e->kind = E_SET;
    e->session_timeout_ms = timeout_ms;
    e->gen = ++p->set_gen;
    entry_push(p, e);
    if (!PQpipelineSync(p->pg))
        return false;
    entry_t *sync = loom_xcalloc(1, sizeof(*sync));
    sync->kind = E_SYNC;
    entry_push(p, sync);
    return true;
}

/* The connection is open: pipeline mode, and the read-only SET first. */
static void pipe_ready(gw_pipe_t *p)
{
    PQsetNoticeProcessor(p->pg, loom_db_notice_log, NULL);
    if (PQsetnonblocking(p->pg, 1) != 0 || !PQenterPipelineMode(p->pg) ||
        !send_set(p, "SET default_transaction_read_only = on", 0)) {
        pipe_down(p, PQerrorMessage(p->pg));
        return;
    }
    p->state = P_READY;
    p->session_timeout_ms = -1;
    p->n_prepared = 0;
    if (poll_watch(p, UV_READABLE) != 0) {
        pipe_down(p, "cannot watch the connection's socket");
        return;
    }
    LOOM_DEBUG("gateway loop connection open", "backend_pid=%d", PQbackendPID(p->pg));
}

static void pipe_connect_step(gw_pipe_t *p)
{
    PostgresPollingStatusType st = PQconnectPoll(p->pg);
    /* libpq may have closed the socket and opened another under the same
     * number (the next address): a fresh handle registers it again. */
    poll_close(p);
    if (st == PGRES_POLLING_OK) {
        pipe_ready(p);
    } else if (st == PGRES_POLLING_FAILED) {
        pipe_down(p, PQerrorMessage(p->pg));
    } else if (poll_watch(p, st == PGRES_POLLING_READING ? UV_READABLE : UV_WRITABLE) != 0) {
        pipe_down(p, "cannot watch the connection's socket");
    }
}

static void pipe_connect(gw_pipe_t *p)
{
    loom_db_pool_t *pool = p->gw->opts.ops->pool;
    /* As the pool connects: values inside the conninfo win. */
    const char *keys[] = {"connect_timeout", "application_name", "options", "dbname", NULL};
    const char *vals[] = {"5", loom_db_pool_application_name(pool),
                          "-c default_transaction_read_only=on", loom_db_pool_conninfo(pool), NULL};
    p->pg = PQconnectStartParams(keys, vals, 1);
    if (!p->pg || PQstatus(p->pg) == CONNECTION_BAD) {
        pipe_down(p, p->pg ? PQerrorMessage(p->pg) : "out of memory");
        return;
    }
    p->state = P_CONNECTING;
    p->connect_start_ms = loom_mono_ms();
    pipe_connect_step(p);
}

static void on_timer(uv_timer_t *h);

/* The connection is gone or unusable: calls in flight go to the threads,
 * and the loop tries again after PIPE_RECONNECT_MS. */
static void pipe_down(gw_pipe_t *p, const char *why)
{
    if (p->state == P_READY || !p->warned)
        LOOM_WARN("gateway loop connection down; its op calls go to the worker threads",
                  "error=%.*s retry_ms=%d", (int)strcspn(why ? why : "", "\n"), why ? why : "",
                  PIPE_RECONNECT_MS);
    p->warned = true;
    poll_close(p);
    if (p->pg)
        PQfinish(p->pg);
    p->pg = NULL;
    p->sync_pending = false;
    uv_prepare_stop(&p->sync);
    while (p->head) {
        entry_t *e = entry_pop(p);
        PQclear(e->res);
        if (e->kind == E_CALL)
            call_to_threads(p, e);
        else
            free(e);
    }
    p->state = P_DOWN;
    uv_timer_start(&p->timer, on_timer, PIPE_RECONNECT_MS, PIPE_CHECK_MS);
}

/* ---- results ------------------------------------------------------------------------ */

static void entry_done(gw_pipe_t *p, entry_t *e)
{
    ExecStatusType st = e->res ? PQresultStatus(e->res) : PGRES_FATAL_ERROR;
    bool ok = st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK;
    switch (e->kind) {
    case E_SET:
        /* The value was taken when the SET was sent; a failed SET that is
         * still the last one sent leaves it unknown. */
        if (!ok && e->gen == p->set_gen)
            p->session_timeout_ms = -1;
        if (!ok && e->session_timeout_ms == 0) {
            /* The read-only SET failed: this connection must not serve ops. */
            char why[256];
            snprintf(why, sizeof(why), "SET default_transaction_read_only failed: %s",
                     e->res ? PQresultErrorMessage(e->res) : "no result");
            PQclear(e->res);
            free(e);
            pipe_down(p, why);
            return;
        }
        break;
    case E_PREPARE:
        if (!ok)
            prepared_forget(p, e->stmt);
        break;
    case E_CALL:
        if (ok) {
            loom_error_t err;
            loom_error_clear(&err);
            PGresult *rows = e->res;
            call_answer(p, e, rows, &err); /* frees e */
            PQclear(rows);
            return;
        }
        if (st == PGRES_PIPELINE_ABORTED || !e->res) {
            PQclear(e->res);
            e->res = NULL;
            call_to_threads(p, e);
            return;
        }
        {
            loom_error_t err;
            loom_db_error(p->pg, e->res, &err);
            /* 26000: its PREPARE went down with an earlier statement's
             * group; the threads run it on a connection of their own. */
            const char *state = PQresultErrorField(e->res, PG_DIAG_SQLSTATE);
            bool unprepared = state && strcmp(state, "26000") == 0;
            PQclear(e->res);
            e->res = NULL;
            if (loom_db_error_is_transient(&err) || unprepared)
                call_to_threads(p, e);
            else
                call_answer(p, e, NULL, &err);
        }
        return;
    case E_SYNC:
    case E_DROPPED:
        break;
    }
    PQclear(e->res);
    free(e);
}

/* Takes every result libpq holds, in order (a flush may have read some). */
static void pipe_drain(gw_pipe_t *p)
{
    while (p->state == P_READY && p->head && !PQisBusy(p->pg)) {
        PGresult *r = PQgetResult(p->pg);
        entry_t *e = p->head;
        if (e->kind == E_SYNC) {
            if (!r)
                break; /* not there yet */
            bool sync = PQresultStatus(r) == PGRES_PIPELINE_SYNC;
            PQclear(r);
            if (!sync) {
                pipe_down(p, "the connection's results are out of step");
                return;
            }
            free(entry_pop(p));
            continue;
        }
        if (r) {
            /* One statement, one result; keep the first, an error first. */
            if (!e->res)
                e->res = r;
            else
                PQclear(r);
            continue;
        }
        entry_done(p, entry_pop(p)); /* NULL: the statement's results are over */
    }
    if (p->state == P_READY && PQstatus(p->pg) == CONNECTION_BAD)
        pipe_down(p, PQerrorMessage(p->pg));
}

/* Reads what arrived on the socket, then takes the results. */
static void pipe_read(gw_pipe_t *p)
{
    if (!PQconsumeInput(p->pg)) {
        pipe_down(p, PQerrorMessage(p->pg));
        return;
    }
    pipe_drain(p);
}

static void pipe_flush(gw_pipe_t *p)
{
    int rc = PQflush(p->pg);
    if (rc < 0)
        pipe_down(p, PQerrorMessage(p->pg));
    else if (poll_watch(p, rc ? UV_READABLE | UV_WRITABLE : UV_READABLE) != 0)
        pipe_down(p, "cannot watch the connection's socket");
    else
        pipe_drain(p); /* a send that would block reads what has come meanwhile */
}

static void on_poll(uv_poll_t *h, int status, int events)
{
    gw_pipe_t *p = h->data;
    if (p->poll != h)
        return; /* an old handle, closing */
    if (status < 0) {
        pipe_down(p, uv_strerror(status));
        return;
    }
    if (p->state == P_CONNECTING) {
        pipe_connect_step(p);
        return;
    }
    if (p->state != P_READY)
        return;
    if (events & UV_WRITABLE)
        pipe_flush(p);
    if (p->state == P_READY && (events & UV_READABLE))
        pipe_read(p);
}

/* Before the loop waits: one Sync after what this turn queued, and send. */
static void on_sync(uv_prepare_t *h)
{
    gw_pipe_t *p = h->data;
    uv_prepare_stop(h);
    if (!p->sync_pending || p->state != P_READY)
        return;
    p->sync_pending = false;
    if (!PQpipelineSync(p->pg)) {
        pipe_down(p, PQerrorMessage(p->pg));
        return;
    }
    entry_t *e = loom_xcalloc(1, sizeof(*e));
    e->kind = E_SYNC;
    entry_push(p, e);
    pipe_flush(p);
}

static void on_timer(uv_timer_t *h)
{
    gw_pipe_t *p = h->data;
    if (p->state == P_DOWN) {
        pipe_connect(p); /* on failure pipe_down sets the timer again */
        return;
    }
    if (p->state == P_CONNECTING) {
        /* libpq leaves connect_timeout to the caller when it does not block. */
        if (loom_mono_ms() - p->connect_start_ms > PIPE_CONNECT_TIMEOUT_MS)
            pipe_down(p, "could not connect within the timeout");
        return;
    }
    if (p->state != P_READY)
        return;
    /* The oldest call far past its deadline: the server would have
     * cancelled its statement long ago (statement_timeout), so the
     * connection is lost without saying so. Calls behind it have not
     * started: their time on the server has not begun. */
    int64_t now = loom_mono_ms();
    for (entry_t *e = p->head; e; e = e->next)
        if (e->kind == E_CALL || e->kind == E_DROPPED) {
            if (now > e->ctx.op_deadline_mono_ms + PIPE_LOST_MS)
                pipe_down(p, "no answer from the database long past a call's deadline");
            return;
        }
}

/* The oldest call in flight (the one the server runs now, or next); NULL
 * when none is. */
static entry_t *first_call(const gw_pipe_t *p)
{
    for (entry_t *e = p->head; e; e = e->next)
        if (e->kind == E_CALL)
            return e;
    return NULL;
}

/* The oldest call in flight has run PIPE_STALL_MS: the calls queued behind
 * it on the connection go to the worker threads (a read runs twice at
 * worst), so one slow statement holds no call but its own for longer. */
static void on_stall(uv_timer_t *h)
{
    gw_pipe_t *p = h->data;
    if (p->state != P_READY)
        return;
    entry_t *first = first_call(p);
    if (!first)
        return;
    int64_t age_ms = (loom_mono_ns() - first->start_ns) / 1000000;
    if (age_ms < PIPE_STALL_MS) {
        uv_timer_start(h, on_stall, (uint64_t)(PIPE_STALL_MS - age_ms), 0);
        return;
    }
    for (entry_t *e = first->next; e; e = e->next) {
        if (e->kind != E_CALL)
            continue;
        /* Behind the slow one: answered elsewhere, its result dropped. */
        entry_t *moved = loom_xcalloc(1, sizeof(*moved));
        *moved = *e;
        moved->next = NULL;
        e->kind = E_DROPPED;
        e->t = NULL;
        p->calls--;
        call_to_threads(p, moved);
    }
    uv_timer_start(h, on_stall, PIPE_STALL_MS, 0);
}

/* The server has said the session is read-only (PostgreSQL 14+ reports the
 * setting with every change; a server that reports nothing has the SET,
 * which is sent alone and first, and whose failure closes the connection). */
static bool session_read_only(const gw_pipe_t *p)
{
    const char *v = PQparameterStatus(p->pg, "default_transaction_read_only");
    return !v || strcmp(v, "on") == 0;
}

/* ---- calls ---------------------------------------------------------------------------- */

/* The oldest call in flight has waited too long: something slow is ahead. */
static bool pipe_stalled(const gw_pipe_t *p, int64_t now_ns)
{
    const entry_t *e = first_call(p);
    return e && now_ns - e->start_ns > (int64_t)PIPE_STALL_MS * 1000000;
}

bool gw_pipe_call(loom_http_req_t *req, gw_op_task_t *t)
{
    gw_pipe_t *p = loom_http_req_loop_data(req);
    if (!p || p->state != P_READY || !session_read_only(p))
        return false;
    const loom_op_t *op = loom_op_find(p->gw->opts.ops->table, t->name);
    if (!op || !op->stmt)
        return false;
    int64_t start_ns = loom_mono_ns();
    if (p->calls >= PIPE_MAX_CALLS || pipe_stalled(p, start_ns))
        return false;

    entry_t *e = loom_xcalloc(1, sizeof(*e));
    e->kind = E_CALL;
    e->t = t;
    e->start_ns = start_ns;
    gw_op_attach(req, t);
    e->ctx = gw_op_ctx(t);
    loom_http_req_ref(req);
    if (!t->op_req)
        t->op_req = json_object();

    loom_op_params_t params;
    loom_error_t err;
    t->rc = loom_op_stmt_begin(&e->ctx, op, t->op_req, start_ns, &params, &err);
    if (t->rc != 0) { /* a bad request, counted already: answered at once */
        t->err = err;
        call_finish(p, e);
        return true;
    }
    /* statement_timeout: the op's own timeout, set on the session when it
     * changes (a caller's earlier deadline does not come this way). */
    int64_t timeout = e->ctx.op_deadline_mono_ms - start_ns / 1000000;
    const loom_db_stmt_t *stmt = op->stmt->stmt;
    bool sent = true;
    if (timeout != p->session_timeout_ms) {
        char sql[64];
        snprintf(sql, sizeof(sql), "SET statement_timeout = %lld", (long long)timeout);
        sent = send_set(p, sql, timeout);
        if (sent)
            p->session_timeout_ms = timeout; /* forgotten if it fails */
    }
    if (sent && !prepared_has(p, stmt)) {
        sent = PQsendPrepare(p->pg, stmt->name, stmt->sql, stmt->nparams, NULL) != 0;
        if (sent) {
            entry_t *pe = loom_xcalloc(1, sizeof(*pe));
            pe->kind = E_PREPARE;
            pe->stmt = stmt;
            entry_push(p, pe);
            if (p->n_prepared == p->cap_prepared) {
                p->cap_prepared = p->cap_prepared ? p->cap_prepared * 2 : 8;
                p->prepared = loom_xrealloc(p->prepared, p->cap_prepared * sizeof(*p->prepared));
            }
            p->prepared[p->n_prepared++] = stmt;
        }
    }
    if (sent)
        sent = PQsendQueryPrepared(p->pg, stmt->name, stmt->nparams, params.v, NULL, NULL, 0) != 0;
    if (!sent) {
        /* libpq refused to queue it: the connection is broken. */
        entry_push(p, e); /* pipe_down hands it to the threads with the rest */
        pipe_down(p, PQerrorMessage(p->pg));
        return true;
    }
    entry_push(p, e);
    return true;
}

/* ---- the loop's hooks ---------------------------------------------------------------- */

void *gw_pipe_loop_start(uv_loop_t *loop, void *opaque)
{
    loom_gateway_t *gw = opaque;
    if (gw->opts.no_op_pipeline || !gw->opts.ops || !gw->opts.ops->pool)
        return NULL;
    gw_pipe_t *p = loom_xcalloc(1, sizeof(*p));
    p->gw = gw;
    p->loop = loop;
    p->poll_fd = -1;
    p->session_timeout_ms = -1;
    uv_prepare_init(loop, &p->sync);
    p->sync.data = p;
    uv_timer_init(loop, &p->timer);
    p->timer.data = p;
    uv_timer_init(loop, &p->stall);
    p->stall.data = p;
    p->handles_open = 3;
    pipe_connect(p);
    if (p->state != P_DOWN) /* else pipe_down started it */
        uv_timer_start(&p->timer, on_timer, PIPE_CHECK_MS, PIPE_CHECK_MS);
    return p;
}

static void handle_closed(uv_handle_t *h)
{
    gw_pipe_t *p = h->data;
    if (--p->handles_open == 0) {
        free(p->prepared);
        free(p);
    }
}

void gw_pipe_loop_stop(uv_loop_t *loop, void *loop_data, void *opaque)
{
    (void)loop;
    (void)opaque;
    gw_pipe_t *p = loop_data;
    if (!p)
        return;
    p->state = P_STOPPED;
    poll_close(p);
    /* Only a forced stop leaves calls here: cancel them. */
    while (p->head) {
        entry_t *e = entry_pop(p);
        PQclear(e->res);
        if (e->kind == E_CALL) {
            loom_http_req_t *req = e->t->task.req;
            e->ctx.op = NULL;
            e->t->fin(req, e->t, true);
            loom_http_req_unref(req);
        }
        free(e);
    }
    if (p->pg)
        PQfinish(p->pg);
    p->pg = NULL;
    uv_close((uv_handle_t *)&p->sync, handle_closed);
    uv_close((uv_handle_t *)&p->timer, handle_closed);
    uv_close((uv_handle_t *)&p->stall, handle_closed);
}
