#!/usr/bin/env bash
# Enable prepared transactions on the machine's PostgreSQL (max_prepared_transactions > 0).
# The setting needs a server restart; this script restarts only when the value must change,
# then waits until the server accepts connections again.
set -euo pipefail

want=${TWOPHASE_MAX_PREPARED:-500}
psql_q() { psql -h 127.0.0.1 -U postgres -d postgres -tAc "$1"; }

current=$(psql_q "SHOW max_prepared_transactions")
if [ "$current" -ge "$want" ]; then
  echo "PostgreSQL: max_prepared_transactions = $current (ok)"
  exit 0
fi

psql_q "ALTER SYSTEM SET max_prepared_transactions = $want" >/dev/null
version=$(ls /etc/postgresql | sort -V | tail -n 1)
echo "PostgreSQL $version: max_prepared_transactions $current -> $want, restarting"
pg_ctlcluster --skip-systemctl-redirect "$version" main restart

for _ in $(seq 1 120); do
  if got=$(psql_q "SHOW max_prepared_transactions" 2>/dev/null); then
    echo "PostgreSQL: max_prepared_transactions = $got"
    [ "$got" -ge "$want" ] && exit 0
    echo "the setting did not take effect" >&2
    exit 1
  fi
  sleep 0.5
done
echo "PostgreSQL did not come back within 60 s" >&2
exit 1
