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


def this_process_started() -> float:
    """When this process started; returned once it is a few seconds old, so that a beat can be
    placed after its start and still be old.
    """
    started = heartbeat._started_at(os.getpid())
    assert started is not None, "/proc tells when a process started"
    deadline = time.monotonic() + 10
    while time.time() < started + heartbeat.START_SLACK + 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return started


def test_a_live_process_silent_too_long_is_hung(tmp_path: Path) -> None:
    started = this_process_started()
    heartbeat.beat(tmp_path, "dispatcher")
    last = started + heartbeat.START_SLACK + 0.5  # after this process started, and old
    os.utime(heartbeat.beat_file(tmp_path, "dispatcher"), (last, last))
    age = time.time() - last
    verdict = heartbeat.check(tmp_path, "dispatcher", max_age=age / 2)
    assert not verdict.ok
    assert f"pid {os.getpid()} silent for {age:.0f} s" in verdict.message


def test_a_file_older_than_the_process_now_holding_its_pid_is_dropped(tmp_path: Path) -> None:
    # A restarted container reuses pids: the file a worker of the old one left behind names a
    # pid that is alive again, as another process (here: this one).
    started = this_process_started()
    heartbeat.beat(tmp_path, "dispatcher")
    path = heartbeat.beat_file(tmp_path, "dispatcher")
    before = started - 100
    os.utime(path, (before, before))
    verdict = heartbeat.check(tmp_path, "dispatcher", max_age=60)
    assert not verdict.ok
    assert "no process has beaten" in verdict.message, "not taken for a hung process"
    assert not path.exists()


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
