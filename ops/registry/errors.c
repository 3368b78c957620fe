/*
 * errors.c: the error codes of the registry service (model.h defines them;
 * docs/errors.md lists them with the engine's).
 */
#include "../ops.h"
#include "model.h"

const loom_error_catalogue_t loom_registry_errors = {"registry", registry_error_codes,
                                                     REGISTRY_ERR__COUNT};
