/*
 * deploy/ (Dockerfile, compose file, Kubernetes manifests, systemd units) and
 * docs/deployment.md against the loom binary: tests/deploy/check.py (Debian's
 * python3-yaml) reads the files and runs the built `loom` (`loom config` with
 * each environment deploy/ defines, `loom <command> --help` for each command
 * line). No container runs here: these are checks of the files.
 */
#include "support.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>

static void check(const char *what)
{
    const char *argv[] = {LOOM_TEST_PYTHON3, LOOM_TEST_DEPLOY_CHECK, "--loom", loom_test_bin(),
                          "--root",          LOOM_TEST_SOURCE_DIR,   what,     NULL};
    const char *env[] = {NULL};
    char *out, *err;
    int rc = loom_test_run(argv, env, &out, &err);
    cr_expect_eq(rc, 0, "deploy check '%s' failed (tests/deploy/check.py, exit %d):\n%s%s", what,
                 rc, out, err);
    free(out);
    free(err);
}

/* Every YAML file under deploy/ parses; kustomizations list existing files. */
Test(deploy, yaml_files_parse)
{
    check("yaml");
}

/* kafka (KRaft), cockroach, postgres (profile), migrate, api, worker. */
Test(deploy, compose_has_the_services)
{
    check("compose");
}

/* Every LOOM_* name is a variable of the binary; every environment passes
 * `loom config`. */
Test(deploy, loom_variables_exist_and_are_valid)
{
    check("env");
}

/* compose command:, k8s args:, Dockerfile CMD, systemd ExecStart are loom
 * commands (`loom <command> --help` exits 0 and shows that usage). */
Test(deploy, command_lines_are_loom_commands)
{
    check("commands");
}

/* Multi-stage on debian:12-slim, runtime libraries only, non-root. */
Test(deploy, dockerfile_stages_packages_user)
{
    check("dockerfile");
}

/* Probes, scrape annotations, grace period > LOOM_SHUTDOWN_TIMEOUT, HPA, PDB,
 * Job, overlay. */
Test(deploy, kubernetes_manifests)
{
    check("k8s");
}

/* EnvironmentFile, Restart, KillSignal, TimeoutStopSec, hardening. */
Test(deploy, systemd_units)
{
    check("systemd");
}
