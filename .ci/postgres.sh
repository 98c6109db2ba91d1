#!/usr/bin/env bash
# Start a PostgreSQL server on 127.0.0.1 for lrdist's tests (and for trying a search across machines)
# and print its SQLAlchemy URL on stdout; everything else goes to stderr. Idempotent: running it again
# reuses the installed package, the cluster, the role and the database. Needs root on Debian/Ubuntu
# (apt-get, and the `postgres` user that the server runs as, since PostgreSQL refuses to run as root).
#   export LRDIST_TEST_POSTGRES_URL="$(sudo .ci/postgres.sh)"
# LRDIST_PG_PORT (default 54329) and LRDIST_PG_CLUSTER (default lrdist) choose the cluster; the
# role, password and database are all `lrdist`.
set -euo pipefail
port="${LRDIST_PG_PORT:-54329}"
cluster="${LRDIST_PG_CLUSTER:-lrdist}"
log() { echo "postgres.sh: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
  log "run me as root (sudo): I install PostgreSQL and start it as the postgres user"; exit 1
fi
if ! command -v pg_ctlcluster >/dev/null; then
  log "installing Debian's postgresql package"
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2
fi
version="$(ls /usr/lib/postgresql | sort -n | tail -1)"

# Our own cluster on its own port, so a server the machine already runs is left alone.
if ! pg_lsclusters -h | awk '{print $1"/"$2}' | grep -qx "$version/$cluster"; then
  log "creating cluster $version/$cluster on port $port"
  pg_createcluster "$version" "$cluster" -p "$port" >&2
fi
# Loopback only; connections enough for several workers, each with a small pool.
printf "listen_addresses = '127.0.0.1'\nmax_connections = 200\n" > "/etc/postgresql/$version/$cluster/conf.d/lrdist.conf"
port="$(pg_lsclusters -h | awk -v v="$version" -v c="$cluster" '$1==v && $2==c {print $3}')"
if ! pg_lsclusters -h | awk -v v="$version" -v c="$cluster" '$1==v && $2==c {print $4}' | grep -q online; then
  log "starting cluster $version/$cluster"
  pg_ctlcluster "$version" "$cluster" start >&2
fi

psql() { runuser -u postgres -- psql -p "$port" -v ON_ERROR_STOP=1 -qtAc "$1"; }
for _ in $(seq 30); do psql "SELECT 1" >/dev/null 2>&1 && break; sleep 1; done
psql "SELECT 1" >/dev/null  # fails the script (and CI) when the server never came up
if [ -z "$(psql "SELECT 1 FROM pg_roles WHERE rolname = 'lrdist'")" ]; then
  psql "CREATE ROLE lrdist LOGIN PASSWORD 'lrdist'"
fi
psql "ALTER ROLE lrdist CREATEDB"  # tests make a fresh database to race on creating Optuna's tables
if [ -z "$(psql "SELECT 1 FROM pg_database WHERE datname = 'lrdist'")" ]; then
  psql "CREATE DATABASE lrdist OWNER lrdist"
fi
log "PostgreSQL $version is up on 127.0.0.1:$port"
echo "postgresql+psycopg://lrdist:lrdist@127.0.0.1:$port/lrdist"
