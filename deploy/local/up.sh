#!/usr/bin/env bash
# Set up and run the whole of bcast on this machine: venv, Postgres and RabbitMQ, migrations,
# then the API, a scheduler, dispatchers and the provider simulator, and a demo broadcast that
# is followed to the end. Everything keeps running afterwards; Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "$0")/../.."

bash deploy/local/venv.sh
bash deploy/local/services.sh

export BCAST_DATABASE_URL=${BCAST_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/bcast}
export BCAST_API_PORT=${BCAST_API_PORT:-8000}
# The demo's provider is the simulator on loopback; never set this in production.
export BCAST_ALLOW_PRIVATE_TARGETS=${BCAST_ALLOW_PRIVATE_TARGETS:-true}
export BCAST_PUBLIC_URL=${BCAST_PUBLIC_URL:-http://127.0.0.1:$BCAST_API_PORT}
# Secrets are encrypted at rest with this machine's own key, made once and kept in var/
# (docs/secrets.md). An exported BCAST_SECRET_KEYS wins.
if [ -z "${BCAST_SECRET_KEYS:-}" ]; then
  if [ ! -s var/secret-keys ]; then
    mkdir -p var
    (umask 077 && .venv/bin/bcast secrets new-key > var/secret-keys)
  fi
  BCAST_SECRET_KEYS=$(cat var/secret-keys)
  export BCAST_SECRET_KEYS
fi
SIM_PORT=${BCAST_SIMULATOR_PORT:-9100}
api="http://127.0.0.1:$BCAST_API_PORT"
sim="http://127.0.0.1:$SIM_PORT"

.venv/bin/bcast db upgrade

.venv/bin/bcast up --with-simulator --simulator-port "$SIM_PORT" "$@" &
up_pid=$!
trap 'kill -TERM "$up_pid" 2>/dev/null; wait "$up_pid" 2>/dev/null || true' INT TERM EXIT

for _ in $(seq 1 120); do
  if curl -fsS "$api/readyz" >/dev/null 2>&1 && curl -fsS "$sim/_sim/health" >/dev/null 2>&1; then
    break
  fi
  if ! kill -0 "$up_pid" 2>/dev/null; then
    echo "bcast up stopped before it was ready" >&2
    exit 1
  fi
  sleep 0.5
done

.venv/bin/bcast demo --contacts "${BCAST_DEMO_CONTACTS:-2000}" --api-url "$api" --simulator-url "$sim"

cat <<MSG

bcast is running:  API $api  (OpenAPI: $api/docs)   metrics :9101 (dispatchers) :9102 (scheduler) $api/metrics
Make a token:      .venv/bin/bcast token create --workspace NAME
Other shells:      export BCAST_SECRET_KEYS=\$(cat var/secret-keys)   (the key secrets are stored with)
Ctrl-C stops everything.
MSG
wait "$up_pid"
