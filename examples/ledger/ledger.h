/* ledger.h: the ledger service (accounts and transfers), gathered in service.c. */
#ifndef LEDGER_H
#define LEDGER_H

#include "loom/service.h"

extern const loom_command_t ledger_commands[];
extern const loom_op_t ledger_account_get_op;
extern const loom_route_t ledger_routes[];
extern const loom_error_code_t ledger_error_codes[]; /* [0] LEDGER_INSUFFICIENT_FUNDS */
extern const loom_error_catalogue_t ledger_errors;
extern const loom_service_t ledger_service;

#endif
