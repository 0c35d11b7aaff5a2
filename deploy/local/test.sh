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
# The suite runs as three lanes side by side (pytest-xdist workers, each with its own database
# and vhost; tests/conftest.py): the in-process tests, the e2e tests that measure rates and
# delays, and the e2e tests that break things or start whole stacks of their own. Each lane
# runs its tests one at a time in their collected order. BCAST_TEST_WORKERS=0 runs the whole
# suite in this one process.
workers=${BCAST_TEST_WORKERS:-3}
set +e
.venv/bin/pytest -n "$workers" --dist loadfile "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "no tests were collected" >&2
fi
exit "$status"
