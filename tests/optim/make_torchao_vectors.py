#!/usr/bin/env python3
"""Writes torchao AdamW8bit / AdamW4bit test vectors for tests/optim/adamw_test.cpp.

Usage: python tests/optim/make_torchao_vectors.py [--device cpu|cuda] [--out tests/optim/data]
Needs torch and torchao (torchao.optim; torch.compile works on CPU too, on CUDA it needs triton). On the GPU
machine bench/optim/run_gpu.sh runs it with --device cuda (torchao's compiled CUDA step, as the acceptance asks)
and brings the files back for tests/optim/data; torchao_vectors.json beside them records where they were made.
For each bits in (8, 4) it writes torchao_adamw{bits}bit.bin: three parameters (a 64x128 matrix that torchao
quantizes, a 32x64 matrix that stays unquantized (< 4096 elements), a 96-vector), two param groups (wd 0.1 for
the matrices, 0 for the vector), lr 1e-2, betas (0.9, 0.95), eps 1e-8, two steps with fixed gradients.
Recorded: the initial parameters, each step's gradients, parameters after each step, and the quantized state
(codes, scales) of the 64x128 matrix after each step, plus the two qmaps.

Format (little endian), a sequence of records until EOF:
  u32 name_len, name bytes, u32 dtype (0 = float32, 1 = uint8), u32 ndim, i64 dims[ndim], raw data.
"""
import argparse
import datetime
import json
import os
import struct

import torch


def write_record(f, name, t):
    t = t.detach().cpu().contiguous()
    dtype = {torch.float32: 0, torch.uint8: 1}[t.dtype]
    nb = name.encode()
    f.write(struct.pack("<I", len(nb)))
    f.write(nb)
    f.write(struct.pack("<II", dtype, t.dim()))
    for d in t.shape:
        f.write(struct.pack("<q", d))
    f.write(t.numpy().tobytes())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("make_torchao_vectors: --device cuda but torch sees no CUDA device")
    import torchao
    from torchao.optim import AdamW4bit, AdamW8bit

    os.makedirs(args.out, exist_ok=True)
    for bits, cls in ((8, AdamW8bit), (4, AdamW4bit)):
        g = torch.Generator().manual_seed(1234 + bits)
        shapes = [(64, 128), (32, 64), (96,)]
        init = [torch.randn(s, generator=g) for s in shapes]
        grads = [[torch.randn(s, generator=g) * (0.1 if k == 0 else 0.01) for s in shapes] for k in range(2)]
        params = [torch.nn.Parameter(x.clone().to(device)) for x in init]
        opt = cls([{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}],
                  lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
        path = os.path.join(args.out, f"torchao_adamw{bits}bit.bin")
        with open(path, "wb") as f:
            for i, x in enumerate(init):
                write_record(f, f"init.{i}", x)
            for k in range(2):
                for i, p in enumerate(params):
                    p.grad = grads[k][i].clone().to(device)
                    write_record(f, f"grad.{k}.{i}", grads[k][i])
                opt.step()
                for i, p in enumerate(params):
                    write_record(f, f"param.{k}.{i}", p)
                st = opt.state[params[0]]
                for key in ("exp_avg", "exp_avg_sq"):
                    q = st[key]
                    assert type(q).__name__.startswith("OptimState"), f"{key} of the 64x128 matrix is not quantized"
                    write_record(f, f"{key}.codes.{k}", q.codes)
                    write_record(f, f"{key}.scale.{k}", q.scale)
                    write_record(f, f"{key}.qmap", q.qmap)
                assert not type(opt.state[params[1]]["exp_avg"]).__name__.startswith("OptimState")
        print("wrote", path)
    meta = dict(device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, torchao=torchao.__version__,
                made=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                files=["torchao_adamw8bit.bin", "torchao_adamw4bit.bin"])
    with open(os.path.join(args.out, "torchao_vectors.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print("wrote", os.path.join(args.out, "torchao_vectors.json"), meta)


if __name__ == "__main__":
    main()
