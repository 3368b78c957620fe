/*
 * Schema migrations: numbered SQL files (migrations/NNNN_name.up.sql and
 * .down.sql) embedded in the binary at build time and applied in order.
 *
 * Each applied migration is recorded in loom_schema_migrations with its
 * version, name and the SHA-256 of its up file. A run refuses to start when an
 * applied file has changed since. Each migration runs in its own transaction
 * that first locks the single row of loom_schema_lock, so two processes
 * migrating at once serialize and the second finds the work done (a row lock
 * rather than an advisory lock, which CockroachDB lacks).
 */
#ifndef LOOM_MIGRATE_H
#define LOOM_MIGRATE_H

#include "loom/db.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

typedef struct loom_migration {
    int version;          /* NNNN */
    const char *name;     /* "engine_tables" */
    const char *up_sql;   /* contents of NNNN_name.up.sql */
    const char *down_sql; /* contents of NNNN_name.down.sql */
} loom_migration_t;

/* A set of migrations ordered by version (the build generates one). */
typedef struct loom_migration_set {
    const loom_migration_t *items;
    size_t count;
} loom_migration_set_t;

typedef enum {
    LOOM_MIGRATION_PENDING,
    LOOM_MIGRATION_APPLIED,
    LOOM_MIGRATION_CHANGED, /* applied, but the file differs from what was applied */
    LOOM_MIGRATION_MISSING, /* applied, but this binary has no such file */
} loom_migration_state_t;

typedef struct loom_migration_status {
    int version;
    char name[128];
    loom_migration_state_t state;
    char applied_at[40]; /* empty when pending */
    char checksum[65];   /* of the file (or as recorded when missing) */
} loom_migration_status_t;

/* SHA-256 hex of a migration's up file. */
void loom_migration_checksum(const loom_migration_t *m, char out[65]);

/* Applies every pending migration in order. *applied (may be NULL) counts
 * what this call applied. */
int loom_migrate_up(loom_db_t *db, const loom_migration_set_t *set, int *applied,
                    loom_error_t *err);
/* Reverts the last `steps` applied migrations, newest first. */
int loom_migrate_down(loom_db_t *db, const loom_migration_set_t *set, int steps, int *reverted,
                      loom_error_t *err);
/* One entry per known or applied migration, by version (caller frees *out). */
int loom_migrate_status(loom_db_t *db, const loom_migration_set_t *set,
                        loom_migration_status_t **out, size_t *n, loom_error_t *err);

const char *loom_migration_state_name(loom_migration_state_t state);

#endif
