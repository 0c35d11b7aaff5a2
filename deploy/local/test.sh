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
# The suite runs on BCAST_TEST_WORKERS workers (pytest-xdist), each with its own database and
# vhost, and takes whole test files. One worker takes all the tests that start processes
# (tests/e2e, handed out first as the largest unit: tests/conftest.py), one at a time; the
# others share the rest. Much of the suite waits, so three workers fit two cores. BCAST_TEST_WORKERS=0 runs it all in this
# one process.
workers=${BCAST_TEST_WORKERS:-3}
set +e
.venv/bin/pytest -n "$workers" --dist loadfile "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "no tests were collected" >&2
fi
exit "$status"
