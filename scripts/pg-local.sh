#!/usr/bin/env bash
# A private, throwaway PostgreSQL cluster in a directory: no system service, unix socket only.
#   scripts/pg-local.sh start DIR   -> initdb (first time) + pg_ctl start; prints the libpq DSN on stdout
#   scripts/pg-local.sh stop DIR    -> pg_ctl stop (fast)
#   scripts/pg-local.sh dsn DIR     -> prints the DSN
# PostgreSQL refuses to run as root, so as root the cluster runs as the unprivileged 'postgres' user
# (created by Debian's postgresql package; override with ABLATE_PG_USER).
set -euo pipefail
cmd=${1:?usage: pg-local.sh start|stop|dsn DIR}
dir=${2:?usage: pg-local.sh start|stop|dsn DIR}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$pgbin/initdb" ] || { echo "pg-local: PostgreSQL server binaries not found (run scripts/setup-deps.sh)" >&2; exit 1; }
port=5432
dsn="host=$dir/socket port=$port dbname=ablate user=ablate"
pg_user=${ABLATE_PG_USER:-postgres}

# Where the cluster really lives. As root, PostgreSQL runs as $pg_user, which must be able to reach the files:
# when DIR is not reachable for it (a checkout under /root, mode 700), the cluster goes to a directory of its own
# under /tmp and DIR/data and DIR/socket become links to it, so the DSN above still works for our clients.
home="$dir"
if [ "$(id -u)" -eq 0 ]; then
  id "$pg_user" >/dev/null 2>&1 || { echo "pg-local: user '$pg_user' does not exist" >&2; exit 1; }
  if ! runuser -u "$pg_user" -- test -x "$dir"; then
    home="/tmp/ablate-pg-$(printf '%s' "$dir" | sha256sum | cut -c1-16)"
    mkdir -p "$home/data" "$home/socket"
    chmod 700 "$home"
    for sub in data socket; do
      [ -L "$dir/$sub" ] || { rm -rf "${dir:?}/$sub"; ln -s "$home/$sub" "$dir/$sub"; }
    done
  fi
fi
data="$home/data"; sock="$home/socket"

as_pg() {
  if [ "$(id -u)" -eq 0 ]; then
    chown -R "$pg_user" "$home"
    runuser -u "$pg_user" -- "$@"
  else
    "$@"
  fi
}

case "$cmd" in
  start)
    mkdir -p "$sock"
    if [ ! -f "$data/PG_VERSION" ]; then
      as_pg "$pgbin/initdb" -D "$data" -U ablate --auth=trust -E UTF8 --no-locale >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    fi
    if ! as_pg "$pgbin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
      as_pg "$pgbin/pg_ctl" -D "$data" -w -t 60 -l "$home/postgres.log" \
        -o "-c listen_addresses='' -c unix_socket_directories='$sock' -p $port -c fsync=on -c max_connections=200" \
        start >/dev/null || { cat "$home/postgres.log" >&2; exit 1; }
    fi
    if ! "$pgbin/psql" "host=$sock port=$port dbname=postgres user=ablate" -Atqc "select 1 from pg_database where datname='ablate'" | grep -q 1; then
      "$pgbin/createdb" -h "$sock" -p $port -U ablate ablate
    fi
    echo "$dsn"
    ;;
  stop)
    if [ -f "$data/PG_VERSION" ]; then
      as_pg "$pgbin/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    ;;
  dsn) echo "$dsn" ;;
  *) echo "usage: pg-local.sh start|stop|dsn DIR" >&2; exit 2 ;;
esac
