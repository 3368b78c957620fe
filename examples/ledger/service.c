/* service.c: the ledger service as one unit. */
#include "ledger.h"

/* Embedded from migrations/ by loom_add_migrations() (CMakeLists.txt). */
extern const loom_migration_set_t loom_migrations_ledger;

/* The service's own error codes (a conflict: the command is rejected). */
const loom_error_code_t ledger_error_codes[] = {
    {"LEDGER_INSUFFICIENT_FUNDS", LOOM_ERR_CONFLICT, false,
     "The source account of a transfer holds less than its amount."},
};
const loom_error_catalogue_t ledger_errors = {"ledger", ledger_error_codes, 1};

static const loom_op_t *const ops[] = {&ledger_account_get_op, NULL};

static const loom_consumer_def_t consumers[] = {
    {.name = "ledger.accounts",
     .description = "applies accounts' commands",
     .commands = ledger_commands},
    {0},
};

const loom_service_t ledger_service = {
    .name = "ledger",
    .description = "accounts and transfers between them",
    .migrations = &loom_migrations_ledger,
    .ops = ops,
    .consumers = consumers,
    .routes = ledger_routes,
    .errors = &ledger_errors,
};
