#!/usr/bin/env bash
# K1-K4 on the GPU machine, side by side: mixer_bench (ours, C++) then ref_mixers.py (torch SDPA, fla, mamba_ssm),
# then compare.py (speedups vs the targets). Run from the repository root after building mixer_bench:
#   bench/mixers/run_gpu.sh [BIN_DIR] [OUT]      BIN_DIR default build-gpu/bin, OUT default $OUT or gpu-out
# needs: .deps/wheels from bench/fetch-ref-wheels.sh (carried along); python3 with torch/triton on the machine.
# env:   CASES (default k2,k3,k4,k1: the order rows run in, so the deadline cuts K1's big shapes last),
#        BUDGET_S (seconds of timed calls per row, default 1.5), OURS_DEADLINE_S / REF_DEADLINE_S (default 100 / 100),
#        MAX_T (skip shapes with a longer sequence).
# Every step reports its failure and the next one still runs. Total well under 4 minutes on an H200.
# $OUT gets two files (the device tool brings back at most 8): mixers_summary.txt (tables, speedups, checks) and
# mixers_results.tar.gz (every raw file: mixers_{ours,ref}.{txt,jsonl}, mixers_compare.json).
set -uo pipefail
cd "$(dirname "$0")/../.."
bin=${1:-build-gpu/bin}
out=${2:-${OUT:-gpu-out}}
mkdir -p "$out"
work=$(mktemp -d /tmp/ablate-mixers.XXXX)
cases=${CASES:-k2,k3,k4,k1}
budget=${BUDGET_S:-1.5}
maxt=${MAX_T:-1048576}
summary="$out/mixers_summary.txt"
: > "$summary"
log() { echo "== $*" | tee -a "$summary"; }
t0=$(date +%s)
log "mixers: $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo ?)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee -a "$summary"

if [[ -x $bin/mixer_bench ]]; then
  timeout $(( ${OURS_DEADLINE_S:-100} + 70 )) "$bin/mixer_bench" --device cuda --case "$cases" --budget_s "$budget" --max_t "$maxt" \
    --deadline_s "${OURS_DEADLINE_S:-100}" --json "$work/mixers_ours.jsonl" > "$work/mixers_ours.txt" 2>&1
  rc=$?
  log "mixer_bench rc=$rc ($(( $(date +%s) - t0 ))s)"
  grep -v '^{' "$work/mixers_ours.txt" | tee -a "$summary"
else
  log "mixer_bench not found in $bin (build it: cmake --build <dir> --target mixer_bench)"
fi

refpy=$(bench/setup-refpy.sh)
t1=$(date +%s)
# The hard cap leaves the script 70 s past its own deadline: a measurement in flight when the deadline passes
# (Triton autotuning of a new shape takes tens of seconds) finishes instead of being killed with the report unprinted.
PYTHONPATH="$refpy${PYTHONPATH:+:$PYTHONPATH}" timeout $(( ${REF_DEADLINE_S:-100} + 70 )) python3 bench/mixers/ref_mixers.py --case "$cases" \
  --budget_s "$budget" --max_t "$maxt" --deadline_s "${REF_DEADLINE_S:-100}" --json "$work/mixers_ref.jsonl" \
  > "$work/mixers_ref.txt" 2>&1
rc=$?
log "ref_mixers rc=$rc ($(( $(date +%s) - t1 ))s)"
grep -v '^{' "$work/mixers_ref.txt" | grep -v -i 'warn' | tail -80 | tee -a "$summary"

python3 bench/mixers/compare.py "$work/mixers_ours.jsonl" "$work/mixers_ref.jsonl" --json "$work/mixers_compare.json" \
  2>&1 | tee -a "$summary"
tar -czf "$out/mixers_results.tar.gz" -C "$work" . && log "raw files: $out/mixers_results.tar.gz"
log "mixers done in $(( $(date +%s) - t0 ))s"
