"""Liveness: a worker process that stops turning its loop fails `bcast probe`, though its
metrics endpoint (a process of its own) still answers; it passes again once it goes on.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import BCAST, System, wait_for


def probe(system: System, service: str, max_age: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BCAST, "probe", service, "--max-age", str(max_age)],
        env=system.procs.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in children.read_text().split() if children.exists() else []:
        out += [int(child), *descendants(int(child))]
    return out


def beating_pids(system: System, service: str) -> list[int]:
    directory = Path(system.procs.env["BCAST_HEARTBEAT_DIR"])
    return [int(p.name.rsplit("-", 1)[1]) for p in directory.glob(f"{service}-*")]


@pytest.mark.parametrize("service", ["dispatcher", "scheduler"])
def test_a_stopped_process_fails_its_liveness_probe_until_it_goes_on(
    system: System, service: str
) -> None:
    wait_for(f"the {service} to pass its probe", lambda: probe(system, service, 3).returncode == 0)
    main = system.procs.running[service].pid
    pids = [p for p in beating_pids(system, service) if p in [main, *descendants(main)]]
    assert pids, f"no {service} process of this system beats"
    stopped = pids[0]
    os.kill(stopped, signal.SIGSTOP)
    try:
        failed = wait_for(
            f"the probe to see the {service} stopped",
            lambda: (r := probe(system, service, 3)).returncode == 1 and r,
            timeout=30,
            every=0.5,
        )
        assert f"pid {stopped} silent" in failed.stderr
    finally:
        os.kill(stopped, signal.SIGCONT)
    wait_for(f"the {service} to pass again", lambda: probe(system, service, 3).returncode == 0)
