#!/usr/bin/env python3
"""Deploy acceptance test on a real stack: PostgreSQL, ablate-scheduler, ablate-worker x2, ablate-train,
Prometheus (Debian's package) with deploy/prometheus/{prometheus.yml,alerts.yml}, and headless Chromium.

    live_test.py --bin BIN_DIR --work WORK_DIR      (env ABLATE_TEST_PG_DSN: the ctest PostgreSQL cluster)

Scenario (~1-2 minutes): two sweeps are submitted while no worker runs (the queue does not drain); two workers
start; one is SIGKILLed mid-job (worker down, lease expiry, retry) and comes back; the second sweep diverges
(NaN loss, failed attempts). Then:
  1. every SQL query of the Grafana dashboards (and their variables) runs against the migrated database as a
     read-only role and returns rows for the finished demo sweep (time-series queries return a time column);
  2. `ablate report` writes a self-contained HTML report; headless Chromium renders it without console errors,
     and the screenshot shows every run's loss curve in its colour;
  3. the scheduler is stopped (scheduler down);
  4. every PromQL expression of the dashboards and of the alert rules returns data over the test window, the
     rules evaluate without errors, and the alerts the scenario provoked are pending or firing.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import zlib

import yaml

SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(SRC, "deploy")
failures = []


def log(*a):
    print("[deploy-live %5.1fs]" % (time.time() - T0), *a, flush=True)


def fail(msg):
    failures.append(msg)
    log("FAIL:", msg)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    def __init__(self, work):
        self.work, self.procs = work, {}

    def start(self, name, argv, **kw):
        out = open(os.path.join(self.work, name + ".log"), "w")
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.work, start_new_session=True, **kw)
        self.procs[name] = p
        return p

    def kill(self, name, sig=signal.SIGTERM, wait=10):
        p = self.procs.get(name)
        if not p or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, sig)  # the process group: a worker's ablate-train child too
        except ProcessLookupError:
            return
        try:
            p.wait(wait)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)

    def stop_all(self):
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM, 5)

    def tail(self, name, n=30):
        try:
            with open(os.path.join(self.work, name + ".log"), errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


def psql(dsn, sql, *extra):
    r = subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=1", "-Atq", dsn, *extra, "-c", sql],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip())
    return r.stdout


def wait_for(what, pred, timeout, interval=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            v = pred()
            if v:
                return v
        except Exception:  # noqa: BLE001 - the thing we wait for is not there yet
            pass
        time.sleep(interval)
    raise TimeoutError("timed out after %ss waiting for %s" % (timeout, what))


def http_json(url):
    with urllib.request.urlopen(url, timeout=15) as r:
        return json.loads(r.read().decode())


# ---------------------------------------------------------------------------------------------------------------
# Dashboards
# ---------------------------------------------------------------------------------------------------------------

def dashboards():
    d = os.path.join(DEPLOY, "grafana", "dashboards")
    out = []
    for name in sorted(os.listdir(d)):
        if name.endswith(".json"):
            with open(os.path.join(d, name)) as f:
                out.append((name, json.load(f)))
    return out


def all_panels(board):
    for p in board.get("panels", []):
        yield p
        yield from p.get("panels", [])


def dashboard_queries(kind):
    """(where, query, format) of every target of the given datasource type, and the SQL variables."""
    out = []
    for name, b in dashboards():
        for p in all_panels(b):
            for t in p.get("targets", []):
                ds = (t.get("datasource") or p.get("datasource") or {}).get("type", "")
                if kind == "prometheus" and ds == "prometheus":
                    out.append(("%s / %s / %s" % (name, p["title"], t["refId"]), t["expr"], None))
                if kind == "sql" and "postgres" in ds:
                    out.append(("%s / %s / %s" % (name, p["title"], t["refId"]), t["rawSql"], t.get("format")))
    return out


def sql_variables():
    out = {}
    for name, b in dashboards():
        for v in b.get("templating", {}).get("list", []):
            if "postgres" in (v.get("datasource") or {}).get("type", ""):
                out.setdefault(v["name"], []).append((name, v["query"]))
    return out


def substitute(q, sweep, factor):
    q = q.replace("${sweep}", str(sweep)).replace("$sweep", str(sweep))
    if factor is not None:
        q = q.replace("${factor:raw}", factor).replace("${factor}", factor).replace("$factor", factor)
    return q


def check_sql(ro_dsn, rw_dsn, sweep_id):
    emitted = set(psql(rw_dsn, "SELECT DISTINCT name FROM metrics").split())
    variables = sql_variables()
    # Variables: the sweep list must offer the demo sweep; the factor list its two varying factors.
    for board, q in variables.get("sweep", []):
        ids = [line.split("|")[0] for line in psql(ro_dsn, q).splitlines()]
        if str(sweep_id) not in ids:
            fail("%s: variable sweep does not list the demo sweep %s: %s" % (board, sweep_id, ids))
    factors = set()
    for board, q in variables.get("factor", []):
        got = set(psql(ro_dsn, substitute(q, sweep_id, None)).split())
        if got != {"model_size", "context_length"}:
            fail("%s: variable factor returned %s, expected model_size and context_length" % (board, sorted(got)))
        factors |= got
    n = 0
    for where, q, fmt in dashboard_queries("sql"):
        for factor in (sorted(factors) if "factor" in q else [None]):
            sq = substitute(q, sweep_id, factor)
            if "$" in re.sub(r"'[^']*'", "", sq):
                fail("%s: unsubstituted variable in %s" % (where, sq))
                continue
            try:
                rows = psql(ro_dsn, sq).splitlines()
            except RuntimeError as e:
                fail("%s [factor=%s]: query failed: %s" % (where, factor, e))
                continue
            n += 1
            names = set(re.findall(r"m\.name = '([a-z_/]+)'", sq))
            if not rows:
                missing = [m for m in names if m not in emitted]
                if missing:
                    log("empty (metric %s is not emitted by this ablate-train; query ran): %s" % (missing, where))
                    continue
                fail("%s [factor=%s]: no rows" % (where, factor))
                continue
            if fmt == "time_series":
                cols = column_types(ro_dsn, sq)
                if cols.get("time") not in ("timestamp with time zone", "timestamp without time zone"):
                    fail("%s: time_series query has no timestamp column 'time': %s" % (where, cols))
                if not any(t in ("double precision", "numeric", "bigint", "integer", "real") for t in cols.values()):
                    fail("%s: time_series query has no numeric column: %s" % (where, cols))
    log("dashboard SQL: %d queries ran as the read-only role, %d metric names in the database" % (n, len(emitted)))
    if n < 10:
        fail("expected at least 10 SQL queries in the dashboards, ran %d" % n)


def column_types(dsn, q):
    # \gdesc describes the result columns without running the query.
    r = subprocess.run(["psql", "-X", "-Atq", "-F", "|", dsn], input=q + " \\gdesc\n", capture_output=True,
                       text=True, timeout=30)
    return dict(line.split("|", 1) for line in r.stdout.splitlines() if "|" in line)


# ---------------------------------------------------------------------------------------------------------------
# Prometheus
# ---------------------------------------------------------------------------------------------------------------

def prometheus_config(path, sched_metrics, worker_targets, rules):
    with open(os.path.join(DEPLOY, "prometheus", "prometheus.yml")) as f:
        cfg = yaml.safe_load(f)
    cfg["global"]["scrape_interval"] = "1s"
    cfg["global"]["evaluation_interval"] = "1s"
    cfg["rule_files"] = [rules]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    if set(jobs) != {"ablate-scheduler", "ablate-worker"}:
        fail("deploy/prometheus/prometheus.yml scrape jobs changed: %s" % sorted(jobs))
    jobs["ablate-scheduler"]["static_configs"] = [{"targets": [sched_metrics]}]
    jobs["ablate-worker"]["static_configs"] = [{"targets": worker_targets}]
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)


def promql_exprs():
    out = [(w, q) for w, q, _ in dashboard_queries("prometheus")]
    with open(os.path.join(DEPLOY, "prometheus", "alerts.yml")) as f:
        rules = yaml.safe_load(f)
    for g in rules["groups"]:
        for r in g["rules"]:
            out.append(("alerts.yml / %s" % (r.get("alert") or r.get("record")), r["expr"]))
    return out


def range_query(prom, expr, start, end):
    url = "%s/api/v1/query_range?%s" % (prom, urllib.parse.urlencode(
        {"query": expr, "start": "%.3f" % start, "end": "%.3f" % end, "step": "1"}))
    r = http_json(url)
    if r.get("status") != "success":
        raise RuntimeError(r)
    return r["data"]["result"]


def check_promql(prom, start, end):
    n = 0
    for where, expr in promql_exprs():
        q = expr.replace("$__rate_interval", "10s").replace("$__interval", "1s")
        try:
            res = range_query(prom, q, start, end)
        except Exception as e:  # noqa: BLE001
            fail("%s: PromQL error: %s" % (where, e))
            continue
        n += 1
        points = sum(len(s.get("values", [])) for s in res)
        if not res or points == 0:
            fail("%s: no data for %s" % (where, " ".join(expr.split())))
        else:
            log("PromQL ok (%d series, %d points): %s" % (len(res), points, where))
    if n < 15:
        fail("expected at least 15 PromQL expressions (dashboards + alerts), evaluated %d" % n)
    rules = http_json(prom + "/api/v1/rules")["data"]["groups"]
    for g in rules:
        for r in g["rules"]:
            if r.get("health") != "ok":
                fail("rule %s health %s: %s" % (r["name"], r.get("health"), r.get("lastError")))


def alerts_seen(prom, start, end):
    res = range_query(prom, 'max by (alertname) (ALERTS{alertstate=~"pending|firing"})', start, end)
    return {s["metric"]["alertname"] for s in res}


# ---------------------------------------------------------------------------------------------------------------
# Report + Chromium
# ---------------------------------------------------------------------------------------------------------------

def read_png(path):
    """RGB(A) 8-bit non-interlaced PNG -> (width, height, channels, bytes rows)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, w = 8, b"", None
    while pos < len(data):
        n, typ = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if typ == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            if depth != 8 or ctype not in (2, 6) or interlace:
                raise ValueError("unsupported PNG (depth %d, colour type %d)" % (depth, ctype))
            ch = 3 if ctype == 2 else 4
        elif typ == b"IDAT":
            idat += body
    raw = zlib.decompress(idat)
    stride = w * ch
    rows, prev = [], bytearray(stride)
    for y in range(h):
        ft = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - ch] if i >= ch else 0
            b = prev[i]
            c = prev[i - ch] if i >= ch else 0
            if ft == 1:
                line[i] = (line[i] + a) & 255
            elif ft == 2:
                line[i] = (line[i] + b) & 255
            elif ft == 3:
                line[i] = (line[i] + ((a + b) >> 1)) & 255
            elif ft == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return w, h, ch, rows


def color_counts(png, colors, tol=24):
    w, h, ch, rows = read_png(png)
    want = [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in colors]
    counts = [0] * len(want)
    for row in rows:
        for x in range(0, w * ch, ch):
            r, g, b = row[x], row[x + 1], row[x + 2]
            if r > 235 and g > 235 and b > 235:
                continue  # background
            for k, (cr, cg, cb) in enumerate(want):
                if abs(r - cr) <= tol and abs(g - cg) <= tol and abs(b - cb) <= tol:
                    counts[k] += 1
                    break
    return counts


def chromium_bin():
    for b in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(b)
        if p:
            return p
    return None


def check_report(bin_dir, work, sched, sweep_id, jobs):
    out = os.path.join(work, "report.html")
    r = subprocess.run([os.path.join(bin_dir, "ablate"), "report", str(sweep_id), "--out", out,
                        "--scheduler", sched], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        fail("ablate report exited %d: %s %s" % (r.returncode, r.stdout, r.stderr))
        return
    html = open(out, encoding="utf-8").read()
    if re.search(r"""(src|href)\s*=\s*["'](https?:|//)""", html) or "<script src" in html or "@import" in html:
        fail("report.html is not self-contained (it loads an external resource)")
    for f in ("model_size", "context_length"):
        if ("<h3>%s</h3>" % f) not in html and ('id="factor-%s"' % f) not in html:
            fail("report.html has no table for factor %s" % f)
    colors = re.findall(r'<polyline[^>]*data-job="(\d+)"[^>]*stroke="(#[0-9a-fA-F]{6})"', html)
    by_job = {}
    for job, c in colors:
        by_job.setdefault(job, c)
    if set(by_job) != {str(j) for j in jobs}:
        fail("report curves are for jobs %s, expected %s" % (sorted(by_job), sorted(jobs)))
    chrome = chromium_bin()
    if not chrome:
        fail("chromium not installed (scripts/setup-deps.sh installs it)")
        return
    png = os.path.join(work, "report.png")
    prof = os.path.join(work, "chromium-profile")
    r = subprocess.run([chrome, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--no-first-run", "--user-data-dir=" + prof, "--hide-scrollbars", "--window-size=1280,2600",
                        "--enable-logging=stderr", "--v=0", "--virtual-time-budget=3000",
                        "--screenshot=" + png, "file://" + out],
                       capture_output=True, text=True, timeout=120)
    errors = [l for l in r.stderr.splitlines() if "CONSOLE" in l or "Uncaught" in l or "ERR_FILE" in l]
    if r.returncode != 0 or not os.path.exists(png):
        fail("chromium failed (%d): %s" % (r.returncode, r.stderr[-2000:]))
        return
    if errors:
        fail("chromium reported errors rendering the report: %s" % errors[:5])
    # Chromium renders the DOM: the page's own self-check (an <svg> per curve panel) is visible in --dump-dom.
    r2 = subprocess.run([chrome, "--headless=new", "--no-sandbox", "--disable-gpu", "--user-data-dir=" + prof,
                         "--dump-dom", "file://" + out], capture_output=True, text=True, timeout=120)
    if r2.stdout.count("<polyline") < len(jobs):
        fail("rendered DOM has %d polylines, expected >= %d" % (r2.stdout.count("<polyline"), len(jobs)))
    counts = color_counts(png, [by_job[j] for j in sorted(by_job)])
    log("screenshot %s: pixels per run colour %s" % (png, dict(zip(sorted(by_job), counts))))
    for j, c in zip(sorted(by_job), counts):
        if c < 600:  # a drawn curve is >1000 pixels; legend and table swatches together are ~150
            fail("screenshot: the curve of job %s (colour %s) is not drawn (%d pixels)" % (j, by_job[j], c))


# ---------------------------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--prometheus", default=shutil.which("prometheus") or "/usr/bin/prometheus")
    ap.add_argument("--keep", action="store_true", help="leave the work dir and database for inspection")
    args = ap.parse_args()
    base_dsn = os.environ.get("ABLATE_TEST_PG_DSN")
    if not base_dsn:
        sys.exit("ABLATE_TEST_PG_DSN must point at a running PostgreSQL (ctest sets it)")
    for b in ("ablate", "ablate-scheduler", "ablate-worker", "ablate-train"):
        if not os.access(os.path.join(args.bin, b), os.X_OK):
            sys.exit("missing %s/%s" % (args.bin, b))
    if not os.access(args.prometheus, os.X_OK):
        sys.exit("prometheus not installed (scripts/setup-deps.sh installs Debian's package)")
    bin_dir = os.path.abspath(args.bin)
    work = os.path.abspath(args.work)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)

    db = "deploy_%d" % os.getpid()
    ro = "grafana_ro_%d" % os.getpid()
    dsn = re.sub(r"dbname=\S+", "dbname=" + db, base_dsn)
    ro_dsn = re.sub(r"user=\S+", "user=" + ro, dsn)
    psql(base_dsn, "CREATE DATABASE %s" % db)
    procs = Procs(work)
    try:
        run(args, bin_dir, work, dsn, ro, ro_dsn, procs)
    finally:
        procs.stop_all()
        if not args.keep:
            try:
                psql(base_dsn, "DROP DATABASE IF EXISTS %s WITH (FORCE)" % db)
                psql(base_dsn, "DROP ROLE IF EXISTS %s" % ro)
            except RuntimeError as e:
                log("cleanup:", e)
    if failures:
        print("\nDEPLOY LIVE TEST: %d failure(s):\n  - %s" % (len(failures), "\n  - ".join(failures)))
        sys.exit(1)
    print("DEPLOY LIVE TEST PASS")


def run(args, bin_dir, work, dsn, ro, ro_dsn, procs):
    q = lambda s: psql(dsn, s).strip()  # noqa: E731
    data = os.path.join(work, "data", "fortunes")
    subprocess.run([os.path.join(bin_dir, "ablate-train"), "prepare-data", "--input", "/usr/share/games/fortunes",
                    "--output", data], check=True, capture_output=True, timeout=120)
    subprocess.run([os.path.join(bin_dir, "ablate-scheduler"), "migrate", "--db", dsn], check=True,
                   capture_output=True, timeout=60)
    # Grafana's role: SELECT only (what deploy/postgres/10-grafana-readonly.sh grants).
    psql(dsn, "CREATE ROLE %s LOGIN; GRANT USAGE ON SCHEMA public TO %s; "
              "GRANT SELECT ON ALL TABLES IN SCHEMA public TO %s" % (ro, ro, ro))

    sched_help = subprocess.run([os.path.join(bin_dir, "ablate-scheduler"), "serve", "--help"],
                                capture_output=True, text=True).stdout
    extra = []
    if "--retry_backoff_ms" in sched_help:
        extra += ["--retry_backoff_ms", "200", "--retry_backoff_max_ms", "500"]
    if "--retry_policy" in sched_help:
        extra += ["--retry_policy", "crash=2,hang=2,infra=5,oom=0,diverged=1"]
    sched = procs.start("scheduler", [os.path.join(bin_dir, "ablate-scheduler"), "serve", "--db", dsn,
                                      "--listen", "127.0.0.1:0", "--metrics_listen", "127.0.0.1:0",
                                      "--lease_ttl_s", "3", "--max_attempts", "3", *extra])
    line = wait_for("scheduler to listen", lambda: re.search(
        r"listening grpc=(\S+) metrics=(\S+)", procs.tail("scheduler", 200)), 30)
    addr, maddr = line.group(1), line.group(2)
    log("scheduler grpc=%s metrics=%s" % (addr, maddr))
    wports = [free_port(), free_port()]
    prom_port = free_port()
    rules = os.path.join(DEPLOY, "prometheus", "alerts.yml")
    cfg = os.path.join(work, "prometheus.yml")
    prometheus_config(cfg, maddr, ["127.0.0.1:%d" % p for p in wports], rules)
    r = subprocess.run(["promtool", "check", "config", cfg], capture_output=True, text=True)
    if r.returncode != 0:
        fail("promtool check config (test config): %s" % r.stdout + r.stderr)
    procs.start("prometheus", [args.prometheus, "--config.file=" + cfg, "--storage.tsdb.path=" + work + "/tsdb",
                               "--web.listen-address=127.0.0.1:%d" % prom_port, "--log.level=warn"])
    prom = "http://127.0.0.1:%d" % prom_port
    wait_for("prometheus ready", lambda: urllib.request.urlopen(prom + "/-/ready", timeout=2).status == 200, 60)
    t_start = time.time() - 2
    wait_for("the first scrape of the scheduler", lambda: any(
        t["health"] == "up" for t in http_json(prom + "/api/v1/targets")["data"]["activeTargets"]
        if t["labels"]["job"] == "ablate-scheduler"), 30)

    # 1. Both sweeps queued, no worker: the queue does not drain.
    ablate = os.path.join(bin_dir, "ablate")
    for f in ("diverge-sweep.yaml", "demo-sweep.yaml"):
        subprocess.run([ablate, "submit", os.path.join(SRC, "tests", "deploy", f), "--scheduler", addr,
                        "--idempotency_key", "deploy-test-%s-%d" % (f, os.getpid())],
                       check=True, capture_output=True, timeout=60)
    demo = int(q("SELECT id FROM sweeps WHERE name = 'deploy-demo'"))
    diverge = int(q("SELECT id FROM sweeps WHERE name = 'deploy-diverge'"))
    wait_for("AblateQueueNotDraining's condition", lambda: range_query(
        prom, 'sum(ablate_jobs{state="queued"}) > 0 and '
              'sum(increase(ablate_scheduler_leases_granted_total[15m])) == 0', t_start, time.time()), 30)
    time.sleep(2.5)  # let the rule evaluations see it too (ALERTS pending)
    log("queue not draining observed; starting workers")

    def start_worker(i, wid):
        return procs.start("worker-%d" % i, [
            os.path.join(bin_dir, "ablate-worker"), "--scheduler", addr, "--worker_id", wid, "--data_root",
            os.path.join(work, "data"), "--work_dir", os.path.join(work, "work-" + wid), "--metrics_listen",
            "127.0.0.1:%d" % wports[i], "--poll_interval_ms", "200", "--kill_grace_ms", "2000"])

    start_worker(0, "w0")
    start_worker(1, "w1")
    # 2. Kill w0 mid-job (its child dies with it): worker down, lease expiry, retry.
    victim = wait_for("w0 to report metrics of a demo job", lambda: q(
        "SELECT j.id FROM jobs j WHERE j.worker_id = 'w0' AND j.state IN ('leased','running') AND j.sweep_id = %d "
        "AND EXISTS (SELECT 1 FROM metrics m WHERE m.job_id = j.id) LIMIT 1" % demo), 90, 0.2)
    procs.kill("worker-0", signal.SIGKILL)
    log("SIGKILLed worker w0 during job %s" % victim)
    wait_for("w0's target to be scraped down", lambda: range_query(
        prom, 'up{job="ablate-worker"} == 0', t_start, time.time()), 20)
    wait_for("the lease of job %s to expire" % victim, lambda: int(q(
        "SELECT attempt FROM jobs WHERE id = %s" % victim)) >= 2 or q(
        "SELECT state FROM jobs WHERE id = %s" % victim) == "queued", 30)
    start_worker(0, "w0b")
    # 3. Both sweeps finish.
    wait_for("both sweeps to finish", lambda: q(
        "SELECT count(*) FROM jobs WHERE sweep_id IN (%d, %d) AND state NOT IN ('succeeded','failed','cancelled')"
        % (demo, diverge)) == "0", 240, 1)
    log("jobs:\n" + q("SELECT id, sweep_id, state, attempt, failure_class FROM jobs ORDER BY id"))
    if q("SELECT count(*) FROM jobs WHERE sweep_id = %d AND state = 'succeeded'" % demo) != "4":
        fail("the demo sweep did not succeed: " + q("SELECT id, state, last_error FROM jobs WHERE sweep_id=%d" % demo))
    if q("SELECT count(*) FROM jobs WHERE sweep_id = %d AND state = 'failed' AND failure_class = 'diverged'"
         % diverge) != "2":
        fail("the diverging sweep's jobs did not fail as diverged")
    if int(q("SELECT max(attempt) FROM jobs WHERE sweep_id = %d" % demo)) < 2:
        fail("no demo job was retried after the worker was killed")
    time.sleep(3)  # a few more scrapes of the final state

    # 4. Dashboards' SQL, as Grafana's read-only role.
    check_sql(ro_dsn, dsn, demo)
    # 5. The report of the demo sweep, rendered by Chromium.
    jobs = [int(x) for x in q("SELECT id FROM jobs WHERE sweep_id = %d ORDER BY id" % demo).split()]
    check_report(bin_dir, work, addr, demo, jobs)
    # 6. Scheduler down.
    procs.kill("scheduler", signal.SIGTERM)
    wait_for("the scheduler's target to be scraped down", lambda: range_query(
        prom, 'up{job="ablate-scheduler"} == 0', t_start, time.time()), 20)
    time.sleep(3)
    t_end = time.time()
    # 7. Every PromQL expression returns data; the provoked alerts went pending/firing.
    check_promql(prom, t_start, t_end)
    seen = alerts_seen(prom, t_start, t_end)
    log("alerts pending/firing during the run: %s" % sorted(seen))
    want = {"AblateQueueNotDraining", "AblateWorkerDown", "AblateLeaseExpiries", "AblateNaNLoss",
            "AblateJobFailureRate", "AblateSchedulerDown"}
    if want - seen:
        fail("alerts never became pending/firing: %s" % sorted(want - seen))


if __name__ == "__main__":
    T0 = time.time()
    main()
