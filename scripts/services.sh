#!/usr/bin/env bash
# Make sure the servers the tests talk to answer on loopback: Redis on 127.0.0.1:6379 and
# PostgreSQL on 127.0.0.1:5432 with a database `test` that the `postgres` role reaches
# without a password. Idempotent: a server that already answers is left alone; a missing
# one is installed with apt-get (as root, or through sudo) and started.
#
# The tests read NOTEBOOK_FLOW_TEST_REDIS_URL (default redis://127.0.0.1:6379/15) and
# NOTEBOOK_FLOW_TEST_PG_DSN (default postgresql://postgres@127.0.0.1:5432/test).
set -euo pipefail

if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    $SUDO apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

wait_for() {  # wait_for SECONDS COMMAND...: retry COMMAND until it succeeds
  local seconds=$1
  shift
  for _ in $(seq $((seconds * 10))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  return 1
}

# -- Redis ------------------------------------------------------------------------------------
redis_up() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; }
if ! command -v redis-cli >/dev/null 2>&1 || ! redis_up; then
  if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    echo "services: installing redis-server"
    apt_install redis-server redis-tools
  fi
  if ! redis_up; then
    echo "services: starting redis-server on 127.0.0.1:6379"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
      >/dev/null
  fi
  wait_for 10 redis_up || { echo "services: Redis does not answer on 127.0.0.1:6379" >&2; exit 1; }
fi

# -- PostgreSQL -------------------------------------------------------------------------------
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432; }
if ! command -v pg_isready >/dev/null 2>&1 || ! pg_up; then
  if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    echo "services: installing postgresql"
    apt_install postgresql
  fi
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  conf=/etc/postgresql/$version/main
  # Loopback only, and trust on loopback: these are throwaway test servers.
  changed=0
  if ! grep -q "^listen_addresses = '127.0.0.1'" "$conf/postgresql.conf"; then
    echo "listen_addresses = '127.0.0.1'" | $SUDO tee -a "$conf/postgresql.conf" >/dev/null
    changed=1
  fi
  if ! grep -q "^host all all 127.0.0.1/32 trust" "$conf/pg_hba.conf"; then
    # pg_hba.conf is read top-down: the trust line must come before the default ones.
    $SUDO sed -i '1i host all all 127.0.0.1/32 trust' "$conf/pg_hba.conf"
    changed=1
  fi
  if [ "$changed" = 1 ] && $SUDO pg_ctlcluster "$version" main status >/dev/null 2>&1; then
    # apt may have started the cluster before the edits above: apply them.
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main restart || true
  fi
  if ! pg_up; then
    echo "services: starting PostgreSQL $version"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  fi
  wait_for 30 pg_up || { echo "services: PostgreSQL does not answer on 127.0.0.1:5432" >&2; exit 1; }
fi
psql_postgres() { psql -h 127.0.0.1 -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA "$@"; }
if ! psql_postgres -c "select 1" >/dev/null 2>&1; then
  echo "services: the postgres role cannot log in over 127.0.0.1 without a password" >&2
  echo "services: add 'host all all 127.0.0.1/32 trust' to pg_hba.conf and reload" >&2
  exit 1
fi
if [ "$(psql_postgres -c "select 1 from pg_database where datname = 'test'")" != 1 ]; then
  echo "services: creating database test"
  psql_postgres -c "create database test" >/dev/null
fi
echo "services: Redis and PostgreSQL answer on 127.0.0.1"
