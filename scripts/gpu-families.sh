#!/usr/bin/env bash
# On the GPU machine: model families train at long context, bf16 with activation checkpointing; one line per
# run (last logged step: tokens/s, MFU, peak memory) goes to $OUT/families.txt, the full logs to families.log.
#   scripts/gpu-families.sh [run ...]     (default: the 0.6B runs of issue 3)
# Runs: dense-32k mamba2-32k deltanet-32k nsa-32k mdma-nsa-32k mamba2-128k nsa-128k deltanet-128k
#       dense-4b-32k mamba2-4b-32k deltanet-4b-32k nsa-4b-32k mdma-nsa-4b-32k
# Each run is capped at $RUN_LIMIT seconds ($TRAIN_STEPS steps, default 20) so the whole script fits one device call.
# The 128K runs read data/fortunes-long (prepare-data --val_fraction 0.1) so one 128K window fits the eval split.
set -uo pipefail
out=${OUT:-gpu-out}; bin=${BIN:-build-gpu/bin}; limit=${RUN_LIMIT:-55}; steps=${TRAIN_STEPS:-20}
mkdir -p "$out"
common="--batch_size 1 --num_train_steps $steps --warmup_steps 2 --learning_rate 3e-4 --log_interval 1
  --eval_interval 100000 --eval_batches 1 --save_interval 100000 --dtype bfloat16 --gradient_checkpointing
  --device cuda"
run() {
  local name=$1; shift
  echo "== $name: $*" >> "$out/families.log"
  # One output folder per run (under $RUNS_DIR), removed after it: two copies of this script may share the GPU.
  local dir="${RUNS_DIR:-/dev/shm/ablate-runs}/$name-$$"
  timeout "$limit" "$bin/ablate-train" $common --output_dir "$dir" --run_name "$name" "$@" >> "$out/families.log" 2>&1
  local rc=$?
  local last; last=$(sed -n "/^== $name:/,\$p" "$out/families.log" | grep -E "^step [0-9]+/$steps" | tail -1)
  echo "$name rc=$rc | $last" | tee -a "$out/families.txt"
  rm -rf "$dir"
}
d32="--data_dir data/fortunes --context_length 32768"
d128="--data_dir data/fortunes-long --context_length 131072"
declare -A runs=(
  [dense-32k]="$d32 --model_size 0.6B"
  [mamba2-32k]="$d32 --model_size 0.6B --mamba_type mamba2"
  [deltanet-32k]="$d32 --model_size 0.6B --mamba_type deltanet"
  [nsa-32k]="$d32 --model_size 0.6B --attn_type nsa"
  [mdma-nsa-32k]="$d32 --model_size 0.6B --block_pattern MDMA --attn_type nsa"
  [mamba2-128k]="$d128 --model_size 0.6B --mamba_type mamba2"
  [nsa-128k]="$d128 --model_size 0.6B --attn_type nsa"
  [deltanet-128k]="$d128 --model_size 0.6B --mamba_type deltanet"
  [dense-4b-32k]="$d32 --model_size 4B --optimizer_type adamw8bit"
  [mamba2-4b-32k]="$d32 --model_size 4B --mamba_type mamba2 --optimizer_type adamw8bit"
  [deltanet-4b-32k]="$d32 --model_size 4B --mamba_type deltanet --optimizer_type adamw8bit"
  [nsa-4b-32k]="$d32 --model_size 4B --attn_type nsa --optimizer_type adamw8bit"
  [mdma-nsa-4b-32k]="$d32 --model_size 4B --block_pattern MDMA --attn_type nsa --optimizer_type adamw8bit"
)
selected=("$@")
[ ${#selected[@]} -gt 0 ] || selected=(dense-32k mamba2-32k deltanet-32k nsa-32k mdma-nsa-32k mamba2-128k nsa-128k)
for name in "${selected[@]}"; do
  [ -n "${runs[$name]:-}" ] || { echo "gpu-families: unknown run '$name' (known: ${!runs[*]})" >&2; exit 2; }
  # shellcheck disable=SC2086
  run "$name" ${runs[$name]}
done
