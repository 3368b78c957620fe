/* main.c: the ledger binary: Loom's command line with the ledger service. */
#include "ledger.h"
#include "loom/app.h"

int main(int argc, char **argv)
{
    static const loom_service_t *const services[] = {
        &ledger_service,
    };
    loom_app_t app = {.name = "ledger",
                      .version = "1.0.0",
                      .services = services,
                      .n_services = LOOM_COUNT(services)};
    return loom_main(argc, argv, &app);
}
