#!/usr/bin/env python3
"""PyTorch twin of ablate-train's model and training step, for E1-E3 of shared/BENCHMARKS.md.

Architecture = core/model.cpp, dims read from `ablate-train --print_config` (same flags, same --data_dir):
  embedding -> L x [x + mixer(RMSNorm(x)); h + SwiGLU(RMSNorm(h))] -> RMSNorm -> untied head -> mean CE.
  A  q/k/v/o Linear (no bias), NeoX RoPE (theta 1e6 unless --rope_theta), K/V repeat_interleave'd to the query
     heads, causal SDPA (flash) -- the same call core/model.cpp makes; no QK-norm (ours has none)
  M  Mamba2 as core/mixers/mamba2.cpp: in_proj -> depthwise causal conv + SiLU -> mamba_ssm's Triton
     mamba_chunk_scan_combined (dt_bias + softplus inside, D skip) -> gated RMSNorm (mamba_ssm rmsnorm_fn,
     norm_before_gate=False) -> out_proj
  D  fla's GatedDeltaNet layer (q/k/v/a/b/g projections, short convs, chunk_gated_delta_rule, FusedRMSNormGated)
     with ours' settings: head_dim 64, expand_v 2, conv 4
RMSNorm eps 1e-6. Precision as ablate-train --dtype bfloat16: fp32 master weights, bf16 autocast, fp32 loss.
Step: zero_grad(set_to_none) -> forward/backward -> loss.item() -> clip_grad_norm_(1.0) -> optimizer.step().
Optimizer: torch AdamW(fused=True) or torchao AdamW8bit; weight decay on >= 2-D weights except the embedding.
Modes: eager; compile = torch.compile per block (and the loss head), the torchtitan way.
--ac: activation checkpointing per block (torch.utils.checkpoint, non-reentrant), as --gradient_checkpointing.

Reports tokens/s per step (wall time of the step, synchronised by loss.item() as ablate-train is), the median and
p20/p80 over the steps after --warmup, peak allocated CUDA memory, and FLOPs/token by docs/flops.md. One JSON
object to stdout (prefixed "RESULT ") and to --json.
"""
import argparse
import json
import math
import re
import statistics
import sys
import time
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

NORM_EPS = 1e-6


# -------------------------------------------------------------------------------------------- dims
def parse_print_config(text):
    """The fields of core/config.cpp describe_model()."""
    def num(key):
        m = re.search(rf"^{key}:\s*(\d+)", text, re.M)
        if not m:
            raise ValueError(f"--print_config output has no '{key}:' line")
        return int(m.group(1))

    dims = {"d": num("d_model"), "n_layers": num("n_layers"), "n_heads": num("n_heads"),
            "n_kv_heads": num("n_kv_heads"), "head_dim": num("head_dim"), "intermediate": num("intermediate")}
    m = re.search(r"^vocab:\s*(\d+)\s*\(padded (\d+)\)", text, re.M)
    dims["vocab"], dims["padded_vocab"] = int(m.group(1)), int(m.group(2))
    m = re.search(r"^pattern:\s*([AMD]+)", text, re.M)
    dims["pattern"] = m.group(1) if m else "A"
    m = re.search(r"^attention:\s*(\w+)", text, re.M)
    dims["attn_type"] = m.group(1) if m else "dense"
    m = re.search(r"^mamba2: d_state (\d+), d_conv (\d+), expand (\d+), headdim (\d+)", text, re.M)
    if m:
        dims.update(mamba_d_state=int(m.group(1)), mamba_d_conv=int(m.group(2)), mamba_expand=int(m.group(3)),
                    mamba_headdim=int(m.group(4)))
    m = re.search(r"^deltanet: heads (\d+), head_dim (\d+), expand_v (\d+), conv (\d+)", text, re.M)
    if m:
        dims.update(gdn_heads=int(m.group(1)), gdn_head_dim=int(m.group(2)), gdn_expand_v=int(m.group(3)),
                    gdn_conv=int(m.group(4)))
    m = re.search(r"^\s*total:\s*(\d+)", text, re.M)
    dims["params_ours"] = int(m.group(1)) if m else None
    return dims


# -------------------------------------------------------------------------------------------- layers
def rope_tables(T, hd, theta, device):
    inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.outer(torch.arange(T, dtype=torch.float64), inv)
    emb = torch.cat([ang, ang], -1)
    return emb.cos().float().to(device), emb.sin().float().to(device)


def apply_rope(x, cos, sin):
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], -1)
    return x * cos.to(x.dtype) + rot * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, d, H, KV, hd):
        super().__init__()
        self.H, self.KV, self.hd = H, KV, hd
        self.q = nn.Linear(d, H * hd, bias=False)
        self.k = nn.Linear(d, KV * hd, bias=False)
        self.v = nn.Linear(d, KV * hd, bias=False)
        self.o = nn.Linear(H * hd, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = apply_rope(self.q(x).view(B, T, self.H, self.hd).transpose(1, 2), cos, sin)
        k = apply_rope(self.k(x).view(B, T, self.KV, self.hd).transpose(1, 2), cos, sin)
        v = self.v(x).view(B, T, self.KV, self.hd).transpose(1, 2)
        if self.H != self.KV:
            k = k.repeat_interleave(self.H // self.KV, 1)
            v = v.repeat_interleave(self.H // self.KV, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(o.transpose(1, 2).reshape(B, T, self.H * self.hd))


class Mamba2(nn.Module):
    def __init__(self, d, d_state, d_conv, expand, headdim, ngroups=1, chunk=256):
        super().__init__()
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        self.scan, self.rmsnorm_fn = mamba_chunk_scan_combined, rmsnorm_fn
        self.di, self.N, self.G, self.P, self.chunk = expand * d, d_state, ngroups, headdim, chunk
        self.nh = self.di // headdim
        conv_ch = self.di + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d, 2 * self.di + 2 * ngroups * d_state + self.nh, bias=False)
        self.conv_w = nn.Parameter(torch.randn(conv_ch, 1, d_conv) * 0.1)
        self.conv_b = nn.Parameter(torch.zeros(conv_ch))
        dt = torch.exp(torch.rand(self.nh) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp_min(1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nh).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.nh))
        self.norm_weight = nn.Parameter(torch.ones(self.di))
        self.out_proj = nn.Linear(self.di, d, bias=False)

    def forward(self, u):
        B, T, _ = u.shape
        di, GN = self.di, self.G * self.N
        zxbcdt = self.in_proj(u)
        z, xBC, dt = torch.split(zxbcdt, [di, di + 2 * GN, self.nh], -1)
        xBC = F.conv1d(xBC.transpose(1, 2), self.conv_w.to(xBC.dtype), self.conv_b.to(xBC.dtype),
                       padding=self.conv_w.shape[-1] - 1, groups=xBC.shape[-1])[..., :T]
        xBC = F.silu(xBC).transpose(1, 2)
        x, Bm, Cm = torch.split(xBC, [di, GN, GN], -1)
        y = self.scan(x.reshape(B, T, self.nh, self.P), dt, -torch.exp(self.A_log.float()),
                      Bm.reshape(B, T, self.G, self.N), Cm.reshape(B, T, self.G, self.N), chunk_size=self.chunk,
                      D=self.D.float(), dt_bias=self.dt_bias.float(), dt_softplus=True)
        y = self.rmsnorm_fn(y.reshape(B, T, di), self.norm_weight, None, z=z, eps=1e-5, norm_before_gate=False)
        return self.out_proj(y)


def install_transformers_stub():
    """fla.layers imports a few names from transformers (logging, ACT2FN, Unpack); the GPU machine has no
    transformers. A stub with those names is enough for the layers used here (GatedDeltaNet)."""
    try:
        import transformers  # noqa: F401
        return False
    except ImportError:
        pass
    import logging

    class _Log(logging.Logger):
        def warning_once(self, *a, **k):
            self.warning(*a, **k)

    logging.setLoggerClass(_Log)
    tf = types.ModuleType("transformers")

    def _missing(name):  # `from transformers import AutoConfig` (fla.models): "not installed", which fla tolerates
        if name.startswith("__"):
            raise AttributeError(name)
        raise ModuleNotFoundError(f"transformers stub has no {name}", name="transformers")

    tf.__getattr__ = _missing
    utils = types.ModuleType("transformers.utils")
    log = types.ModuleType("transformers.utils.logging")
    log.get_logger = logging.getLogger
    utils.logging = log
    acts = types.ModuleType("transformers.activations")
    acts.ACT2FN = {"silu": nn.SiLU(), "swish": nn.SiLU(), "gelu": nn.GELU(), "relu": nn.ReLU(),
                   "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh()}
    proc = types.ModuleType("transformers.processing_utils")
    proc.Unpack = dict
    mu = types.ModuleType("transformers.modeling_utils")
    mu._init_weights = True
    tf.utils, tf.activations, tf.processing_utils, tf.modeling_utils = utils, acts, proc, mu
    for name, mod in (("transformers", tf), ("transformers.utils", utils), ("transformers.utils.logging", log),
                      ("transformers.activations", acts), ("transformers.processing_utils", proc),
                      ("transformers.modeling_utils", mu)):
        sys.modules[name] = mod
    return True


# Set when fla's "Triton < 3.7.1 on Hopper" guard of the gated backward (fla #640) was switched off: the GPU machine
# has Triton 3.6 and cannot take a newer one (no network; the wheel is larger than what a device call carries), and
# without the switch fla refuses the backward outright. The kernels then run as fla ships them, so the TIMING stands;
# fla says their gradients can be wrong on this Triton, so such a run is no correctness reference (RESULT says so).
FLA_GUARD_BYPASSED = []


def bypass_fla_hopper_guard():
    import fla.ops.common.chunk_o as chunk_o
    if not getattr(chunk_o, "TRITON_ABOVE_3_7_1", True) and getattr(chunk_o, "IS_NVIDIA_HOPPER", False):
        chunk_o.TRITON_ABOVE_3_7_1 = True
        if not FLA_GUARD_BYPASSED:
            FLA_GUARD_BYPASSED.append("fla gated bwd guard (Triton < 3.7.1 on Hopper, fla #640) bypassed: timing only")


class GDN(nn.Module):
    def __init__(self, d, heads, head_dim, expand_v, conv):
        super().__init__()
        install_transformers_stub()
        from fla.layers.gated_deltanet import GatedDeltaNet
        bypass_fla_hopper_guard()
        self.layer = GatedDeltaNet(hidden_size=d, expand_v=expand_v, head_dim=head_dim, num_heads=heads, mode="chunk",
                                   use_gate=True, use_short_conv=True, conv_size=conv, norm_eps=1e-6)

    def forward(self, x):
        return self.layer(x)[0]


class Block(nn.Module):
    def __init__(self, dims, t):
        super().__init__()
        d = dims["d"]
        self.t = t
        self.norm1 = nn.Parameter(torch.ones(d))
        self.norm2 = nn.Parameter(torch.ones(d))
        if t == "A":
            self.mixer = Attention(d, dims["n_heads"], dims["n_kv_heads"], dims["head_dim"])
        elif t == "M":
            self.mixer = Mamba2(d, dims["mamba_d_state"], dims["mamba_d_conv"], dims["mamba_expand"],
                                dims["mamba_headdim"])
        elif t == "D":
            self.mixer = GDN(d, dims["gdn_heads"], dims["gdn_head_dim"], dims["gdn_expand_v"], dims["gdn_conv"])
        I = dims["intermediate"]
        self.gate = nn.Linear(d, I, bias=False)
        self.up = nn.Linear(d, I, bias=False)
        self.down = nn.Linear(I, d, bias=False)

    def forward(self, x, cos, sin):
        xn = F.rms_norm(x, (x.shape[-1],), self.norm1, NORM_EPS)
        h = x + (self.mixer(xn, cos, sin) if self.t == "A" else self.mixer(xn))
        hn = F.rms_norm(h, (h.shape[-1],), self.norm2, NORM_EPS)
        return h + self.down(F.silu(self.gate(hn)) * self.up(hn))


def loss_head(h, final_norm, weight, targets):
    hn = F.rms_norm(h, (h.shape[-1],), final_norm, NORM_EPS)
    logits = F.linear(hn, weight)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


class LM(nn.Module):
    def __init__(self, dims, theta):
        super().__init__()
        self.dims, self.theta = dims, theta
        self.embed = nn.Embedding(dims["padded_vocab"], dims["d"])
        self.blocks = nn.ModuleList([Block(dims, dims["pattern"][i % len(dims["pattern"])])
                                     for i in range(dims["n_layers"])])
        self.final_norm = nn.Parameter(torch.ones(dims["d"]))
        self.head = nn.Linear(dims["d"], dims["padded_vocab"], bias=False)
        self.ac = False
        self.loss_fn = loss_head
        self._rope = None
        with torch.no_grad():  # seed init: Linear and embedding N(0, 0.02)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0, 0.02)
            self.embed.weight.normal_(0, 0.02)

    def forward(self, ids, targets):
        T = ids.shape[1]
        if self._rope is None or self._rope[0].shape[0] != T:
            self._rope = rope_tables(T, self.dims["head_dim"], self.theta, ids.device)
        cos, sin = self._rope
        x = self.embed(ids)
        for b in self.blocks:
            if self.ac and self.training:
                x = torch.utils.checkpoint.checkpoint(b, x, cos, sin, use_reentrant=False)
            else:
                x = b(x, cos, sin)
        return self.loss_fn(x, self.final_norm, self.head.weight, targets)


# -------------------------------------------------------------------------------------------- FLOPs
def flops_per_token(model, dims, T, chunk_m=256, chunk_d=64):
    """docs/flops.md: 6 N_matmul + per A layer 12 H hd T/2 + per M layer 6 SSD MACs + per D layer 6 delta MACs.
    N_matmul: every >= 2-D weight except the embedding (Linear weights, depthwise conv weights)."""
    n = sum(p.numel() for name, p in model.named_parameters() if p.dim() >= 2 and not name.startswith("embed."))
    pat = dims["pattern"]
    count = {c: sum(1 for i in range(dims["n_layers"]) if pat[i % len(pat)] == c) for c in "AMD"}
    f = 6.0 * n + count["A"] * 12.0 * dims["n_heads"] * dims["head_dim"] * T / 2.0
    if count["M"]:
        di = dims["mamba_expand"] * dims["d"]
        P, N = dims["mamba_headdim"], dims["mamba_d_state"]
        nh, G, c = di / P, 1, min(chunk_m, T)
        macs = G * c * N + nh * c * P + 2 * nh * N * P + nh * N * P * math.ceil(T / c) / c
        f += count["M"] * 6.0 * macs
    if count["D"]:
        K = dims["gdn_head_dim"]
        V, H, c = K * dims["gdn_expand_v"], dims["d"] / K, min(chunk_d, T)
        f += count["D"] * 6.0 * H * (2 * c * K + c * (K + V) / 2 + 3 * K * V + c * V)
    return f, n


# -------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--print_config", required=True, help="file holding `ablate-train --print_config` output")
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--mode", choices=["eager", "compile"], default="eager")
    ap.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw")
    ap.add_argument("--ac", action="store_true", help="activation checkpointing per block")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--time_cap_s", type=float, default=90.0, help="stop after this much wall time (>= warmup+2 steps)")
    ap.add_argument("--rope_theta", type=float, default=1e6)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--weight_decay", type=float, default=0.1)
    ap.add_argument("--label", default="")
    ap.add_argument("--device", default="cuda", help="cpu: a plumbing smoke test of the dense path only")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    t_start = time.time()
    dims = parse_print_config(open(a.print_config).read())
    res = {"bench": "e2e_ref", "label": a.label, "mode": a.mode, "optimizer": a.optimizer, "ac": a.ac, "seq": a.seq,
           "batch": a.batch, "dims": dims, "torch": torch.__version__}

    def finish(extra):
        res.update(extra)
        line = json.dumps(res)
        print("RESULT " + line, flush=True)
        if a.json:
            with open(a.json, "w") as f:
                f.write(line + "\n")

    try:
        dev = torch.device(a.device)
        cuda = dev.type == "cuda"
        torch.manual_seed(0)
        with torch.device(dev):
            model = LM(dims, a.rope_theta)
        model.ac = a.ac
        fpt, n_matmul = flops_per_token(model, dims, a.seq)
        res.update(params=sum(p.numel() for p in model.parameters()), n_matmul=n_matmul, flops_per_token=fpt)
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("embed.")]
        no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.startswith("embed."))]
        groups = [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if a.optimizer == "adamw":
            opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
        else:
            from torchao.optim import AdamW8bit
            opt = AdamW8bit(groups, lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
        if a.mode == "compile":
            for b in model.blocks:
                b.compile()
            model.loss_fn = torch.compile(loss_head)
        model.train()
        V = dims["padded_vocab"]
        step_s, losses = [], []
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for step in range(a.steps):
            ids = torch.randint(0, dims["vocab"], (a.batch, a.seq + 1), device=dev)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = model(ids[:, :-1], ids[:, 1:])
            loss.backward()
            lv = loss.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if cuda:
                torch.cuda.synchronize()
            step_s.append(time.perf_counter() - t0)
            losses.append(lv)
            print(f"step {step + 1}: loss {lv:.4f} {step_s[-1] * 1e3:.1f} ms "
                  f"{a.batch * a.seq / step_s[-1]:.0f} tok/s", flush=True)
            if time.time() - t_start > a.time_cap_s and step + 1 >= a.warmup + 2:
                break
        steady = step_s[a.warmup:] if len(step_s) > a.warmup else step_s[-1:]
        tps = sorted(a.batch * a.seq / s for s in steady)

        def pct(p):
            return tps[min(len(tps) - 1, int(p * (len(tps) - 1) + 0.5))]

        tok_s = statistics.median(tps)
        finish({"ok": True, "steps": len(step_s), "steady_steps": len(steady), "tokens_per_sec": tok_s,
                "tokens_per_sec_p20": pct(0.2), "tokens_per_sec_p80": pct(0.8),
                "first_step_s": step_s[0], "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else 0,
                "mfu": fpt * tok_s / 989e12, "losses": losses, "V": V, "caveats": FLA_GUARD_BYPASSED})
    except Exception as e:  # noqa: BLE001 -- reported, so the harness continues
        import traceback
        traceback.print_exc()
        oom = isinstance(e, torch.cuda.OutOfMemoryError)
        finish({"ok": False, "error": f"{type(e).__name__}: {str(e)[:400]}", "oom": oom,
                "peak_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
