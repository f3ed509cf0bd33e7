#!/usr/bin/env python3
"""Joins mixer_bench (ours) and ref_mixers (references) JSON lines; prints speedups = reference ms / our ms
(higher is better) against the K1-K4 targets of shared/BENCHMARKS.md and writes them as JSON.

  compare.py OURS.jsonl REFS.jsonl [--json OUT.json]
"""
import argparse
import json
import re
import sys


def load(path):
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    except OSError as e:
        print(f"compare: cannot read {path}: {e}", file=sys.stderr)
    return rows


def timed(rows):
    return [r for r in rows if "median_ms" in r]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ours")
    ap.add_argument("refs")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    ours, refs = timed(load(a.ours)), timed(load(a.refs))
    checks = [r for r in load(a.ours) + load(a.refs) if "pass" in r]
    out = []

    def ref_best(id_, shape, direction, impls=None, variant=None):
        c = [r for r in refs if r["id"] == id_ and r["shape"] == shape and r["dir"] == direction
             and (impls is None or r["impl"] in impls) and (variant is None or r["variant"] == variant)]
        return min(c, key=lambda r: r["median_ms"]) if c else None

    def our(id_, shape, direction, variant):
        c = [r for r in ours if r["id"] == id_ and r["shape"] == shape and r["dir"] == direction
             and r["variant"] == variant]
        return c[0] if c else None

    def add(id_, shape, direction, ours_label, ours_ms, ref_label, ref_ms, target):
        sp = ref_ms / ours_ms if ours_ms and ref_ms else None
        out.append({"id": id_, "shape": shape, "dir": direction, "ours": ours_label, "ours_ms": ours_ms,
                    "reference": ref_label, "ref_ms": ref_ms, "speedup": sp, "target": target,
                    "meets": (sp is not None and sp >= target)})

    for r in [r for r in ours if r["id"] == "K1"]:
        ref = ref_best("K1", r["shape"], r["dir"])
        if ref:
            add("K1", r["shape"], r["dir"], r["variant"], r["median_ms"], f"{ref['impl']} ({ref['variant']})",
                ref["median_ms"], 0.95)
    for sh in sorted({r["shape"] for r in ours if r["id"] == "K2"}):
        m = re.match(r"B(\d+) T(\S+) H(\d+)/(\d+) G(\d+)", sh)
        G = int(m.group(5)) if m else 16
        for d in ("fwd", "fwd+bwd"):
            cs, sw = our("K2", sh, d, "cmp+slc"), our("K2", sh, d, "swa")
            fla, flex = ref_best("K2", sh, d, {"fla"}), ref_best("K2", sh, d, {"flex"})
            if cs and fla:
                add("K2", sh, d, "cmp+slc", cs["median_ms"], "fla cmp+slc", fla["median_ms"], 2.0 if G <= 4 else 1.5)
            if cs and sw and fla and flex:
                add("K2", sh, d, "cmp+slc+swa", cs["median_ms"] + sw["median_ms"], "fla cmp+slc + flex swa",
                    fla["median_ms"] + flex["median_ms"], 2.0 if G <= 4 else 1.5)
            if m and cs and sw:
                dense = ref_best("K1", f"B{m.group(1)} T{m.group(2)} H{m.group(3)}/{m.group(4)} d128", d)
                if dense:
                    tgt = 4.0 if (m.group(2) == "64K" and d == "fwd+bwd") else (2.5 if m.group(2) == "64K" else 1.0)
                    add("K2", sh, d, "cmp+slc+swa", cs["median_ms"] + sw["median_ms"],
                        f"dense {dense['impl']}", dense["median_ms"], tgt)
    for id_, impl in (("K3", "mamba_ssm"), ("K4", "fla")):
        for r in [r for r in ours if r["id"] == id_]:
            ref = ref_best(id_, r["shape"], r["dir"], {impl})
            if ref:
                add(id_, r["shape"], r["dir"], r["variant"], r["median_ms"], impl, ref["median_ms"], 1.0)

    print(f"\n== speedup = reference ms / ours ms (higher is better)\n{'id':4s} {'shape':30s} {'dir':8s} "
          f"{'ours':12s} {'ours ms':>10s} {'reference':28s} {'ref ms':>10s} {'speedup':>8s} {'target':>7s}")
    for o in out:
        sp = f"{o['speedup']:.2f}x" if o["speedup"] else "-"
        print(f"{o['id']:4s} {o['shape']:30s} {o['dir']:8s} {o['ours']:12s} {o['ours_ms']:10.3f} "
              f"{o['reference']:28s} {o['ref_ms']:10.3f} {sp:>8s} {o['target']:6.2f}x {'ok' if o['meets'] else 'MISS'}")
    failed = [c for c in checks if not c["pass"]]
    print(f"\ncorrectness checks: {len(checks) - len(failed)} passed, {len(failed)} failed")
    for c in failed:
        print(f"  FAIL {c.get('bench')} {c.get('id')} {c.get('check')}: {c.get('detail')}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"speedups": out, "checks": checks}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
