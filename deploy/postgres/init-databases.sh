#!/usr/bin/env bash
# Creates the services' databases. The official postgres image runs this once, when its data
# volume is empty, against a temporary server reachable only through the unix socket.
#
# APP_DATABASES: space-separated names (default "orders inventory": order-service and relay use
# `orders`, inventory-consumer uses `inventory`). Existing databases are left alone, so the
# script is also safe to run by hand against a live server.
set -euo pipefail

for db in ${APP_DATABASES:-orders inventory}; do
  echo "init-databases: ensuring database \"$db\""
  psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
    --set=db="$db" <<'SQL'
SELECT format('CREATE DATABASE %I', :'db')
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db')
\gexec
SQL
done
