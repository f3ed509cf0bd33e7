#!/usr/bin/env bash
# One device-tool call on the H200 that builds the engine with CUDA and runs the chosen steps, each capped in
# time, a failing step never stopping the next. Run from a clean source tree (e.g. `git archive HEAD` unpacked
# into .gpu-src/, with .deps/ beside it):
#   STEPS="build data test timing profile optim mixers e2e families dist" scripts/gpu-session.sh   (dist: 2 GPUs)
# needs: .deps/*.deb (CLI11, nlohmann-json, GoogleTest, fortunes: `apt-get download` them on a Debian machine),
#        optionally .deps/wheels/*.whl (reference packages for the benchmarks: bench/*/fetch scripts).
# Writes $OUT/summary.txt and $OUT/logs.tgz (every step's log and JSON): the device tool returns at most 8 files.
# Seen once (2026-11-29): a call within the machine's 30 s warm window that did not carry .gpu-src again found
# .gpu-src/build-gpu and .gpu-src/data still there, but not .gpu-src's sources (run the repository copy's scripts:
# `cd .gpu-src && ../scripts/gpu-families.sh nsa-32k`); the call after that found no .gpu-src at all.
set -uo pipefail
out=${OUT:-gpu-out}; mkdir -p "$out"
work=/tmp/gpu-session; rm -rf "$work"; mkdir -p "$work"
steps=${STEPS:-build data test families}
deps=${DEPS:-.deps}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
log() { echo "== [$(date +%T)] $*" | tee -a "$out/summary.txt"; }
has() { [[ " $steps " == *" $1 "* ]]; }
finish() { tar -C "$work" -czf "$out/logs.tgz" . 2>/dev/null; log "session done"; }
trap finish EXIT

mkdir -p /tmp/deps && for f in "$deps"/*.deb; do dpkg -x "$f" /tmp/deps; done
# The training tests read the real corpus at its Debian path; the GPU image has no Debian packages.
[ -d /usr/share/games/fortunes ] || { mkdir -p /usr/share/games && ln -s /tmp/deps/usr/share/games/fortunes /usr/share/games/fortunes; }
if compgen -G "$deps/wheels/*" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$deps"/wheels/*.whl \
    > "$work/wheels.log" 2>&1 && log "reference wheels installed in /tmp/site" || log "wheel install FAILED (see wheels.log)"
  for sd in "$deps"/wheels/*.tar.gz; do [ -e "$sd" ] && tar -C /tmp/site -xzf "$sd"; done
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/summary.txt"
bin=build-gpu/bin

if has build; then
  t0=$(date +%s)
  torch_prefix=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DABLATE_WITH_CUDA=ON -DABLATE_BUILD_CONTROL_PLANE=OFF \
    -DABLATE_CUDA_ARCHITECTURES=90 -DCMAKE_PREFIX_PATH="$torch_prefix;/tmp/deps/usr" > "$work/configure.log" 2>&1 \
    || { log "configure FAILED"; tail -30 "$work/configure.log"; exit 1; }
  # -k 0: one broken target does not stop the others.
  # BUILD_TARGETS (e.g. "ablate-train optim_bench") builds only those; default: everything.
  targets=(); for t in ${BUILD_TARGETS:-}; do targets+=(--target "$t"); done
  cmake --build build-gpu -j 16 "${targets[@]}" -- -k 0 > "$work/build.log" 2>&1 \
    || { log "build FAILED (some targets)"; grep -m40 -A8 -E 'error|FAILED' "$work/build.log"; }
  log "build done in $(( $(date +%s) - t0 ))s"
fi

if has data; then
  # The default split for the 32K runs; a larger validation split so one 128K window fits for eval.
  $bin/ablate-train prepare-data --input /usr/share/games/fortunes --output data/fortunes > "$work/data.log" 2>&1
  $bin/ablate-train prepare-data --input /usr/share/games/fortunes --output data/fortunes-long --val_fraction 0.1 \
    >> "$work/data.log" 2>&1
  log "data rc=$?: $(tail -2 "$work/data.log" | tr '\n' ' ')"
fi

if has test; then
  (cd build-gpu && timeout "${CTEST_CAP:-300}" ctest --output-on-failure -j 2 --timeout 600 -L "${CTEST_LABEL:-gpu}" ${CTEST_ARGS:-}) \
    > "$work/ctest.log" 2>&1
  log "ctest rc=$?: $(grep -E 'tests passed|tests failed' "$work/ctest.log")"
  grep -E '\*\*\*Failed|\(Failed\)|Not Run|Timeout' "$work/ctest.log" | head -30 | tee -a "$out/summary.txt"
fi

# The kernel tests' timing cases print their numbers (ctest hides the output of passing tests).
if has timing; then
  timeout "${TIMING_CAP:-120}" $bin/mixers_nsa_gpu_test --gtest_filter='*Timing*' > "$work/timing_nsa.log" 2>&1
  log "nsa timing rc=$?"; grep -iE ' ms|x faster|speedup|tok' "$work/timing_nsa.log" | head -30 | tee -a "$out/summary.txt"
  [[ ${TIMING_GDN:-1} == 1 ]] && timeout 150 $bin/kernels_chunk_state_scan_gpu_test \
    --gtest_filter='*TimingDeltaRule32K*:*TimingAgainstTrsm32K*' > "$work/timing_gdn.log" 2>&1
  log "gdn timing rc=$?"; grep -iE ' ms|x faster|speedup|fwd' "$work/timing_gdn.log" | head -30 | tee -a "$out/summary.txt"
  if [[ ${TIMING_CONV:-1} == 1 && -x $bin/mixers_causal_conv1d_gpu_test ]]; then
    timeout 60 $bin/mixers_causal_conv1d_gpu_test --gtest_filter='*Timing*' > "$work/timing_conv.log" 2>&1
    log "short conv timing rc=$?"; grep -iE ' ms|speedup' "$work/timing_conv.log" | head -10 | tee -a "$out/summary.txt"
  fi
fi

# Where a training step's time goes (ablate-train --profile_steps): PROFILES names runs of scripts/gpu-families.sh's
# kind plus the short-context dense case of E1 (dense-0.6b-4k: the Qwen3-0.6B layout at 4K x 4, no checkpointing).
if has profile; then
  mkdir -p "$work/profile"
  for name in ${PROFILES:-dense-0.6b-4k nsa-32k}; do
    case $name in
      dense-0.6b-4k) args="--data_dir data/fortunes --model_size SMALL --context_length 4096 --batch_size 4" ;;
      nsa-32k) args="--data_dir data/fortunes --model_size 0.6B --attn_type nsa --context_length 32768 --batch_size 1
                     --gradient_checkpointing" ;;
      mdma-nsa-32k) args="--data_dir data/fortunes --model_size 0.6B --block_pattern MDMA --attn_type nsa
                          --context_length 32768 --batch_size 1 --gradient_checkpointing" ;;
      deltanet-32k) args="--data_dir data/fortunes --model_size 0.6B --mamba_type deltanet --context_length 32768
                          --batch_size 1 --gradient_checkpointing" ;;
      mamba2-32k) args="--data_dir data/fortunes --model_size 0.6B --mamba_type mamba2 --context_length 32768
                        --batch_size 1 --gradient_checkpointing" ;;
      *) log "profile: unknown run $name"; continue ;;
    esac
    # shellcheck disable=SC2086
    timeout "${PROFILE_CAP:-150}" $bin/ablate-train $args --num_train_steps "${PROFILE_TRAIN_STEPS:-5}" --warmup_steps 2 \
      --log_interval 1 --eval_interval 100000 --eval_batches 1 --save_interval 100000 --dtype bfloat16 --device cuda \
      --profile_steps "${PROFILE_STEPS:-2}" --output_dir /dev/shm/ablate-profile --run_name "$name" \
      > "$work/profile/$name.log" 2>&1
    log "profile $name rc=$?"
    sed -n '/^profile of steps/,/^trace:/p' "$work/profile/$name.log" | cut -c1-200 | head -32 | tee -a "$out/summary.txt"
    grep -E '^step' "$work/profile/$name.log" | tail -2 | tee -a "$out/summary.txt"
    rm -rf /dev/shm/ablate-profile
  done
fi

# Benchmark scripts of bench/*/run_gpu.sh: each gets its own OUT and a time cap.
run_bench() {
  local name=$1 script=$2 cap=$3 bench_steps=$4
  [ -x "$script" ] || { log "$name: $script missing"; return; }
  mkdir -p "$work/$name"
  # env -u STEPS: the bench scripts read their own STEPS (this script's step list would select nothing there).
  # <NAME>_STEPS (OPTIM_STEPS, MIXERS_STEPS, E2E_STEPS) passes that script its own step list.
  env -u STEPS ${bench_steps:+STEPS="$bench_steps"} OUT="$work/$name" BIN="$bin" timeout "$cap" "$script" "$bin" \
    > "$work/$name/stdout.log" 2>&1
  log "$name rc=$?"; tail -40 "$work/$name/stdout.log" | tee -a "$out/summary.txt"
}
has optim && run_bench optim bench/optim/run_gpu.sh "${OPTIM_CAP:-300}" "${OPTIM_STEPS:-}"
has mixers && run_bench mixers bench/mixers/run_gpu.sh "${MIXERS_CAP:-300}" "${MIXERS_STEPS:-}"
has e2e && run_bench e2e bench/e2e/run_gpu.sh "${E2E_CAP:-300}" "${E2E_STEPS:-}"

if has vectors; then
  mkdir -p "$work/vectors"
  python3 tests/optim/make_torchao_vectors.py --device cuda --out "$work/vectors" > "$work/vectors/log.txt" 2>&1
  log "torchao vectors rc=$?: $(tail -3 "$work/vectors/log.txt" | tr '\n' ' ')"
fi

# Multi-GPU training (issue 8) on a machine with 2 GPUs: topology, weak scaling, 4B sharded (scripts/gpu-dist.sh).
if has dist; then
  OUT="$work/dist" BIN="$bin" SUMMARY="$out/summary.txt" timeout "${DIST_CAP:-420}" scripts/gpu-dist.sh ${DIST_PARTS:-}
  log "dist rc=$?"
fi

if has families; then
  mkdir -p "$work/families"
  OUT="$work/families" BIN="$bin" RUN_LIMIT="${RUN_LIMIT:-60}" scripts/gpu-families.sh ${FAMILIES:-}
  cat "$work/families/families.txt" >> "$out/summary.txt"
fi
