/* cmd/loom/main.c: the binary's services, one line each. */
#include "loom/app.h"
#include "notes.h"

int main(int argc, char **argv)
{
    static const loom_service_t *const services[] = {
        &notes_service,
    };
    loom_app_t app = {.name = "loom",
                      .version = "tutorial",
                      .services = services,
                      .n_services = LOOM_COUNT(services)};
    return loom_main(argc, argv, &app);
}
