#!/usr/bin/env bash
# E1-E3 on the GPU machine: ablate-train beside its PyTorch twin (bench/e2e/ref_model.py), same model, batch,
# sequence, precision (fp32 master + bf16 autocast) and optimizer; tokens/s, peak memory, MFU; report.py prints the
# ratios against the targets. Run from the repository root:
#   bench/e2e/run_gpu.sh [BIN_DIR] [OUT]      BIN_DIR default build-gpu/bin (needs ablate-train), OUT default $OUT
# PARTS picks what runs (each part alone stays under 4 minutes; all three together do not):
#   PARTS=e1   0.6B dense (E1_MODEL, default SMALL = d1024 L28 16/8 heads I3072, the Qwen3-0.6B layout) at 4K x 4
#              and 32K x 1 (AC at 32K: E1_AC32=1), AdamW: ours, reference eager, reference torch.compile
#   PARTS=e2   4B dense (E2_MODEL, default MEDIUM = d2560 L36 32/8 heads I9216, the Qwen3-4B layout) at 32K x 1,
#              AdamW8bit, AC: ours vs reference compile + torchao AdamW8bit
#   PARTS=e3   hybrids at E3_MODEL (default SMALL) 4K x 2: MDMA ours vs reference (fla GatedDeltaNet, mamba_ssm SSD,
#              SDPA) eager and compile; NSA (every attention layer NSA) ours only (fla's NSA needs GQA group >= 16)
# $OUT gets two files per call (the device tool brings back at most 8): e2e-<parts>_summary.txt (everything printed,
# the report) and e2e-<parts>_results.tar.gz (per-case JSON, logs, the --print_config the twin was built from).
# Data: random tokens (uniform over a 65,536 vocabulary, the most a uint16 token file holds) written as an
# ablate-train dataset; the reference draws the same distribution on the GPU.
# env: DEADLINE_S (default 220: later runs are skipped and reported), E3_CAP / E3_MODES (seconds and reference modes
#      of the MDMA case, default 240 and "eager compile": the reference's first step autotunes fla's and mamba_ssm's
#      Triton kernels, measured 113 s (eager) / 136 s (compile) with a warm Triton cache and over 160 s cold, so one
#      device call fits one mode: E3_MODES=eager DEADLINE_S=500, then E3_MODES=compile; E3_MODES= runs ours only), STEPS_4K / STEPS_32K / STEPS_4B (logged steps),
#      SEQ_4K / SEQ_32K (sequence lengths of e1), DEVICE=cpu with E1_MODEL=tiny SEQ_4K=128 SEQ_32K=256: a plumbing
#      check of this script on a machine without a GPU (dense only).
set -uo pipefail
cd "$(dirname "$0")/../.."
bin=${1:-build-gpu/bin}
out=${2:-${OUT:-gpu-out}}
mkdir -p "$out"
parts=${PARTS:-e1}
deadline=${DEADLINE_S:-220}
vocab=${VOCAB:-65536}
e1_model=${E1_MODEL:-SMALL}
e2_model=${E2_MODEL:-MEDIUM}
e3_model=${E3_MODEL:-SMALL}
tag=e2e-$(echo "$parts" | tr -c 'a-z0-9\n' '_' | tr -d '\n' | sed 's/_*$//')
summary="$out/${tag}_summary.txt"
: > "$summary"
work=/tmp/ablate-e2e
res=$(mktemp -d "/tmp/$tag.XXXX")
mkdir -p "$work"
t0=$(date +%s)
log() { echo "== $*" | tee -a "$summary"; }
left() { echo $(( deadline - ($(date +%s) - t0) )); }
log "e2e $parts: $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo ?)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee -a "$summary"
export PYTHONPATH="$(bench/setup-refpy.sh)${PYTHONPATH:+:$PYTHONPATH}"
train="$bin/ablate-train"
[[ -x $train ]] || log "ablate-train not found in $bin: only the references will run"

# Random-token dataset for ablate-train (meta.json + uint16 train.bin / val.bin).
python3 - "$work/data" "$vocab" <<'PY'
import array, json, os, sys
d, V = sys.argv[1], int(sys.argv[2])
os.makedirs(d, exist_ok=True)
for name, n in (("train.bin", 4 << 20), ("val.bin", 1 << 17)):
    a = array.array("H", os.urandom(2 * n))  # uniform over 65536 ids (modulo V below that: a negligible bias)
    if V < 65536:
        a = array.array("H", (x % V for x in a))
    with open(os.path.join(d, name), "wb") as f:
        a.tofile(f)
json.dump({"tokenizer": "random", "vocab_size": V, "eos_id": 0, "train_tokens": 4 << 20, "val_tokens": 1 << 17,
           "sources": ["bench/e2e/run_gpu.sh random tokens"]}, open(os.path.join(d, "meta.json"), "w"))
PY

# Common ablate-train flags: no eval or checkpoint inside the measured steps (the harness stops the run first).
common=(--data_dir "$work/data" --output_dir "$work/runs" --dtype bfloat16 --num_train_steps 100000 --warmup_steps 10
        --log_interval 1 --eval_interval 1000000 --eval_batches 1 --save_interval 1000000 --device "${DEVICE:-cuda}")

# run_case LABEL MODEL_FLAGS(str) SEQ BATCH OPT AC(0/1) STEPS WARMUP CAP_S REF_MODES(str)
run_case() {
  local label=$1 mflags=$2 seq=$3 batch=$4 opt=$5 ac=$6 steps=$7 warm=$8 cap=$9 modes=${10}
  local acflag=() refac=()
  [[ $ac == 1 ]] && acflag=(--gradient_checkpointing) && refac=(--ac)
  # shellcheck disable=SC2086
  if [[ -x $train ]]; then
    $train $mflags --print_config --data_dir "$work/data" > "$work/$label.config.txt" 2>&1 \
      || log "$label: --print_config failed: $(tail -3 "$work/$label.config.txt")"
  fi
  cp "$work/$label.config.txt" "$res/$label.config.txt" 2>/dev/null
  if (( $(left) < 20 )); then log "$label: skipped (deadline)"; return; fi
  if [[ -x $train ]]; then
    local c=$(( cap < $(left) ? cap : $(left) ))
    # shellcheck disable=SC2086
    python3 bench/e2e/run_ours.py --bin "$train" --label "$label-ours" --steps "$steps" --warmup "$warm" \
      --time_cap_s "$c" --json "$res/$label-ours.json" --log "$work/$label-ours.log" -- \
      $mflags --context_length "$seq" --batch_size "$batch" --optimizer_type "$opt" "${acflag[@]}" "${common[@]}" \
      | grep RESULT | cut -c1-400 | tee -a "$summary"
    cp "$work/$label-ours.log" "$res/" 2>/dev/null
  fi
  for mode in $modes; do
    if (( $(left) < 20 )); then log "$label-$mode: skipped (deadline)"; continue; fi
    if [[ ! -s $work/$label.config.txt ]] || ! grep -q '^d_model:' "$work/$label.config.txt"; then
      log "$label-$mode: no --print_config output to build the reference from"; continue
    fi
    local c=$(( cap < $(left) ? cap : $(left) )) ropt=adamw
    [[ $opt == adamw8bit ]] && ropt=adamw8bit
    timeout $(( c + 30 )) python3 bench/e2e/ref_model.py --print_config "$work/$label.config.txt" --seq "$seq" \
      --batch "$batch" --mode "$mode" --optimizer "$ropt" "${refac[@]}" --steps "$steps" --warmup "$warm" \
      --time_cap_s "$c" --device "${DEVICE:-cuda}" --label "$label-$mode" --json "$res/$label-$mode.json" > "$work/$label-$mode.log" 2>&1
    log "$label-$mode rc=$?: $(grep -h RESULT "$work/$label-$mode.log" | cut -c1-300)"
    grep -v RESULT "$work/$label-$mode.log" | grep -i -E 'error|Traceback' | tail -3 | tee -a "$summary"
    cp "$work/$label-$mode.log" "$res/" 2>/dev/null
  done
}

steps4k=${STEPS_4K:-12}
steps32k=${STEPS_32K:-8}
steps4b=${STEPS_4B:-5}
for p in $parts; do
  case $p in
    e1)
      run_case e1-4k "--model_size $e1_model" "${SEQ_4K:-4096}" 4 adamw 0 "$steps4k" 3 45 "eager compile"
      run_case e1-32k "--model_size $e1_model" "${SEQ_32K:-32768}" 1 adamw "${E1_AC32:-1}" "$steps32k" 3 50 "eager compile"
      ;;
    e2)
      run_case e2-32k "--model_size $e2_model" 32768 1 adamw8bit 1 "$steps4b" 2 110 "compile"
      ;;
    e3)
      run_case e3-mdma-4k "--model_size $e3_model --block_pattern MDMA" 4096 2 adamw 0 "$steps4k" 3 "${E3_CAP:-240}" \
        "${E3_MODES-eager compile}"
      run_case e3-nsa-4k "--model_size $e3_model --attn_type nsa" 4096 2 adamw 0 "$steps4k" 3 50 ""
      ;;
    *) log "unknown part $p (e1, e2, e3)" ;;
  esac
done
python3 bench/e2e/report.py "$res" --json "$res/e2e_report.json" 2>&1 | tee -a "$summary"
tar -czf "$out/${tag}_results.tar.gz" -C "$res" . && log "raw files: $out/${tag}_results.tar.gz"
log "e2e done in $(( $(date +%s) - t0 ))s"
