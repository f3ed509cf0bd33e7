#!/usr/bin/env python3
"""E1-E3 report: joins OUT/<case>-ours.json (run_ours.py) with OUT/<case>-eager.json / -compile.json
(ref_model.py), prints tokens/s, ratios ours/reference, MFU and peak memory against the targets of
shared/BENCHMARKS.md, and writes them as JSON.

MFU = flops_per_token x tokens/s / 989e12 (docs/flops.md: 6 N_matmul + 12 H hd T/2 per attention layer + the SSD
and delta-rule MACs x 6; recomputation not counted). Two FLOP counts are shown: ablate-train's own (core/flops.cpp,
implied by its logged mfu) and ref_model.py's count on the PyTorch twin; they should agree.
"""
import argparse
import glob
import json
import os
import sys

TARGETS = {  # case prefix -> (min ratio vs eager, min ratio vs compile, min MFU, max memory ratio vs compile)
    "e1-4k": (1.5, 1.15, 0.45, None),
    "e1-32k": (1.5, 1.15, 0.50, None),
    "e2-32k": (None, 1.1, None, 0.9),
    "e3-mdma-4k": (1.2, 1.2, None, None),
    "e3-nsa-4k": (None, None, None, None),
}


def load(path):
    try:
        with open(path) as f:
            return json.loads(f.readline())
    except (OSError, ValueError):
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    cases = sorted({os.path.basename(p)[:-len("-ours.json")] for p in glob.glob(os.path.join(a.out, "*-ours.json"))}
                   | {os.path.basename(p).rsplit("-", 1)[0] for p in glob.glob(os.path.join(a.out, "*-eager.json"))}
                   | {os.path.basename(p).rsplit("-", 1)[0] for p in glob.glob(os.path.join(a.out, "*-compile.json"))})
    report = []
    print(f"\n{'case':12s} {'impl':8s} {'tok/s':>9s} {'p20':>9s} {'p80':>9s} {'peak GiB':>9s} {'MFU':>6s} "
          f"{'GFLOP/tok':>10s}  notes")
    for case in cases:
        ours = load(os.path.join(a.out, f"{case}-ours.json"))
        refs = {m: load(os.path.join(a.out, f"{case}-{m}.json")) for m in ("eager", "compile")}
        fpt_ref = next((r["flops_per_token"] for r in refs.values() if r and r.get("flops_per_token")), None)
        entry = {"case": case, "ours": ours, "refs": refs, "ratios": {}}
        for name, r in [("ours", ours)] + list(refs.items()):
            if r is None:
                continue
            if not r.get("ok"):
                print(f"{case:12s} {name:8s} FAILED: {(r.get('error') or '')[:200]}")
                continue
            fpt = r.get("flops_per_token") or fpt_ref
            mfu = (fpt or 0) * r["tokens_per_sec"] / 989e12
            r["mfu_docs_formula"] = mfu
            note = ""
            if name != "ours" and r.get("params") is not None:
                po = (r.get("dims") or {}).get("params_ours")
                note = f"params {r['params']:,} ({'= ours' if r['params'] == po else f'ours {po}'})"
            if r.get("caveats"):
                note = (note + "; " if note else "") + "; ".join(r["caveats"])
            if name == "ours" and fpt_ref and r.get("flops_per_token"):
                note = f"ablate-train FLOPs/token {r['flops_per_token'] / 1e9:.2f} G vs twin {fpt_ref / 1e9:.2f} G"
            print(f"{case:12s} {name:8s} {r['tokens_per_sec']:9.0f} {r.get('tokens_per_sec_p20', 0):9.0f} "
                  f"{r.get('tokens_per_sec_p80', 0):9.0f} {r.get('peak_memory_bytes', 0) / 2**30:9.2f} "
                  f"{100 * mfu:5.1f}% {(fpt or 0) / 1e9:10.2f}  {note}")
        t = TARGETS.get(case, (None, None, None, None))
        if ours and ours.get("ok"):
            for i, m in enumerate(("eager", "compile")):
                r = refs.get(m)
                if r and r.get("ok"):
                    ratio = ours["tokens_per_sec"] / r["tokens_per_sec"]
                    mem = ours["peak_memory_bytes"] / r["peak_memory_bytes"] if r.get("peak_memory_bytes") else None
                    entry["ratios"][m] = {"tokens_per_sec": ratio, "peak_memory": mem, "target": t[i]}
                    ok = "" if t[i] is None else ("ok" if ratio >= t[i] else "MISS")
                    mem_s = f", memory {mem:.2f}x" if mem else ""
                    if i == 1 and t[3] is not None and mem is not None:
                        mem_s += f" (target <= {t[3]}x: {'ok' if mem <= t[3] else 'MISS'})"
                    print(f"{'':12s} ours/{m}: {ratio:.2f}x tokens/s"
                          f"{'' if t[i] is None else f' (target >= {t[i]}x: {ok})'}{mem_s}")
            if t[2] is not None:
                mfu = ours.get("mfu_docs_formula", 0)
                print(f"{'':12s} MFU {100 * mfu:.1f}% (target >= {100 * t[2]:.0f}%: {'ok' if mfu >= t[2] else 'MISS'})")
        report.append(entry)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
