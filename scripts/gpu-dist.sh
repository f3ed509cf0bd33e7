#!/usr/bin/env bash
# On a machine with 2 GPUs (the device tool's nvidia-h200-x2): multi-GPU training over NCCL (issue 8, acceptance 2).
#   OUT=dir BIN=build-gpu/bin scripts/gpu-dist.sh [part ...]      parts: topo weak big (default: all three)
# topo: how the GPUs are linked and which NCCL ablate-train loads.
# weak: weak scaling of the 0.6B dense model at 32K (bf16, activation checkpointing, batch 1 per GPU): one GPU, then
#       2 GPUs with --parallel ddp and with --parallel zero; efficiency = tok/s(2 GPUs) / (2 x tok/s(1 GPU)), on the
#       median of the per-step tokens/s after the warm-up steps.
# big:  the 4B model at 32K trained sharded (--parallel zero, full-precision AdamW, whose 33 GB of state is split
#       between the ranks), its sharded checkpoint resumed on 2 ranks for one more step.
# One line per run goes to $OUT/dist.txt, full logs to $OUT/<run>.log. Needs data/fortunes (prepare-data).
set -uo pipefail
out=${OUT:-gpu-out}; bin=${BIN:-build-gpu/bin}; runs=${RUNS_DIR:-/dev/shm/ablate-dist}
mkdir -p "$out" "$runs"
parts=("$@"); [ ${#parts[@]} -gt 0 ] || parts=(topo weak big)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# $SUMMARY (optional): a second file the lines go to as they come (gpu-session.sh's summary, kept if the call is cut).
log() { echo "$*" | tee -a "$out/dist.txt" ${SUMMARY:+"$SUMMARY"}; }
steps=${WEAK_STEPS:-12}
common="--data_dir data/fortunes --context_length 32768 --batch_size 1 --warmup_steps 2 --learning_rate 3e-4
  --log_interval 1 --eval_interval 100000 --eval_batches 1 --save_interval 100000 --dtype bfloat16
  --gradient_checkpointing --device cuda --async_checkpoint_host_budget_gb 100"

# Median tokens/s of the step lines after step 3 (the first steps include warm-up and allocator growth).
median_tps() {
  grep -E '^step [0-9]+/' "$1" | awk '{split($2, a, "/"); if (a[1] > 3) for (i = 1; i <= NF; i++) if ($i == "tok/s") print $(i+1)}' |
    sort -n | awk '{v[NR] = $1} END {if (NR == 0) print 0; else if (NR % 2) print v[(NR+1)/2]; else print (v[NR/2] + v[NR/2+1]) / 2}'
}

# run NAME CAP ARGS...: one ablate-train run, its header, last step line and rc into dist.txt.
run() {
  local name=$1 cap=$2; shift 2
  local t0; t0=$(date +%s)
  # shellcheck disable=SC2086
  timeout "$cap" "$bin/ablate-train" $common --output_dir "$runs" --run_name "$name" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  log "$name rc=$rc in $(( $(date +%s) - t0 )) s | $(grep -m1 -E 'ranks,|params' "$out/$name.log" | cut -c1-220)"
  log "    $(grep -E '^step [0-9]+/' "$out/$name.log" | tail -1)"
  grep -E '^checkpoint|resum' "$out/$name.log" | head -4 | sed 's/^/    /' | tee -a "$out/dist.txt" ${SUMMARY:+"$SUMMARY"}
  [ $rc -eq 0 ] || grep -iE 'error|fail|abort|nccl' "$out/$name.log" | grep -v '^step' | head -8 | sed 's/^/    /' | tee -a "$out/dist.txt" ${SUMMARY:+"$SUMMARY"}
  return $rc
}

for part in "${parts[@]}"; do
  case $part in
    topo)
      { nvidia-smi topo -m; nvidia-smi nvlink -s 2>&1 | head -20; ldd "$bin/ablate-train" | grep -iE 'nccl|torch_cuda'; } \
        > "$out/topo.txt" 2>&1
      log "topo: $(grep -E '^GPU0' "$out/topo.txt" | tr -s ' ')"
      ;;
    weak)
      run weak-1gpu 150 --model_size 0.6B --num_train_steps "$steps"
      run weak-2gpu-ddp 180 --model_size 0.6B --num_train_steps "$steps" --nproc 2 --parallel ddp
      run weak-2gpu-zero 180 --model_size 0.6B --num_train_steps "$steps" --nproc 2 --parallel zero
      one=$(median_tps "$out/weak-1gpu.log")
      for mode in ddp zero; do
        two=$(median_tps "$out/weak-2gpu-$mode.log")
        log "weak scaling 0.6B dense 32K, $mode: 1 GPU $one tok/s, 2 GPUs $two tok/s (median of steps 4-$steps):" \
            "efficiency $(awk -v a="$one" -v b="$two" 'BEGIN {if (a > 0) printf "%.1f %%", 100 * b / (2 * a); else print "n/a"}')"
      done
      rm -rf "${runs:?}"/weak-*
      ;;
    big)
      run big-4b-zero "${BIG_CAP:-200}" --model_size 4B --optimizer_type adamw --num_train_steps 3 --nproc 2 \
        --parallel zero && ls -la "$runs/big-4b-zero/checkpoint-3" >> "$out/big-4b-zero.log" 2>&1
      if [ -d "$runs/big-4b-zero/checkpoint-3" ]; then
        run big-4b-zero-resume "${BIG_CAP:-200}" --model_size 4B --optimizer_type adamw --num_train_steps 4 --nproc 2 \
          --parallel zero --resume_from "$runs/big-4b-zero/checkpoint-3"
      fi
      rm -rf "${runs:?}"/big-4b-*
      ;;
    *) log "gpu-dist: unknown part '$part' (topo weak big)"; exit 2 ;;
  esac
done
