/*
 * consumers.h: the write side of this build, handed to the engine by
 * cmd/loom/main.c: the consumer table, the periodic jobs (they publish
 * commands), the projections `loom replay` rebuilds, and the services'
 * configuration variables. One folder per service; each file is listed once
 * in consumers.c.
 */
#ifndef LOOM_CONSUMERS_H
#define LOOM_CONSUMERS_H

#include "loom/config.h"
#include "loom/consumer.h"
#include "loom/periodic.h"
#include "loom/replay.h"

#include <stddef.h>

extern const loom_consumer_def_t loom_app_consumers[];
extern const size_t loom_app_n_consumers;
extern const loom_periodic_def_t loom_app_jobs[];
extern const size_t loom_app_n_jobs;
extern const loom_projection_t loom_app_projections[];
extern const size_t loom_app_n_projections;
extern const loom_config_var_t loom_app_config_vars[];
extern const size_t loom_app_n_config_vars;

#endif
