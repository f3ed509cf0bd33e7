#!/usr/bin/env bash
# make demo: start a one-machine stack (private PostgreSQL, scheduler, one worker), run the demo sweep on
# real text, show live progress, print the comparison table. Leaves the stack running for `ablate` commands
# unless ABLATE_DEMO_DOWN=1; `build/bin/ablate down` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
bin="$build/bin"
for b in ablate ablate-scheduler ablate-worker ablate-train; do
  [ -x "$bin/$b" ] || { echo "demo: $bin/$b is missing; run 'make build'" >&2; exit 1; }
done
start=$(date +%s)
# Two workers: the cells run two at a time (each training process uses one thread at these sizes).
"$bin/ablate" up --state_dir .ablate --data_root data --workers "${ABLATE_DEMO_WORKERS:-2}"
# A fresh key per run makes a new sweep; cells whose config already succeeded in this stack's database are reused,
# not trained again (submit says so): `ablate down` and removing .ablate gives a demo that trains from scratch.
"$bin/ablate" submit examples/demo-sweep.yaml --state_dir .ablate --idempotency_key "demo-$(date +%s)-$$" --wait
echo "demo: finished in $(( $(date +%s) - start ))s"
if [ "${ABLATE_DEMO_DOWN:-0}" = 1 ]; then
  "$bin/ablate" down --state_dir .ablate
else
  echo "demo: the stack is still up: try '$bin/ablate status', '$bin/ablate compare <id>'; stop it with '$bin/ablate down'"
fi
