"""The operator's commands against the running system: up, demo and watch."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import httpx2 as httpx
import pytest

from bench.ports import free_port
from tests.e2e.conftest import BCAST, Api, System, wait_for

pytestmark = pytest.mark.e2e


def test_demo_runs_the_whole_story_and_watch_follows_a_broadcast(api: Api, system: System) -> None:
    demo = subprocess.run(
        [
            *BCAST,
            "demo",
            "--contacts",
            "60",
            "--api-url",
            system.api_url,
            "--simulator-url",
            system.sim_url,
        ],
        env=system.procs.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "status completed" in demo.stdout
    assert "59 unique messages, 0 duplicates, 0 bad signatures" in demo.stdout
    assert "not reached: user-7" in demo.stdout

    channel, _ = api.webhook_channel(rate=20)
    account = api.account(channel["id"])
    api.import_contacts(account["id"], [f"w-{i}" for i in range(30)])
    b = api.broadcast(channel["id"], {})
    token = api.http.headers["Authorization"].removeprefix("Bearer ")
    watched = subprocess.run(
        [*BCAST, "watch", str(b["id"]), "--api-url", system.api_url],
        env={**system.procs.env, "BCAST_TOKEN": token, "COLUMNS": "160"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert watched.returncode == 0, watched.stderr
    assert f"broadcast {b['id']} completed" in watched.stdout
    assert "sent 30" in watched.stdout
    assert api.get(b["id"])["status"] == "completed"
    direct = subprocess.run(
        [*BCAST, "watch", str(b["id"])],
        env={**system.procs.env, "COLUMNS": "160"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert direct.returncode == 0, direct.stderr
    assert f"broadcast {b['id']} completed" in direct.stdout
    assert "sent 30" in direct.stdout


def test_up_starts_every_service_and_sigterm_stops_them_all(system: System) -> None:
    api_port, sim_port = free_port(), free_port()
    env = {**system.procs.env, "BCAST_API_PORT": str(api_port)}
    up = subprocess.Popen(
        [
            *BCAST,
            "up",
            "--processes",
            "1",
            "--threads",
            "2",
            "--with-simulator",
            "--simulator-port",
            str(sim_port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def serving() -> bool:
            try:
                api_ok = httpx.get(f"http://127.0.0.1:{api_port}/readyz").status_code == 200
                return (
                    api_ok
                    and httpx.get(f"http://127.0.0.1:{sim_port}/_sim/health").status_code == 200
                )
            except httpx.TransportError:
                return False

        wait_for("bcast up to serve", serving, timeout=60, every=0.2)
        children = _children(up.pid)
        assert len(children) >= 4, "simulator, api, scheduler and dispatcher"
        os.kill(up.pid, signal.SIGTERM)
        assert up.wait(timeout=60) == 0
        wait_for("every child to exit", lambda: not any(_alive(p) for p in children), timeout=30)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", api_port)) != 0, "the API port is closed"
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    ).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = subprocess.run(
        ["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True, check=False
    ).stdout
    return bool(state.strip()) and not state.strip().startswith("Z")
