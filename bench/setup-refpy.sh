#!/usr/bin/env bash
# Unpacks the reference packages of .deps/wheels (bench/fetch-ref-wheels.sh, bench/optim/fetch-wheels.sh) into
# one directory for PYTHONPATH and prints it. Wheels are zip files: extracting one is installing it (no pip
# needed, no network); mamba_ssm comes as a tarball of its Triton sources. Missing packages are skipped (the
# benchmarks then report that reference as unavailable).
#   usage: refpy=$(bench/setup-refpy.sh [DIR])      default DIR /tmp/ablate-refpy
set -uo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/tmp/ablate-refpy}
mkdir -p "$dir"
for w in .deps/wheels/{fla_core,flash_linear_attention,einops,packaging,torchao}-*.whl; do
  [[ -f $w ]] || continue
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$w" "$dir" \
    || echo "setup-refpy: could not unpack $w" >&2
done
for t in .deps/wheels/mamba_ssm_triton-*.tar.gz; do
  [[ -f $t ]] && tar -xzf "$t" -C "$dir"
done
echo "$dir"
