#!/usr/bin/env bash
# On the GPU machine (the device tool, from the repository root): builds only the fused-op targets, runs their
# tests (CPU and GPU cases), the raw-kernel GPU tests once more under compute-sanitizer memcheck, then
# kernels_bench. Logs and bench.jsonl go to $OUT (or ./gpu-out).
#   needs: .deps/*.deb (CLI11, nlohmann-json, GoogleTest from Debian; see scripts/gpu-check.sh) carried along.
#   env:   STEPS="build test sanitize bench" (default all), BENCH_ARGS (e.g. "--op rope").
set -uo pipefail
out=${OUT:-gpu-out}; mkdir -p "$out"
steps=${STEPS:-build test sanitize bench}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
log() { echo "== $*" | tee -a "$out/summary.txt"; }
bin=build-fused/bin
if [[ " $steps " == *" build "* ]]; then
  mkdir -p /tmp/deps && for f in .deps/*.deb; do dpkg -x "$f" /tmp/deps; done
  torch_prefix=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee -a "$out/summary.txt"
  t0=$(date +%s)
  cmake -S . -B build-fused -G Ninja -DCMAKE_BUILD_TYPE=Release -DABLATE_WITH_CUDA=ON -DABLATE_BUILD_CONTROL_PLANE=OFF \
    -DABLATE_CUDA_ARCHITECTURES=90 -DCMAKE_PREFIX_PATH="$torch_prefix;/tmp/deps/usr" > "$out/configure.log" 2>&1 \
    || { log "configure FAILED"; tail -30 "$out/configure.log"; exit 1; }
  rm -f "$out/configure.log"  # $OUT brings back at most 8 files
  # -k 0: a broken target does not stop the others from building.
  cmake --build build-fused -j 16 --target kernels_fused_test kernels_fused_gpu_test kernels_bench -- -k 0 \
    > "$out/build.log" 2>&1 || { log "build FAILED (some targets)"; grep -m30 -B2 -A12 'error' "$out/build.log"; }
  # Against core/model.cpp: needs all of ablate_core (others' code); its failure does not stop the rest.
  cmake --build build-fused -j 16 --target kernels_fused_model_test > "$out/build_model_test.log" 2>&1 \
    || log "kernels_fused_model_test did not build (see build_model_test.log)"
  log "build done in $(( $(date +%s) - t0 ))s"
fi
if [[ " $steps " == *" test "* && -x $bin/kernels_fused_gpu_test ]]; then
  $bin/kernels_fused_test > "$out/cpu_test.log" 2>&1; log "kernels_fused_test rc=$?: $(grep -E '^\[  (PASSED|FAILED)' "$out/cpu_test.log" | tr '\n' ' ')"
  if [[ -x $bin/kernels_fused_model_test ]]; then
    $bin/kernels_fused_model_test > "$out/model_test.log" 2>&1
    log "kernels_fused_model_test rc=$?: $(grep -E '^\[  (PASSED|FAILED)' "$out/model_test.log" | tr '\n' ' ')"
  fi
  $bin/kernels_fused_gpu_test > "$out/gpu_test.log" 2>&1; rc=$?
  log "kernels_fused_gpu_test rc=$rc: $(grep -E '^\[  (PASSED|FAILED)|SKIPPED' "$out/gpu_test.log" | tr '\n' ' ')"
  grep -E 'Failure|FAILED|error|Expected|Which is|bf16 max err' "$out/gpu_test.log" | head -60
fi
if [[ " $steps " == *" sanitize "* && -x $bin/kernels_fused_gpu_test ]]; then
  timeout 300 compute-sanitizer --tool memcheck --print-limit 20 $bin/kernels_fused_gpu_test --gtest_filter='*Raw*' \
    > "$out/memcheck.log" 2>&1; log "memcheck rc=$?: $(grep -E 'ERROR SUMMARY|PASSED|FAILED' "$out/memcheck.log" | tr '\n' ' ')"
  # Shared-memory races in the block reductions (RMSNorm, cross-entropy).
  timeout 300 compute-sanitizer --tool racecheck --print-limit 20 $bin/kernels_fused_gpu_test \
    --gtest_filter='*RMSNormResidualRaw*:*CrossEntropyRaw*' > "$out/racecheck.log" 2>&1
  log "racecheck rc=$?: $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY|PASSED|FAILED' "$out/racecheck.log" | tr '\n' ' ')"
fi
if [[ " $steps " == *" bench "* && -x $bin/kernels_bench ]]; then
  $bin/kernels_bench --json "$out/bench.jsonl" ${BENCH_ARGS:-} > "$out/bench.txt" 2>&1; log "kernels_bench rc=$?"
  grep -v '^{' "$out/bench.txt"
fi
echo; echo "== summary"; cat "$out/summary.txt"
