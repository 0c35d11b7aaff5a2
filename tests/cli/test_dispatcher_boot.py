"""``bcast dispatcher`` started where Postgres cannot be reached: its worker process says so in
one JSON line and exits, and the command exits with it (for its supervisor to start it again),
instead of a worker that takes messages and can send none.
"""

from __future__ import annotations

import json
import os
import subprocess

from bench.ports import free_port
from tests.cli.test_cli import BCAST
from tests.conftest import scratch_vhost


def test_a_dispatcher_that_cannot_reach_postgres_exits_with_a_line_that_says_why() -> None:
    with scratch_vhost("bcast_test_boot") as vhost:
        env = {
            **os.environ,
            # Nothing listens there.
            "BCAST_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/bcast",
            "BCAST_BROKER_URL": f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
            "BCAST_DISPATCHER_OPEN_TIMEOUT_SECONDS": "1",
        }
        done = subprocess.run(
            [*BCAST, "dispatcher", "--processes", "1", "--threads", "2", "--metrics-port", "0"],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
    assert done.returncode == 3, (done.returncode, done.stderr[-3000:])
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    # Every line is a log record: no bare traceback from the worker process.
    records = [json.loads(line) for line in lines]
    [failed] = [r for r in records if r.get("event") == "boot_failed"]
    assert failed["level"] == "CRITICAL"
    assert failed["message"].startswith("dispatcher runtime could not open (")
    assert "the process exits" in failed["message"]
    # It gave up after the time it was given (BCAST_DISPATCHER_OPEN_TIMEOUT_SECONDS).
    assert "after 1.0 sec" in failed["message"]
    assert [r for r in records if r["message"] == "dispatcher runtime open"] == []
