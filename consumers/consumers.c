/*
 * consumers.c: the consumer table, periodic jobs, projections and service
 * settings of this build. Each service's header provides its entries as
 * initializers (MESSAGES_CONSUMERS, ...); add a service by adding its line.
 */
#include "consumers.h"
#include "messages/messages.h"
#include "registry/registry.h"

const loom_consumer_def_t loom_app_consumers[] = {MESSAGES_CONSUMERS, REGISTRY_CONSUMERS};
const size_t loom_app_n_consumers = sizeof(loom_app_consumers) / sizeof(loom_app_consumers[0]);

const loom_periodic_def_t loom_app_jobs[] = {MESSAGES_JOBS, REGISTRY_JOBS};
const size_t loom_app_n_jobs = sizeof(loom_app_jobs) / sizeof(loom_app_jobs[0]);

const loom_projection_t loom_app_projections[] = {MESSAGES_PROJECTIONS};
const size_t loom_app_n_projections =
    sizeof(loom_app_projections) / sizeof(loom_app_projections[0]);

const loom_config_var_t loom_app_config_vars[] = {MESSAGES_CONFIG_VARS, REGISTRY_CONFIG_VARS};
const size_t loom_app_n_config_vars =
    sizeof(loom_app_config_vars) / sizeof(loom_app_config_vars[0]);
