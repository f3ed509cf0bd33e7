#!/usr/bin/env python3
"""The references of K1-K4 (shared/BENCHMARKS.md) at mixer_bench's shapes, timed the same way.

  K1  torch SDPA, flash and cuDNN backends (enable_gqa when the backend takes it, else K/V repeated: says which)
  K2  fla `parallel_nsa` compression + top-n + selection (window_size 0: fla's window branch needs flash_attn,
      absent on the GPU machine); sliding window timed separately with FlexAttention (compiled)
  K3  mamba_ssm Triton `mamba_chunk_scan_combined` (only mamba_ssm/ops/triton and mamba_ssm/utils on the path)
  K4  fla `chunk_gated_delta_rule`. Its gated backward refuses Triton < 3.7.1 on Hopper (a known miscompile,
      fla #640); for timing the guard is bypassed and the row says so: that backward is not a correctness
      reference there.

Method as mixer_bench.cpp: a correctness check of each reference at a small T first (K1: vs an fp32 composite;
K2: fla's naive_nsa; K3/K4: plain sequential recurrences written here in fp64), then warm-up, then one CUDA event
pair per call with the L2 flushed before it, median and p20/p80, iterations adapted to --budget_s (>= --min_iters,
<= --iters). A reference that fails to import or run is reported as a skipped row and the rest continues.
One JSON object per row to stdout and to --json FILE (JSON lines, the same keys as mixer_bench).
"""
import argparse
import json
import math
import sys
import time
import traceback

import torch
import torch.nn.functional as F

MATMUL_CEIL = 790e12
COPY_CEIL = 4.3e12

opt = None
json_out = None
t_start = time.time()
flush_buf = None


def emit(obj):
    line = json.dumps(obj)
    print(line, flush=True)
    if json_out:
        json_out.write(line + "\n")
        json_out.flush()


def kstr(T):
    return f"{T // 1024}K" if T % 1024 == 0 else str(T)


def past_deadline():
    return time.time() - t_start > opt.deadline_s


def time_it(fn):
    fn()  # compiles / autotunes (Triton, torch.compile)
    torch.cuda.synchronize()
    t0 = time.time()
    fn()  # sizes the run
    torch.cuda.synchronize()
    first = max(1e-6, time.time() - t0)
    # Slow calls (> budget): no further warm-up, and at least 3 timed calls within ~6 budgets.
    for _ in range(0 if first > opt.budget_s else max(1, min(9, int(0.3 * opt.budget_s / first)))):
        fn()
    torch.cuda.synchronize()
    iters = max(opt.min_iters, min(opt.iters, int(opt.budget_s / first)))
    if first * iters > 6 * opt.budget_s:
        iters = max(min(3, opt.iters), int(6 * opt.budget_s / first))
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for a, b in ev:
        flush_buf.add_(1.0)  # evict L2, outside the events
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    ms = sorted(a.elapsed_time(b) for a, b in ev)

    def pct(p):
        return ms[min(len(ms) - 1, int(p * (len(ms) - 1) + 0.5))]

    return {"median_ms": pct(0.5), "p20_ms": pct(0.2), "p80_ms": pct(0.8), "iters": iters}


def row(id_, shape, impl, variant, direction, st, flops, nbytes, check):
    sec = st["median_ms"] * 1e-3
    tf = flops / sec / 1e12
    floor_ms = 1e3 * max(flops / MATMUL_CEIL, nbytes / COPY_CEIL)
    print(f"{id_:5s} {shape:34s} {impl:12s} {variant:9s} {direction:8s} {st['median_ms']:9.3f} {st['p20_ms']:9.3f} "
          f"{st['p80_ms']:9.3f} {st['iters']:5d} {tf:9.1f} {100 * tf * 1e12 / MATMUL_CEIL:6.1f}% {floor_ms:9.3f}")
    emit({"bench": "ref_mixers", "id": id_, "shape": shape, "impl": impl, "variant": variant, "dir": direction,
          "device": "cuda", **st, "flops": flops, "min_bytes": nbytes, "tflops": round(tf, 2),
          "floor_ms": floor_ms, "check": check})


def skipped(id_, shape, impl, variant, why):
    print(f"{id_:5s} {shape:34s} {impl:12s} {variant:9s} SKIPPED: {why}")
    emit({"bench": "ref_mixers", "id": id_, "shape": shape, "impl": impl, "variant": variant, "device": "cuda",
          "skipped": why})


def check_result(id_, what, ok, detail):
    print(f"check {id_:4s} {what:48s} {'PASS' if ok else 'FAIL'}  {detail}")
    emit({"bench": "ref_mixers", "id": id_, "check": what, "pass": bool(ok), "detail": detail})


def rel_rms(a, ref):
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def header(title):
    print(f"\n== {title}\n{'id':5s} {'shape':34s} {'impl':12s} {'variant':9s} {'dir':8s} {'med ms':>9s} "
          f"{'p20 ms':>9s} {'p80 ms':>9s} {'n':>5s} {'TFLOP/s':>9s} {'%790':>7s} {'floor ms':>9s}")


def time_fwd_bwd(id_, shape, impl, variant, fwd, inputs, gy, flops_fwd, bwd_factor, nbytes, check, fwd_only=False):
    if past_deadline():
        return skipped(id_, shape, impl, variant, "global deadline reached")
    try:
        with torch.no_grad():
            st = time_it(fwd)
        row(id_, shape, impl, variant, "fwd", st, flops_fwd, nbytes, check)
        if fwd_only:
            return
        if past_deadline():
            return skipped(id_, shape, impl, variant + " fwd+bwd", "global deadline reached")

        def fb():
            y = fwd()
            torch.autograd.grad(y, inputs, gy)

        st = time_it(fb)
        row(id_, shape, impl, variant, "fwd+bwd", st, flops_fwd * bwd_factor, 2.5 * nbytes, check)
    except Exception as e:  # noqa: BLE001 -- a failing reference is reported, the rest continues
        skipped(id_, shape, impl, variant, f"error: {type(e).__name__}: {str(e)[:300]}")
    finally:
        torch.cuda.empty_cache()


# ============================================================================================ K1
def attn_composite(q, k, v):
    H, KV, T = q.shape[1], k.shape[1], q.shape[2]
    k = k.repeat_interleave(H // KV, 1)
    v = v.repeat_interleave(H // KV, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


def sdpa_fn(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def gqa(q, k, v):
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])

    def rep(q, k, v):
        r = q.shape[1] // k.shape[1]
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1),
                                                  is_causal=True)

    return gqa, rep


def bench_k1():
    header("K1 dense causal attention, torch SDPA (bf16, d=128)")
    d = 128
    shapes = [(1, 16, 8, 4096), (1, 16, 8, 32768), (1, 16, 8, 131072), (1, 32, 8, 32768), (1, 32, 8, 65536),
              (1, 64, 4, 65536), (1, 16, 1, 32768)]
    # Which form each backend takes (enable_gqa or repeated K/V), and its error vs fp32 at T=1024.
    chosen = {}
    torch.manual_seed(1)
    T = 1024
    q = torch.randn(1, 16, T, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, T, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 8, T, d, device="cuda", dtype=torch.bfloat16)
    ref = attn_composite(q.float(), k.float(), v.float())
    comp = attn_composite(q, k, v)
    ec = (comp.float() - ref).abs().max().item()
    for backend in ("flash", "cudnn"):
        gqa, rep = sdpa_fn(backend)
        for form, fn in (("gqa", gqa), ("repeat", rep)):
            try:
                e = (fn(q, k, v).float() - ref).abs().max().item()
                ok = e <= 2 * ec + 1e-3
                check_result("K1", f"SDPA {backend} ({form}) T1024", ok, f"o {e:.2e} (bf16 composite {ec:.2e})")
                if ok:
                    chosen[backend] = (form, fn)
                    break
            except Exception as ex:  # noqa: BLE001 -- e.g. a backend without GQA support: try the next form
                print(f"note K1 SDPA {backend} ({form}) does not run: {str(ex)[:200]}")
                emit({"bench": "ref_mixers", "id": "K1", "note": f"SDPA {backend} ({form}) does not run",
                      "detail": str(ex)[:300]})
    for B, H, KV, T in shapes:
        if T > opt.max_t:
            continue
        shape = f"B{B} T{kstr(T)} H{H}/{KV} d{d}"
        torch.manual_seed(2)
        q = torch.randn(B, H, T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, KV, T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, KV, T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gy = torch.randn(B, H, T, d, device="cuda", dtype=torch.bfloat16)
        flops = 2.0 * B * H * T * T * d
        nbytes = 2.0 * B * T * d * (2 * H + 2 * KV)
        for backend in ("flash", "cudnn"):
            if backend not in chosen:
                skipped("K1", shape, f"sdpa-{backend}", "model", "backend failed its check or does not run")
                continue
            form, fn = chosen[backend]
            time_fwd_bwd("K1", shape, f"sdpa-{backend}", form, lambda fn=fn: fn(q, k, v), (q, k, v), gy, flops, 3.5,
                         nbytes, "passed")


# ============================================================================================ K2
NSA_L, NSA_D, NSA_LS, NSA_N, NSA_W = 32, 16, 64, 16, 512  # ours; fla: mean-pool blocks of 64 = its selection block


def nsa_keys(T, l, st, ls, n, w):
    t = torch.arange(T, dtype=torch.float64)
    cmp = torch.where(t >= l - 1, torch.div(t - l + 1, st, rounding_mode="floor") + 1, torch.zeros_like(t))
    blocks = torch.div(t, ls, rounding_mode="floor") + 1
    slc = torch.where(blocks <= n, t + 1, (n - 1) * ls + torch.remainder(t, ls) + 1)
    swa = torch.clamp(t + 1, max=w)
    return cmp.mean().item(), slc.mean().item(), swa.mean().item()


def bench_k2():
    header("K2 NSA: fla parallel_nsa (compression + top-n + selection, no window) and FlexAttention sliding window")
    d = 128
    shapes = [(1, 64, 4, 32768), (1, 64, 4, 65536), (1, 64, 4, 131072), (1, 16, 1, 32768), (1, 32, 8, 32768),
              (1, 32, 8, 65536), (1, 32, 8, 131072)]
    try:
        from fla.ops.nsa import parallel_nsa
        from fla.ops.nsa.naive import naive_nsa
    except Exception as e:  # noqa: BLE001
        parallel_nsa = None
        why = f"fla import failed: {type(e).__name__}: {str(e)[:200]}"
    if parallel_nsa is not None:
        try:
            torch.manual_seed(3)
            B, T, H, KV = 1, 1024, 64, 4
            q = torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(B, T, KV, d, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(B, T, KV, d, device="cuda", dtype=torch.bfloat16)
            g = torch.rand(B, T, H, device="cuda", dtype=torch.bfloat16)
            o = parallel_nsa(q, k, v, g_cmp=g, g_slc=g, block_counts=NSA_N, block_size=NSA_LS)
            r = naive_nsa(q.float(), k.float(), v.float(), g_cmp=g.float(), g_slc=g.float(), block_counts=NSA_N,
                          block_size=NSA_LS)
            e = rel_rms(o, r)
            check_result("K2", "fla parallel_nsa (bf16) vs naive_nsa (fp32) T1K", e <= 2e-2, f"o {e:.2e} rel. RMS")
        except Exception as ex:  # noqa: BLE001
            check_result("K2", "fla parallel_nsa vs naive_nsa", False, f"error: {str(ex)[:300]}")
    flex = None
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
    except Exception as e:  # noqa: BLE001
        flex_why = f"FlexAttention unavailable: {str(e)[:200]}"
    for B, H, KV, T in shapes:
        if T > opt.max_t:
            continue
        G = H // KV
        shape = f"B{B} T{kstr(T)} H{H}/{KV} G{G}"
        torch.manual_seed(5)
        q = torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, T, KV, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, T, KV, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gy = torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16)
        per_key = 4.0 * B * T * H * d
        nbytes = 2.0 * B * T * d * (2 * H + 2 * KV)
        if parallel_nsa is None:
            skipped("K2", shape, "fla", "cmp+slc", why)
        elif G < 16 or G & (G - 1):
            skipped("K2", shape, "fla", "cmp+slc", f"fla parallel_nsa requires HQ/H a power of 2 >= 16 (G={G})")
        else:
            # fla: mean-pooled blocks of 64 (stride 64) for compression, top-16 of 64-token blocks.
            kc, sl, _ = nsa_keys(T, NSA_LS, NSA_LS, NSA_LS, NSA_N, NSA_W)
            g = torch.ones(B, T, H, device="cuda", dtype=torch.bfloat16)
            time_fwd_bwd("K2", shape, "fla", "cmp+slc",
                         lambda: parallel_nsa(q, k, v, g_cmp=g, g_slc=g, block_counts=NSA_N, block_size=NSA_LS),
                         (q, k, v), gy, per_key * (kc + sl), 3.5, nbytes, "passed")
        if T != 65536:  # FlexAttention compiles per shape: only the 64K rows the targets name
            continue
        if flex is None:
            skipped("K2", shape, "flex", "swa", flex_why)
            continue
        try:
            W = NSA_W

            def swa_mask(b, h, qi, ki):
                return (ki <= qi) & (qi - ki < W)

            bm = create_block_mask(swa_mask, None, None, T, T, device="cuda")
            gt = gy.transpose(1, 2)
            _, _, sw = nsa_keys(T, NSA_L, NSA_D, NSA_LS, NSA_N, NSA_W)
            time_fwd_bwd("K2", shape, "flex", "swa",
                         lambda: flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm,
                                      enable_gqa=True),
                         (q, k, v), gt, per_key * sw, 3.5, nbytes, "window 512, FlexAttention (compiled)")
        except Exception as e:  # noqa: BLE001
            skipped("K2", shape, "flex", "swa", f"error: {type(e).__name__}: {str(e)[:300]}")


# ============================================================================================ K3
def ssd_sequential(x, dt, A, B, C):
    """S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t, in x's dtype (fp64 here)."""
    Bn, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    Bh, Ch = B.repeat_interleave(H // G, 2), C.repeat_interleave(H // G, 2)
    S = torch.zeros(Bn, H, P, N, dtype=x.dtype, device=x.device)
    ys = []
    for t in range(T):
        S = S * torch.exp(dt[:, t] * A)[..., None, None] + (x[:, t] * dt[:, t, :, None])[..., None] * Bh[:, t, :, None, :]
        ys.append((S * Ch[:, t, :, None, :]).sum(-1))
    return torch.stack(ys, 1)


def ssd_inputs(Bn, T, H, P, G, N):
    x = torch.randn(Bn, T, H, P, device="cuda", dtype=torch.bfloat16)
    dt = torch.exp(torch.rand(Bn, T, H, device="cuda") * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3))
    A = -torch.exp(torch.rand(H, device="cuda") * math.log(16.0))
    Bm = torch.randn(Bn, T, G, N, device="cuda", dtype=torch.bfloat16)
    Cm = torch.randn(Bn, T, G, N, device="cuda", dtype=torch.bfloat16)
    return [x, dt, A, Bm, Cm]


def bench_k3():
    header("K3 Mamba2 SSD: mamba_ssm Triton mamba_chunk_scan_combined (x/B/C bf16, dt/A fp32, chunk 256)")
    shapes = [(1, 32768, 32, 64, 1, 128, 256), (1, 32768, 32, 64, 8, 128, 256), (4, 32768, 32, 64, 1, 128, 256)]
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as e:  # noqa: BLE001
        for Bn, T, H, P, G, N, c in shapes:
            skipped("K3", f"B{Bn} T{kstr(T)} H{H}x{P} N{N} G{G}", "mamba_ssm", "chunked",
                    f"mamba_ssm import failed: {type(e).__name__}: {str(e)[:200]}")
        return
    try:
        torch.manual_seed(6)
        ins = ssd_inputs(1, 600, 8, 64, 1, 128)
        gy = torch.randn(1, 600, 8, 64, device="cuda")
        ours = [t.clone().requires_grad_(True) for t in ins]
        y = mamba_chunk_scan_combined(*ours, chunk_size=256)
        go = torch.autograd.grad(y, ours, gy.to(y.dtype))
        ref = [t.double().requires_grad_(True) for t in ins]
        yr = ssd_sequential(*ref)
        gr = torch.autograd.grad(yr, ref, gy.double())
        errs = [rel_rms(y, yr)] + [rel_rms(a, b) for a, b in zip(go, gr)]
        ok = errs[0] <= 1e-2 and max(errs[1:]) <= 2e-2
        check_result("K3", "mamba_chunk_scan_combined vs sequential (fp64) T600", ok,
                     " ".join(f"{n} {e:.2e}" for n, e in zip(["y", "dx", "ddt", "dA", "dB", "dC"], errs)))
    except Exception as ex:  # noqa: BLE001
        check_result("K3", "mamba_chunk_scan_combined check", False, f"error: {str(ex)[:300]}")
    for Bn, T, H, P, G, N, c in shapes:
        if T > opt.max_t:
            continue
        shape = f"B{Bn} T{kstr(T)} H{H}x{P} N{N} G{G}"
        torch.manual_seed(7)
        ins = [t.requires_grad_(True) for t in ssd_inputs(Bn, T, H, P, G, N)]
        gy = torch.randn(Bn, T, H, P, device="cuda", dtype=torch.bfloat16)
        cc = min(c, T)
        macs = G * cc * N + H * cc * P + 2 * H * N * P + H * N * P * math.ceil(T / cc) / cc
        flops = 2.0 * Bn * T * macs
        nbytes = Bn * T * (2.0 * 2 * H * P + 2.0 * 2 * G * N + 4.0 * H)
        time_fwd_bwd("K3", shape, "mamba_ssm", "chunked", lambda: mamba_chunk_scan_combined(*ins, chunk_size=c), ins,
                     gy, flops, 3.0, nbytes, "passed")


# ============================================================================================ K4
def gdn_sequential(q, k, v, g, beta, scale):
    Bn, T, H, K = q.shape
    V = v.shape[-1]
    S = torch.zeros(Bn, H, K, V, dtype=q.dtype, device=q.device)
    outs = []
    for t in range(T):
        S = S * torch.exp(g[:, t])[..., None, None]
        kt = k[:, t]
        u = beta[:, t, :, None] * (v[:, t] - (S * kt[..., None]).sum(-2))
        S = S + kt[..., None] * u[..., None, :]
        outs.append((S * (q[:, t] * scale)[..., None]).sum(-2))
    return torch.stack(outs, 1)


def gdn_inputs(Bn, T, H, K, V):
    q = F.normalize(torch.randn(Bn, T, H, K, device="cuda"), dim=-1).bfloat16()
    k = F.normalize(torch.randn(Bn, T, H, K, device="cuda"), dim=-1).bfloat16()
    v = torch.randn(Bn, T, H, V, device="cuda", dtype=torch.bfloat16)
    g = F.logsigmoid(torch.rand(Bn, T, H, device="cuda"))
    beta = torch.rand(Bn, T, H, device="cuda").sigmoid().bfloat16()
    return [q, k, v, g, beta]


def bench_k4():
    header("K4 Gated DeltaNet: fla chunk_gated_delta_rule (q/k/v/beta bf16, g fp32, chunk 64)")
    shapes = [(1, 4096, 16, 128, 128), (1, 32768, 16, 128, 128), (4, 4096, 16, 128, 128)]
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        import fla.ops.common.chunk_o as fla_chunk_o
    except Exception as e:  # noqa: BLE001
        for Bn, T, H, K, V in shapes:
            skipped("K4", f"B{Bn} T{kstr(T)} H{H} K{K} V{V}", "fla", "chunked",
                    f"fla import failed: {type(e).__name__}: {str(e)[:200]}")
        return
    bypassed = False
    guard = "fla gated bwd guard (Triton < 3.7.1 on Hopper) bypassed for timing: bwd not a correctness reference"
    try:
        torch.manual_seed(8)
        ins = gdn_inputs(1, 300, 4, 128, 128)
        gy = torch.randn(1, 300, 4, 128, device="cuda")
        scale = 128 ** -0.5
        ours = [t.clone().requires_grad_(True) for t in ins]
        o, _ = chunk_gated_delta_rule(*ours, scale=scale)
        ref = [t.double().requires_grad_(True) for t in ins]
        orf = gdn_sequential(*ref, scale)
        e = rel_rms(o, orf)
        detail = f"o {e:.2e}"
        ok = e <= 1e-2
        try:
            go = torch.autograd.grad(o, ours, gy.to(o.dtype))
            gr = torch.autograd.grad(orf, ref, gy.double())
            errs = [rel_rms(a, b) for a, b in zip(go, gr)]
            ok = ok and max(errs) <= 2e-2
            detail += " " + " ".join(f"{n} {x:.2e}" for n, x in zip(["dq", "dk", "dv", "dg", "dbeta"], errs))
        except RuntimeError as ex:
            if "3.7.1" not in str(ex):
                raise
            detail += " (bwd refused: " + str(ex)[:120] + ")"
            fla_chunk_o.TRITON_ABOVE_3_7_1 = True
            bypassed = True
        check_result("K4", "chunk_gated_delta_rule vs sequential (fp64) T300", ok, detail)
    except Exception as ex:  # noqa: BLE001
        check_result("K4", "chunk_gated_delta_rule check", False, f"error: {str(ex)[:300]}")
    for Bn, T, H, K, V in shapes:
        if T > opt.max_t:
            continue
        shape = f"B{Bn} T{kstr(T)} H{H} K{K} V{V}"
        torch.manual_seed(9)
        ins = [t.requires_grad_(True) for t in gdn_inputs(Bn, T, H, K, V)]
        gy = torch.randn(Bn, T, H, V, device="cuda", dtype=torch.bfloat16)
        c = min(64, T)
        macs = H * (2 * c * K + c * (K + V) / 2 + 3 * K * V + c * V)
        flops = 2.0 * Bn * T * macs
        nbytes = Bn * T * H * (2.0 * (2 * K + 2 * V) + 6.0)
        time_fwd_bwd("K4", shape, "fla", "chunked", lambda: chunk_gated_delta_rule(*ins, scale=K ** -0.5)[0], ins, gy,
                     flops, 3.0, nbytes, guard if bypassed else "passed")


def main():
    global opt, json_out, flush_buf
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="all", help="all or a comma list of k1,k2,k3,k4")
    ap.add_argument("--json", default="")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--min_iters", type=int, default=5)
    ap.add_argument("--budget_s", type=float, default=3.0)
    ap.add_argument("--deadline_s", type=float, default=200.0)
    ap.add_argument("--max_t", type=int, default=1 << 20)
    opt = ap.parse_args()
    if not torch.cuda.is_available():
        print("ref_mixers: needs a CUDA device", file=sys.stderr)
        return 2
    if opt.json:
        json_out = open(opt.json, "w")
    prop = torch.cuda.get_device_properties(0)
    flush_buf = torch.empty(max(1, 2 * getattr(prop, "L2_cache_size", 64 << 20) // 4), device="cuda")
    vers = {"torch": torch.__version__}
    for mod in ("triton", "fla", "einops"):
        try:
            vers[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            vers[mod] = None
    emit({"bench": "ref_mixers", "meta": True, "device_name": prop.name, **vers, "iters": opt.iters,
          "min_iters": opt.min_iters, "budget_s": opt.budget_s})
    cases = ["k1", "k2", "k3", "k4"] if opt.case == "all" else opt.case.split(",")
    for c in cases:
        try:
            {"k1": bench_k1, "k2": bench_k2, "k3": bench_k3, "k4": bench_k4}[c]()
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            emit({"bench": "ref_mixers", "id": c.upper(), "skipped": "case crashed: " + traceback.format_exc()[-300:]})
    print(f"\nref_mixers: done in {time.time() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
