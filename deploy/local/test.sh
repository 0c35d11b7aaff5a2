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
# BCAST_TEST_WORKERS=3 runs the suite as three lanes side by side (pytest-xdist workers, each
# with its own database and vhost; tests/conftest.py): the in-process tests, the e2e tests that
# measure rates and delays, and the e2e tests that break things or start whole stacks of their
# own, each lane one test at a time in its collected order. Faster, but the lanes share the
# cores, and a few tests with tight rates and timeouts can miss on two cores; CI runs the
# suite in one process (the default, 0).
workers=${BCAST_TEST_WORKERS:-0}
set +e
if [ "$workers" = "0" ]; then
  .venv/bin/pytest "$@"
else
  .venv/bin/pytest -n "$workers" --dist loadfile "$@"
fi
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "no tests were collected" >&2
fi
exit "$status"
