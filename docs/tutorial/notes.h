/* notes.h: the parts of the notes service, gathered in notes_service.c. */
#ifndef NOTES_H
#define NOTES_H

#include "loom/service.h"

extern const loom_command_t notes_commands[];
extern const loom_op_t notes_get_op;
extern const loom_route_t notes_routes[];
extern const char notes_migration_sql[];
extern const loom_service_t notes_service;

#endif
