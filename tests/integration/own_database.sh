# Sourced by the integration scripts that run their own scheduler against the shared test cluster:
#   own_database PREFIX    creates database PREFIX_<pid>, sets $db and $dsn, and installs an EXIT trap that stops
#                          every pid in $pids (TERM, then KILL) and drops the database.
# Needs ABLATE_TEST_PG_DSN (ctest sets it) with dbname=ablate.
own_database() {
  db="$1_$$"
  dsn="${ABLATE_TEST_PG_DSN/dbname=ablate/dbname=$db}"
  psql -q "$ABLATE_TEST_PG_DSN" -c "CREATE DATABASE $db" >/dev/null
  pids=()
  trap own_database_cleanup EXIT
}
own_database_cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  psql -q "$ABLATE_TEST_PG_DSN" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
}
