#!/usr/bin/env bash
# Run every check CI runs: lint, format, types, then the whole test suite against the real
# Postgres and RabbitMQ of this machine (each run gets its own database and vhost).
set -euo pipefail
cd "$(dirname "$0")/../.."

bash deploy/local/venv.sh
bash deploy/local/services.sh

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
set +e
.venv/bin/pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "no tests were collected" >&2
fi
exit "$status"
