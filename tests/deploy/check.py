#!/usr/bin/env python3
"""Checks deploy/ (and docs/deployment.md) against the loom binary.

usage: check.py --loom BIN --root REPO CHECK...

CHECK is one of: yaml compose env commands dockerfile k8s systemd (or all).
Each failed check prints one "FAIL [check] file: what is wrong" line; the exit
status is 1 when any check failed. Needs Debian's python3-yaml.
"""
import argparse
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

try:
    import yaml
except ImportError:
    print("FAIL [setup] python3-yaml is missing: run ./scripts/setup (apt-get install python3-yaml)")
    sys.exit(1)

ROOT = "."
LOOM = "loom"
FAILS = []
CURRENT = "?"

# The services the compose file must define; the k8s objects the base must hold.
COMPOSE_SERVICES = ["kafka", "cockroach", "postgres", "migrate", "api", "worker"]
RUNTIME_PACKAGES = ["librdkafka1", "libpq5", "libjansson4", "libuv1", "libhttp-parser2.9",
                    "ca-certificates"]
BASE_IMAGE_PACKAGES = {"libc6", "libgcc-s1"}  # already in debian:12-slim
SYSTEMD_UNITS = ["loom-api.service", "loom-worker.service", "loom-migrate.service"]


def fail(where, msg):
    FAILS.append("FAIL [%s] %s: %s" % (CURRENT, os.path.relpath(where, ROOT) if where else "-", msg))


def path(*parts):
    return os.path.join(ROOT, *parts)


def deploy_files(*patterns):
    out = []
    for p in patterns:
        out += glob.glob(path("deploy", "**", p), recursive=True)
    return sorted(set(out))


def load_yaml(f):
    with open(f) as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def duration_seconds(v):
    """LOOM duration (500ms, 30s, 1m, 2h) or systemd time span (45s, 1min) -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|sec|m|min|h)?\s*", str(v))
    if not m:
        return None
    n = float(m.group(1))
    return n * {"ms": 0.001, "s": 1, "sec": 1, None: 1, "m": 60, "min": 60, "h": 3600}[m.group(2)]


def run(argv, env=None):
    p = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=60)
    return p.returncode, p.stdout, p.stderr


_known = None


def loom_vars():
    """The variables `loom config` prints: the binary's configuration table."""
    global _known
    if _known is None:
        rc, out, err = run([LOOM, "config"], env={"PATH": "/usr/bin:/bin"})
        if rc != 0:
            raise SystemExit("FAIL [setup] `%s config` exited %d: %s" % (LOOM, rc, err.strip()))
        _known = {l.split("=", 1)[0] for l in out.splitlines() if l.startswith("LOOM_")}
        if len(_known) < 10:
            raise SystemExit("FAIL [setup] `loom config` printed only %d variables" % len(_known))
    return _known


def is_loom_image(svc):
    return str(svc.get("image", "")).split(":")[0] in ("loom",) or "build" in svc


def compose():
    f = path("deploy", "compose.yaml")
    docs = load_yaml(f)
    return f, (docs[0] if docs else {})


def k8s_objects(sub="base"):
    objs = []
    for f in sorted(glob.glob(path("deploy", "k8s", sub, "*.yaml"))):
        for d in load_yaml(f):
            objs.append((f, d))
    return objs


def pod_spec(obj):
    kind = obj.get("kind")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return obj["spec"]["template"]["spec"]
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def find_obj(objs, kind, name):
    for f, o in objs:
        if o.get("kind") == kind and o.get("metadata", {}).get("name") == name:
            return f, o
    return None, None


# ---- yaml -----------------------------------------------------------------

def check_yaml():
    files = deploy_files("*.yaml", "*.yml")
    if len(files) < 5:
        fail(path("deploy"), "expected the compose file and the Kubernetes manifests, found %d YAML files" % len(files))
    for f in files:
        try:
            docs = load_yaml(f)
        except yaml.YAMLError as e:
            fail(f, "does not parse as YAML: %s" % str(e).replace("\n", " "))
            continue
        if not docs:
            fail(f, "is empty")
        for d in docs:
            if not isinstance(d, dict):
                fail(f, "a document is not a mapping")
            elif "/k8s/" in f and not (d.get("apiVersion") and d.get("kind")):
                fail(f, "a Kubernetes document without apiVersion/kind")
            elif "/k8s/" in f and d.get("kind") != "Kustomization" and not d.get("metadata", {}).get("name"):
                fail(f, "%s without metadata.name" % d.get("kind"))
    # Every kustomization lists existing files, and the base lists every manifest.
    for kf in deploy_files("kustomization.yaml"):
        k = load_yaml(kf)[0]
        d = os.path.dirname(kf)
        for r in k.get("resources", []):
            if not os.path.exists(os.path.join(d, r)):
                fail(kf, "resource %s does not exist" % r)
        if kf.endswith("base/kustomization.yaml"):
            for m in glob.glob(os.path.join(d, "*.yaml")):
                b = os.path.basename(m)
                if b != "kustomization.yaml" and b not in k.get("resources", []):
                    fail(kf, "%s is not listed in resources (kubectl apply -k would skip it)" % b)


# ---- compose --------------------------------------------------------------

def check_compose():
    f, c = compose()
    svcs = c.get("services", {})
    for s in COMPOSE_SERVICES:
        if s not in svcs:
            fail(f, "service %r is missing (expected %s)" % (s, ", ".join(COMPOSE_SERVICES)))
    if not svcs:
        return
    k = svcs.get("kafka", {})
    if not str(k.get("image", "")).startswith("apache/kafka"):
        fail(f, "kafka must use the apache/kafka image, not %r" % k.get("image"))
    if "broker,controller" not in str(k.get("environment", {}).get("KAFKA_PROCESS_ROLES", "")):
        fail(f, "kafka must run in KRaft mode (KAFKA_PROCESS_ROLES: broker,controller)")
    cr = svcs.get("cockroach", {})
    crcmd = " ".join(cr.get("command", [])) if isinstance(cr.get("command"), list) else str(cr.get("command", ""))
    if not str(cr.get("image", "")).startswith("cockroachdb/cockroach") or "start-single-node" not in crcmd \
            or "--insecure" not in crcmd:
        fail(f, "cockroach must be cockroachdb/cockroach start-single-node --insecure")
    if "postgres" not in svcs.get("postgres", {}).get("profiles", []):
        fail(f, "the postgres service must be in the profile 'postgres'")
    mcmd = svcs.get("migrate", {}).get("command")
    if (shlex.split(mcmd) if isinstance(mcmd, str) else mcmd) != ["migrate", "up"]:
        fail(f, "migrate must run `loom migrate up`, its command is %r" % mcmd)
    if svcs.get("migrate", {}).get("restart", "no") not in ("no", "on-failure"):
        fail(f, "migrate is a one-shot: restart must be 'no' or 'on-failure'")
    for s in ("api", "worker"):
        dep = svcs.get(s, {}).get("depends_on", {})
        cond = dep.get("migrate", {}).get("condition") if isinstance(dep, dict) else None
        if cond != "service_completed_successfully":
            fail(f, "%s must depend on migrate with condition service_completed_successfully (has %r)"
                 % (s, cond))
    listen = svcs.get("api", {}).get("environment", {}).get("LOOM_API_LISTEN")
    if listen != "0.0.0.0:8080":
        fail(f, "api must set LOOM_API_LISTEN=0.0.0.0:8080 (has %r)" % listen)


# ---- env ------------------------------------------------------------------

def interpolate(v):
    """Compose interpolation: ${X:-default} and ${X-default} -> default, ${X} -> ''."""
    v = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", str(v))
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}", "", v)


def env_file(f):
    env = {}
    with open(f) as fh:
        for line in fh:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                k, v = line.split("=", 1)
                env[k.strip()] = v.strip().strip('"')
    return env


def unit_environment(f):
    env = {}
    with open(f) as fh:
        for line in fh:
            if line.startswith("Environment="):
                for item in shlex.split(line.split("=", 1)[1]):
                    k, _, v = item.partition("=")
                    env[k] = v
    return env


def env_sets():
    """(where, {LOOM_*: value}) for every process environment deploy/ defines."""
    sets = []
    f, c = compose()
    for name, svc in c.get("services", {}).items():
        if is_loom_image(svc):
            env = svc.get("environment", {})
            if isinstance(env, list):
                env = dict(e.split("=", 1) for e in env)
            sets.append(("%s (service %s)" % (f, name),
                         {k: interpolate(v) for k, v in env.items() if k.startswith("LOOM_")}))
    k8s = {}
    for kf, o in k8s_objects():
        if o.get("kind") == "ConfigMap":
            k8s.update({k: str(v) for k, v in o.get("data", {}).items() if k.startswith("LOOM_")})
        if o.get("kind") == "Secret":
            k8s.update({k: str(v) for k, v in o.get("stringData", {}).items() if k.startswith("LOOM_")})
        spec = pod_spec(o)
        for ctr in (spec or {}).get("containers", []):
            for e in ctr.get("env", []):
                if e.get("name", "").startswith("LOOM_") and "value" in e:
                    k8s[e["name"]] = str(e["value"])
    sets.append((path("deploy", "k8s", "base") + " (ConfigMap + Secret)", k8s))
    sysenv = path("deploy", "systemd", "loom.env.example")
    base = env_file(sysenv) if os.path.exists(sysenv) else {}
    for u in SYSTEMD_UNITS:
        uf = path("deploy", "systemd", u)
        if os.path.exists(uf):
            e = dict(base)
            e.update(unit_environment(uf))
            sets.append(("%s + loom.env.example" % uf, e))
    return sets


def check_env():
    known = loom_vars()
    # Every LOOM_* name written anywhere in deploy/ or docs/deployment.md.
    texts = [f for f in glob.glob(path("deploy", "**", "*"), recursive=True) if os.path.isfile(f)]
    texts.append(path("docs", "deployment.md"))
    for f in texts:
        if not os.path.exists(f):
            fail(f, "is missing")
            continue
        with open(f, errors="replace") as fh:
            text = fh.read()
        for name in sorted(set(re.findall(r"\bLOOM_[A-Z0-9_]*[A-Z0-9]\b", text))):
            if name not in known and not name.startswith("LOOM_KAFKA_"):
                fail(f, "%s is not a variable of the loom binary (see `loom config`)" % name)
    # Every environment deploy/ defines is one `loom config` accepts as it is.
    tmp = tempfile.NamedTemporaryFile(prefix="loom-deploy-", delete=False)
    tmp.close()
    try:
        for where, env in env_sets():
            if not env:
                fail(where, "sets no LOOM_* variable")
                continue
            for k in env:
                if k not in known and not k.startswith("LOOM_KAFKA_"):
                    fail(where, "%s is not a variable of the loom binary" % k)
            run_env = {"PATH": "/usr/bin:/bin"}
            for k, v in env.items():
                # Files exist only where deployed: check the other values.
                run_env[k] = tmp.name if k.endswith("_FILE") else v
            rc, out, err = run([LOOM, "config"], env=run_env)
            if rc != 0:
                fail(where, "`loom config` rejects these settings (exit %d): %s" % (rc, err.strip()))
            for line in (out + err).splitlines():
                if "not a Loom variable" in line:
                    fail(where, line.strip("# "))
    finally:
        os.unlink(tmp.name)


# ---- commands -------------------------------------------------------------

def dockerfile_instructions(f):
    """[(INSTRUCTION, argument text)] with continuation lines joined."""
    out, cur = [], ""
    with open(f) as fh:
        for line in fh:
            s = line.rstrip("\n")
            if not cur and (not s.strip() or s.lstrip().startswith("#")):
                continue
            cur += s[:-1] + " " if s.endswith("\\") else s
            if not s.endswith("\\"):
                parts = cur.strip().split(None, 1)
                out.append((parts[0].upper(), parts[1] if len(parts) > 1 else ""))
                cur = ""
    return out


def exec_form(arg):
    try:
        v = json.loads(arg)
        return v if isinstance(v, list) else None
    except ValueError:
        return None


def invocations():
    """(where, [args after `loom`]) for every command line deploy/ runs."""
    inv = []
    f, c = compose()
    for name, svc in c.get("services", {}).items():
        if is_loom_image(svc):
            cmd = svc.get("command")
            if cmd is None:
                fail(f, "service %s runs the image's default command: say which (command:)" % name)
                continue
            if svc.get("entrypoint") is not None:
                fail(f, "service %s overrides the entrypoint; loom services keep ENTRYPOINT [\"loom\"]" % name)
            inv.append(("%s (service %s)" % (f, name), shlex.split(cmd) if isinstance(cmd, str) else cmd))
    for kf, o in k8s_objects():
        spec = pod_spec(o)
        for ctr in (spec or {}).get("containers", []) + (spec or {}).get("initContainers", []):
            if str(ctr.get("image", "")).split(":")[0].split("/")[-1] != "loom":
                continue
            cmd, args = ctr.get("command"), ctr.get("args")
            where = "%s (%s %s)" % (kf, o["kind"], o["metadata"]["name"])
            if cmd is not None:
                if not cmd or os.path.basename(cmd[0]) != "loom":
                    fail(kf, "container %s runs %r, not loom" % (ctr.get("name"), cmd))
                    continue
                args = list(cmd[1:]) + list(args or [])
            if not args:
                fail(kf, "container %s runs the image's default command: say which (args:)" % ctr.get("name"))
                continue
            inv.append((where, list(args)))
    df = path("deploy", "Dockerfile")
    if os.path.exists(df):
        ins = dockerfile_instructions(df)
        ep = [exec_form(a) for i, a in ins if i == "ENTRYPOINT"]
        cmd = [exec_form(a) for i, a in ins if i == "CMD"]
        if not ep or ep[-1] != ["loom"]:
            fail(df, 'ENTRYPOINT must be ["loom"] (exec form)')
        if not cmd or not cmd[-1]:
            fail(df, 'CMD must be an exec-form loom command, e.g. ["api"]')
        else:
            inv.append((df + " (CMD)", cmd[-1]))
    for u in SYSTEMD_UNITS:
        uf = path("deploy", "systemd", u)
        if not os.path.exists(uf):
            continue
        with open(uf) as fh:
            for line in fh:
                if re.match(r"Exec(Start|StartPre|StartPost|Stop|Reload)=", line):
                    words = shlex.split(line.split("=", 1)[1].lstrip("-@:+!"))
                    if not words or os.path.basename(words[0]) != "loom":
                        fail(uf, "%s does not run loom" % line.strip())
                        continue
                    if not os.path.isabs(words[0]):
                        fail(uf, "%s: systemd needs an absolute path" % line.strip())
                    inv.append((uf, words[1:]))
    # `loom COMMAND ...` spans in docs/deployment.md.
    doc = path("docs", "deployment.md")
    if os.path.exists(doc):
        with open(doc) as fh:
            for span in re.findall(r"`loom ([a-z][^`]*)`", fh.read()):
                words = span.split()
                if all(re.fullmatch(r"[a-z][a-z-]*", w) for w in words[:2]):
                    inv.append((doc, words))
    return inv


def check_commands():
    inv = invocations()
    if len(inv) < 8:
        fail(path("deploy"), "found only %d loom command lines" % len(inv))
    for where, args in inv:
        if not args:
            fail(where, "runs loom without a command")
            continue
        rc, out, err = run([LOOM] + list(args) + ["--help"], env={"PATH": "/usr/bin:/bin"})
        if rc != 0:
            fail(where, "`loom %s` is not a loom command: `loom %s --help` exited %d: %s"
                 % (" ".join(args), " ".join(args), rc, err.strip()))
            continue
        words = []
        for a in args:
            if a.startswith("-"):
                break
            words.append(a)
        if ("loom " + " ".join(words)) not in out:
            fail(where, "`loom %s` is not a usage line of `loom %s --help`" % (" ".join(words), args[0]))
        for a in args:
            if a.startswith("--") and a.split("=")[0] not in out:
                fail(where, "loom %s has no option %s" % (args[0], a.split("=")[0]))


# ---- dockerfile -----------------------------------------------------------

def check_dockerfile():
    df = path("deploy", "Dockerfile")
    if not os.path.exists(df):
        fail(df, "is missing")
        return
    ins = dockerfile_instructions(df)
    stages, cur = [], None
    for i, a in ins:
        if i == "FROM":
            cur = {"from": a.split()[0], "args": a, "run": [], "user": None, "other": []}
            stages.append(cur)
        elif cur is not None:
            (cur["run"] if i == "RUN" else cur["other"]).append((i, a))
            if i == "USER":
                cur["user"] = a.strip()
    if len(stages) < 2:
        fail(df, "must be multi-stage (a build stage and a runtime stage), has %d FROM" % len(stages))
        return
    for s in stages:
        if s["from"] != "debian:12-slim":
            fail(df, "stage `FROM %s` must use debian:12-slim" % s["args"])
    build_run = " ".join(a for _, a in stages[0]["run"])
    if "-DLOOM_BUILD_TESTS=OFF" not in build_run:
        fail(df, "the build stage must configure with -DLOOM_BUILD_TESTS=OFF")
    if "-DCMAKE_BUILD_TYPE=Release" not in build_run:
        fail(df, "the build stage must build Release (-DCMAKE_BUILD_TYPE=Release)")
    final = stages[-1]
    run_text = " ".join(a for _, a in final["run"])
    m = re.findall(r"apt-get install ([^&;|]*)", run_text)
    pkgs = {w for part in m for w in part.split() if not w.startswith("-")}
    for p in RUNTIME_PACKAGES:
        if p not in pkgs:
            fail(df, "the runtime stage must install %s" % p)
    for p in sorted(pkgs):
        if p.endswith("-dev") or p in ("build-essential", "cmake", "ninja-build", "gcc", "curl"):
            fail(df, "the runtime stage installs %s, a build tool or -dev package" % p)
    if shutil.which("apt-cache"):
        for p in sorted(pkgs):
            if run(["apt-cache", "show", "--no-all-versions", p])[0] != 0:
                fail(df, "%s is not a Debian 12 package (apt-cache show)" % p)
    # The libraries the built binary needs are all installed (or in the base image).
    if shutil.which("ldd") and shutil.which("dpkg"):
        rc, out, _ = run(["ldd", LOOM])
        needed = [l.split("=>")[1].split("(")[0].strip() for l in out.splitlines() if "=>" in l]
        direct = set(run(["sh", "-c", "readelf -d '%s' | sed -n 's/.*NEEDED.*\\[\\(.*\\)\\]/\\1/p'" % LOOM])[1].split())
        for lib in needed:
            if direct and os.path.basename(lib) not in direct:
                continue
            # A sanitizer build (make asan) links the sanitizer runtimes; the
            # image is built without them.
            if re.match(r"lib(asan|ubsan|lsan|tsan)\.so", os.path.basename(lib)):
                continue
            rc, owner, _ = run(["dpkg", "-S", "*/" + os.path.basename(lib)])
            owners = {o.split(":")[0].strip() for o in owner.splitlines() if ":" in o}
            owners = {o.split(",")[0] for o in owners}
            if rc != 0 or not owners:
                fail(df, "cannot tell which package ships %s" % lib)
            elif not owners & (pkgs | BASE_IMAGE_PACKAGES):
                fail(df, "loom links %s (package %s) but the runtime stage does not install it"
                     % (os.path.basename(lib), "/".join(sorted(owners))))
    user = final["user"]
    if not user or user.split(":")[0] in ("0", "root"):
        fail(df, "the runtime stage must switch to a non-root USER (has %r)" % user)
    if not any(i == "COPY" and "--from=" in a for i, a in final["other"]):
        fail(df, "the runtime stage must COPY the binary --from the build stage")
    if not any(i == "EXPOSE" and "8080" in a.split() for i, a in final["other"]):
        fail(df, "the runtime stage must EXPOSE 8080")
    ep = [exec_form(a) for i, a in final["other"] if i == "ENTRYPOINT"]
    cmd = [exec_form(a) for i, a in final["other"] if i == "CMD"]
    if not ep or ep[-1] != ["loom"]:
        fail(df, 'ENTRYPOINT must be ["loom"]')
    if not cmd or cmd[-1] != ["api"]:
        fail(df, 'CMD must be ["api"]')


# ---- k8s ------------------------------------------------------------------

def probe_port(ctr, port):
    if isinstance(port, int):
        return port
    for p in ctr.get("ports", []):
        if p.get("name") == port:
            return p.get("containerPort")
    return None


def check_k8s():
    objs = k8s_objects()
    f, cm = find_obj(objs, "ConfigMap", "loom-config")
    if not cm:
        fail(path("deploy", "k8s", "base"), "ConfigMap loom-config is missing")
        return
    shutdown = duration_seconds(cm.get("data", {}).get("LOOM_SHUTDOWN_TIMEOUT", "30s"))
    if shutdown is None:
        fail(f, "LOOM_SHUTDOWN_TIMEOUT is not a duration")
        return
    sf, sec = find_obj(objs, "Secret", "loom-secrets")
    if not sec:
        fail(path("deploy", "k8s", "base"), "Secret loom-secrets (example values) is missing")
    af, api = find_obj(objs, "Deployment", "loom-api")
    wf, worker = find_obj(objs, "Deployment", "loom-worker")
    for o, n, of in ((api, "loom-api", af), (worker, "loom-worker", wf)):
        if not o:
            fail(path("deploy", "k8s", "base"), "Deployment %s is missing" % n)
            continue
        spec = pod_spec(o)
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if grace <= shutdown:
            fail(of, "%s: terminationGracePeriodSeconds %s must exceed LOOM_SHUTDOWN_TIMEOUT (%gs in "
                 "configmap.yaml), or the kubelet kills it mid-shutdown" % (n, grace, shutdown))
        for ctr in spec.get("containers", []):
            refs = {e.get("configMapRef", {}).get("name") or e.get("secretRef", {}).get("name")
                    for e in ctr.get("envFrom", [])}
            if not {"loom-config", "loom-secrets"} <= refs:
                fail(of, "%s: container %s must take envFrom loom-config and loom-secrets" % (n, ctr.get("name")))
    if api:
        tmpl = api["spec"]["template"]
        ann = tmpl.get("metadata", {}).get("annotations", {})
        if str(ann.get("prometheus.io/scrape")) != "true" or str(ann.get("prometheus.io/port")) != "8080":
            fail(af, "the api pods need prometheus.io/scrape: \"true\" and prometheus.io/port: \"8080\"")
        ctr = tmpl["spec"]["containers"][0]
        for probe, want in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            hg = ctr.get(probe, {}).get("httpGet", {})
            if hg.get("path") != want or probe_port(ctr, hg.get("port")) != 8080:
                fail(af, "%s must be httpGet %s on port 8080 (has path %r, port %r)"
                     % (probe, want, hg.get("path"), hg.get("port")))
        labels = tmpl.get("metadata", {}).get("labels", {})
        svf, svc = find_obj(objs, "Service", "loom-api")
        if not svc:
            fail(af, "Service loom-api is missing")
        elif not svc["spec"].get("selector") or any(labels.get(k) != v for k, v in svc["spec"]["selector"].items()):
            fail(svf, "the Service selector does not match the api pods' labels")
        hf, hpa = find_obj(objs, "HorizontalPodAutoscaler", "loom-api")
        if not hpa or hpa.get("apiVersion") != "autoscaling/v2" or \
                hpa["spec"].get("scaleTargetRef", {}).get("name") != "loom-api":
            fail(hf or af, "an autoscaling/v2 HorizontalPodAutoscaler loom-api scaling Deployment loom-api is missing")
    if worker:
        # The worker serves /healthz, /readyz, /metrics on LOOM_WORKER_LISTEN.
        wl = str(cm.get("data", {}).get("LOOM_WORKER_LISTEN", ""))
        wport = int(wl.rsplit(":", 1)[1]) if re.fullmatch(r"[^,]+:\d+", wl) else None
        if wport is None:
            fail(f, "LOOM_WORKER_LISTEN must be set to host:port (the worker's probes and metrics)")
        tmpl = worker["spec"]["template"]
        ann = tmpl.get("metadata", {}).get("annotations", {})
        if str(ann.get("prometheus.io/scrape")) != "true" or str(ann.get("prometheus.io/port")) != str(wport):
            fail(wf, "the worker pods need prometheus.io/scrape: \"true\" and prometheus.io/port: \"%s\"" % wport)
        ctr = tmpl["spec"]["containers"][0]
        for probe, want in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            hg = ctr.get(probe, {}).get("httpGet", {})
            if hg.get("path") != want or probe_port(ctr, hg.get("port")) != wport:
                fail(wf, "%s must be httpGet %s on port %s (has path %r, port %r)"
                     % (probe, want, wport, hg.get("path"), hg.get("port")))
        labels = worker["spec"]["template"].get("metadata", {}).get("labels", {})
        pdbs = [o for _, o in objs if o.get("kind") == "PodDisruptionBudget" and
                o["spec"].get("selector", {}).get("matchLabels") and
                all(labels.get(k) == v for k, v in o["spec"]["selector"]["matchLabels"].items())]
        if not pdbs:
            fail(wf, "no PodDisruptionBudget selects the worker pods")
    jf, job = find_obj(objs, "Job", "loom-migrate")
    if not job:
        fail(path("deploy", "k8s", "base"), "Job loom-migrate is missing")
    elif pod_spec(job)["containers"][0].get("args") != ["migrate", "up"]:
        fail(jf, "the migrate Job must run args [migrate, up]")
    # The overlay patches replicas and the image tag; both build when kubectl is here.
    of = path("deploy", "k8s", "overlays", "example", "kustomization.yaml")
    if not os.path.exists(of):
        fail(of, "is missing")
        return
    ov = load_yaml(of)[0]
    if not ov.get("replicas") and "replicas" not in json.dumps(ov.get("patches", [])):
        fail(of, "the example overlay must patch replicas")
    if not any(i.get("newTag") for i in ov.get("images", [])):
        fail(of, "the example overlay must set the image tag (images: newTag)")
    kubectl = shutil.which("kubectl")
    if kubectl:
        for d in (path("deploy", "k8s", "base"), path("deploy", "k8s", "overlays", "example")):
            rc, out, err = run([kubectl, "kustomize", d])
            if rc != 0:
                fail(d, "`kubectl kustomize` fails: %s" % err.strip())
            elif d.endswith("example"):
                tag = [i["newTag"] for i in ov.get("images", []) if i.get("newTag")]
                if tag and (":" + str(tag[0])) not in out:
                    fail(d, "the rendered overlay does not use image tag %s" % tag[0])


# ---- systemd --------------------------------------------------------------

def unit_settings(f):
    s = {}
    with open(f) as fh:
        for line in fh:
            line = line.strip()
            if line and not line.startswith(("#", ";", "[")) and "=" in line:
                k, v = line.split("=", 1)
                s.setdefault(k.strip(), []).append(v.strip())
    return s


def check_systemd():
    envf = path("deploy", "systemd", "loom.env.example")
    if not os.path.exists(envf):
        fail(envf, "is missing (the example of /etc/loom/loom.env)")
        return
    shutdown = duration_seconds(env_file(envf).get("LOOM_SHUTDOWN_TIMEOUT", "30s"))
    for u in SYSTEMD_UNITS:
        uf = path("deploy", "systemd", u)
        if not os.path.exists(uf):
            fail(uf, "is missing")
            continue
        s = unit_settings(uf)
        want = {"EnvironmentFile": "/etc/loom/loom.env", "Restart": "on-failure",
                "KillSignal": "SIGTERM", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
                "ProtectHome": "yes", "PrivateTmp": "yes"}
        for k, v in want.items():
            if v not in s.get(k, []):
                fail(uf, "needs %s=%s (has %s)" % (k, v, s.get(k)))
        if not s.get("ExecStart"):
            fail(uf, "has no ExecStart")
        if u == "loom-migrate.service":
            if s.get("Type") != ["oneshot"]:
                fail(uf, "must be Type=oneshot")
        else:
            t = duration_seconds(s.get("TimeoutStopSec", ["90s"])[-1])
            if t is None or t <= shutdown:
                fail(uf, "TimeoutStopSec=%s must exceed LOOM_SHUTDOWN_TIMEOUT (%gs in loom.env.example)"
                     % (s.get("TimeoutStopSec"), shutdown))
            if "loom-migrate.service" not in " ".join(s.get("After", [])):
                fail(uf, "must start After=loom-migrate.service")
        if u == "loom-worker.service":
            wl = env_file(envf).get("LOOM_WORKER_LISTEN", "")
            if not re.fullmatch(r"[^,]+:\d+", wl):
                fail(envf, "LOOM_WORKER_LISTEN must be host:port (loom-worker's /metrics, /readyz)")


CHECKS = {"yaml": check_yaml, "compose": check_compose, "env": check_env,
          "commands": check_commands, "dockerfile": check_dockerfile, "k8s": check_k8s,
          "systemd": check_systemd}


def main():
    global ROOT, LOOM, CURRENT
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--loom", required=True, help="the built loom binary")
    ap.add_argument("--root", required=True, help="the repository")
    ap.add_argument("checks", nargs="+", choices=list(CHECKS) + ["all"])
    a = ap.parse_args()
    ROOT, LOOM = os.path.abspath(a.root), os.path.abspath(a.loom)
    for name in (list(CHECKS) if "all" in a.checks else a.checks):
        CURRENT = name
        try:
            CHECKS[name]()
        except (KeyError, TypeError, AttributeError, IndexError, OSError, yaml.YAMLError) as e:
            fail(None, "unexpected shape (%s: %s)" % (type(e).__name__, e))
    for line in FAILS:
        print(line)
    if not FAILS:
        print("ok: %s" % " ".join(a.checks))
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
