/*
 * main.c: the `loom` binary: its services, one line each, handed to the
 * engine. Every command lives in engine/src/cli_*.c; each service is
 * described in consumers/<service>/service.c.
 */
#include "loom/app.h"
#include "messages/messages.h"
#include "registry/registry.h"

int main(int argc, char **argv)
{
    static const loom_service_t *const services[] = {
        &loom_messages_service,
        &loom_registry_service,
    };
    loom_app_t app = {
        .name = "loom",
        .version = LOOM_VERSION,
        .services = services,
        .n_services = LOOM_COUNT(services),
    };
    return loom_main(argc, argv, &app);
}
