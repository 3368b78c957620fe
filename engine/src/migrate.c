/*
 * migrate.c: the migrations runner.
 *
 * Safety comes from two rules. First, every run verifies the checksums of the
 * migrations already applied before it changes anything, and refuses to go on
 * when one differs. Second, every migration runs in its own transaction that
 * starts by locking the one row of loom_schema_lock and re-reading what is
 * applied, so concurrent runners take turns and never apply a file twice.
 */
#include "loom/migrate.h"
#include "loom/clock.h"
#include "loom/log.h"
#include "loom/mem.h"
#include "loom/sha256.h"

#include <stdlib.h>
#include <string.h>

static const char bootstrap_sql[] =
    "CREATE TABLE IF NOT EXISTS loom_schema_migrations ("
    " version INT PRIMARY KEY,"
    " name TEXT NOT NULL,"
    " checksum TEXT NOT NULL,"
    " applied_at TIMESTAMPTZ NOT NULL DEFAULT now());"
    "CREATE TABLE IF NOT EXISTS loom_schema_lock ("
    " id INT PRIMARY KEY,"
    " locked_at TIMESTAMPTZ);"
    "INSERT INTO loom_schema_lock (id) VALUES (1) ON CONFLICT (id) DO NOTHING;";

void loom_migration_checksum(const loom_migration_t *m, char out[65])
{
    loom_sha256_hex(m->up_sql, strlen(m->up_sql), out);
}

const char *loom_migration_state_name(loom_migration_state_t state)
{
    switch (state) {
    case LOOM_MIGRATION_PENDING:
        return "pending";
    case LOOM_MIGRATION_APPLIED:
        return "applied";
    case LOOM_MIGRATION_CHANGED:
        return "CHANGED";
    case LOOM_MIGRATION_MISSING:
        return "missing";
    }
    return "?";
}

/* Creates the bookkeeping tables. Two runners creating them at the same time
 * can collide inside Postgres's catalog (23505, 42P07, 42710): try again then. */
static int bootstrap(loom_db_t *db, loom_error_t *err)
{
    int rc = 0;
    for (int attempt = 0; attempt < 5; attempt++) {
        rc = loom_db_exec_script(db, bootstrap_sql, err);
        if (rc == 0)
            return 0;
        if (!loom_db_error_is_transient(err) && err && err->code &&
            !loom_error_is(err, LOOM_CODE_ALREADY_EXISTS) && strcmp(err->sqlstate, "42P07") != 0 &&
            strcmp(err->sqlstate, "42710") != 0)
            return rc;
        PGresult *r = PQexec(loom_db_pg(db), "ROLLBACK");
        PQclear(r);
    }
    return rc;
}

typedef struct applied_row {
    int version;
    char name[128];
    char checksum[65];
    char applied_at[40];
} applied_row_t;

static int read_applied(loom_db_t *db, applied_row_t **rows, size_t *n, loom_error_t *err)
{
    PGresult *res = NULL;
    int rc = loom_db_query(db,
                           /* epoch seconds: to_char is not portable to CockroachDB */
                           "SELECT version, name, checksum, "
                           "floor(extract(epoch FROM applied_at))::BIGINT "
                           "FROM loom_schema_migrations ORDER BY version",
                           0, NULL, &res, err);
    if (rc != 0)
        return rc;
    int nt = PQntuples(res);
    *rows = loom_xcalloc((size_t)nt + 1, sizeof(**rows));
    for (int i = 0; i < nt; i++) {
        applied_row_t *a = &(*rows)[i];
        a->version = atoi(PQgetvalue(res, i, 0));
        snprintf(a->name, sizeof(a->name), "%s", PQgetvalue(res, i, 1));
        snprintf(a->checksum, sizeof(a->checksum), "%s", PQgetvalue(res, i, 2));
        loom_rfc3339_format_seconds(atoll(PQgetvalue(res, i, 3)), a->applied_at,
                                    sizeof(a->applied_at));
    }
    *n = (size_t)nt;
    PQclear(res);
    return 0;
}

static const loom_migration_t *find_migration(const loom_migration_set_t *set, int version)
{
    for (size_t i = 0; i < set->count; i++)
        if (set->items[i].version == version)
            return &set->items[i];
    return NULL;
}

/* Refuses to go on when an applied migration's file changed. */
static int verify_checksums(const loom_migration_set_t *set, const applied_row_t *rows, size_t n,
                            loom_error_t *err)
{
    for (size_t i = 0; i < n; i++) {
        const loom_migration_t *m = find_migration(set, rows[i].version);
        if (!m)
            continue;
        char sum[65];
        loom_migration_checksum(m, sum);
        if (strcmp(sum, rows[i].checksum) != 0)
            return loom_error_set(
                err, LOOM_CODE_MIGRATION_CHECKSUM_MISMATCH,
                "migration %04d_%s was changed after it was applied (checksum %.12s, "
                "applied %.12s): restore the file, or write a new migration instead",
                m->version, m->name, sum, rows[i].checksum);
    }
    return 0;
}

static int begin_locked(loom_db_t *db, loom_error_t *err)
{
    int rc = loom_db_exec_script(db, "BEGIN", err);
    if (rc == 0)
        rc =
            loom_db_exec_script(db, "SELECT id FROM loom_schema_lock WHERE id = 1 FOR UPDATE", err);
    return rc;
}

static void rollback(loom_db_t *db)
{
    PGresult *r = PQexec(loom_db_pg(db), "ROLLBACK");
    PQclear(r);
}

static int check_all(loom_db_t *db, const loom_migration_set_t *set, loom_error_t *err)
{
    applied_row_t *rows = NULL;
    size_t n = 0;
    int rc = read_applied(db, &rows, &n, err);
    if (rc == 0)
        rc = verify_checksums(set, rows, n, err);
    free(rows);
    return rc;
}

int loom_migrate_up(loom_db_t *db, const loom_migration_set_t *set, int *applied, loom_error_t *err)
{
    int count = 0, rc = bootstrap(db, err);
    if (rc == 0)
        rc = check_all(db, set, err);
    for (size_t i = 0; rc == 0 && i < set->count; i++) {
        const loom_migration_t *m = &set->items[i];
        char sum[65], version[16];
        loom_migration_checksum(m, sum);
        snprintf(version, sizeof(version), "%d", m->version);
        const char *params[] = {version, m->name, sum};

        rc = begin_locked(db, err);
        PGresult *res = NULL;
        if (rc == 0)
            rc = loom_db_query(db, "SELECT checksum FROM loom_schema_migrations WHERE version = $1",
                               1, params, &res, err);
        if (rc == 0 && PQntuples(res) > 0) {
            /* Applied already, maybe by a runner we waited for. */
            bool same = strcmp(PQgetvalue(res, 0, 0), sum) == 0;
            PQclear(res);
            rollback(db);
            if (!same)
                rc = loom_error_set(err, LOOM_CODE_MIGRATION_CHECKSUM_MISMATCH,
                                    "migration %04d_%s was applied with another checksum",
                                    m->version, m->name);
            continue;
        }
        PQclear(res);
        if (rc == 0)
            rc = loom_db_exec_script(db, m->up_sql, err);
        if (rc == 0)
            rc = loom_db_query(db,
                               "INSERT INTO loom_schema_migrations (version, name, checksum) "
                               "VALUES ($1, $2, $3)",
                               3, params, NULL, err);
        if (rc == 0)
            rc = loom_db_exec_script(db, "COMMIT", err);
        if (rc != 0) {
            rollback(db);
            char msg[LOOM_ERROR_MESSAGE_MAX];
            snprintf(msg, sizeof(msg), "%s", err ? err->message : "");
            if (err)
                snprintf(err->message, sizeof(err->message),
                         "could not apply migration %04d_%s: %s", m->version, m->name, msg);
            break;
        }
        count++;
        LOOM_INFO("applied migration", "version=%d name=%s", m->version, m->name);
    }
    if (applied)
        *applied = count;
    return rc;
}

int loom_migrate_down(loom_db_t *db, const loom_migration_set_t *set, int steps, int *reverted,
                      loom_error_t *err)
{
    int count = 0, rc = bootstrap(db, err);
    if (rc == 0)
        rc = check_all(db, set, err);
    while (rc == 0 && count < steps) {
        rc = begin_locked(db, err);
        PGresult *res = NULL;
        if (rc == 0)
            rc = loom_db_query(db, "SELECT max(version) FROM loom_schema_migrations", 0, NULL, &res,
                               err);
        if (rc != 0) {
            PQclear(res);
            rollback(db);
            break;
        }
        if (PQgetisnull(res, 0, 0)) { /* nothing left to revert */
            PQclear(res);
            rollback(db);
            break;
        }
        int version = atoi(PQgetvalue(res, 0, 0));
        PQclear(res);
        const loom_migration_t *m = find_migration(set, version);
        if (!m) {
            rollback(db);
            rc = loom_error_set(err, LOOM_CODE_INVALID_ARGUMENT,
                                "applied migration %04d is not known to this binary: run the "
                                "binary that applied it to revert it",
                                version);
            break;
        }
        char vbuf[16];
        snprintf(vbuf, sizeof(vbuf), "%d", version);
        const char *params[] = {vbuf};
        rc = loom_db_exec_script(db, m->down_sql, err);
        if (rc == 0)
            rc = loom_db_query(db, "DELETE FROM loom_schema_migrations WHERE version = $1", 1,
                               params, NULL, err);
        if (rc == 0)
            rc = loom_db_exec_script(db, "COMMIT", err);
        if (rc != 0) {
            rollback(db);
            char msg[LOOM_ERROR_MESSAGE_MAX];
            snprintf(msg, sizeof(msg), "%s", err ? err->message : "");
            if (err)
                snprintf(err->message, sizeof(err->message),
                         "could not revert migration %04d_%s: %s", m->version, m->name, msg);
            break;
        }
        count++;
        LOOM_INFO("reverted migration", "version=%d name=%s", m->version, m->name);
    }
    if (reverted)
        *reverted = count;
    return rc;
}

int loom_migrate_status(loom_db_t *db, const loom_migration_set_t *set,
                        loom_migration_status_t **out, size_t *n, loom_error_t *err)
{
    applied_row_t *rows = NULL;
    size_t nrows = 0;
    int rc = bootstrap(db, err);
    if (rc == 0)
        rc = read_applied(db, &rows, &nrows, err);
    if (rc != 0)
        return rc;
    loom_migration_status_t *st = loom_xcalloc(set->count + nrows + 1, sizeof(*st));
    size_t k = 0;
    for (size_t i = 0; i < set->count; i++) {
        const loom_migration_t *m = &set->items[i];
        loom_migration_status_t *s = &st[k++];
        s->version = m->version;
        snprintf(s->name, sizeof(s->name), "%s", m->name);
        loom_migration_checksum(m, s->checksum);
        s->state = LOOM_MIGRATION_PENDING;
        for (size_t j = 0; j < nrows; j++) {
            if (rows[j].version != m->version)
                continue;
            s->state = strcmp(rows[j].checksum, s->checksum) == 0 ? LOOM_MIGRATION_APPLIED
                                                                  : LOOM_MIGRATION_CHANGED;
            snprintf(s->applied_at, sizeof(s->applied_at), "%s", rows[j].applied_at);
        }
    }
    for (size_t j = 0; j < nrows; j++) {
        if (find_migration(set, rows[j].version))
            continue;
        loom_migration_status_t *s = &st[k++];
        s->version = rows[j].version;
        snprintf(s->name, sizeof(s->name), "%s", rows[j].name);
        snprintf(s->checksum, sizeof(s->checksum), "%s", rows[j].checksum);
        snprintf(s->applied_at, sizeof(s->applied_at), "%s", rows[j].applied_at);
        s->state = LOOM_MIGRATION_MISSING;
    }
    free(rows);
    /* Sort by version (insertion sort: a few dozen entries). */
    for (size_t i = 1; i < k; i++) {
        loom_migration_status_t tmp = st[i];
        size_t j = i;
        while (j > 0 && st[j - 1].version > tmp.version) {
            st[j] = st[j - 1];
            j--;
        }
        st[j] = tmp;
    }
    *out = st;
    *n = k;
    return 0;
}
