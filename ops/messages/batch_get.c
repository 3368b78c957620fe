/*
 * messages.batch_get: stored messages by id, in request order; ids that are
 * not stored are left out (no error). At most MESSAGES_BATCH_MAX (1000) ids.
 *
 *   request  {"ids": ["...", ...]}
 *   result   {"msgs": [CloudEvent, ...]}
 */
#include "../ops.h"
#include "model.h"

#include <stdlib.h>
#include <string.h>

#define BATCH_GET_MAX MESSAGES_BATCH_MAX

static const loom_db_stmt_t select_many = {
    "loom_op_messages_batch_get", "SELECT id, event FROM messages WHERE id = ANY($1::text[])", 1};

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int batch_get(loom_op_ctx_t *ctx, loom_db_t *db, const json_t *req, json_t **res,
                     loom_error_t *err)
{
    (void)ctx;
    static const char *const keys[] = {"ids", NULL};
    int rc = loom_op_req_check_keys(req, keys, err);
    if (rc != 0)
        return rc;
    json_t *ids = json_object_get(req, "ids");
    if (!json_is_array(ids))
        return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT, "\"ids\" must be an array");
    size_t n = json_array_size(ids);
    if (n > BATCH_GET_MAX)
        return loom_error_set(err, LOOM_CODE_PAYLOAD_TOO_LARGE,
                              "\"ids\" holds %zu ids; the limit is %d", n, BATCH_GET_MAX);
    loom_db_array_t lit = {0};
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(ids, i);
        if (!json_is_string(v) || json_string_length(v) == 0 ||
            json_string_length(v) > MESSAGES_ID_MAX) {
            loom_db_array_free(&lit);
            return loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                                  "ids[%zu] must be a string of 1 to %d bytes", i, MESSAGES_ID_MAX);
        }
        loom_db_array_add(&lit, json_string_value(v));
    }
    const char *params[] = {loom_db_array_str(&lit)};
    PGresult *r = NULL;
    rc = loom_db_exec(db, &select_many, params, &r, err);
    loom_db_array_free(&lit);
    if (rc != 0)
        return rc;
    /* Found rows sorted by id, then looked up in request order. */
    int nr = PQntuples(r);
    const char **found = calloc((size_t)nr + 1, 2 * sizeof(char *));
    if (!found)
        abort();
    for (int i = 0; i < nr; i++) {
        found[2 * i] = PQgetvalue(r, i, 0);
        found[2 * i + 1] = PQgetvalue(r, i, 1);
    }
    qsort(found, (size_t)nr, 2 * sizeof(char *), cmp_str);
    json_t *msgs = json_array();
    for (size_t i = 0; i < n && rc == 0; i++) {
        const char *id = json_string_value(json_array_get(ids, i));
        const char **hit = bsearch(&id, found, (size_t)nr, 2 * sizeof(char *), cmp_str);
        if (!hit)
            continue;
        json_error_t jerr;
        json_t *ev = json_loads(hit[1], 0, &jerr);
        if (!ev)
            rc = loom_error_set(err, LOOM_CODE_INTERNAL, "stored message \"%s\" is not JSON: %s",
                                id, jerr.text);
        else
            json_array_append_new(msgs, ev);
    }
    free(found);
    PQclear(r);
    if (rc != 0) {
        json_decref(msgs);
        return rc;
    }
    *res = json_pack("{s:o}", "msgs", msgs);
    return 0;
}

const loom_op_t loom_op_messages_batch_get = {
    .name = "messages.batch_get",
    .fn = batch_get,
    .timeout_ms = 10000,
    .description = "stored messages by id, in request order, missing ids left out (max 1000)",
    .flags = LOOM_OP_ONE_STATEMENT, /* one SELECT: no transaction needed */
};
