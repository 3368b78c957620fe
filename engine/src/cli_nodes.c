/*
 * cli_nodes.c: `loom nodes`, every Loom process with its last heartbeat.
 */
#include "cli.h"
#include "loom/node.h"

#include <stdio.h>
#include <stdlib.h>

static int cmd_nodes(cli_ctx_t *ctx, int argc, char **argv)
{
    if (argc > 1)
        return cli_usage_error("nodes", "%s '%s'",
                               argv[1][0] == '-' ? "unknown option" : "unexpected argument",
                               argv[1]);
    loom_db_pool_t *pool = NULL;
    int rc = cli_open_db(ctx, "nodes", 1, &pool);
    if (rc != 0)
        return rc;
    loom_db_t *db = NULL;
    loom_error_t err;
    PGresult *res = NULL;
    char stale[32];
    snprintf(stale, sizeof(stale), "%d", LOOM_NODE_STALE_MS);
    const char *p[] = {stale};
    rc = loom_db_acquire(pool, &db, &err);
    if (rc == 0)
        rc = loom_db_query(db,
                           "SELECT id, role, coalesce(url, '-'), site, version, "
                           "floor(extract(epoch FROM now() - last_heartbeat))::bigint, "
                           "now() - last_heartbeat > $1::bigint * interval '1 millisecond' "
                           "FROM loom_nodes ORDER BY role, last_heartbeat DESC",
                           1, p, &res, &err);
    loom_db_release(db);
    loom_db_pool_free(pool);
    if (rc != 0)
        return cli_fail("nodes", "%s", err.message);
    printf("%-36s  %-8s  %-24s  %-10s  %-8s  %s\n", "ID", "ROLE", "URL", "SITE", "VERSION",
           "LAST HEARTBEAT");
    int n = PQntuples(res), n_stale = 0;
    for (int i = 0; i < n; i++) {
        bool is_stale = PQgetvalue(res, i, 6)[0] == 't';
        n_stale += is_stale;
        printf("%-36s  %-8s  %-24s  %-10s  %-8s  %s s ago%s\n", PQgetvalue(res, i, 0),
               PQgetvalue(res, i, 1), PQgetvalue(res, i, 2), PQgetvalue(res, i, 3),
               PQgetvalue(res, i, 4), PQgetvalue(res, i, 5), is_stale ? "  STALE" : "");
    }
    printf("%d node%s, %d stale (no heartbeat for %d s)\n", n, n == 1 ? "" : "s", n_stale,
           LOOM_NODE_STALE_MS / 1000);
    PQclear(res);
    return LOOM_EXIT_OK;
}

const cli_command_t cli_nodes_command = {
    "nodes", "list Loom processes with their last heartbeat",
    "usage: loom nodes\n"
    "\n"
    "Every Loom process writes a heartbeat to loom_nodes every 5 s. This lists\n"
    "them: id, role, url, site, version and how long ago the last heartbeat was;\n"
    "a node silent for more than 20 s is marked STALE. Needs LOOM_DATABASE_URL.\n",
    true, cmd_nodes};
