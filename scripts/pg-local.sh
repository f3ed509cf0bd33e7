#!/usr/bin/env bash
# A private, throwaway PostgreSQL cluster in a directory: no system service, unix socket only.
#   scripts/pg-local.sh start DIR   -> initdb (first time) + pg_ctl start; prints the libpq DSN on stdout
#   scripts/pg-local.sh stop DIR    -> pg_ctl stop (fast)
#   scripts/pg-local.sh dsn DIR     -> prints the DSN
# Failover drills (fault scenario F16):
#   scripts/pg-local.sh replica DIR PRIMARY_DIR -> an asynchronous streaming replica of PRIMARY_DIR's cluster in DIR
#                                    (pg_basebackup -R, hot standby), started; prints its DSN
#   scripts/pg-local.sh promote DIR -> the replica becomes a primary (pg_ctl promote, waits until it takes writes)
#   scripts/pg-local.sh crash DIR   -> SIGKILL the postmaster and every server process at once (a machine crash:
#                                    no shutdown checkpoint, nothing more sent to replicas)
#   scripts/pg-local.sh destroy DIR -> immediate stop and remove the cluster's files
# PostgreSQL refuses to run as root, so as root the cluster runs as the unprivileged 'postgres' user
# (created by Debian's postgresql package; override with ABLATE_PG_USER).
set -euo pipefail
usage="usage: pg-local.sh start|stop|dsn|promote|crash|destroy DIR, or pg-local.sh replica DIR PRIMARY_DIR"
cmd=${1:?$usage}
dir=${2:?$usage}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$pgbin/initdb" ] || { echo "pg-local: PostgreSQL server binaries not found (run scripts/setup-deps.sh)" >&2; exit 1; }
port=5432
dsn="host=$dir/socket port=$port dbname=ablate user=ablate"
pg_user=${ABLATE_PG_USER:-postgres}

# Where the cluster of directory $1 really lives (sets home). As root, PostgreSQL runs as $pg_user, which must be
# able to reach the files: when the directory is not reachable for it (a checkout under /root, mode 700), the
# cluster goes to a directory of its own under /tmp and DIR/data and DIR/socket become links to it, so the DSN
# above still works for our clients.
locate() {
  home="$1"
  if [ "$(id -u)" -eq 0 ]; then
    id "$pg_user" >/dev/null 2>&1 || { echo "pg-local: user '$pg_user' does not exist" >&2; exit 1; }
    if ! runuser -u "$pg_user" -- test -x "$1"; then
      home="/tmp/ablate-pg-$(printf '%s' "$1" | sha256sum | cut -c1-16)"
      mkdir -p "$home/data" "$home/socket"
      chmod 700 "$home"
      for sub in data socket; do
        [ -L "$1/$sub" ] || { rm -rf "${1:?}/$sub"; ln -s "$home/$sub" "$1/$sub"; }
      done
    fi
  fi
}
locate "$dir"
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
  replica)
    pdir=${3:?$usage}
    pdir=$(cd "$pdir" && pwd)
    mine="$home"
    locate "$pdir"
    psock="$home/socket"
    home="$mine"
    if [ ! -f "$data/PG_VERSION" ]; then
      mkdir -p "$sock"
      rm -rf "${data:?}"; mkdir -p "$data"; chmod 700 "$data"
      # -R: standby.signal + primary_conninfo; -X stream: the WAL of the copy itself comes along; -N: the copy is not
      # fsynced file by file (the server syncs its data directory when it starts from it). No slot: a replica
      # that falls behind is simply lost (a drill cluster, not a product setup).
      as_pg "$pgbin/pg_basebackup" -h "$psock" -p $port -U ablate -D "$data" -R -X stream -c fast -N \
        >"$dir/basebackup.log" 2>&1 || { cat "$dir/basebackup.log" >&2; exit 1; }
    fi
    if ! as_pg "$pgbin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
      as_pg "$pgbin/pg_ctl" -D "$data" -w -t 60 -l "$home/postgres.log" \
        -o "-c listen_addresses='' -c unix_socket_directories='$sock' -p $port -c fsync=on -c max_connections=200" \
        start >/dev/null || { cat "$home/postgres.log" >&2; exit 1; }
    fi
    echo "$dsn"
    ;;
  promote)
    as_pg "$pgbin/pg_ctl" -D "$data" -w -t 60 promote >/dev/null
    ;;
  crash)
    # Every server process at once: stopped first, so none of them commits or sends anything more, then killed.
    if [ -f "$data/postmaster.pid" ]; then
      pm=$(head -1 "$data/postmaster.pid")
      if [ -n "$pm" ] && kill -0 "$pm" 2>/dev/null; then
        pids="$pm $(ps -o pid= --ppid "$pm" | tr '\n' ' ')"
        kill -STOP $pids 2>/dev/null || true
        kill -KILL $pids 2>/dev/null || true
      fi
    fi
    ;;
  destroy)
    if [ -f "$data/PG_VERSION" ]; then
      as_pg "$pgbin/pg_ctl" -D "$data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "${data:?}" "${sock:?}"
    [ "$home" = "$dir" ] || rm -rf "${home:?}"
    rm -rf "${dir:?}/data" "${dir:?}/socket"
    ;;
  stop)
    if [ -f "$data/PG_VERSION" ]; then
      as_pg "$pgbin/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    ;;
  dsn) echo "$dsn" ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
