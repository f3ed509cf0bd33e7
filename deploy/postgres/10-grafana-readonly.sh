#!/bin/sh
# Runs once in the postgres container's first start (docker-entrypoint-initdb.d): a read-only role for Grafana.
# Its password is read from a secret file, never written here.
set -eu
pw=$(cat /run/secrets/grafana_pg_password)
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" -v pw="$pw" <<'SQL'
CREATE ROLE grafana_ro LOGIN PASSWORD :'pw';
GRANT CONNECT ON DATABASE ablate TO grafana_ro;
GRANT USAGE ON SCHEMA public TO grafana_ro;
ALTER DEFAULT PRIVILEGES FOR ROLE ablate IN SCHEMA public GRANT SELECT ON TABLES TO grafana_ro;
SQL
