/*
 * errors.c: the error codes of the messages service (docs/errors.md lists
 * them with the engine's).
 */
#include "../ops.h"

const loom_error_code_t loom_messages_error_codes[] = {
    {"MESSAGE_NOT_FOUND", LOOM_ERR_NOT_FOUND, false, "No message with that id is stored."},
};

const loom_error_catalogue_t loom_messages_errors = {"messages", loom_messages_error_codes, 1};
