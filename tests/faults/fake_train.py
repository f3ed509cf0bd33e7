#!/usr/bin/env python3
"""A fast, deterministic stand-in for ablate-train (docs/contracts.md §2–3) for the fault suite.

Speaks the same protocol: JSON-line events on --events_fd (started, metrics, checkpoint, finished), checkpoints
in <output_dir>/<run_name>/checkpoint-<step>/ written to a temp dir and renamed, manifest.json (per-file size and
sha256) written last, --resume_from verified before use, exit codes 0 ok / 2 invalid config / 3 diverged / 4 OOM.
Faults on demand (flags, so a sweep file's `train:` section sets them):
  --fake_fail KIND@STEP   oom | nan | nan_continue | hang | crash | enospc | slow_ckpt | big_ckpt (KIND@STEP, comma
                          list); big_ckpt adds a sparse file of FAKE_BIG_CKPT_BYTES (default 8 GiB) whose manifest
                          hash is wrong: a checkpoint whose hashing outlasts a lease TTL, then fails
                          startup_crash (no step: dies by SIGSEGV before the started event)
  --fake_fail_attempts N  only on these attempts (comma list; default: every attempt)
  --fake_fail_model M     only when --model_size is M
  --step_ms MS            time per step (default 50)
SIGTERM: writes a checkpoint at the current step (drain), then exits 143.
--lease_file PATH (set by the worker): before every step, if the worker's lease deadline in it ("monotonic_deadline_ns
N", CLOCK_MONOTONIC) has passed, stops at once without saving, exit 75 (as ablate-train, core/lease_watch.h).
Ledger: env FAKE_LEDGER=path gets one JSON line per start/step/checkpoint/end with the monotonic clock, so the
fault suite can prove that two attempts of one job never trained at the same time (I2) and resumed where they
should (I4).
"""
import hashlib, json, os, re, signal, sys, time

def parse(argv):
    a = {}
    i = 0
    while i < len(argv):
        k = argv[i]
        if not k.startswith("--"):
            print("fake_train: unexpected argument " + k, file=sys.stderr); sys.exit(2)
        if i + 1 >= len(argv):
            print("fake_train: " + k + " needs a value", file=sys.stderr); sys.exit(2)
        a[k[2:]] = argv[i + 1]
        i += 2
    return a

args = parse(sys.argv[1:])
events_fd = int(args.get("events_fd", "-1"))
ev = os.fdopen(events_fd, "w", buffering=1) if events_fd >= 0 else None
out_dir = args.get("output_dir", ".")
run_name = args.get("run_name", "attempt-1")
run_dir = os.path.join(out_dir, run_name)
total = int(args.get("num_train_steps", "40"))
save_interval = int(args.get("save_interval", "10"))
step_ms = float(args.get("step_ms", "50"))
# attempt-<n>, or attempt-<n>-<grant digest> when the number was reissued after a database rollback (F16)
_m = re.match(r"attempt-(\d+)", run_name)
attempt = int(_m.group(1)) if _m else 1
job = os.environ.get("ABLATE_JOB_ID", "0")
faults = {}
for f in filter(None, args.get("fake_fail", "").split(",")):
    kind, _, step = f.partition("@")
    faults[kind] = int(step) if step else 0
only = [int(x) for x in args.get("fake_fail_attempts", "").split(",") if x]
if only and attempt not in only:
    faults = {}
if args.get("fake_fail_model") and args.get("fake_fail_model") != args.get("model_size"):
    faults = {}
ledger_path = os.environ.get("FAKE_LEDGER")
lease_file = args.get("lease_file")

def lease_expired():
    if not lease_file:
        return False
    try:
        key, ns = open(lease_file).read().split()[:2]
        return key == "monotonic_deadline_ns" and time.monotonic_ns() > int(ns)
    except (OSError, ValueError):
        return False  # missing or unreadable: the last deadline is unknown, not passed

def ledger(kind, **kw):
    if not ledger_path:
        return
    rec = {"job": int(job), "attempt": attempt, "pid": os.getpid(), "event": kind, "mono": time.monotonic()}
    rec.update(kw)
    with open(ledger_path, "a") as f:
        f.write(json.dumps(rec) + "\n")

def emit(obj):
    if ev is None:
        return
    try:
        ev.write(json.dumps(obj) + "\n")
    except (BrokenPipeError, OSError):
        pass

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()

def verify(d):
    try:
        m = json.load(open(os.path.join(d, "manifest.json")))
        for name, info in m["files"].items():
            p = os.path.join(d, name)
            if os.path.getsize(p) != info["bytes"] or sha256(p) != info["sha256"]:
                return None
        return json.load(open(os.path.join(d, "state.json")))["step"]
    except Exception:
        return None

def add_big_file(d, files):
    """A sparse file (no disk space) that the worker must read and hash in full, listed with a wrong sha256."""
    n = int(os.environ.get("FAKE_BIG_CKPT_BYTES", str(8 << 30)))
    with open(os.path.join(d, "shard.bin"), "wb") as f:
        f.truncate(n)
    files["shard.bin"] = {"bytes": n, "sha256": "0" * 64}

def save(step, slow=False, enospc=False, big=False):
    final = os.path.join(run_dir, "checkpoint-%d" % step)
    tmp = final + ".tmp-%d" % os.getpid()
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(tmp, "model.pt"), "wb") as f:
        f.write(hashlib.sha256(("%s-%d" % (job, step)).encode()).digest() * 64)
        f.flush(); os.fsync(f.fileno())
    if slow:
        time.sleep(1.0)   # the window in which a kill leaves a checkpoint without its manifest
    if enospc:
        # The disk filled up: the manifest cannot be written. A buggy trainer still announces the checkpoint
        # (under its final name, without manifest): the worker must refuse to record it.
        os.rename(tmp, final)
        emit({"event": "checkpoint", "step": step, "path": os.path.abspath(final)})
        return
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump({"step": step}, f)
    files = {}
    for n in ("model.pt", "state.json"):
        p = os.path.join(tmp, n)
        files[n] = {"bytes": os.path.getsize(p), "sha256": sha256(p)}
    if big:
        add_big_file(tmp, files)
    with open(os.path.join(tmp, "manifest.json.tmp"), "w") as f:
        json.dump({"format": "ablate-checkpoint-v1", "step": step, "files": files}, f)
        f.flush(); os.fsync(f.fileno())
    os.rename(os.path.join(tmp, "manifest.json.tmp"), os.path.join(tmp, "manifest.json"))
    if os.path.exists(final):
        import shutil; shutil.rmtree(final)
    os.rename(tmp, final)
    ledger("checkpoint", step=step)
    emit({"event": "checkpoint", "step": step, "path": os.path.abspath(final)})

if "startup_crash" in faults:
    os.kill(os.getpid(), signal.SIGSEGV)

start = 0
if args.get("resume_from"):
    s = verify(args["resume_from"])
    if s is None:
        emit({"event": "finished", "status": "failed", "failure_class": "invalid_config",
              "message": "resume checkpoint fails verification: " + args["resume_from"]})
        sys.exit(2)
    start = s

os.makedirs(run_dir, exist_ok=True)
state = {"step": start}

def on_term(signum, frame):
    ledger("drain", step=state["step"])
    if state["step"] > start:
        save(state["step"])
    ledger("end", step=state["step"], why="sigterm")
    sys.exit(143)

signal.signal(signal.SIGTERM, on_term)
ledger("start", resume_step=start)
emit({"event": "started", "total_steps": total, "params": 1234})
nan_at = None
for step in range(start + 1, total + 1):
    time.sleep(step_ms / 1000.0)
    if lease_expired():
        ledger("end", step=state["step"], why="lease_expired")
        print("fake_train: the worker's lease deadline passed without renewal: stopping without saving",
              file=sys.stderr)
        sys.exit(75)
    if faults.get("hang") == step:
        ledger("hang", step=step)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a wedged process: only SIGKILL ends it
        while True:
            time.sleep(1)
    if faults.get("crash") == step:
        ledger("end", step=step, why="crash")
        os.kill(os.getpid(), signal.SIGSEGV)
    if faults.get("oom") == step:
        emit({"event": "finished", "status": "failed", "failure_class": "oom", "message": "CUDA out of memory (fake)"})
        ledger("end", step=step, why="oom")
        sys.exit(4)
    loss = 4.0 / (1.0 + 0.1 * step)
    if "nan" in faults and step >= faults["nan"] or "nan_continue" in faults and step >= faults["nan_continue"]:
        loss = float("nan")
        nan_at = nan_at or step
    state["step"] = step
    ledger("step", step=step)
    emit({"event": "metrics", "step": step, "time_unix_ms": int(time.time() * 1000),
          "values": {"train/loss": loss if loss == loss else "NaN", "train/lr": 0.001}})
    if nan_at and "nan" in faults:
        emit({"event": "finished", "status": "failed", "failure_class": "diverged",
              "message": "loss is NaN at step %d" % nan_at})
        ledger("end", step=step, why="nan")
        sys.exit(3)
    if step % save_interval == 0 or step == total:
        save(step, slow=faults.get("slow_ckpt", -1) <= step and "slow_ckpt" in faults,
             enospc=faults.get("enospc") == step, big=faults.get("big_ckpt") == step)
emit({"event": "metrics", "step": total, "values": {"eval/loss": 1.0}})
emit({"event": "finished", "status": "succeeded"})
ledger("end", step=total, why="done")
sys.exit(0)
