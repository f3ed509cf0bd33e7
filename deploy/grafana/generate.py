#!/usr/bin/env python3
"""Writes the provisioned Grafana dashboards (deploy/grafana/dashboards/*.json) from this one source.

    python3 deploy/grafana/generate.py          # rewrite the JSON files
    python3 deploy/grafana/generate.py --check  # exit 1 if a JSON file differs from what this script makes

Data sources (deploy/grafana/provisioning/datasources/datasources.yaml):
  ablate-prometheus  live state: queue, leases, workers, RPCs, latest values of running jobs
  ablate-postgres    history: sweeps, jobs, every metric point (read-only role)

Every PromQL and SQL query here is executed by tests/deploy against a real Prometheus and a real, migrated
PostgreSQL holding a finished sweep; each must return data. SQL may use the variables $sweep (a sweep id) and
${factor:raw} (a factor name of that sweep); no Grafana time macros, so old sweeps stay visible.
"""
import json
import os
import sys

PROM = {"type": "prometheus", "uid": "ablate-prometheus"}
PG = {"type": "grafana-postgresql-datasource", "uid": "ablate-postgres"}
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "dashboards")


class Board:
    def __init__(self, uid, title, description, tags, time_from="now-6h", refresh="30s"):
        self.uid, self.title, self.description, self.tags = uid, title, description, tags
        self.time_from, self.refresh = time_from, refresh
        self.panels, self.variables = [], []
        self._x = self._y = 0
        self._row_h = 0
        self._next_id = 1

    def _place(self, w, h):
        if self._x + w > 24:
            self._x, self._y = 0, self._y + self._row_h
            self._row_h = 0
        pos = {"x": self._x, "y": self._y, "w": w, "h": h}
        self._x += w
        self._row_h = max(self._row_h, h)
        return pos

    def panel(self, ptype, title, targets, w=12, h=8, description="", unit=None, options=None, field=None,
              repeat=None, transformations=None):
        ds = targets[0]["datasource"]
        p = {"id": self._next_id, "type": ptype, "title": title, "description": description, "datasource": ds,
             "gridPos": self._place(w, h), "targets": targets,
             "fieldConfig": {"defaults": dict(field or {}), "overrides": []}, "options": options or {}}
        if unit:
            p["fieldConfig"]["defaults"]["unit"] = unit
        if repeat:
            p["repeat"], p["repeatDirection"] = repeat, "h"
        if transformations:
            p["transformations"] = transformations
        self._next_id += 1
        self.panels.append(p)
        return p

    def row(self, title):
        if self._x:
            self._x, self._y = 0, self._y + self._row_h
            self._row_h = 0
        self.panels.append({"id": self._next_id, "type": "row", "title": title, "collapsed": False,
                            "gridPos": {"x": 0, "y": self._y, "w": 24, "h": 1}, "panels": []})
        self._next_id += 1
        self._y += 1

    def sql_variable(self, name, label, sql, multi=False, include_all=False):
        self.variables.append({
            "name": name, "label": label, "type": "query", "datasource": PG, "query": sql, "definition": sql,
            "refresh": 1, "multi": multi, "includeAll": include_all, "sort": 0, "hide": 0,
            "current": {}, "options": [],
        })

    def json(self):
        return {
            "uid": self.uid, "title": self.title, "description": self.description, "tags": self.tags,
            "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1, "timezone": "utc",
            "time": {"from": self.time_from, "to": "now"}, "refresh": self.refresh,
            "templating": {"list": self.variables}, "annotations": {"list": []}, "links": [
                {"title": "Ablate", "type": "dashboards", "tags": ["ablate"], "asDropdown": True}],
            "panels": self.panels,
        }


def prom(expr, legend="", ref="A"):
    return {"refId": ref, "datasource": PROM, "expr": expr, "legendFormat": legend, "range": True}


def sql(query, fmt="table", ref="A"):
    return {"refId": ref, "datasource": PG, "rawQuery": True, "editorMode": "code", "format": fmt,
            "rawSql": " ".join(query.split())}


SWEEP_VAR = ("SELECT id AS __value, format('%s #%s (%s)', name, id, state) AS __text "
             "FROM sweeps ORDER BY id DESC LIMIT 200")
FACTOR_VAR = "SELECT jsonb_array_elements_text(factor_names) FROM sweeps WHERE id = $sweep"
# A run's series name: the factor's value, then the job id (several runs can share a value).
RUN_BY_FACTOR = "format('%s=%s · job %s', '${factor:raw}', j.factors->>'${factor:raw}', j.id)"
RUN_ALL_FACTORS = ("format('job %s · %s', j.id, (SELECT string_agg(k || '=' || (j.factors->>k), ' ' ORDER BY o) "
                   "FROM jsonb_array_elements_text(s.factor_names) WITH ORDINALITY AS f(k, o)))")


def metric_series(name, label_expr=RUN_ALL_FACTORS):
    return f"""
      SELECT m.time AS "time", {label_expr} AS metric, m.value
      FROM metrics m JOIN jobs j ON j.id = m.job_id JOIN sweeps s ON s.id = j.sweep_id
      WHERE j.sweep_id = $sweep AND m.name = '{name}' AND m.value <> 'NaN'::float8
      ORDER BY 1"""


def sweep_overview():
    b = Board("ablate-sweep-overview", "Ablate / Sweep overview",
              "Sweeps, their jobs by state, and each job's progress (PostgreSQL), with the live queue (Prometheus).",
              ["ablate"], time_from="now-24h")
    b.sql_variable("sweep", "Sweep", SWEEP_VAR)
    b.panel("table", "Recent sweeps", [sql("""
      SELECT s.id, s.name, s.state, s.created_at,
             count(j.id) AS jobs,
             count(j.id) FILTER (WHERE j.state = 'succeeded') AS succeeded,
             count(j.id) FILTER (WHERE j.state = 'failed') AS failed,
             count(j.id) FILTER (WHERE j.state IN ('queued', 'leased', 'running')) AS unfinished
      FROM sweeps s LEFT JOIN jobs j ON j.sweep_id = s.id
      GROUP BY s.id ORDER BY s.id DESC LIMIT 50""")], w=24, h=7)
    b.panel("piechart", "Jobs by state", [sql("""
      SELECT state AS metric, count(*) AS jobs FROM jobs WHERE sweep_id = $sweep GROUP BY state ORDER BY state""")],
            w=8, h=8, options={"reduceOptions": {"values": True, "calcs": ["lastNotNull"], "fields": "/^jobs$/"},
                               "pieType": "donut", "legend": {"displayMode": "table", "placement": "right",
                                                              "values": ["value"]}})
    b.panel("gauge", "Sweep progress (steps done / planned)", [sql("""
      SELECT CASE WHEN sum(GREATEST(total_steps, 1)) = 0 THEN 0
             ELSE sum(CASE WHEN state = 'succeeded' THEN GREATEST(total_steps, latest_step, 1)
                           ELSE LEAST(latest_step, GREATEST(total_steps, 1)) END)::float8
                  / sum(GREATEST(total_steps, 1)) END AS progress
      FROM jobs WHERE sweep_id = $sweep""")], w=8, h=8, unit="percentunit",
            field={"min": 0, "max": 1}, options={"reduceOptions": {"calcs": ["lastNotNull"], "values": False}})
    b.panel("stat", "Attempts and failures", [sql("""
      SELECT count(*) AS jobs, coalesce(sum(attempt), 0) AS attempts,
             count(*) FILTER (WHERE state = 'failed') AS failed,
             count(*) FILTER (WHERE attempt > 1) AS retried
      FROM jobs WHERE sweep_id = $sweep""")], w=8, h=8,
            options={"reduceOptions": {"calcs": ["lastNotNull"], "values": False}, "colorMode": "value"})
    b.panel("table", "Jobs of the sweep", [sql("""
      SELECT j.id AS job, j.cell_index AS cell,
             (SELECT string_agg(k || '=' || (j.factors->>k), ' ' ORDER BY k) FROM jsonb_object_keys(j.factors) k)
               AS factors,
             j.state, j.attempt, j.latest_step AS step, j.total_steps AS steps,
             CASE WHEN j.total_steps > 0 THEN LEAST(j.latest_step::float8 / j.total_steps, 1) END AS progress,
             (SELECT m.value FROM metrics m WHERE m.job_id = j.id AND m.name = 'train/loss'
               ORDER BY m.step DESC LIMIT 1) AS train_loss,
             (SELECT m.value FROM metrics m WHERE m.job_id = j.id AND m.name = 'eval/loss'
               ORDER BY m.step DESC LIMIT 1) AS eval_loss,
             j.worker_id AS worker, j.failure_class, j.last_error
      FROM jobs j WHERE j.sweep_id = $sweep ORDER BY j.cell_index""")], w=24, h=10,
            field={"custom": {"align": "auto"}})
    b.panel("timeseries", "Cluster queue by state (live)", [prom('sum by (state) (ablate_jobs)', "{{state}}")],
            w=12, h=8, unit="short")
    b.panel("timeseries", "Sweeps by state (live)", [prom('sum by (state) (ablate_sweeps)', "{{state}}")],
            w=12, h=8, unit="short")
    return b


def sweep_curves():
    b = Board("ablate-sweep-curves", "Ablate / Loss and eval curves by factor",
              "Train and eval loss of every run of a sweep (PostgreSQL), one panel per factor: each series is named "
              "by the run's value of that factor.", ["ablate"], time_from="now-7d", refresh="")
    b.sql_variable("sweep", "Sweep", SWEEP_VAR)
    b.sql_variable("factor", "Factor", FACTOR_VAR, multi=True, include_all=True)
    line = {"custom": {"drawStyle": "line", "lineWidth": 1, "showPoints": "never", "spanNulls": True}}
    b.row("Curves by $factor")
    b.panel("timeseries", "train/loss by ${factor:raw}", [sql(metric_series("train/loss", RUN_BY_FACTOR),
                                                               "time_series")],
            w=12, h=9, repeat="factor", field=line)
    b.panel("timeseries", "eval/loss by ${factor:raw}", [sql(metric_series("eval/loss", RUN_BY_FACTOR),
                                                              "time_series")],
            w=12, h=9, repeat="factor", field={"custom": {"drawStyle": "line", "showPoints": "always",
                                                          "spanNulls": True}})
    b.panel("barchart", "Final eval loss by ${factor:raw} (mean over runs)", [sql("""
      SELECT j.factors->>'${factor:raw}' AS value,
             avg(last.value) AS mean_final_eval_loss, min(last.value) AS best, count(*) AS runs
      FROM jobs j
      JOIN LATERAL (SELECT m.value FROM metrics m WHERE m.job_id = j.id AND m.name = 'eval/loss'
                    ORDER BY m.step DESC LIMIT 1) last ON TRUE
      WHERE j.sweep_id = $sweep AND j.state = 'succeeded'
      GROUP BY 1 ORDER BY 1""")], w=12, h=8, repeat="factor",
            options={"xField": "value", "orientation": "auto", "showValue": "auto"})
    b.row("All runs")
    b.panel("timeseries", "train/loss (every run)", [sql(metric_series("train/loss"), "time_series")],
            w=12, h=9, field=line)
    b.panel("timeseries", "eval/perplexity (every run)", [sql(metric_series("eval/perplexity"), "time_series")],
            w=12, h=9, field={"custom": {"drawStyle": "line", "showPoints": "always", "spanNulls": True}})
    b.panel("timeseries", "learning rate (every run)", [sql(metric_series("train/lr"), "time_series")],
            w=12, h=8, field=line)
    b.panel("timeseries", "gradient norm (every run)", [sql(metric_series("train/grad_norm"), "time_series")],
            w=12, h=8, field=line)
    return b


def run_performance():
    b = Board("ablate-run-performance", "Ablate / Throughput, MFU and memory per run",
              "Per-run throughput, model FLOPs utilization and peak memory: history from PostgreSQL, running jobs "
              "live from the scheduler's /metrics.", ["ablate"], time_from="now-24h")
    b.sql_variable("sweep", "Sweep", SWEEP_VAR)
    line = {"custom": {"drawStyle": "line", "lineWidth": 1, "showPoints": "never", "spanNulls": True}}
    b.panel("timeseries", "Throughput (tokens/s)", [sql(metric_series("train/tokens_per_sec"), "time_series")],
            w=12, h=9, unit="short", field=line)
    b.panel("timeseries", "MFU", [sql(metric_series("train/mfu"), "time_series")], w=12, h=9,
            unit="percentunit", field=line,
            description="Model FLOPs utilization; 0 where ablate-train knows no peak FLOP/s for the device "
                        "(--peak_tflops sets it).")
    b.panel("timeseries", "Peak memory", [sql(metric_series("train/peak_memory_bytes"), "time_series")],
            w=12, h=9, unit="bytes", field=line)
    b.panel("table", "Per run: mean throughput, MFU, peak memory", [sql("""
      SELECT j.id AS job,
             (SELECT string_agg(k || '=' || (j.factors->>k), ' ' ORDER BY k) FROM jsonb_object_keys(j.factors) k)
               AS factors,
             j.state,
             avg(m.value) FILTER (WHERE m.name = 'train/tokens_per_sec') AS tokens_per_sec,
             avg(m.value) FILTER (WHERE m.name = 'train/mfu') AS mfu,
             max(m.value) FILTER (WHERE m.name = 'train/peak_memory_bytes') AS peak_memory_bytes
      FROM jobs j LEFT JOIN metrics m ON m.job_id = j.id
      WHERE j.sweep_id = $sweep
      GROUP BY j.id ORDER BY j.id""")], w=12, h=9,
            field={"custom": {"align": "auto"}})
    b.row("Running jobs (live, Prometheus)")
    b.panel("timeseries", "Throughput of running jobs", [
        prom('ablate_job_latest{metric="train/tokens_per_sec"}', "job {{job_id}}")], w=8, h=8, unit="short")
    b.panel("timeseries", "Train loss of running jobs", [
        prom('ablate_job_latest{metric="train/loss"}', "job {{job_id}}")], w=8, h=8)
    b.panel("timeseries", "Peak memory of running jobs", [
        prom('ablate_job_latest{metric="train/peak_memory_bytes"}', "job {{job_id}}")], w=8, h=8, unit="bytes")
    return b


def cluster_health():
    b = Board("ablate-cluster-health", "Ablate / Cluster health",
              "Scheduler and workers from Prometheus: targets, queue, leases, RPCs, metric ingest, worker children.",
              ["ablate"], time_from="now-3h", refresh="15s")
    b.panel("stat", "Targets up", [prom('sum by (job) (up{job=~"ablate-.*"})', "{{job}}")], w=6, h=6,
            options={"reduceOptions": {"calcs": ["lastNotNull"], "values": False}, "colorMode": "value"})
    b.panel("stat", "Workers alive (scheduler's view)", [prom('max(ablate_workers_alive)', "workers")], w=6, h=6,
            options={"reduceOptions": {"calcs": ["lastNotNull"], "values": False}})
    b.panel("stat", "Queued jobs", [prom('sum(ablate_jobs{state="queued"})', "queued")], w=6, h=6,
            options={"reduceOptions": {"calcs": ["lastNotNull"], "values": False}})
    b.panel("table", "Alerts (pending and firing)", [prom('sum by (alertname, alertstate) (ALERTS)',
                                                          "{{alertname}} {{alertstate}}")], w=6, h=6)
    b.panel("timeseries", "Target up", [prom('up{job=~"ablate-.*"}', "{{job}} {{instance}}")], w=12, h=8,
            field={"min": 0, "max": 1})
    b.panel("timeseries", "Jobs by state", [prom('sum by (state) (ablate_jobs)', "{{state}}")], w=12, h=8)
    b.panel("timeseries", "Leases granted / expired per second", [
        prom('sum(rate(ablate_scheduler_leases_granted_total[$__rate_interval]))', "granted", "A"),
        prom('sum(rate(ablate_scheduler_leases_expired_total[$__rate_interval]))', "expired", "B")],
        w=12, h=8, unit="ops")
    b.panel("timeseries", "Metric points ingested per second", [
        prom('sum(rate(ablate_scheduler_metric_points_ingested_total[$__rate_interval]))', "scheduler ingest", "A"),
        prom('sum(rate(ablate_worker_metric_points_sent_total[$__rate_interval]))', "workers sent", "B"),
        prom('sum(rate(ablate_worker_metric_points_dropped_total[$__rate_interval]))', "workers dropped", "C")],
        w=12, h=8, unit="ops")
    b.panel("timeseries", "RPCs per second by method and code", [
        prom('sum by (method, code) (rate(ablate_scheduler_rpc_total[$__rate_interval]))', "{{method}} {{code}}")],
        w=12, h=8, unit="reqps")
    b.panel("timeseries", "RPC latency p95 by method", [
        prom('histogram_quantile(0.95, sum by (method, le) '
             '(rate(ablate_scheduler_rpc_duration_seconds_bucket[$__rate_interval])))', "{{method}}")],
        w=12, h=8, unit="s")
    b.panel("timeseries", "Scheduler leader (1 = holds the leader lock)", [
        prom('max by (instance) (ablate_scheduler_is_leader)', "{{instance}}")], w=8, h=8, field={"min": 0, "max": 1})
    b.panel("timeseries", "Dispatch latency p95 (job created -> first lease)", [
        prom('histogram_quantile(0.95, sum by (le) '
             '(rate(ablate_scheduler_dispatch_latency_seconds_bucket[$__rate_interval])))', "p95")],
        w=8, h=8, unit="s")
    b.panel("timeseries", "Workers quarantined", [prom('max(ablate_workers_quarantined)', "quarantined")],
            w=8, h=8, field={"min": 0})
    b.panel("timeseries", "Worker children running", [
        prom('ablate_worker_child_running', "{{instance}}")], w=12, h=8, field={"min": 0})
    b.panel("timeseries", "Heartbeats per second (ok / failed)", [
        prom('sum by (instance) (rate(ablate_worker_heartbeats_total[$__rate_interval]))', "{{instance}} ok", "A"),
        prom('sum by (instance) (rate(ablate_worker_heartbeat_failures_total[$__rate_interval]))',
             "{{instance}} failed", "B")], w=12, h=8, unit="ops")
    b.panel("timeseries", "Job attempts finished by outcome (workers, per hour)", [
        prom('sum by (outcome) (increase(ablate_worker_jobs_total[1h]))', "{{outcome}}")], w=12, h=8)
    return b


BOARDS = {"sweep-overview.json": sweep_overview, "sweep-curves.json": sweep_curves,
          "run-performance.json": run_performance, "cluster-health.json": cluster_health}


def main():
    check = "--check" in sys.argv[1:]
    os.makedirs(OUT, exist_ok=True)
    stale = []
    for name, make in BOARDS.items():
        text = json.dumps(make().json(), indent=2, ensure_ascii=False) + "\n"
        path = os.path.join(OUT, name)
        if check:
            try:
                with open(path, encoding="utf-8") as f:
                    if f.read() != text:
                        stale.append(name)
            except FileNotFoundError:
                stale.append(name)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
    if stale:
        print("stale dashboards (run python3 deploy/grafana/generate.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
