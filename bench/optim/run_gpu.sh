#!/usr/bin/env bash
# On the GPU machine, from the repository root: the optimizer-step benchmarks K5-K8 (shared/BENCHMARKS.md), ours
# (build-gpu/bin/optim_bench) beside the PyTorch references (bench/optim/ref_optim.py: torch fused AdamW, torchao,
# bitsandbytes, Emerging-Optimizers SOAP), joined by bench/optim/report.py into one table with ratios, targets and
# pass/MISS. Also regenerates the torchao test vectors of tests/optim on CUDA and checks ours against them.
#   needs: build-gpu/bin/optim_bench (scripts/gpu-check.sh's cmake line; BIN=dir overrides), and the reference
#          wheels in .deps/wheels (bench/optim/fetch-wheels.sh, run where PyPI is reachable).
#   env:   STEPS="vectors ours ref report" (default; add "build" first to configure build-gpu with
#          scripts/gpu-check.sh's cmake line and build only optim_bench and optim_adamw_test); ITERS (50), SOAP_ITERS (5), MAX_SECONDS (10 per case);
#          SETS (AdamW-family shape sets), SOAP_SETS, SOAP_EXTRA_LAYERS (4: layers for soap8bit/soap4bit/shampoo);
#          REFS_SETS (which sets each reference runs on; see ref_optim.py --refs_sets); DEVICE (cuda; cpu with
#          SETS=tiny SOAP_SETS=tiny-linear BIN=build/bin PYTHON=.venv/bin/python is a dry run of this script on a machine without a GPU).
# $OUT (or ./gpu-out) gets at most 7 files: summary.txt (the K5-K8 table and every row, Markdown), results.json,
# ours.txt, ref.txt, and the regenerated vectors torchao_adamw8bit.bin, torchao_adamw4bit.bin,
# torchao_vectors.json (commit those three to tests/optim/data/).
set -uo pipefail
out=${OUT:-gpu-out}; mkdir -p "$out"
steps=${STEPS:-vectors ours ref report}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
dev=${DEVICE:-cuda}
py=${PYTHON:-python3}
bindir=${BIN:-build-gpu/bin}
bench=$bindir/optim_bench
work=$(mktemp -d /tmp/optim-bench.XXXXXX)
sets=${SETS:-qwen3-0.6b-linear,ablate-0.6b,ablate-4b}
soap_sets=${SOAP_SETS:-qwen3-0.6b-linear}
iters=${ITERS:-50}; soap_iters=${SOAP_ITERS:-5}; max_s=${MAX_SECONDS:-10}
all_sets=$(echo "$sets,$soap_sets" | tr ',' '\n' | awk 'NF && !seen[$0]++' | paste -sd, -)
refs_sets=${REFS_SETS:-torchao_adamw8bit=qwen3-0.6b-linear+ablate-0.6b,torchao_adamw4bit=qwen3-0.6b-linear+ablate-0.6b,eo_soap_default=$soap_sets,eo_soap_matched=$soap_sets}
sum=$out/summary.txt
log() { echo "== $*" | tee -a "$sum"; }
t_start=$(date +%s)
phase() { log "$1 done in $(( $(date +%s) - t0 ))s (total $(( $(date +%s) - t_start ))s)"; }

log "bench/optim/run_gpu.sh at $(git rev-parse --short HEAD 2>/dev/null || echo '?') on $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$sum"

if [[ " $steps " == *" build "* ]]; then
  t0=$(date +%s)
  mkdir -p /tmp/deps && for f in .deps/*.deb; do [[ -f $f ]] && dpkg -x "$f" /tmp/deps; done
  torch_prefix=$("$py" -c 'import torch;print(torch.utils.cmake_prefix_path)')
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DABLATE_WITH_CUDA=ON -DABLATE_BUILD_CONTROL_PLANE=OFF \
    -DABLATE_CUDA_ARCHITECTURES=90 -DCMAKE_PREFIX_PATH="$torch_prefix;/tmp/deps/usr" > "$work/configure.log" 2>&1 \
    || { log "configure FAILED"; tail -30 "$work/configure.log"; }
  cmake --build build-gpu -j 16 --target optim_bench optim_adamw_test > "$work/build.log" 2>&1 \
    || { log "build FAILED"; grep -m20 -B2 -A10 'error' "$work/build.log"; }
  phase "build"
  bench=build-gpu/bin/optim_bench; bindir=build-gpu/bin
fi
[[ -x $bench ]] || log "no $bench: build it first (scripts/gpu-check.sh's cmake line, target optim_bench)"

# The reference packages, offline, into a private site directory.
site=/tmp/optim-ref-site; rm -rf "$site"
t0=$(date +%s)
# Only this benchmark's wheels (.deps/wheels is shared with other benchmarks' references).
wheels=$(ls .deps/wheels/torchao-*.whl .deps/wheels/bitsandbytes-*.whl .deps/wheels/emerging_optimizers-*.whl \
  .deps/wheels/absl_py-*.whl 2>/dev/null)
if [[ -n $wheels ]]; then
  "$py" -m pip install -q --no-deps --no-index --no-compile --no-cache-dir --upgrade \
    --ignore-requires-python --target "$site" $wheels > "$work/pip.log" 2>&1 || { log "pip install of .deps/wheels FAILED"; tail -5 "$work/pip.log" | tee -a "$sum"; }
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
else
  log "no .deps/wheels/*.whl (run bench/optim/fetch-wheels.sh here first): torchao, bitsandbytes, Emerging-Optimizers will be skipped"
fi
"$py" - <<'PY' 2>&1 | grep -v '^W[0-9]' | tee -a "$sum"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
for m in ("torchao", "bitsandbytes", "emerging_optimizers", "triton"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "UNAVAILABLE:", type(e).__name__, str(e)[:200])
PY
phase "setup"

if [[ " $steps " == *" vectors "* ]]; then
  t0=$(date +%s)
  # Acceptance 2: the torchao AdamW8bit/4bit vectors made on the GPU; the gtest compares our CPU path with them,
  # optim_bench --parity (below) our CUDA kernels.
  "$py" tests/optim/make_torchao_vectors.py --device "$dev" --out "$out" > "$work/vectors.log" 2>&1
  log "make_torchao_vectors.py --device $dev rc=$?: $(grep -c wrote "$work/vectors.log") files"
  grep -v '^W[0-9]' "$work/vectors.log" | tail -5
  if [[ $dev == cuda && -f $out/torchao_adamw8bit.bin && -f $out/torchao_adamw4bit.bin ]]; then
    # Into this (the GPU machine's) copy of the tree, where the gtest reads them.
    cp "$out"/torchao_adamw8bit.bin "$out"/torchao_adamw4bit.bin tests/optim/data/
    [[ -f $out/torchao_vectors.json ]] && cp "$out"/torchao_vectors.json tests/optim/data/
    if [[ -x $bindir/optim_adamw_test ]]; then
      "$bindir"/optim_adamw_test --gtest_filter='AdamWTorchaoVectorsTest.*' > "$work/gtest.log" 2>&1
      log "optim_adamw_test (CPU ours vs CUDA-made torchao vectors) rc=$?: $(grep -E '^\[  (PASSED|FAILED)' "$work/gtest.log" | tr '\n' ' ')"
      grep -E 'Failure|max abs diff|differing' "$work/gtest.log" | head -20 | tee -a "$sum"
    fi
  fi
  # The same test at Qwen3-0.6B tensor sizes and lr 1e-3 (torchao on CUDA), replayed by optim_bench below.
  "$py" bench/optim/ref_optim.py --device "$dev" --refs '' --parity_out "$work" > "$work/parity.log" 2>&1
  log "ref_optim.py --parity_out rc=$?: $(grep -c wrote "$work/parity.log") files"
  phase "vectors"
fi

if [[ " $steps " == *" ours "* && -x $bench ]]; then
  t0=$(date +%s)
  parity=()
  for f in "$out"/torchao_adamw8bit.bin "$out"/torchao_adamw4bit.bin "$work"/torchao_parity_8bit.bin "$work"/torchao_parity_4bit.bin; do
    [[ -f $f ]] && parity+=(--parity "$f")
  done
  "$bench" --dump_shapes "$work/shapes.jsonl" --shapes "$all_sets" > /dev/null
  {
    "$bench" --device "$dev" --shapes "$sets" --optimizers adamw,adamw8bit,adamw4bit --iters "$iters" \
      --max_seconds "$max_s" "${parity[@]}" --json "$work/ours.jsonl"
    echo "rc=$?"
    "$bench" --device "$dev" --shapes "$soap_sets" --optimizers soap --soap_iters "$soap_iters" --json "$work/ours.jsonl"
    echo "rc=$?"
    "$bench" --device "$dev" --shapes "$soap_sets" --layers "${SOAP_EXTRA_LAYERS:-4}" --optimizers soap8bit,soap4bit,shampoo \
      --soap_iters "$soap_iters" --json "$work/ours.jsonl"
    echo "rc=$?"
  } > "$out/ours.txt" 2>&1
  log "optim_bench: $(grep -c '"kind":"step"' "$work/ours.jsonl" 2>/dev/null || echo 0) rows, exit codes $(grep '^rc=' "$out/ours.txt" | tr '\n' ' ')"
  grep -E '^parity|optim_bench:' "$out/ours.txt" | tee -a "$sum"
  phase "ours"
fi

if [[ " $steps " == *" ref "* ]]; then
  t0=$(date +%s)
  [[ -f $work/shapes.jsonl ]] || "$bench" --dump_shapes "$work/shapes.jsonl" --shapes "$all_sets" > /dev/null
  "$py" bench/optim/ref_optim.py --device "$dev" --shapes_file "$work/shapes.jsonl" --refs_sets "$refs_sets" \
    --iters "$iters" --soap_iters "$soap_iters" --max_seconds "$max_s" --json "$work/ref.jsonl" \
    > "$out/ref.txt" 2>&1
  log "ref_optim.py rc=$?: $(grep -c '"kind": "step"' "$work/ref.jsonl" 2>/dev/null || echo 0) rows; skipped: $(grep -c '"kind": "skip"' "$work/ref.jsonl" 2>/dev/null || echo 0)"
  grep 'skipped' "$out/ref.txt" | tee -a "$sum"
  phase "ref"
fi

if [[ " $steps " == *" report "* ]]; then
  echo | tee -a "$sum"
  "$py" bench/optim/report.py "$work/ours.jsonl" "$work/ref.jsonl" --json "$out/results.json" \
    --meta "commit=$(git rev-parse --short HEAD 2>/dev/null)" "date=$(date -u +%FT%TZ)" \
    "gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)" \
    2>&1 | tee -a "$sum"
fi
log "total $(( $(date +%s) - t_start ))s; scratch in $work"
