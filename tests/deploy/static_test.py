#!/usr/bin/env python3
"""Static checks of the deployment artifacts (no database, no network):

  prometheus  promtool check config / check rules / test rules on deploy/prometheus
  grafana     dashboards are what generate.py makes; every panel has a provisioned datasource and a query;
              variables and repeats refer to defined variables; unique ids and uids
  docker      Dockerfiles: pinned base images, non-root USER, no secrets, COPY sources exist; compose: pinned
              images, passwords only via secret files
  helm        values.yaml validates against values.schema.json (and bad values are rejected); the chart renders
              (helm template where helm is installed, tests/deploy/helm_render.py always, and both agree); every
              manifest passes the Kubernetes schema (kubernetes-validate, strict); CRDs against a minimal schema;
              no Secret is rendered and no credential is inlined; restricted pod security; GPU DaemonSet;
              >= 2 scheduler replicas with PDB; migration hook; CronJobs for the enabled schedules

    static_test.py [--work DIR]
"""
import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys

import jsonschema
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(os.path.dirname(HERE))
DEPLOY = os.path.join(SRC, "deploy")
CHART = os.path.join(SRC, "helm", "ablate")
sys.path.insert(0, HERE)
import helm_render  # noqa: E402

failures = []
checks = 0


def check(cond, msg):
    global checks
    checks += 1
    if not cond:
        failures.append(msg)
        print("FAIL:", msg, flush=True)
    return cond


def run(argv):
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------------------------------- prometheus

def prometheus():
    promtool = shutil.which("promtool")
    if not check(promtool is not None, "promtool not installed (Debian package prometheus; scripts/setup-deps.sh)"):
        return
    p = os.path.join(DEPLOY, "prometheus")
    for argv in (["check", "config", os.path.join(p, "prometheus.yml")],
                 ["check", "rules", os.path.join(p, "alerts.yml")],
                 ["test", "rules", os.path.join(p, "alerts_test.yml")]):
        r = run([promtool, *argv])
        check(r.returncode == 0, "promtool %s: %s%s" % (" ".join(argv), r.stdout, r.stderr))
    with open(os.path.join(p, "alerts.yml")) as f:
        rules = [r for g in yaml.safe_load(f)["groups"] for r in g["rules"]]
    names = {r.get("alert") for r in rules}
    for want in ("AblateWorkerDown", "AblateQueueNotDraining", "AblateJobFailureRate", "AblateNaNLoss",
                 "AblateLeaseExpiries"):
        check(want in names, "alert rule %s missing" % want)
    for r in rules:
        check(r.get("labels", {}).get("severity") in ("warning", "critical"), "%s: no severity" % r.get("alert"))
        check(r.get("annotations", {}).get("summary"), "%s: no summary" % r.get("alert"))
    print("prometheus: config, %d rules and their unit tests ok" % len(rules))


# ----------------------------------------------------------------------------------------------------- grafana

def grafana():
    r = run([sys.executable, os.path.join(DEPLOY, "grafana", "generate.py"), "--check"])
    check(r.returncode == 0, "dashboards differ from deploy/grafana/generate.py: " + r.stderr)
    with open(os.path.join(DEPLOY, "grafana", "provisioning", "datasources", "datasources.yaml")) as f:
        ds = {d["uid"]: d["type"] for d in yaml.safe_load(f)["datasources"]}
    check(set(ds.values()) >= {"prometheus", "grafana-postgresql-datasource"}, "datasources: %s" % ds)
    with open(os.path.join(DEPLOY, "grafana", "provisioning", "dashboards", "dashboards.yaml")) as f:
        prov = yaml.safe_load(f)
    check(prov["providers"][0]["type"] == "file", "dashboard provider is not a file provider")
    d = os.path.join(DEPLOY, "grafana", "dashboards")
    uids, n_panels, n_targets = set(), 0, 0
    files = sorted(f for f in os.listdir(d) if f.endswith(".json"))
    check(len(files) >= 4, "expected 4 dashboards, found %s" % files)
    kinds = set()
    for name in files:
        with open(os.path.join(d, name)) as f:
            b = json.load(f)
        check(b.get("uid") and b["uid"] not in uids, "%s: missing or duplicate uid" % name)
        uids.add(b.get("uid"))
        check(b.get("title"), "%s: no title" % name)
        variables = {v["name"]: v for v in b.get("templating", {}).get("list", [])}
        for v in variables.values():
            vds = v.get("datasource") or {}
            check(vds.get("uid") in ds and ds[vds["uid"]] == vds.get("type"), "%s: variable %s datasource %s"
                  % (name, v["name"], vds))
            check(bool(v.get("query")), "%s: variable %s has no query" % (name, v["name"]))
        ids = set()
        for p in b.get("panels", []):
            check(p.get("id") not in ids, "%s: duplicate panel id %s" % (name, p.get("id")))
            ids.add(p.get("id"))
            gp = p.get("gridPos", {})
            check(all(k in gp for k in ("x", "y", "w", "h")) and gp["x"] + gp["w"] <= 24,
                  "%s / %s: bad gridPos %s" % (name, p.get("title"), gp))
            if p.get("type") == "row":
                continue
            n_panels += 1
            pds = p.get("datasource") or {}
            check(pds.get("uid") in ds and ds[pds["uid"]] == pds.get("type"),
                  "%s / %s: datasource %s is not provisioned" % (name, p.get("title"), pds))
            check(p.get("type") in ("timeseries", "table", "stat", "gauge", "piechart", "barchart", "bargauge"),
                  "%s / %s: unknown panel type %s" % (name, p.get("title"), p.get("type")))
            targets = p.get("targets") or []
            check(len(targets) > 0, "%s / %s: no query" % (name, p.get("title")))
            for t in targets:
                n_targets += 1
                tds = t.get("datasource") or {}
                check(tds.get("uid") in ds, "%s / %s / %s: target datasource missing" % (name, p["title"],
                                                                                         t.get("refId")))
                kind = ds.get(tds.get("uid"))
                kinds.add(kind)
                if kind == "prometheus":
                    check(bool(t.get("expr", "").strip()), "%s / %s: empty PromQL" % (name, p["title"]))
                    text = t.get("expr", "")
                else:
                    check(bool(t.get("rawSql", "").strip()) and t.get("rawQuery") is True,
                          "%s / %s: empty SQL" % (name, p["title"]))
                    check(t.get("format") in ("table", "time_series"), "%s / %s: format %s" % (
                        name, p["title"], t.get("format")))
                    text = t.get("rawSql", "")
                    check(not re.search(r"(?i)\b(insert|update|delete|drop|alter|create|grant|truncate)\b", text),
                          "%s / %s: SQL is not read-only" % (name, p["title"]))
                for var in re.findall(r"\$\{?(\w+)", text):
                    if var.startswith("__"):
                        continue
                    check(var in variables, "%s / %s: uses undefined variable $%s" % (name, p["title"], var))
            if p.get("repeat"):
                check(p["repeat"] in variables, "%s / %s: repeats undefined variable" % (name, p["title"]))
    check(kinds == {"prometheus", "grafana-postgresql-datasource"}, "dashboards use datasources %s" % kinds)
    print("grafana: %d dashboards, %d panels, %d queries ok" % (len(files), n_panels, n_targets))


# ----------------------------------------------------------------------------------------------------- docker

# A credential written as a literal: a key that *is* a password/token/key with a value (references such as
# existingSecret, *_FILE, secretKeyRef and ${VAR} are fine), a DSN with a password, or a PEM private key.
SECRETISH = re.compile(
    r"(?im)^[\s-]*[\"']?([\w.-]*(password|passwd|api[_-]?key|private[_-]?key|client[_-]?secret|access[_-]?key)|token)"
    r"[\"']?[ \t]*[:=][ \t]*[\"']?(?!\$|\{\{|false\b|true\b)[^\s\"']{4,}"
    r"|password=(?!\$|\.\.\.)[^\s\"']+|-----BEGIN [A-Z ]*PRIVATE KEY-----")


def dockerfiles():
    d = os.path.join(DEPLOY, "docker")
    files = sorted(f for f in os.listdir(d) if f.endswith("Dockerfile"))
    check(set(files) >= {"scheduler.Dockerfile", "worker.Dockerfile"}, "Dockerfiles: %s" % files)
    for name in files:
        with open(os.path.join(d, name)) as f:
            text = f.read()
        lines = re.sub(r"\\\n", " ", text).splitlines()
        instr = [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if len(l.split(None, 1)) > 1 else "")
                 for l in (x.strip() for x in lines) if l and not l.startswith("#")]
        froms = [a for i, a in instr if i == "FROM"]
        check(len(froms) >= 2, "%s: expected a multi-stage build" % name)
        stages = set()
        for a in froms:
            img = a.split()[0]
            if " AS " in a.upper():
                stages.add(a.split()[-1].lower())
            check(img.lower() in stages or ("@sha256:" in img or re.search(r":[\w.-]*\d[\w.-]*$", img)),
                  "%s: base image %s is not pinned to a version" % (name, img))
            check(not img.endswith(":latest"), "%s: base image %s uses latest" % (name, img))
        # The final stage runs as a non-root user.
        final = text[text.rfind("\nFROM "):]
        users = re.findall(r"(?m)^USER\s+(\S+)", final)
        check(users and users[-1].split(":")[0] not in ("root", "0"), "%s: final stage does not set a non-root "
                                                                      "USER" % name)
        check(not SECRETISH.search(text), "%s: looks like an inlined secret" % name)
        for i, a in instr:
            if i in ("ENV", "ARG"):
                check(not re.search(r"(?i)(password|secret|token|_key)\b", a), "%s: %s %s names a secret" % (
                    name, i, a))
            if i == "ADD":
                check(not re.match(r"https?://", a), "%s: ADD from a URL" % name)
            if i == "COPY" and "--from=" not in a:
                for src in a.split()[:-1]:
                    check(os.path.exists(os.path.join(SRC, src)), "%s: COPY source %s does not exist" % (name, src))
            if i == "RUN" and "apt-get install" in a:
                check("--no-install-recommends" in a and "rm -rf /var/lib/apt/lists" in a,
                      "%s: apt-get install without --no-install-recommends / list cleanup" % name)
        check(os.path.exists(os.path.join(d, name + ".dockerignore")), "%s: no .dockerignore" % name)
    with open(os.path.join(DEPLOY, "compose.yaml")) as f:
        compose = yaml.safe_load(f)
    need = {"postgres", "migrate", "scheduler", "worker", "prometheus", "grafana"}
    check(need <= set(compose["services"]), "compose services: %s" % sorted(compose["services"]))
    for sname, svc in compose["services"].items():
        img = svc.get("image", "")
        if "build" not in svc:
            check(re.search(r":[\w.-]*\d", img) and not img.endswith(":latest"), "compose %s: image %s not pinned"
                  % (sname, img))
        env = svc.get("environment", {}) or {}
        for k, v in (env.items() if isinstance(env, dict) else []):
            if re.search(r"(?i)password|secret|token", k):
                check(k.endswith("_FILE") or k.endswith("__FILE"), "compose %s: %s is inlined, use a secret file"
                      % (sname, k))
    with open(os.path.join(DEPLOY, "compose.yaml")) as f:
        check(not SECRETISH.search(f.read()), "compose.yaml: looks like an inlined secret")
    print("docker: %d Dockerfiles and compose.yaml ok (structural lint; no Docker engine here)" % len(files))


# ----------------------------------------------------------------------------------------------------- helm

SERVICEMONITOR_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
                 "properties": {
                     "selector": {"type": "object", "properties": {"matchLabels": {"type": "object"}}},
                     "endpoints": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "additionalProperties": False,
                         "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                        "relabelings": {"type": "array"}}}},
                     "namespaceSelector": {"type": "object"}, "jobLabel": {"type": "string"}}}}}

FULL_VALUES = """
schedules:
  nightly: {enabled: true}
  weekly: {enabled: true, cron: "30 5 * * 6"}
scheduler:
  tls: {existingSecret: ablate-tls}
  auth: {tokensSecret: ablate-tokens}
worker:
  data: {existingClaim: ablate-datasets}
  work: {existingClaim: ablate-work}
imagePullSecrets: [{name: regcred}]
"""


def pod_specs(doc):
    k = doc.get("kind")
    if k in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
        return [doc["spec"]["template"]["spec"]]
    if k == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    return []


def helm_checks(docs, values, label):
    import kubernetes_validate as kv
    kinds = {}
    for d in docs:
        kinds.setdefault(d["kind"], []).append(d)
        if d["kind"] == "ServiceMonitor":
            errs = list(jsonschema.Draft7Validator(SERVICEMONITOR_SCHEMA).iter_errors(d))
            check(not errs, "%s: ServiceMonitor %s: %s" % (label, d["metadata"]["name"], [e.message for e in errs]))
            continue
        try:
            kv.validate(d, "1.30", strict=True)
        except Exception as e:  # noqa: BLE001
            check(False, "%s: %s %s fails the Kubernetes 1.30 schema: %s" % (label, d["kind"], d["metadata"]["name"],
                                                                           str(e)[:500]))
    check("Secret" not in kinds, "%s: the chart renders a Secret (secrets must be referenced, not inlined)" % label)
    text = yaml.safe_dump_all(docs)
    check(not SECRETISH.search(text), "%s: a credential-looking literal is rendered" % label)
    for d in docs:
        for spec in pod_specs(d):
            where = "%s: %s %s" % (label, d["kind"], d["metadata"]["name"])
            psc = spec.get("securityContext", {})
            check(psc.get("runAsNonRoot") is True, where + ": runAsNonRoot")
            check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where + ": seccompProfile")
            check(spec.get("automountServiceAccountToken") is False, where + ": mounts a service account token")
            check(not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"),
                  where + ": host namespaces")
            for v in spec.get("volumes", []):
                check("hostPath" not in v, where + ": hostPath volume")
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                sc = c.get("securityContext", {})
                check(sc.get("allowPrivilegeEscalation") is False, where + ": allowPrivilegeEscalation")
                check("ALL" in sc.get("capabilities", {}).get("drop", []), where + ": capabilities not dropped")
                check(not sc.get("privileged"), where + ": privileged")
                check(sc.get("readOnlyRootFilesystem") is True, where + ": readOnlyRootFilesystem")
                check(c.get("resources", {}).get("limits"), where + ": no resource limits")
                for e in c.get("env", []):
                    if re.search(r"(?i)(password|secret|token|dsn|^ABLATE_DB$)", e["name"]) and \
                            not e["name"].endswith("_FILE"):
                        check("value" not in e, where + ": env %s inlines a credential" % e["name"])
                image = c.get("image", "")
                check(re.search(r":[\w.-]+$", image), where + ": image %s has no tag" % image)
    dep = [d for d in kinds.get("Deployment", []) if d["metadata"]["name"].endswith("-scheduler")]
    if check(len(dep) == 1, "%s: one scheduler Deployment" % label):
        dep = dep[0]
        check(dep["spec"]["replicas"] >= 2, "%s: scheduler replicas < 2" % label)
        c = dep["spec"]["template"]["spec"]["containers"][0]
        db = [e for e in c["env"] if e["name"] == "ABLATE_DB"]
        check(db and db[0]["valueFrom"]["secretKeyRef"]["name"] == values["database"]["existingSecret"],
              "%s: scheduler DSN does not come from the Secret" % label)
        check(any(e["name"] == "ABLATE_REPLICA_ID" for e in c["env"]), "%s: no replica id for leader election"
              % label)
        check(c.get("readinessProbe") and c.get("livenessProbe"), "%s: scheduler probes" % label)
        sel = dep["spec"]["selector"]["matchLabels"]
        pdb = kinds.get("PodDisruptionBudget", [])
        check(pdb and pdb[0]["spec"]["selector"]["matchLabels"] == sel, "%s: PDB does not select the scheduler"
              % label)
        svc = [s for s in kinds.get("Service", []) if s["spec"].get("selector") == sel]
        check(svc and {p["name"] for p in svc[0]["spec"]["ports"]} == {"grpc", "metrics"},
              "%s: scheduler Service" % label)
    ds = kinds.get("DaemonSet", [])
    if check(len(ds) == 1, "%s: one worker DaemonSet" % label):
        spec = ds[0]["spec"]["template"]["spec"]
        c = spec["containers"][0]
        check(str(c["resources"]["limits"].get("nvidia.com/gpu")) == str(values["worker"]["gpusPerWorker"]),
              "%s: worker does not request nvidia.com/gpu" % label)
        check(spec.get("nodeSelector") or spec.get("affinity"), "%s: worker not restricted to GPU nodes" % label)
        check(any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])),
              "%s: worker does not tolerate the GPU taint" % label)
    jobs = kinds.get("Job", [])
    check(any("pre-install" in j["metadata"].get("annotations", {}).get("helm.sh/hook", "") for j in jobs),
          "%s: no migration hook Job" % label)
    sm = kinds.get("ServiceMonitor", [])
    jobs_sm = {sm_["spec"]["endpoints"][0]["relabelings"][0]["replacement"] for sm_ in sm}
    with open(os.path.join(DEPLOY, "prometheus", "prometheus.yml")) as f:
        prom_jobs = {j["job_name"] for j in yaml.safe_load(f)["scrape_configs"]}
    check(jobs_sm == prom_jobs, "%s: ServiceMonitor job labels %s differ from prometheus.yml %s" % (
        label, jobs_sm, prom_jobs))
    nps = kinds.get("NetworkPolicy", [])
    check(len(nps) >= 2, "%s: NetworkPolicies missing" % label)
    cron = {d["metadata"]["name"]: d for d in kinds.get("CronJob", [])}
    for name, s in values.get("schedules", {}).items():
        cj = [c for n, c in cron.items() if n.endswith("-" + name)]
        if s.get("enabled"):
            check(cj and cj[0]["spec"]["schedule"] == s["cron"], "%s: no CronJob for schedule %s (%s)" % (
                label, name, s["cron"]))
        else:
            check(not cj, "%s: disabled schedule %s rendered" % (label, name))
    return kinds


def helm():
    with open(os.path.join(CHART, "values.schema.json")) as f:
        schema = json.load(f)
    jsonschema.Draft7Validator.check_schema(schema)
    v = jsonschema.Draft7Validator(schema)
    with open(os.path.join(CHART, "values.yaml")) as f:
        values = yaml.safe_load(f)
    errs = list(v.iter_errors(values))
    check(not errs, "values.yaml does not validate: %s" % [e.message for e in errs])
    full = helm_render.merge(copy.deepcopy(values), yaml.safe_load(FULL_VALUES))
    check(not list(v.iter_errors(full)), "the full test values do not validate")
    # The schema must reject what the chart forbids.
    bad = {
        "inlined password": ("database", {"existingSecret": "x", "dsnKey": "dsn", "password": "hunter2"}),
        "inlined DSN": ("database", {"dsn": "host=db password=x"}),
        "one scheduler replica": ("scheduler", dict(values["scheduler"], replicas=1)),
        "root pods": ("podSecurityContext", dict(values["podSecurityContext"], runAsNonRoot=False)),
        "privilege escalation": ("containerSecurityContext", dict(values["containerSecurityContext"],
                                                                  allowPrivilegeEscalation=True)),
        "bad cron": ("schedules", {"nightly": {"enabled": True, "cron": "every night", "sweep": "name: x\n"}}),
        "unknown key": ("worker", dict(values["worker"], gpu=1)),
    }
    for what, (key, val) in bad.items():
        b = copy.deepcopy(values)
        b[key] = val
        check(list(v.iter_errors(b)), "values.schema.json accepts %s" % what)

    # Render: our renderer always, helm where installed; both must agree.
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(FULL_VALUES)
        full_file = f.name
    helm_bin = shutil.which("helm")
    for label, files, vals in (("default values", [], values), ("full values", [full_file], full)):
        text = helm_render.render(CHART, files, release="ablate", namespace="ablate")
        docs = [d for d in yaml.safe_load_all(text) if d]
        check(len(docs) >= 10, "%s: only %d manifests rendered" % (label, len(docs)))
        kinds = helm_checks(docs, vals, label + " (helm_render.py)")
        print("helm: %s rendered by helm_render.py: %s" % (label, ", ".join(
            "%d %s" % (len(x), k) for k, x in sorted(kinds.items()))))
        if helm_bin:
            r = run([helm_bin, "template", "ablate", CHART, "--namespace", "ablate", *sum((["-f", x] for x in files),
                                                                                          [])])
            if check(r.returncode == 0, "helm template (%s): %s" % (label, r.stderr)):
                hdocs = [d for d in yaml.safe_load_all(r.stdout) if d]
                helm_checks(hdocs, vals, label + " (helm template)")
                key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
                check(sorted(map(json.dumps, sorted(docs, key=key))) == sorted(map(json.dumps, sorted(hdocs, key=key))),
                      "%s: helm_render.py and helm template disagree" % label)
    if helm_bin:
        r = run([helm_bin, "lint", CHART, "--strict", "-f", full_file])
        check(r.returncode == 0, "helm lint: " + r.stdout + r.stderr)
        print("helm: helm template + lint ran (%s)" % helm_bin)
    else:
        print("helm: helm is not installed; rendered with tests/deploy/helm_render.py only (see deploy/README.md)")
    os.unlink(full_file)
    # The validator is live: a broken manifest must fail it.
    import kubernetes_validate as kv
    broken = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
              "spec": {"replicas": "two", "selector": {}, "template": {"spec": {"containers": [{"name": "c"}]}}}}
    try:
        kv.validate(broken, "1.30", strict=True)
        check(False, "kubernetes-validate accepted a broken Deployment")
    except kv.ValidationError:
        pass
    # No secret material anywhere in the chart's sources.
    for root, _, names in os.walk(CHART):
        for n in names:
            with open(os.path.join(root, n), errors="replace") as f:
                t = f.read()
            check(not SECRETISH.search(t), "helm/%s: looks like an inlined secret" % n)
            check("kind: Secret" not in t, "helm/%s: defines a Secret" % n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=None)
    ap.parse_args()
    for f in (prometheus, grafana, dockerfiles, helm):
        try:
            f()
        except Exception as e:  # noqa: BLE001
            check(False, "%s: %s: %s" % (f.__name__, type(e).__name__, e))
    if failures:
        print("\n%d passed, %d failed" % (checks - len(failures), len(failures)))
        sys.exit(1)
    print("\n%d passed, 0 failed" % checks)


if __name__ == "__main__":
    main()
