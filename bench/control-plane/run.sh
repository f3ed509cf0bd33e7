#!/usr/bin/env bash
# Control-plane benchmarks O1-O6 (/work/shared/BENCHMARKS.md, "Control plane on the 2-core CI-class machine"):
# a private PostgreSQL cluster, a real ablate-scheduler, simulated workers (ablate-cp-load, load.cpp), and beside
# each of our numbers the bare SQL of the same operation (psql COPY / pgbench custom script) in the same run.
#   bench/control-plane/run.sh [WORKDIR]      -> table on stdout, WORKDIR/results.json
# Env: ABLATE_BIN (dir with ablate-scheduler; default build-ctl/bin), O4_WORKERS (1000), O4_SECONDS (30),
#      O5_SECONDS (60), O2_CYCLES (8000).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
work=${1:-$repo/build-bench/cp-work}
bin=${ABLATE_BIN:-$repo/build-ctl/bin}
O2_CYCLES=${O2_CYCLES:-8000}; O4_WORKERS=${O4_WORKERS:-1000}; O4_SECONDS=${O4_SECONDS:-30}; O5_SECONDS=${O5_SECONDS:-60}
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
load=$repo/build-bench/ablate-cp-load
if [ ! -x "$load" ]; then
  cmake -S "$here" -B "$repo/build-bench" -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build "$repo/build-bench" -j2 >/dev/null
fi
rm -rf "$work"; mkdir -p "$work"
chmod 755 "$work"
dsn=$("$repo/scripts/pg-local.sh" start "$work/pg")
sched_pid=""
cleanup() {
  [ -n "$sched_pid" ] && kill "$sched_pid" 2>/dev/null || true
  for p in $(cat "$work"/holders.pid 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
  "$repo/scripts/pg-local.sh" stop "$work/pg" || true
}
trap cleanup EXIT
psql() { "$pgbin/psql" "$dsn" -v ON_ERROR_STOP=1 -Atq "$@"; }
kv() { grep "^$2=" "$1" | tail -1 | cut -d= -f2; }

# --- scheduler ------------------------------------------------------------------------------------------------
"$bin/ablate-scheduler" serve --db "$dsn" --listen 127.0.0.1:0 --metrics_listen 127.0.0.1:0 --max_cells 20000 \
  >"$work/sched.out" 2>"$work/sched.err" &
sched_pid=$!
for _ in $(seq 100); do grep -q '^listening' "$work/sched.out" 2>/dev/null && break; sleep 0.1; done
addr=$(sed -n 's/^listening grpc=\([^ ]*\).*/\1/p' "$work/sched.out")
[ -n "$addr" ] || { cat "$work/sched.err" >&2; exit 1; }
export SCHED_PID=$sched_pid
ttl=15; reaper_ms=1000   # the scheduler's defaults (--lease_ttl_s, --reaper_interval_ms)
echo "scheduler pid=$sched_pid grpc=$addr; postgres: $dsn" >&2

# Reference tables: same columns, defaults and indexes as ours (LIKE ... INCLUDING ALL), no foreign keys.
psql -c "CREATE TABLE ref_jobs (LIKE jobs INCLUDING ALL); CREATE TABLE ref_attempts (LIKE job_attempts INCLUDING ALL);
         CREATE TABLE ref_workers (LIKE workers INCLUDING ALL); CREATE TABLE ref_metrics (LIKE metrics INCLUDING ALL);
         INSERT INTO ref_workers (id) SELECT 'w' || g FROM generate_series(1, 100) g;"

# --- O1: a 10,000-cell sweep (2 sizes x 2 optimizers x 2,500 context lengths) ----------------------------------
sweep_yaml() {  # name, sizes, optimizers, first ctx, number of ctx
  echo "name: $1"; echo "grid:"; echo "  model_size: [$2]"; echo "  optimizer: [$3]"
  printf '  context_length: ['; seq -s, "$4" $(($4 + $5 - 1)) | tr -d '\n'; echo "]"
  echo "train:"; echo "  num_train_steps: ${6:-100}"
}
sweep_yaml bench-o1 "tiny, mini" "adamw, soap" 64 2500 >"$work/o1.yaml"
"$load" submit "$addr" "$work/o1.yaml" >"$work/o1.out"
s1=$(kv "$work/o1.out" sweep_id)
cols="sweep_id, cell_index, factors, params, config_hash, total_steps, mem_estimate_bytes, gpus, state"
psql -c "\\copy (SELECT $cols FROM jobs WHERE sweep_id = $s1 ORDER BY cell_index) TO '$work/o1.rows'"
ref_ms=$(psql -c "\\timing on" -c "\\copy ref_jobs ($cols) FROM '$work/o1.rows'" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -1)
echo "ref_copy_s=$(python3 -c "print($ref_ms/1000)")" >>"$work/o1.out"
echo "ref_rows=$(psql -c 'SELECT count(*) FROM ref_jobs')" >>"$work/o1.out"

# --- O2: lease -> heartbeat x2 -> complete, 100 workers, vs pgbench with the same claim/update SQL ---------------
"$load" lease "$addr" 100 "$O2_CYCLES" 60 2 >"$work/o2.out" 2>"$work/o2.err" || true
cat >"$work/o2.pgbench" <<SQL
\\set w random(1, 100)
WITH next AS (SELECT id FROM ref_jobs WHERE state = 'queued' AND not_before <= now() ORDER BY queued_at, id LIMIT 1 FOR UPDATE SKIP LOCKED), upd AS (UPDATE ref_jobs j SET state = 'leased', attempt = j.attempt + 1, lease_epoch = j.lease_epoch + 1, lease_nonce = replace(gen_random_uuid()::text, '-', ''), lease_expires_at = now() + make_interval(secs => $ttl), worker_id = 'w' || :w, started_at = coalesce(j.started_at, now()) FROM next WHERE j.id = next.id RETURNING j.*), hist AS (INSERT INTO ref_attempts (job_id, attempt, lease_epoch, lease_nonce, worker_id, outcome, acquired_at) SELECT id, attempt, lease_epoch, lease_nonce, worker_id, 'running', now() FROM upd) SELECT id, attempt, lease_epoch, quote_literal(lease_nonce) AS qnonce FROM upd \\gset
UPDATE ref_workers SET last_seen = now() WHERE id = 'w' || :w;
UPDATE ref_jobs SET lease_expires_at = now() + make_interval(secs => $ttl), state = CASE WHEN state = 'leased' THEN 'running' ELSE state END, latest_step = greatest(latest_step, 0) WHERE id = :id AND attempt = :attempt AND lease_epoch = :lease_epoch AND lease_nonce = :qnonce RETURNING lease_expires_at;
UPDATE ref_workers SET last_seen = now() WHERE id = 'w' || :w;
UPDATE ref_jobs SET lease_expires_at = now() + make_interval(secs => $ttl), latest_step = greatest(latest_step, 1) WHERE id = :id AND attempt = :attempt AND lease_epoch = :lease_epoch AND lease_nonce = :qnonce RETURNING lease_expires_at;
UPDATE ref_jobs SET state = 'succeeded', finished_at = now(), lease_expires_at = NULL WHERE id = :id AND attempt = :attempt AND lease_epoch = :lease_epoch;
UPDATE ref_attempts SET outcome = 'succeeded', finished_at = now() WHERE job_id = :id AND attempt = :attempt;
SQL
"$pgbin/pgbench" "$dsn" -n -c 8 -j 2 -t $((O2_CYCLES / 8)) -f "$work/o2.pgbench" >"$work/o2.ref" 2>&1 || true
echo "ref_rate=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$work/o2.ref" | head -1)" >>"$work/o2.out"
echo "ref_lat_avg_ms=$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' "$work/o2.ref")" >>"$work/o2.out"

# --- O3: metric ingest, 8 ReportMetrics streams x 50 batches x 1,000 points, vs COPY of 400k rows ------------------
"$load" metrics "$addr" 8 50 1000 >"$work/o3.out" 2>"$work/o3.err" || true
psql -c "\\copy (SELECT 1::bigint, 1, g / 10, 'train/m' || (g % 10), 1.0 / (1 + g), now() FROM generate_series(0, 399999) g) TO '$work/o3.rows'"
ref_ms=$(psql -c "\\timing on" -c "\\copy ref_metrics (job_id, attempt, step, name, value, time) FROM '$work/o3.rows'" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -1)
echo "ref_rate=$(python3 -c "print(400000/($ref_ms/1000))")" >>"$work/o3.out"

# --- O4: many workers heartbeating every 5 s -----------------------------------------------------------------
"$load" hb "$addr" "$O4_WORKERS" 5000 "$O4_SECONDS" >"$work/o4.out" 2>"$work/o4.err" || true

# --- O5: footprint with >=10k jobs and 100 workers (heartbeat every 1 s) ----------------------------------------
echo "jobs_in_db=$(psql -c 'SELECT count(*) FROM jobs')" >"$work/o5.out"
"$load" hb "$addr" 100 1000 "$O5_SECONDS" >>"$work/o5.out" 2>"$work/o5.err" || true
echo "vm_hwm_mb=$(awk '/VmHWM/ {printf "%.1f", $2/1024}' /proc/$sched_pid/status)" >>"$work/o5.out"

# --- O6: SIGKILL 5 workers holding a lease each; time until another worker holds each job ----------------------
for s in $(psql -c "SELECT id FROM sweeps WHERE state = 'active'"); do "$load" cancel "$addr" "$s" >/dev/null; done
# 777 steps: not a config_hash that O2 already succeeded (that cell would be stored as reused, never leased).
sweep_yaml bench-o6 "tiny" "adamw" 64 5 777 >"$work/o6.yaml"
"$load" submit "$addr" "$work/o6.yaml" >"$work/o6.submit"
: >"$work/holders.pid"; ids=""
for i in 1 2 3 4 5; do
  "$load" hold "$addr" "bench-victim-$i" >"$work/o6.hold$i" 2>&1 &
  echo $! >>"$work/holders.pid"
done
for i in 1 2 3 4 5; do
  for _ in $(seq 100); do grep -q '^job=' "$work/o6.hold$i" && break; sleep 0.1; done
  ids="$ids$(kv "$work/o6.hold$i" job),"
done
sleep 2   # a few heartbeats
"$load" reclaim "$addr" bench-rescuer "$ids" >"$work/o6.reclaim" 2>&1 &
reclaim_pid=$!
kill_ms=$(date +%s%3N)
for p in $(cat "$work/holders.pid"); do kill -9 "$p"; done
wait "$reclaim_pid" || true
: >"$work/holders.pid"
echo "kill_ms=$kill_ms" >"$work/o6.out"
sed 's/^/o6 /' "$work/o6.reclaim" >>"$work/o6.out"

# --- table + JSON ------------------------------------------------------------------------------------------------
python3 "$here/report.py" "$work" "$ttl" "$reaper_ms" "$O4_WORKERS" "$O4_SECONDS" "$O5_SECONDS"
