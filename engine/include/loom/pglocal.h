/*
 * A private PostgreSQL cluster for `loom dev` and the test harness.
 *
 * initdb in a directory (once), then pg_ctl start on a free loopback port with
 * Unix sockets off, and pg_ctl stop on the way out. PostgreSQL refuses to run
 * as root, so when euid is 0 the server programs run as the `postgres` user
 * and the directory is handed to it.
 */
#ifndef LOOM_PGLOCAL_H
#define LOOM_PGLOCAL_H

#include "loom/error.h"

#include <stdbool.h>

typedef struct loom_pglocal {
    char dir[512];    /* cluster directory: data/, postgres.log, loom.lock */
    char bindir[256]; /* where initdb and pg_ctl live */
    char url[768];    /* postgresql://loom@127.0.0.1:PORT/loom */
    int port;
    bool started;
    int lock_fd; /* flock on dir/loom.lock while we own the cluster */
} loom_pglocal_t;

typedef struct loom_pglocal_opts {
    bool fast;          /* fsync off etc.: for tests, never for data you keep */
    const char *dbname; /* database to create; default "loom" */
    int port;           /* listen here (a restart keeps its address); 0: a free port */
} loom_pglocal_opts_t;

/*
 * Starts (initialising first when needed) a cluster in dir. Takes an exclusive
 * lock on dir/loom.lock: a second start on the same dir fails with a message
 * naming the holder. A server left running by a crashed earlier owner is
 * stopped first. Returns 0 or LOOM_EIO with err filled.
 */
int loom_pglocal_start(loom_pglocal_t *pg, const char *dir, const loom_pglocal_opts_t *opts,
                       loom_error_t *err);
/* Stops the server (fast shutdown, waits) and releases the lock. Idempotent. */
int loom_pglocal_stop(loom_pglocal_t *pg);

/* Finds the directory holding initdb/pg_ctl (LOOM_PG_BINDIR, the newest
 * /usr/lib/postgresql/N/bin, or pg_config --bindir). */
int loom_pglocal_find_bindir(char *out, size_t size);

/* A free TCP port on 127.0.0.1 (bound then released). */
int loom_free_port(void);

#endif
