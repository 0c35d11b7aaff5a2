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
# BCAST_TEST_WORKERS=2 runs the suite as two lanes side by side (pytest-xdist workers, each
# with its own database and vhost; lane_of in tests/conftest.py), each running its tests one at
# a time in their collected order: the tests that start processes of their own and measure no
# rate or delay (whole stacks, the command line, promtool; niced), and the rest; 3 splits the
# rest into in-process and e2e lanes. Faster, but on two cores the lanes' contention can make
# tests with tight rates and timeouts miss: CI runs the suite in one process (the default, 0).
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
