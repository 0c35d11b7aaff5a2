"""The whole system as real processes: API, scheduler, dispatcher and the provider simulator,
on a database and a RabbitMQ vhost made for this test run only.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psycopg
import pytest

from bench.ports import free_port
from shared.db import migrate
from shared.db.engine import libpq_url
from tests.conftest import _drop_database, scratch_vhost

BCAST = [sys.executable, "-m", "services.cli"]
#: Every wait in these tests gives up after this long; the system should take a fraction.
WAIT = 90.0


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT, every: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(every)


@pytest.fixture(scope="session")
def vhost() -> Iterator[str]:
    """A RabbitMQ vhost for this test run, deleted at the end."""
    with scratch_vhost("bcast_test") as name:
        yield name


def _ahead_of_bcast(pid: int) -> None:
    """The simulator plays a provider, which runs on machines of its own: it is scheduled
    ahead of bcast's processes on these shared cores, so that a dispatcher's load does not
    hold its requests back and then stamp them together (a burst bcast never sent). Without
    the right to raise a priority, it runs as it is.
    """
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, pid, -5)


class Procs:
    """Child processes of the test system; all are stopped at the end of the session."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.files: dict[str, Any] = {}

    def start(self, name: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        log = self.files[name] = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [*BCAST, *args],
            env={**self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if args[:1] == ("simulator",):
            _ahead_of_bcast(proc.pid)
        self.running[name] = proc
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 40) -> None:
        """Stop a process as its supervisor would: the signal to the process itself (it passes
        SIGTERM on to its own workers), SIGKILL to its whole group, or after ``timeout``.
        """
        proc = self.running.pop(name)
        self.files.pop(name).close()
        with contextlib.suppress(ProcessLookupError):
            if sig == signal.SIGKILL:
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")


class System:
    """Handles on the running system: its API, its simulator and its database."""

    def __init__(self, api_url: str, sim_url: str, database_url: str, procs: Procs) -> None:
        self.api_url = api_url
        self.sim_url = sim_url
        self.database_url = database_url
        self.procs = procs
        self.sim = httpx.Client(base_url=sim_url, timeout=30)
        self.clients: list[httpx.Client] = [self.sim]

    def client(self) -> Api:
        token = subprocess.run(
            [*BCAST, "token", "create", "--workspace", f"e2e-{secrets.token_hex(4)}"],
            env=self.procs.env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        api = Api(self, token)
        self.clients.append(api.http)
        return api

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(libpq_url(self.database_url), autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []


class Api:
    """One workspace's client of the running API, with shortcuts for e2e setups."""

    def __init__(self, system: System, token: str) -> None:
        self.system = system
        self.token = token
        #: Each simulator hook's webhook secret, by hook name.
        self.hook_secrets: dict[str, str] = {}
        self.http = httpx.Client(
            base_url=system.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=60
        )

    def ok(self, method: str, path: str, expect: int = 200, **kw: Any) -> Any:
        response = self.http.request(method, path, **kw)
        assert response.status_code == expect, response.text
        return (
            response.json()
            if response.headers.get("content-type", "").startswith("application/json")
            else response
        )

    def webhook_channel(self, rate: float = 5000.0, **sim: Any) -> tuple[dict[str, Any], str]:
        """A webhook channel to a fresh simulator hook configured with ``sim``; returns (channel, hook)."""
        hook = f"h-{secrets.token_hex(4)}"
        secret = secrets.token_urlsafe(24)
        self.hook_secrets[hook] = secret
        r = self.system.sim.put(f"/_sim/hooks/{hook}", json={"secret": secret, **sim})
        assert r.status_code == 200, r.text
        channel = self.ok(
            "POST",
            "/v1/channels",
            201,
            json={
                "name": hook,
                "kind": "webhook",
                "config": {"url": f"{self.system.sim_url}/hooks/{hook}", "secret": secret},
                "rate_limit_per_second": rate,
            },
        )
        return channel, hook

    def channel(self, kind: str, rate: float = 5000.0, **sim: Any) -> tuple[dict[str, Any], str]:
        """A channel of ``kind`` pointed at a fresh simulator endpoint; returns (channel, name)."""
        if kind == "webhook":
            return self.webhook_channel(rate, **sim)
        name = f"{kind[:2]}-{secrets.token_hex(4)}"
        r = self.system.sim.put(f"/_sim/hooks/{name}", json=sim)
        assert r.status_code == 200, r.text
        config: dict[str, Any] = {
            "telegram": {
                "bot_token": f"{secrets.randbelow(10**9)}:AA{secrets.token_urlsafe(16)}",
                "api_base_url": f"{self.system.sim_url}/telegram/{name}",
            },
            "whatsapp": {
                "access_token": f"EAAG{secrets.token_urlsafe(24)}",
                "phone_number_id": "106540352242922",
                "api_version": "v21.0",
                "api_base_url": f"{self.system.sim_url}/whatsapp/{name}",
            },
            "line": {
                "channel_access_token": secrets.token_urlsafe(32),
                "api_base_url": f"{self.system.sim_url}/line/{name}",
            },
            "messenger": {
                "page_access_token": f"EAAB{secrets.token_urlsafe(24)}",
                "api_version": "v21.0",
                "api_base_url": f"{self.system.sim_url}/messenger/{name}",
            },
            "instagram": {
                "page_access_token": f"IGQV{secrets.token_urlsafe(24)}",
                "ig_user_id": "17841400000000001",
                "api_version": "v21.0",
                "api_base_url": f"{self.system.sim_url}/instagram/{name}",
            },
        }[kind]
        secret = next(
            config[k]
            for k in ("bot_token", "access_token", "channel_access_token", "page_access_token")
            if k in config
        )
        self.secrets = [*getattr(self, "secrets", []), secret]
        channel = self.ok(
            "POST",
            "/v1/channels",
            201,
            json={"name": name, "kind": kind, "config": config, "rate_limit_per_second": rate},
        )
        channel["secret"] = self.secrets[-1]
        return channel, name

    def account(self, channel_id: int) -> dict[str, Any]:
        return dict(
            self.ok(
                "POST",
                "/v1/accounts",
                201,
                json={"channel_id": channel_id, "name": f"a-{secrets.token_hex(3)}"},
            )
        )

    def import_contacts(
        self,
        account_id: int,
        addresses: list[str],
        tags: list[str] | None = None,
        *,
        wrote_in: bool = False,
    ) -> None:
        """Import contacts; ``wrote_in``: each wrote in just now (inside every provider's
        conversation window).
        """
        now = datetime.now(UTC).isoformat() if wrote_in else None
        rows = [
            {
                "account_id": account_id,
                "address": a,
                "name": f"N {a}",
                "tags": tags or [],
                **({"last_inbound_at": now} if now else {}),
            }
            for a in addresses
        ]
        self.ok("POST", "/v1/contacts/import", json=rows)

    def contacts(self, account_id: int) -> dict[str, int]:
        out: dict[str, int] = {}
        cursor = None
        while True:
            page = self.ok(
                "GET",
                "/v1/contacts",
                params={
                    "account_id": account_id,
                    "limit": 500,
                    **({"cursor": cursor} if cursor else {}),
                },
            )
            out.update({c["address"]: c["id"] for c in page["items"]})
            cursor = page["next_cursor"]
            if cursor is None:
                return out

    def tag_id(self, name: str) -> int:
        return int(
            next(
                t["id"]
                for t in self.ok("GET", "/v1/tags", params={"limit": 500})["items"]
                if t["name"] == name
            )
        )

    def broadcast(self, channel_id: int, audience: dict[str, Any], **kw: Any) -> dict[str, Any]:
        body = {
            "name": "e2e",
            "channel_id": channel_id,
            "audience": audience,
            "content": {"text": "hello e2e"},
            **kw,
        }
        return dict(self.ok("POST", "/v1/broadcasts", 201, json=body))

    def get(self, broadcast_id: int) -> dict[str, Any]:
        return dict(self.ok("GET", f"/v1/broadcasts/{broadcast_id}"))

    def wait_status(
        self, broadcast_id: int, *statuses: str, timeout: float = WAIT
    ) -> dict[str, Any]:
        return dict(
            wait_for(
                f"broadcast {broadcast_id} to become {'/'.join(statuses)}",
                lambda: (b := self.get(broadcast_id))["status"] in statuses and b,
                timeout=timeout,
            )
        )

    def sim_stats(self, hook: str) -> dict[str, Any]:
        return dict(self.system.sim.get(f"/_sim/hooks/{hook}/stats").json())

    def sim_requests(self, hook: str) -> list[dict[str, Any]]:
        return list(self.system.sim.get(f"/_sim/hooks/{hook}/requests").json())


@pytest.fixture(scope="session")
def system(
    database_url: str, vhost: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    """API, scheduler, one dispatcher process and the simulator, on their own database."""
    name = database_url.rsplit("/", 1)[1] + "_e2e"
    url = database_url.rsplit("/", 1)[0] + "/" + name
    migrate.upgrade(url)
    api_port, sim_port = free_port(), free_port()
    logs = tmp_path_factory.mktemp("e2e-logs")
    env = {
        **os.environ,
        "BCAST_DATABASE_URL": url,
        "BCAST_BROKER_URL": f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
        "BCAST_API_PORT": str(api_port),
        "BCAST_PUBLIC_URL": f"http://127.0.0.1:{api_port}",
        "BCAST_MEDIA_DIR": str(tmp_path_factory.mktemp("e2e-media")),
        "BCAST_HEARTBEAT_DIR": str(tmp_path_factory.mktemp("e2e-heartbeat")),
        "BCAST_LOG_FORMAT": "json",
        "BCAST_SCHEDULER_METRICS_PORT": "0",
        "BCAST_DISPATCHER_METRICS_PORT": "0",
        "BCAST_SCHEDULER_POLL_SECONDS": "0.5",
        "BCAST_STALL_SECONDS": "5",
        "BCAST_LEASE_SECONDS": "10",
        "BCAST_SEND_TIMEOUT_SECONDS": "4",
        "BCAST_RETRY_BASE_SECONDS": "0.2",
        "BCAST_RETRY_MAX_SECONDS": "1",
        "BCAST_BATCH_SIZE": "200",
        "BCAST_CHAIN_MAX_SECONDS": "2",
        "BCAST_API_HEADER_TIMEOUT_SECONDS": "2",
        "BCAST_API_BODY_TIMEOUT_SECONDS": "2",
        "BCAST_API_BODY_TOTAL_SECONDS": "4",
    }
    procs = Procs(env, logs)
    procs.start("simulator", "simulator", "--port", str(sim_port))
    procs.start("api", "api")
    procs.start("scheduler", "scheduler")
    procs.start("dispatcher", "dispatcher", "--processes", "1", "--threads", "4")
    system = System(f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{sim_port}", url, procs)

    def up() -> bool:
        try:
            return (
                httpx.get(f"{system.api_url}/readyz").status_code == 200
                and system.sim.get("/_sim/health").status_code == 200
            )
        except httpx.TransportError:
            return False

    wait_for("the API and the simulator to come up", up, timeout=60, every=0.2)
    yield system
    for client in system.clients:
        client.close()
    procs.stop_all()
    _drop_database(name)


@pytest.fixture
def api(system: System) -> Api:
    return system.client()
