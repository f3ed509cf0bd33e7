#!/usr/bin/env bash
# Downloads the reference kernels of bench/mixers/ref_mixers.py and bench/e2e/ref_model.py into .deps/wheels (run
# here, where PyPI is reachable; the GPU machine has no network). The GPU machine has python3.12, torch 2.11+cu130,
# triton 3.6 and numpy. About 2 MB in all. (torchao, for E2's AdamW8bit, comes from bench/optim/fetch-wheels.sh.)
#   flash-linear-attention, fla-core   parallel_nsa, chunk_gated_delta_rule, GatedDeltaNet layer (pure python/Triton)
#   einops                             imported by fla and mamba_ssm
#   packaging                          imported by fla and mamba_ssm (version checks); absent from a bare torch install
#   mamba_ssm (sdist)                  only mamba_ssm/ops/triton and mamba_ssm/utils are kept, as
#                                      mamba_ssm_triton-<version>.tar.gz, with empty package __init__s, so the Triton
#                                      SSD kernels import without the compiled extensions (selective_scan_cuda, ...)
# bench/mixers/run_gpu.sh and bench/e2e/run_gpu.sh unpack them under /tmp/ablate-refpy on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.deps/wheels
mkdir -p "$dest"
pyver=${PYVER:-3.12}
FLA_VERSION=${FLA_VERSION:-0.6.0}
MAMBA_VERSION=${MAMBA_VERSION:-2.3.2.post1}
pip download --quiet --python-version "$pyver" --only-binary=:all: --no-deps -d "$dest" \
  "flash-linear-attention==$FLA_VERSION" "fla-core==$FLA_VERSION" einops==0.8.2 packaging

out="$dest/mamba_ssm_triton-$MAMBA_VERSION.tar.gz"
if [[ ! -f $out ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # pip download of an sdist prepares its metadata, i.e. runs mamba_ssm's setup.py: that needs torch (the
  # repository's .venv has it), the `wheel` module, and MAMBA_SKIP_CUDA_BUILD so that nothing is compiled.
  py=${PYTHON:-.venv/bin/python}
  pip download --quiet --only-binary=:all: --no-deps -d "$tmp/tool" wheel
  python3 -c 'import glob, sys, zipfile; zipfile.ZipFile(glob.glob(sys.argv[1] + "/wheel-*.whl")[0]).extractall(sys.argv[1] + "/site")' "$tmp/tool"
  PYTHONPATH="$tmp/tool/site" MAMBA_SKIP_CUDA_BUILD=TRUE "$py" -m pip download --quiet --no-deps --no-binary=:all: \
    --no-build-isolation -d "$tmp" "mamba_ssm==$MAMBA_VERSION"
  tar -xzf "$tmp"/mamba_ssm-*.tar.gz -C "$tmp"
  src=$(ls -d "$tmp"/mamba_ssm-*/ | head -1)
  mkdir -p "$tmp/pkg/mamba_ssm/ops"
  cp -r "$src/mamba_ssm/ops/triton" "$tmp/pkg/mamba_ssm/ops/"
  cp -r "$src/mamba_ssm/utils" "$tmp/pkg/mamba_ssm/"
  cp "$src/LICENSE" "$tmp/pkg/mamba_ssm/" 2>/dev/null || true
  echo "__version__ = \"$MAMBA_VERSION\"  # Triton kernels and utils only (bench/fetch-ref-wheels.sh)" \
    > "$tmp/pkg/mamba_ssm/__init__.py"
  : > "$tmp/pkg/mamba_ssm/ops/__init__.py"
  find "$tmp/pkg" -name __pycache__ -prune -exec rm -rf {} +
  tar -czf "$out" -C "$tmp/pkg" mamba_ssm
fi
ls -la "$dest"
du -sh "$dest"
