#!/usr/bin/env bash
# End-to-end: real PostgreSQL, ablate-scheduler and ablate-worker over real gRPC, ablate-train on real text.
#   e2e.sh BIN_DIR WORK_DIR          (env ABLATE_TEST_PG_DSN: the shared test cluster; we use our own database)
# Checks: invalid sweep files are rejected by `ablate submit` naming the field and store nothing; a valid sweep
# runs to success even though its worker is SIGKILLed mid-job (the lease expires and a new worker takes over);
# metric rows are in Postgres; the scheduler's /metrics shows the jobs and the ingested points.
set -euo pipefail
bin=$(cd "$1" && pwd); work=$2
src=$(cd "$(dirname "$0")/../.." && pwd)
: "${ABLATE_TEST_PG_DSN:?ABLATE_TEST_PG_DSN must point at a running PostgreSQL (ctest sets it)}"
rm -rf "$work"; mkdir -p "$work"; work=$(cd "$work" && pwd)

source "$src/tests/integration/own_database.sh"
own_database e2e
fail() { echo "E2E FAIL: $*" >&2; for f in "$work"/*.log; do echo "--- $f"; tail -n 30 "$f"; done >&2; exit 1; }
q() { psql -Atq "$dsn" -c "$1"; }

# 1. Data: the real corpus, byte-level tokens.
"$bin/ablate-train" prepare-data --input /usr/share/games/fortunes --output "$work/data/fortunes" > "$work/prepare.log" 2>&1 \
  || fail "prepare-data failed"

# 2. Scheduler on free ports; short leases so the kill below is detected quickly.
"$bin/ablate-scheduler" migrate --db "$dsn" > "$work/migrate.log" 2>&1 || fail "migrate failed"
"$bin/ablate-scheduler" serve --db "$dsn" --listen 127.0.0.1:0 --metrics_listen 127.0.0.1:0 --lease_ttl_s 4 \
  > "$work/scheduler.out" 2> "$work/scheduler.log" &
pids+=($!)
for _ in $(seq 100); do grep -q '^listening grpc=' "$work/scheduler.out" 2>/dev/null && break; sleep 0.1; done
line=$(grep -m1 '^listening grpc=' "$work/scheduler.out") || fail "scheduler did not start"
addr=$(sed -E 's/.*grpc=([^ ]+).*/\1/' <<<"$line"); maddr=$(sed -E 's/.*metrics=([^ ]+).*/\1/' <<<"$line")
echo "scheduler at $addr, metrics at $maddr"

# 3. Invalid sweeps: exit 2, a message naming the field, nothing stored.
for f in "$src"/tests/integration/bad/*.yaml; do
  want=$(sed -n 's/^# expect: //p' "$f")
  set +e; "$bin/ablate" submit "$f" --scheduler "$addr" > "$work/bad.out" 2> "$work/bad.err"; rc=$?; set -e
  [ "$rc" -eq 2 ] || fail "$(basename "$f"): expected exit 2, got $rc"
  grep -q -- "$want" "$work/bad.err" || fail "$(basename "$f"): message does not name '$want': $(cat "$work/bad.err")"
  echo "rejected $(basename "$f"): $(head -c 200 "$work/bad.err" | tr '\n' ' ')"
done
[ "$(q 'SELECT count(*) FROM sweeps')" = 0 ] || fail "a rejected sweep was stored"
[ "$(q 'SELECT count(*) FROM jobs')" = 0 ] || fail "a rejected sweep stored jobs"

# 4. A valid sweep; the first worker is SIGKILLed while it trains, a second one finishes the sweep.
start_worker() {
  "$bin/ablate-worker" --scheduler "$addr" --worker_id "$1" --data_root "$work/data" --work_dir "$work/work-$1" \
    > "$work/worker-$1.log" 2>&1 &
  pids+=($!)
}
"$bin/ablate" submit "$src/tests/integration/e2e-sweep.yaml" --scheduler "$addr" > "$work/submit.log" 2>&1 \
  || fail "submit failed: $(cat "$work/submit.log")"
sweep=$(q 'SELECT max(id) FROM sweeps')
[ "$(q "SELECT count(*) FROM jobs WHERE sweep_id=$sweep")" = 4 ] || fail "expected 4 jobs"
start_worker w1; w1=${pids[-1]}
for _ in $(seq 600); do [ "$(q 'SELECT count(*) FROM metrics')" -gt 0 ] && break; sleep 0.1; done
[ "$(q 'SELECT count(*) FROM metrics')" -gt 0 ] || fail "no metrics arrived from the first worker"
kill -9 "$w1"
echo "killed worker w1 (pid $w1) mid-job"
start_worker w2
deadline=$(( $(date +%s) + 400 ))
while :; do
  left=$(q "SELECT count(*) FROM jobs WHERE sweep_id=$sweep AND state NOT IN ('succeeded','failed','cancelled')")
  [ "$left" = 0 ] && break
  [ "$(date +%s)" -lt "$deadline" ] || fail "sweep did not finish in time ($left jobs left)"
  sleep 1
done

# 5. Every job succeeded; one was re-leased after the kill; metrics are in Postgres and on /metrics.
q "SELECT id, state, attempt FROM jobs WHERE sweep_id=$sweep ORDER BY id"
[ "$(q "SELECT count(*) FROM jobs WHERE sweep_id=$sweep AND state='succeeded'")" = 4 ] || fail "not every job succeeded"
[ "$(q "SELECT max(attempt) FROM jobs WHERE sweep_id=$sweep")" -ge 2 ] || fail "no job was re-leased after the worker was killed"
[ "$(q "SELECT count(DISTINCT job_id) FROM metrics WHERE name='eval/loss'")" = 4 ] || fail "eval/loss missing for some job"
n=$(q 'SELECT count(*) FROM metrics'); echo "metric rows in Postgres: $n"
[ "$(q 'SELECT count(*) FROM (SELECT job_id, attempt, name, step FROM metrics GROUP BY 1,2,3,4 HAVING count(*) > 1) d')" = 0 ] \
  || fail "duplicate metric rows"
curl -sf "http://$maddr/metrics" > "$work/metrics.txt" || fail "scrape of /metrics failed"
grep -E '^ablate_jobs\{[^}]*state="succeeded"[^}]*\} 4(\.0+)?$' "$work/metrics.txt" || fail "/metrics does not show 4 succeeded jobs"
ing=$(grep -E '^ablate_scheduler_metric_points_ingested_total ' "$work/metrics.txt" | awk '{print $2}')
awk -v v="${ing:-0}" 'BEGIN{exit !(v > 0)}' || fail "/metrics shows no ingested metric points"
echo "/metrics: ingested points $ing"
"$bin/ablate" compare "$sweep" --scheduler "$addr" | tee "$work/compare.txt"
echo "E2E PASS"
