"""Heartbeats and the liveness verdict drawn from them (files only; no process started)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from shared import heartbeat


def a_dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(done.stdout)


def test_a_process_that_beats_is_alive(tmp_path: Path) -> None:
    heartbeat.beat(tmp_path, "dispatcher")
    verdict = heartbeat.check(tmp_path, "dispatcher", max_age=5)
    assert verdict.ok, verdict.message
    assert heartbeat.beat_file(tmp_path, "dispatcher").exists()


def test_a_live_process_silent_too_long_is_hung(tmp_path: Path) -> None:
    heartbeat.beat(tmp_path, "dispatcher")
    past = time.time() - 120
    os.utime(heartbeat.beat_file(tmp_path, "dispatcher"), (past, past))
    verdict = heartbeat.check(tmp_path, "dispatcher", max_age=60)
    assert not verdict.ok
    assert f"pid {os.getpid()} silent for 120 s" in verdict.message


def test_no_heartbeat_at_all_is_not_alive(tmp_path: Path) -> None:
    verdict = heartbeat.check(tmp_path / "none", "scheduler")
    assert not verdict.ok
    assert "no process has beaten" in verdict.message
    heartbeat.beat(tmp_path, "dispatcher")  # another service's beat does not count
    assert not heartbeat.check(tmp_path, "scheduler").ok


def test_the_file_of_a_process_that_is_gone_is_dropped_not_counted(tmp_path: Path) -> None:
    dead = heartbeat.beat_file(tmp_path, "dispatcher", a_dead_pid())
    dead.touch()
    past = time.time() - 600
    os.utime(dead, (past, past))
    assert not heartbeat.check(tmp_path, "dispatcher").ok, "a dead process proves nothing"
    assert not dead.exists()
    heartbeat.beat(tmp_path, "dispatcher")
    assert heartbeat.check(tmp_path, "dispatcher").ok


def test_a_stopping_process_takes_its_heartbeat_with_it(tmp_path: Path) -> None:
    heartbeat.beat(tmp_path, "scheduler")
    heartbeat.forget(tmp_path, "scheduler")
    assert not heartbeat.beat_file(tmp_path, "scheduler").exists()
    heartbeat.forget(tmp_path, "scheduler")  # twice is fine


def test_a_heartbeat_that_cannot_be_written_never_stops_the_work(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file-not-a-folder"
    blocked.write_text("")
    heartbeat.beat(blocked, "scheduler")  # logged, not raised
    assert not heartbeat.check(blocked, "scheduler").ok
