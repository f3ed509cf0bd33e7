#!/usr/bin/env python3
"""Reads run.sh's key=value outputs in WORKDIR, prints the O1-O6 table, writes WORKDIR/results.json."""
import json
import sys

work, ttl, reaper_ms, o4w, o4s, o5s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]


def kv(name):
    out = {}
    try:
        for line in open(f"{work}/{name}"):
            if "=" in line and not line.startswith("o6 "):
                k, v = line.strip().split("=", 1)
                try:
                    out[k] = float(v)
                except ValueError:
                    out[k] = v
    except FileNotFoundError:
        pass
    return out


rows = []


def row(id_, what, ours, ref, ratio, target, ok, extra=None):
    rows.append({"id": id_, "what": what, "ours": ours, "reference": ref, "ratio": ratio, "target": target,
                 "pass": bool(ok), **(extra or {})})


o1 = kv("o1.out")
if "submit_s" in o1:
    n = o1["jobs"]
    ours_rate, ref_rate = n / o1["submit_s"], o1["ref_rows"] / o1["ref_copy_s"]
    r = ours_rate / ref_rate
    row("O1", f"submit+expand+persist {int(n)} cells", f"{o1['submit_s']:.2f} s ({ours_rate:,.0f} rows/s)",
        f"COPY {o1['ref_copy_s']:.3f} s ({ref_rate:,.0f} rows/s)", r, "<=2 s and >=0.70",
        o1["submit_s"] <= 2 and r >= 0.7)
o2 = kv("o2.out")
if "rate" in o2 and o2.get("ref_rate"):
    r = o2["rate"] / o2["ref_rate"]
    row("O2", "lease->hb x2->complete, 100 workers", f"{o2['rate']:,.0f} cycles/s; lease p50 {o2['lease_p50_ms']:.1f} "
        f"p99 {o2['lease_p99_ms']:.1f} ms", f"pgbench 8 clients {o2['ref_rate']:,.0f} tx/s", r,
        ">=0.70 and p99<=20 ms", r >= 0.7 and o2["lease_p99_ms"] <= 20, {"errors": o2.get("errors")})
o3 = kv("o3.out")
if "rate" in o3 and o3.get("ref_rate"):
    r = o3["rate"] / o3["ref_rate"]
    row("O3", f"ReportMetrics, 8 streams, {int(o3['points'])} points", f"{o3['rate']:,.0f} points/s",
        f"COPY {o3['ref_rate']:,.0f} rows/s", r, ">=200k/s and >=0.60", o3["rate"] >= 200e3 and r >= 0.6)
o4 = kv("o4.out")
if "hb_p99_ms" in o4:
    row("O4", f"{o4w} workers heartbeating every 5 s, {o4s} s", f"hb p50 {o4['hb_p50_ms']:.1f} p99 {o4['hb_p99_ms']:.1f} ms;"
        f" sched CPU {o4.get('sched_cpu_cores', -1):.3f} cores", "-", None, "p99<=20 ms, CPU<0.5 core",
        o4["hb_p99_ms"] <= 20 and o4.get("sched_cpu_cores", 9) < 0.5 and o4.get("errors", 1) == 0,
        {"late_sends": o4.get("late_sends"), "errors": o4.get("errors")})
o5 = kv("o5.out")
if "sched_rss_max_mb" in o5:
    row("O5", f"RSS, {int(o5['jobs_in_db'])} jobs in DB, 100 workers, {o5s} s", f"RSS {o5['sched_rss_start_mb']:.0f}->"
        f"{o5['sched_rss_end_mb']:.0f} MB (max {o5['sched_rss_max_mb']:.0f}, lifetime HWM {o5['vm_hwm_mb']:.0f})", "-",
        None, "RSS<150 MB, flat", o5["vm_hwm_mb"] < 150 and o5["sched_rss_end_mb"] <= o5["sched_rss_start_mb"] * 1.1)
kill_ms = kv("o6.out").get("kill_ms")
o6 = []
try:
    for line in open(f"{work}/o6.reclaim"):
        if line.startswith("job="):
            parts = dict(p.split("=") for p in line.split())
            o6.append((int(parts["t_ms"]) - kill_ms) / 1000)
except FileNotFoundError:
    pass
if kill_ms and o6:
    bound = ttl + reaper_ms / 1000 + 10
    row("O6", f"SIGKILL {len(o6)} lease holders -> re-leased elsewhere", f"max {max(o6):.1f} s (all: "
        + ", ".join(f"{x:.1f}" for x in sorted(o6)) + ")", "-", None, f"<= TTL {ttl}+reaper {reaper_ms/1000:g}+10 = {bound:g} s",
        len(o6) == 5 and max(o6) <= bound)

print(f"| id | what | ours | reference (same run) | ratio | target | result |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
    print(f"| {r['id']} | {r['what']} | {r['ours']} | {r['reference']} | {ratio} | {r['target']} | "
          f"{'pass' if r['pass'] else 'MISS'} |")
missing = [i for i in ("O1", "O2", "O3", "O4", "O5", "O6") if i not in {r["id"] for r in rows}]
if missing:
    print(f"\nnot measured (see {work}/*.err): {', '.join(missing)}")
json.dump({"rows": rows, "missing": missing, "raw": {n: kv(f"{n}.out") for n in ("o1", "o2", "o3", "o4", "o5")}},
          open(f"{work}/results.json", "w"), indent=1)
print(f"\nJSON: {work}/results.json")
