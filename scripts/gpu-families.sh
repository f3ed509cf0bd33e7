#!/usr/bin/env bash
# On the GPU machine: every model family at 0.6B trains 20 steps at 32K context (and NSA/Mamba2 at 128K),
# bf16 with activation checkpointing; tokens/s and peak memory go to $OUT/families.txt.
# Each run is capped at $RUN_LIMIT seconds so the whole script fits one device call.
set -uo pipefail
out=${OUT:-gpu-out}; bin=${BIN:-build-gpu/bin}; limit=${RUN_LIMIT:-55}
common="--data_dir data/fortunes --model_size 0.6B --batch_size 1 --num_train_steps 20 --warmup_steps 2
  --learning_rate 3e-4 --log_interval 1 --eval_interval 1000 --eval_batches 1 --save_interval 100000
  --dtype bfloat16 --gradient_checkpointing --device cuda --output_dir /dev/shm/ablate-runs"
run() {
  local name=$1; shift
  echo "== $name: $*" >> "$out/families.log"
  timeout "$limit" "$bin/ablate-train" $common --run_name "$name" "$@" >> "$out/families.log" 2>&1
  local rc=$?
  local last; last=$(grep -E '^step [0-9]+/20' "$out/families.log" | tail -1)
  echo "$name rc=$rc | $last" | tee -a "$out/families.txt"
  rm -rf /dev/shm/ablate-runs
}
run dense-32k   --context_length 32768
run mamba2-32k  --context_length 32768 --mamba_type mamba2
run deltanet-32k --context_length 32768 --mamba_type deltanet
run nsa-32k     --context_length 32768 --attn_type nsa
run mdma-nsa-32k --context_length 32768 --block_pattern MDMA --attn_type nsa
run mamba2-128k --context_length 131072 --mamba_type mamba2
run nsa-128k    --context_length 131072 --attn_type nsa
