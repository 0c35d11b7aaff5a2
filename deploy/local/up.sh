#!/usr/bin/env bash
# Set up and run bcast on this machine: venv, Postgres and RabbitMQ, migrations, a token for
# the "demo" workspace, then the API in the foreground (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/../.."

bash deploy/local/venv.sh
bash deploy/local/services.sh

export BCAST_DATABASE_URL=${BCAST_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/bcast}
.venv/bin/bcast db upgrade
token=$(.venv/bin/bcast token create --workspace demo --name up.sh)
port=${BCAST_API_PORT:-8000}
cat <<MSG
bcast is starting on http://127.0.0.1:$port  (OpenAPI: http://127.0.0.1:$port/docs)
A token for the "demo" workspace, shown once:
  export BCAST_TOKEN=$token
  curl -H "Authorization: Bearer \$BCAST_TOKEN" http://127.0.0.1:$port/v1/broadcasts
MSG
exec .venv/bin/bcast api
