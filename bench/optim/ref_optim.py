#!/usr/bin/env python3
"""PyTorch references for the optimizer-step benchmarks K5-K8 (shared/BENCHMARKS.md), timed exactly as
bench/optim/optim_bench.cpp times ours, on the same parameter shapes.

References (each skipped with a note when its package is missing or fails on the device):
  torch_adamw_fused   torch.optim.AdamW(fused=True)                                   K5, and the bar of K6/K7
  torchao_adamw8bit   torchao.optim.AdamW8bit (block 256)                             K6
  torchao_adamw4bit   torchao.optim.AdamW4bit (block 128)                             K7
  bnb_adamw8bit       bitsandbytes.optim.AdamW8bit (blockwise, min_8bit_size 4096)    K6
  eo_soap_default     Emerging-Optimizers SOAP, its defaults: QR refresh every step, TF32 ("high") matmuls
  eo_soap_matched     the same SOAP at our settings: fp32 "highest" matmuls and QR, refresh every
                      --precondition_frequency steps (see below)                      K8

Emerging-Optimizers 0.3.0 (the only release on PyPI) refreshes the eigenbasis on every step and has no
precondition_frequency; its GitHub tree's legacy_soap (which has one) is not in the wheel. For the matched
variant the module-level update_eigenbasis_and_exp_avgs that its SOAP.step() calls is wrapped so that it runs
only on refresh steps (and on the first step, which takes eigh); on other steps the basis and moments pass
through unchanged. That is the library's own step with a refresh gate, nothing else changed.

Method, as optim_bench: fp32 parameters N(0, 0.02) and gradients N(0, 1e-3) redrawn before every step; each
timed step: overwrite a 2 x L2 scratch buffer, synchronize, CUDA event, step(), CUDA event, synchronize (so
Python/dispatch overhead of the step counts). AdamW family: 5 warm-up steps (torchao compiles in them), then
up to --iters timed steps, at least 10, stopping early after --max_seconds. SOAP: step 1 alone, then alternating
no-refresh / refresh steps (one warm-up of each, --soap_iters timed of each); the default variant refreshes on
every step, so it only has refresh steps. Writes one JSON line per row to --json (appended).

Parity (K6): --parity_out DIR writes torchao_parity_{8,4}bit.bin (the format of
tests/optim/make_torchao_vectors.py, plus an "hparams" record [bits, lr, beta1, beta2, eps, weight_decay] and
the codes of every quantized moment after each step, "exp_avg.codes.K.I" / "exp_avg_sq.codes.K.I"):
Qwen3-0.6B-sized tensors (quantized), a small matrix and vectors (left fp32 by torchao), two torchao steps on
--device. optim_bench --parity FILE replays them with our optimizers and prints the max abs difference.

Usage: python3 bench/optim/ref_optim.py [--device cuda] [--shapes_file shapes.jsonl | --shapes qwen3-0.6b-linear]
           [--refs torch_adamw_fused,torchao_adamw8bit,...] [--refs_sets REF=SET+SET,...] [--json out.jsonl]
           [--parity_out DIR]
"""
import argparse
import importlib.util
import json
import os
import sys
import time
import traceback
import typing

import torch

if not hasattr(typing, "override"):  # Emerging-Optimizers imports typing.override (Python >= 3.12)
    typing.override = lambda f: f

COPY_CEILING = 4.3e12
ADAM_REFS = ["torch_adamw_fused", "torchao_adamw8bit", "torchao_adamw4bit", "bnb_adamw8bit"]
SOAP_REFS = ["eo_soap_default", "eo_soap_matched"]
HP = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


# ------------------------------------------------------------------------------------------------ shapes

def builtin_shape_set(name, layers):
    if name == "qwen3-0.6b-linear":
        total = 28
        n = min(layers, total) if layers > 0 else total
        shapes = []
        for i in range(n):
            b = f"layers.{i}."
            shapes += [(b + "q.weight", [2048, 1024]), (b + "k.weight", [1024, 1024]), (b + "v.weight", [1024, 1024]),
                       (b + "o.weight", [1024, 2048]), (b + "gate.weight", [3072, 1024]),
                       (b + "up.weight", [3072, 1024]), (b + "down.weight", [1024, 3072])]
        return dict(name=name, layers=n, total_layers=total, shapes=shapes)
    if name == "tiny":  # optim_bench's CPU smoke set: a 2-layer Transformer, d 64, vocab 256
        total = 2
        n = min(layers, total) if layers > 0 else total
        shapes = [("embed.weight", [256, 64])]
        for i in range(n):
            b = f"blocks.{i}."
            shapes += [(b + "norm1", [64]), (b + "attn.q.weight", [64, 64]), (b + "attn.k.weight", [32, 64]),
                       (b + "attn.v.weight", [32, 64]), (b + "attn.o.weight", [64, 64]), (b + "norm2", [64]),
                       (b + "mlp.gate.weight", [192, 64]), (b + "mlp.up.weight", [192, 64]),
                       (b + "mlp.down.weight", [64, 192])]
        shapes += [("final_norm", [64]), ("head.weight", [256, 64])]
        return dict(name=name, layers=n, total_layers=total, shapes=shapes)
    raise SystemExit(f"ref_optim: shape set {name} needs --shapes_file (optim_bench --dump_shapes writes it)")


def is_no_decay(name, shape):  # core/optim make_param_groups
    n = name.lower()
    return len(shape) <= 1 or n.endswith(".bias") or "norm" in n or "embed" in n


# ------------------------------------------------------------------------------------------------ timing

class Timer:
    def __init__(self, device):
        self.device = device
        if device.type == "cuda":
            l2 = torch.cuda.get_device_properties(device).L2_cache_size
            self.flush = torch.empty(2 * l2 // 4, dtype=torch.float32, device=device)
            self.start = torch.cuda.Event(enable_timing=True)
            self.stop = torch.cuda.Event(enable_timing=True)
        self.k = 0

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def ms(self, fn):
        if self.device.type == "cuda":
            self.k += 1
            self.flush.fill_(float(self.k))
            torch.cuda.synchronize(self.device)
            self.start.record()
            fn()
            self.stop.record()
            self.stop.synchronize()
            return self.start.elapsed_time(self.stop)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def stats(ms):
    s = sorted(ms)
    if not s:
        return dict(median_ms=0.0, p20_ms=0.0, p80_ms=0.0, iters=0)
    pct = lambda p: s[min(len(s) - 1, int(p * (len(s) - 1) + 0.5))]
    return dict(median_ms=pct(0.5), p20_ms=pct(0.2), p80_ms=pct(0.8), iters=len(s))


# ------------------------------------------------------------------------------------------------ state bytes

def tensor_bytes(t, seen):
    """Bytes of a state tensor as stored: plain tensors by nbytes, torchao subclasses by their inner tensors
    except the shared lookup map (qmap), as core/optim's state_bytes() counts."""
    if not isinstance(t, torch.Tensor):
        return 0
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n), seen) for n in names if n != "qmap")
    if id(t) in seen:
        return 0
    seen.add(id(t))
    return t.numel() * t.element_size()


def state_bytes(opt):
    seen, total = set(), 0
    for st in opt.state.values():
        for key, t in st.items():
            if isinstance(key, str) and key.startswith("qmap"):  # bitsandbytes' shared maps
                continue
            if isinstance(t, torch.Tensor):
                total += tensor_bytes(t, seen)
            elif isinstance(t, (int, float)):
                total += 8
    return total


# ------------------------------------------------------------------------------------------------ references

class RefUnavailable(Exception):
    pass


def groups_of(named):
    decay = [p for n, p in named if not is_no_decay(n, p.shape)]
    no_decay = [p for n, p in named if is_no_decay(n, p.shape)]
    out = []
    if decay:
        out.append({"params": decay, "weight_decay": HP["weight_decay"]})
    if no_decay:
        out.append({"params": no_decay, "weight_decay": 0.0})
    return out


def make_adam(ref, named, device):
    kw = dict(lr=HP["lr"], betas=HP["betas"], eps=HP["eps"])
    if ref == "torch_adamw_fused":
        return torch.optim.AdamW(groups_of(named), fused=True, **kw)
    if ref in ("torchao_adamw8bit", "torchao_adamw4bit"):
        try:
            from torchao.optim import AdamW4bit, AdamW8bit
        except Exception as e:  # noqa: BLE001
            raise RefUnavailable(f"torchao: {type(e).__name__}: {e}")
        return (AdamW8bit if ref.endswith("8bit") else AdamW4bit)(groups_of(named), **kw)
    if ref == "bnb_adamw8bit":
        try:
            import bitsandbytes as bnb
        except Exception as e:  # noqa: BLE001
            raise RefUnavailable(f"bitsandbytes: {type(e).__name__}: {e}")
        return bnb.optim.AdamW8bit(groups_of(named), min_8bit_size=4096, **kw)
    raise ValueError(ref)


_eo_refresh = [True]


def eo_soap_module():
    try:
        import emerging_optimizers.soap.soap as eo
    except Exception as e:  # noqa: BLE001
        raise RefUnavailable(f"emerging_optimizers: {type(e).__name__}: {e}")
    if not getattr(eo, "_ablate_gated", False):
        orig = eo.update_eigenbasis_and_exp_avgs

        def gated(*args, **kwargs):
            if _eo_refresh[0] or kwargs.get("use_eigh", False):
                return orig(*args, **kwargs)
            names = ["kronecker_factor_list", "eigenbasis_list", "exp_avg_sq", "exp_avg"]
            a = dict(zip(names, args))
            a.update({k: v for k, v in kwargs.items() if k in names})
            return a["eigenbasis_list"], a["exp_avg"], a["exp_avg_sq"]

        eo.update_eigenbasis_and_exp_avgs = gated
        eo._ablate_gated = True
    return eo


def make_soap(ref, named):
    eo = eo_soap_module()
    params = [p for _, p in named]
    kw = dict(lr=HP["lr"], betas=HP["betas"], shampoo_beta=0.95, eps=HP["eps"], weight_decay=HP["weight_decay"])
    if ref == "eo_soap_default":
        return eo.SOAP(params, **kw)
    return eo.SOAP(params, fp32_matmul_prec="highest", qr_fp32_matmul_prec="highest", **kw)


def soap_flops(shapes):
    """GEMM FLOPs of a SOAP step and of the extra refresh work: the formula of optim_bench.cpp (soap_flops)."""
    step = refresh = 0.0
    for _, s in shapes:
        if len(s) != 2:
            continue
        m, n = float(s[0]), float(s[1])
        step += 6 * m * n * (m + n)
        refresh += 4 * m * n * (m + n) + (4 + 8.0 / 3) * (m ** 3 + n ** 3)
    return step, refresh


# ------------------------------------------------------------------------------------------------ runner

class Runner:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.timer = Timer(self.device)
        self.json = open(args.json, "a") if args.json else None

    def emit(self, row):
        row = dict(tool="ref", kind="step", **row)
        sec = row.get("median_ms", 0) * 1e-3
        n = max(row.get("n_params", 1), 1)
        row["state_bytes_per_param"] = row.get("state_bytes", 0) / n
        row["gbps"] = row["min_bytes"] / sec / 1e9 if row.get("min_bytes") and sec > 0 else 0.0
        row["pct_copy_ceiling"] = 100 * row["gbps"] * 1e9 / COPY_CEILING
        row["tflops"] = row["flops"] / sec / 1e12 if row.get("flops") and sec > 0 else 0.0
        if row["kind"] == "step":
            print(f"{row['shapes']:<18} {row['optimizer']:<18} {row['variant']:<15} {n / 1e6:6.0f} "
                  f"{row['median_ms']:9.3f} {row['p20_ms']:9.3f} {row['p80_ms']:9.3f} {row['iters']:5d} "
                  f"{row['state_bytes_per_param']:8.2f} {row['gbps']:10.0f} {row['pct_copy_ceiling']:6.1f}% "
                  f"{row['tflops']:9.1f}  {row.get('note', '')}", flush=True)
        if self.json:
            self.json.write(json.dumps(row) + "\n")
            self.json.flush()

    def skip(self, set_, ref, why):
        print(f"{set_['name']:<18} {ref:<18} skipped: {why}", flush=True)
        if self.json:
            self.json.write(json.dumps(dict(tool="ref", kind="skip", shapes=set_["name"], optimizer=ref,
                                            note=why)) + "\n")
            self.json.flush()

    def make_params(self, set_):
        g = torch.Generator(device=self.device).manual_seed(0)
        named = []
        for name, shape in set_["shapes"]:
            p = torch.nn.Parameter(torch.randn(shape, device=self.device, generator=g) * 0.02)
            p.grad = torch.empty_like(p)
            named.append((name, p))
        return named

    @staticmethod
    def redraw(named):
        for _, p in named:
            p.grad.normal_(0.0, 1e-3)

    def base_row(self, set_, ref, variant, ms, opt, named):
        n = sum(p.numel() for _, p in named)
        return dict(shapes=set_["name"], layers=set_["layers"], total_layers=set_["total_layers"], optimizer=ref,
                    variant=variant, n_params=n, n_tensors=len(named), state_bytes=state_bytes(opt), **stats(ms))

    def run_adam(self, set_, named, ref):
        opt = make_adam(ref, named, self.device)
        t_warm = time.perf_counter()
        for _ in range(5):
            self.redraw(named)
            opt.step()
        self.timer.sync()
        t_warm = time.perf_counter() - t_warm
        ms, t0 = [], time.perf_counter()
        for i in range(self.args.iters):
            self.redraw(named)
            ms.append(self.timer.ms(opt.step))
            if i + 1 >= 10 and time.perf_counter() - t0 > self.args.max_seconds:
                break
        row = self.base_row(set_, ref, "step", ms, opt, named)
        row["min_bytes"] = 12.0 * row["n_params"] + 2.0 * row["state_bytes"]
        notes = [f"warm-up {t_warm:.1f}s"]
        if len(ms) < self.args.iters:
            notes.append("fewer steps: --max_seconds reached")
        row["note"] = "; ".join(notes)
        self.emit(row)
        del opt

    def run_soap(self, set_, named, ref):
        if any(len(s) != 2 for _, s in set_["shapes"]):
            raise RefUnavailable("Emerging-Optimizers SOAP takes 2-D parameters only")
        if any(max(s) > 8192 for _, s in set_["shapes"]):
            raise RefUnavailable("a side > 8192 (Emerging-Optimizers 0.3.0 has no max_precond_dim)")
        opt = make_soap(ref, named)
        f_step, f_refresh = soap_flops(set_["shapes"])
        every_step = ref == "eo_soap_default"
        _eo_refresh[0] = True
        self.redraw(named)
        init = self.timer.ms(opt.step)  # step 1: eigh
        plain, refresh = [], []
        try:
            for i in range(2 + 2 * self.args.soap_iters):  # the first two are warm-up
                do_refresh = every_step or i % 2 == 1
                _eo_refresh[0] = do_refresh
                self.redraw(named)
                t = self.timer.ms(opt.step)
                if i >= 2:
                    (refresh if do_refresh else plain).append(t)
                if every_step and len(refresh) >= self.args.soap_iters:
                    break
        finally:
            _eo_refresh[0] = True
        fewer = "fewer than 50 steps (--soap_iters)"
        row = self.base_row(set_, ref, "init", [init], opt, named)
        row.update(min_bytes=0, flops=0, note="step 1: eigh of every factor, once")
        self.emit(row)
        rf = self.base_row(set_, ref, "step_refresh", refresh, opt, named)
        rf.update(min_bytes=0, flops=f_step + f_refresh,
                  note=fewer + ("; refresh on every step (library default)" if every_step else ""))
        if every_step:
            self.emit(rf)
            return
        nr = self.base_row(set_, ref, "step_norefresh", plain, opt, named)
        nr.update(min_bytes=0, flops=f_step, note=fewer)
        self.emit(nr)
        self.emit(rf)
        f = float(self.args.precondition_frequency)
        am = dict(nr)
        for k in ("median_ms", "p20_ms", "p80_ms"):
            am[k] = nr[k] + (rf[k] - nr[k]) / f
        am.update(variant="step_amortized", flops=f_step + f_refresh / f,
                  note=f"no_refresh + (refresh - no_refresh) / {self.args.precondition_frequency}")
        self.emit(am)

    def run(self, sets, refs, refs_sets):
        print(f"ref_optim on {self.device} ({torch.cuda.get_device_name(self.device) if self.device.type == 'cuda' else 'CPU'}), "
              f"torch {torch.__version__}", flush=True)
        for set_ in sets:
            todo = [r for r in refs if set_["name"] in refs_sets.get(r, [set_["name"]])]
            if not todo:
                continue
            named = self.make_params(set_)
            n = sum(p.numel() for _, p in named)
            print(f"\n== {set_['name']}: {len(named)} tensors, {n / 1e6:.1f} M parameters "
                  f"({set_['layers']} of {set_['total_layers']} layers), fp32 params and grads", flush=True)
            print(f"{'shapes':<18} {'optimizer':<18} {'variant':<15} {'Mparam':>6} {'med ms':>9} {'p20 ms':>9} "
                  f"{'p80 ms':>9} {'n':>5} {'state B/p':>8} {'floor GB/s':>10} {'%4.3TB':>7} {'fp32 TF/s':>9}")
            for ref in todo:
                try:
                    if ref in SOAP_REFS:
                        self.run_soap(set_, named, ref)
                    else:
                        self.run_adam(set_, named, ref)
                except RefUnavailable as e:
                    self.skip(set_, ref, str(e))
                except Exception as e:  # noqa: BLE001  a broken reference must not stop the others
                    traceback.print_exc()
                    self.skip(set_, ref, f"failed: {type(e).__name__}: {str(e)[:300]}")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            del named
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ parity

def load_vector_writer():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "optim",
                        "make_torchao_vectors.py")
    spec = importlib.util.spec_from_file_location("make_torchao_vectors", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.write_record


def write_parity(out_dir, device, lr=1e-3):
    from torchao.optim import AdamW4bit, AdamW8bit

    write_record = load_vector_writer()
    os.makedirs(out_dir, exist_ok=True)
    # Quantized by torchao: Qwen3-0.6B down/q projections; left fp32: < 4096 elements, or numel % block != 0
    # (4224 = 33 x 128: quantized at 4 bits, fp32 at 8 bits), and a norm vector.
    shapes = [(1024, 3072), (2048, 1024), (32, 64), (4224,), (1024,)]
    paths = []
    for bits, cls in ((8, AdamW8bit), (4, AdamW4bit)):
        g = torch.Generator().manual_seed(4321 + bits)
        init = [torch.randn(s, generator=g) for s in shapes]
        grads = [[torch.randn(s, generator=g) * 1e-2 for s in shapes] for _ in range(2)]
        params = [torch.nn.Parameter(x.clone().to(device)) for x in init]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        opt = cls([{"params": decay, "weight_decay": HP["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
                  lr=lr, betas=HP["betas"], eps=HP["eps"])
        path = os.path.join(out_dir, f"torchao_parity_{bits}bit.bin")
        with open(path, "wb") as f:
            write_record(f, "hparams", torch.tensor([bits, lr, HP["betas"][0], HP["betas"][1], HP["eps"],
                                                     HP["weight_decay"]], dtype=torch.float32))
            for i, x in enumerate(init):
                write_record(f, f"init.{i}", x)
            for k in range(2):
                for i, p in enumerate(params):
                    p.grad = grads[k][i].clone().to(device)
                    write_record(f, f"grad.{k}.{i}", grads[k][i])
                opt.step()
                for i, p in enumerate(params):
                    write_record(f, f"param.{k}.{i}", p)
                    for key in ("exp_avg", "exp_avg_sq"):  # quantized moments: the codes, to count flips
                        q = opt.state[p][key]
                        if type(q).__name__.startswith("OptimState"):
                            write_record(f, f"{key}.codes.{k}.{i}", q.codes)
        print(f"wrote {path} (torchao {bits}-bit on {device}, lr {lr})", flush=True)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------ main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default="qwen3-0.6b-linear", help="comma-separated built-in sets")
    ap.add_argument("--shapes_file", help="JSON lines from optim_bench --dump_shapes (overrides --shapes)")
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--refs", default=",".join(ADAM_REFS + SOAP_REFS))
    ap.add_argument("--refs_sets", default="",
                    help="restrict references to sets: REF=SET+SET,REF=SET (default: every set)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--soap_iters", type=int, default=5)
    ap.add_argument("--precondition_frequency", type=int, default=10)
    ap.add_argument("--max_seconds", type=float, default=10.0)
    ap.add_argument("--json")
    ap.add_argument("--parity_out", help="write torchao parity vectors here (needs torchao)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("ref_optim: --device cuda but torch sees no CUDA device")

    if args.parity_out:
        try:
            write_parity(args.parity_out, torch.device(args.device))
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            print("ref_optim: parity vectors not written", flush=True)

    if args.shapes_file:
        with open(args.shapes_file) as f:
            sets = [json.loads(line) for line in f if line.strip()]
    else:
        sets = [builtin_shape_set(s, args.layers) for s in args.shapes.split(",") if s]
    refs = [r for r in args.refs.split(",") if r]
    for r in refs:
        if r not in ADAM_REFS + SOAP_REFS:
            raise SystemExit(f"ref_optim: unknown reference {r}; expected one of {ADAM_REFS + SOAP_REFS}")
    refs_sets = {}
    for item in filter(None, args.refs_sets.split(",")):
        ref, _, sets_ = item.partition("=")
        refs_sets[ref] = sets_.split("+")
    Runner(args).run(sets, refs, refs_sets)


if __name__ == "__main__":
    main()
