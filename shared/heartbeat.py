"""Heartbeats: proof that a process's own work loop still turns, for liveness probes.

A dispatcher's metrics are served by a process of their own (dramatiq's Prometheus
middleware), so a scrape that answers says nothing about the workers: a worker process stopped
(SIGSTOP), or whose event loop is stuck in a blocking call, keeps ``up`` at 1. Each worker
process therefore beats from inside its own work: the dispatcher from a task on the event loop
that runs every batch, the scheduler after each turn of its loop. A beat is the modification
time of a file named after the process (``<service>-<pid>``) in ``BCAST_HEARTBEAT_DIR``, and
the ``bcast_heartbeat_timestamp_seconds{service}`` gauge for Prometheus.

``bcast probe <service>`` (the liveness probe of every deployment) fails when a live process
of that service has not beaten for ``--max-age`` seconds, or when none has beaten at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Gauge

log = logging.getLogger(__name__)

HEARTBEAT = Gauge(
    "bcast_heartbeat_timestamp_seconds",
    "When this process's work loop last turned (Unix time), by service (scheduler, "
    "dispatcher); a dispatcher exports one series per worker process (pid).",
    ["service"],
    multiprocess_mode="liveall",
)
#: Seconds between beats.
BEAT_SECONDS = 5.0
#: Default age past which a process is taken for hung.
MAX_AGE_SECONDS = 60.0
#: A process's start time from /proc is rounded to clock ticks (and the boot time to seconds):
#: a beat this close before it still counts as its own.
START_SLACK = 2.0


def beat_file(directory: Path, service: str, pid: int | None = None) -> Path:
    return directory / f"{service}-{os.getpid() if pid is None else pid}"


def beat(directory: Path, service: str) -> None:
    """Record that this process's work loop turned now. A file that cannot be written is
    logged, never raised: the work goes on (and the probe says the process is silent).
    """
    HEARTBEAT.labels(service).set_to_current_time()
    path = beat_file(directory, service)
    try:
        try:
            os.utime(path)
        except FileNotFoundError:
            directory.mkdir(parents=True, exist_ok=True)
            path.touch()
    except OSError as exc:
        log.warning("heartbeat could not be written: %s", exc)


def forget(directory: Path, service: str) -> None:
    """This process stops (normally): its heartbeat is no longer expected."""
    with contextlib.suppress(FileNotFoundError):
        beat_file(directory, service).unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _started_at(pid: int) -> float | None:
    """When process ``pid`` started (Unix time), from /proc; None where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        # Fields after the command name (which may hold spaces): starttime is the 20th.
        ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


@dataclass(frozen=True)
class Verdict:
    ok: bool
    message: str


def check(
    directory: Path, service: str, *, max_age: float = MAX_AGE_SECONDS, now: float | None = None
) -> Verdict:
    """Whether every live process of ``service`` beat within ``max_age`` seconds. Files of
    processes that no longer exist are removed (a worker killed outright leaves its file), and
    so are files last written before the process now holding their pid started.
    """
    now = time.time() if now is None else now
    fresh: list[int] = []
    stale: list[tuple[int, float]] = []
    for path in sorted(directory.glob(f"{service}-*")) if directory.is_dir() else []:
        try:
            pid = int(path.name.rsplit("-", 1)[1])
            age = now - path.stat().st_mtime
        except (ValueError, FileNotFoundError):
            continue
        started = _started_at(pid)
        # Gone; or the pid now names a younger process (a restarted container reuses pids):
        # the file was left by a process that no longer exists.
        if not _alive(pid) or (started is not None and started > now - age + START_SLACK):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        if age <= max_age:
            fresh.append(pid)
        else:
            stale.append((pid, age))
    if stale:
        hung = ", ".join(f"pid {pid} silent for {age:.0f} s" for pid, age in stale)
        return Verdict(False, f"{service}: {hung} (limit {max_age:g} s)")
    if not fresh:
        return Verdict(False, f"{service}: no process has beaten in {directory}")
    return Verdict(True, f"{service}: {len(fresh)} processes beating")
