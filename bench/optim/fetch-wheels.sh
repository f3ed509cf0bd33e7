#!/usr/bin/env bash
# Downloads the reference optimizers of bench/optim/ref_optim.py as wheels into .deps/wheels (run here, where
# PyPI is reachable; the GPU machine has no network). Target: the GPU machine's python3.12 on manylinux x86_64.
#   torchao               AdamW8bit / AdamW4bit (K6, K7) and the parity vectors of tests/optim
#   bitsandbytes          AdamW8bit (K6); repacked to keep only the CUDA 13.0 library (the full wheel is 43 MB)
#   emerging-optimizers   NVIDIA Emerging-Optimizers SOAP (K8), pure python
#   absl-py               emerging-optimizers imports absl.logging; not part of a plain torch install
# Installed on the GPU machine by bench/optim/run_gpu.sh with pip install --no-deps --no-index --target.
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=.deps/wheels
mkdir -p "$dest"
pyver=${PYVER:-3.12}
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64)
pip download --quiet --python-version "$pyver" "${plat[@]}" --only-binary=:all: --no-deps -d "$dest" \
  torchao==0.18.0 emerging-optimizers==0.3.0 absl-py bitsandbytes==0.50.2

# bitsandbytes: one shared library per CUDA/ROCm/XPU version; torch 2.11+cu130 loads libbitsandbytes_cuda130.so
# (BNB_CUDA_VERSION overrides). Keep that one and the CPU library, drop the rest from the archive and RECORD.
bnb=$(ls "$dest"/bitsandbytes-*.whl | head -1)
python3 - "$bnb" <<'PY'
import os, sys, zipfile
path = sys.argv[1]
keep = ("libbitsandbytes_cuda130.so", "libbitsandbytes_cpu.so")
def dropped(name):
    base = os.path.basename(name)
    return base.startswith("libbitsandbytes_") and base.endswith(".so") and base not in keep
src = zipfile.ZipFile(path)
names = src.namelist()
if not any(dropped(n) for n in names):
    print(f"{os.path.basename(path)}: already repacked"); sys.exit(0)
tmp = path + ".tmp"
with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
    for info in src.infolist():
        if dropped(info.filename):
            continue
        data = src.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(l for l in lines if not dropped(l.split(",", 1)[0])).encode()
        out.writestr(info, data)
os.replace(tmp, path)
print(f"{os.path.basename(path)}: kept {', '.join(keep)}")
PY
ls -la "$dest"
du -sh "$dest"
