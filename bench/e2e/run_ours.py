#!/usr/bin/env python3
"""Runs ablate-train for E1-E3 and reads its per-step log lines (--log_interval 1):

  step 5/1000 | loss ... | tok/s 91234 | grad ... | mfu 0.4321 | mem 51234.5 MiB | opt state ... MiB | ...

tokens/s per step is ablate-train's own (wall time of the step, which ends in loss.item() and the optimizer step).
Stops the run (SIGTERM to the process it started) after --steps logged steps or --time_cap_s, so the final
checkpoint write never happens. Reports the median and p20/p80 tokens/s over the steps after --warmup, the peak
allocated memory (ablate-train's CUDA allocator peak, as torch.cuda.max_memory_allocated), ablate-train's MFU
and the FLOPs/token it implies (mfu * peak / tok/s, core/flops.cpp). One JSON object to stdout ("RESULT ...")
and --json.

  run_ours.py --bin build-gpu/bin/ablate-train --label e1-4k --steps 20 --warmup 3 -- <ablate-train flags>
"""
import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time

STEP = re.compile(r"^step (\d+)/\d+ \|.*\| tok/s (\d+) \|.*\| mfu ([0-9.]+) \| mem ([0-9.]+) MiB")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--label", default="")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--time_cap_s", type=float, default=90.0)
    ap.add_argument("--peak_tflops", type=float, default=989.0)
    ap.add_argument("--json", default="")
    ap.add_argument("--log", default="", help="write ablate-train's output here")
    ap.add_argument("train_args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    args = [x for x in a.train_args if x != "--"]
    cmd = [a.bin] + args
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)
    log = open(a.log, "w") if a.log else None
    steps, tail, first_step_t = [], [], None
    stopped = False
    for line in proc.stdout:
        if log:
            log.write(line)
        tail = (tail + [line.rstrip()])[-30:]
        m = STEP.match(line)
        if m:
            if first_step_t is None:
                first_step_t = time.time() - t0
            steps.append({"step": int(m.group(1)), "tok_s": float(m.group(2)), "mfu": float(m.group(3)),
                          "mem_mib": float(m.group(4))})
            if len(steps) >= a.steps or (time.time() - t0 > a.time_cap_s and len(steps) >= a.warmup + 2):
                stopped = True
                break
        if time.time() - t0 > a.time_cap_s + 60:  # no step lines at all: give up
            stopped = True
            break
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    rc = proc.returncode
    res = {"bench": "e2e_ours", "label": a.label, "cmd": " ".join(cmd), "steps": len(steps),
           "startup_s": first_step_t, "stopped_by_harness": stopped}
    steady = steps[a.warmup:] if len(steps) > a.warmup else steps[-1:]
    if steady:
        tps = sorted(s["tok_s"] for s in steady)

        def pct(p):
            return tps[min(len(tps) - 1, int(p * (len(tps) - 1) + 0.5))]

        med = statistics.median(tps)
        mfu = statistics.median(s["mfu"] for s in steady)
        res.update(ok=True, tokens_per_sec=med, tokens_per_sec_p20=pct(0.2), tokens_per_sec_p80=pct(0.8),
                   mfu=mfu, flops_per_token=(mfu * a.peak_tflops * 1e12 / med) if med > 0 and mfu > 0 else None,
                   peak_memory_bytes=max(s["mem_mib"] for s in steps) * (1 << 20), steady_steps=len(steady))
    else:
        res.update(ok=False, rc=rc, error="no step lines; last output: " + " / ".join(tail[-8:]),
                   oom=any("out of memory" in t.lower() for t in tail))
    line = json.dumps(res)
    print("RESULT " + line, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            f.write(line + "\n")
    return 0 if res.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
