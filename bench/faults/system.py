"""One scenario's system: a fresh database and vhost on the private servers, the bcast
processes (API, schedulers, dispatchers, the provider simulator), and handles on them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import httpx2 as httpx
import psycopg
from sqlalchemy.orm import Session

from bench import common
from bench.faults.servers import PrivatePostgres, PrivateRabbit
from bench.ports import free_port
from shared.db import migrate
from shared.db.engine import make_engine
from shared.domain.tokens import create_token

BCAST = [sys.executable, "-m", "services.cli"]
#: How long a process told to stop (SIGTERM) may take: the dispatcher gives its batches back
#: within 20 s and then waits for its worker (the runtime's own bounds), the others at once.
STOP_SECONDS = 45.0
#: Contacts imported per API request.
IMPORT_CHUNK = 20_000
#: The channel's rate limit: the highest allowed, so the scheduler keeps the most batches of a broadcast in
#: flight (``BCAST_BROADCAST_MAX_BATCHES``) and every dispatcher has some when a fault hits;
#: the provider's latency paces the send instead.
CHANNEL_RATE = 10_000.0


class ScenarioFailed(Exception):
    """A scenario could not go on (a wait ran out, a process misbehaved); says what."""


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy; ``ScenarioFailed`` naming ``what``
    after ``timeout`` seconds.
    """
    return common.wait_for(what, check, timeout, every, fail=ScenarioFailed)


def group_pids(pgid: int) -> set[int]:
    """Every live process of a process group (a bcast command and the workers it started)."""
    pids: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            # fields[0] is the state, fields[2] the process group; zombies are gone already.
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.add(int(stat.parent.name))
    return pids


class Procs:
    """The bcast processes of one scenario, each in its own process group, logging to a file."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.exited: dict[str, int] = {}
        self._files: dict[str, IO[bytes]] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        if name in self.running:
            raise ScenarioFailed(f"{name} is already running")
        log = self._files[name] = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [*BCAST, *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.running[name] = proc
        return proc

    def kill(self, name: str) -> set[int]:
        """SIGKILL the process and every process it started (its group); return their pids
        once all of them are gone.
        """
        proc = self.running.pop(name)
        pids = group_pids(proc.pid) | {proc.pid}
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_SECONDS)
        wait_for(f"every process of {name} to be gone", lambda: not group_pids(proc.pid), 10)
        self.exited[name] = proc.returncode
        self._close_log(name)
        return pids

    def terminate(self, name: str) -> None:
        """SIGTERM the process itself, as a supervisor does (a dispatcher passes it on to
        its workers).
        """
        with contextlib.suppress(ProcessLookupError):
            self.running[name].send_signal(signal.SIGTERM)

    def wait_exit(self, name: str, timeout: float) -> int | None:
        """Wait for a process told to stop; its exit code, or None if it was still running
        after ``timeout`` (then it is killed, its whole group).
        """
        proc = self.running.pop(name)
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # Workers must not outlive their parent.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.exited[name] = proc.returncode
        self._close_log(name)
        return code

    def dead(self) -> dict[str, int]:
        """Processes that ended on their own: name -> exit code."""
        return {n: code for n, p in self.running.items() if (code := p.poll()) is not None}

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill_all(self) -> None:
        """SIGKILL every process still running, with everything it started."""
        for name in list(self.running):
            self.kill(name)

    def _close_log(self, name: str) -> None:
        log = self._files.pop(name, None)
        if log is not None:
            log.close()


@dataclass(frozen=True)
class Layout:
    """The processes a scenario starts with."""

    schedulers: int = 1
    dispatchers: int = 2
    #: Worker processes and threads of each ``bcast dispatcher``.
    processes: int = 1
    threads: int = 4


class System:
    """The running system of one scenario, on a database and vhost of its own.

    Parameters:
      pg, rabbit: the private servers.
      name: the scenario (names the database, the vhost and the log folder).
      logs: the folder for this scenario's logs.
      settings: ``BCAST_*`` settings of every bcast process.
    """

    def __init__(
        self,
        pg: PrivatePostgres,
        rabbit: PrivateRabbit,
        name: str,
        logs: Path,
        settings: dict[str, str],
    ) -> None:
        self.pg = pg
        self.rabbit = rabbit
        self.name = name
        self.db_name = f"faults_{name.replace('-', '_')}_{secrets.token_hex(3)}"
        self.vhost = self.db_name
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.database_url = pg.url(self.db_name)
        self.api_port, self.sim_port, self.provider_port = free_port(), free_port(), free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.sim_url = f"http://127.0.0.1:{self.sim_port}"
        media, tmp = logs / "media", logs / "tmp"
        media.mkdir(exist_ok=True)
        tmp.mkdir(exist_ok=True)
        self.settings = settings
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("BCAST_")},
            "BCAST_DATABASE_URL": self.database_url,
            "BCAST_BROKER_URL": rabbit.url(self.vhost),
            "BCAST_API_PORT": str(self.api_port),
            "BCAST_PUBLIC_URL": self.api_url,
            "BCAST_MEDIA_DIR": str(media),
            # What a killed process leaves in its temp dir goes with the scenario's folder.
            "TMPDIR": str(tmp),
            "BCAST_SCHEDULER_METRICS_PORT": "0",
            "BCAST_DISPATCHER_METRICS_PORT": "0",
            "BCAST_LOG_FORMAT": "json",
            # The provider simulator is on loopback.
            "BCAST_ALLOW_PRIVATE_TARGETS": "true",
            **settings,
        }
        self.procs = Procs(self.env, logs)
        self.sim = httpx.Client(base_url=self.sim_url, timeout=60)
        self.api: httpx.Client | None = None
        self.hook = f"faults-{secrets.token_hex(4)}"
        self.secret = secrets.token_urlsafe(24)
        #: How long the provider takes to answer (what paces the send).
        self.latency_ms = 0.0
        self.channel_id = 0
        self.account_id = 0
        self._made = False

    # --- life ---------------------------------------------------------------------------------

    def open(self, layout: Layout) -> None:
        """Make the database and vhost, start the simulator, the API and the processes of
        ``layout``, and wait until all of them are ready.
        """
        self.pg.create_database(self.db_name)
        self._made = True
        migrate.upgrade(self.database_url)
        self.rabbit.add_vhost(self.vhost)
        self.procs.start(
            "simulator",
            "simulator",
            "--port",
            str(self.sim_port),
            "--extra-port",
            str(self.provider_port),
        )
        self.procs.start("api", "api")
        for i in range(1, layout.schedulers + 1):
            self.start_scheduler(f"scheduler-{i}")
        for i in range(1, layout.dispatchers + 1):
            self.start_dispatcher(f"dispatcher-{i}", layout)
        wait_for("the simulator to answer", self._sim_up, 60, every=0.1)
        wait_for("the API to be ready", self._api_up, 60, every=0.1)
        for i in range(1, layout.dispatchers + 1):
            self.wait_dispatcher_ready(f"dispatcher-{i}", layout.processes)

    def close(self) -> None:
        """Kill every process and drop the database and vhost (best effort: this runs after
        failures too). What the processes did is in the database and their logs already.
        """
        self.procs.kill_all()
        self.sim.close()
        if self.api is not None:
            self.api.close()
        if self._made:
            with contextlib.suppress(Exception):
                self.pg.drop_database(self.db_name)
            with contextlib.suppress(Exception):
                self.rabbit.delete_vhost(self.vhost)

    def start_api(self, name: str = "api") -> None:
        self.procs.start(name, "api")
        wait_for("the API to be ready", self._api_up, 60, every=0.1)

    def start_scheduler(self, name: str) -> None:
        self.procs.start(name, "scheduler")

    def start_dispatcher(self, name: str, layout: Layout) -> None:
        self.procs.start(
            name,
            "dispatcher",
            "--processes",
            str(layout.processes),
            "--threads",
            str(layout.threads),
        )

    def wait_dispatcher_ready(self, name: str, processes: int) -> None:
        """Every worker process of ``name`` has opened its runtime (it takes messages)."""
        wait_for(
            f"{name} to open its runtime in {processes} worker process(es)",
            lambda: self.procs.log(name).count("dispatcher runtime open") >= processes,
            90,
            every=0.1,
        )

    def _sim_up(self) -> bool:
        try:
            return self.sim.get("/_sim/health").status_code == 200
        except httpx.TransportError:
            return False

    def _api_up(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/readyz", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    # --- the provider -------------------------------------------------------------------------

    def sim_hook(self, **behaviour: Any) -> None:
        """Set how the provider behaves (see the simulator's ``HookConfig``) on top of its
        usual behaviour (the secret, its latency).
        """
        r = self.sim.put(
            f"/_sim/hooks/{self.hook}",
            json={"secret": self.secret, "latency_ms": self.latency_ms, **behaviour},
        )
        r.raise_for_status()

    def provider_listening(self, listening: bool) -> None:
        """Open or close the port the channel sends to (closed: connections refused)."""
        r = self.sim.put(f"/_sim/ports/{self.provider_port}", json={"open": listening})
        r.raise_for_status()

    def sim_records(self) -> list[dict[str, Any]]:
        return list(self.sim.get(f"/_sim/hooks/{self.hook}/requests").json())

    # --- setup through the API ----------------------------------------------------------------

    def client(self) -> httpx.Client:
        if self.api is None:
            engine = make_engine(self.database_url, pool_size=1)
            try:
                with Session(engine) as session, session.begin():
                    token = create_token(session, f"faults-{self.name}").token
            finally:
                engine.dispose()
            self.api = httpx.Client(
                base_url=self.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=120
            )
        return self.api

    def call(self, method: str, path: str, expect: int = 200, **kw: Any) -> Any:
        r = self.client().request(method, path, **kw)
        if r.status_code != expect:
            raise ScenarioFailed(f"{method} {path} answered {r.status_code}: {r.text[:500]}")
        return r.json()

    def make_audience(
        self, recipients: int, parts: int = 1, rate: float = CHANNEL_RATE
    ) -> list[int]:
        """A webhook channel to the simulator (its closable port), an account and
        ``recipients`` contacts; with ``parts`` > 1 each contact gets one of ``parts`` tags.
        Returns the tag ids (empty for one part).
        """
        channel = self.call(
            "POST",
            "/v1/channels",
            201,
            json={
                "name": self.hook,
                "kind": "webhook",
                "config": {
                    "url": f"http://127.0.0.1:{self.provider_port}/hooks/{self.hook}",
                    "secret": self.secret,
                },
                "rate_limit_per_second": rate,
            },
        )
        self.channel_id = channel["id"]
        account = self.call(
            "POST", "/v1/accounts", 201, json={"channel_id": self.channel_id, "name": "faults"}
        )
        self.account_id = account["id"]
        for start in range(0, recipients, IMPORT_CHUNK):
            rows = [
                {
                    "account_id": self.account_id,
                    "address": f"r-{i}",
                    "tags": [f"part-{i % parts}"] if parts > 1 else [],
                }
                for i in range(start, min(recipients, start + IMPORT_CHUNK))
            ]
            self.call("POST", "/v1/contacts/import", json=rows)
        if parts == 1:
            return []
        tags = self.call("GET", "/v1/tags", params={"limit": 500})["items"]
        by_name = {t["name"]: t["id"] for t in tags}
        return [by_name[f"part-{p}"] for p in range(parts)]

    def create_broadcast(self, tag_ids: list[int] | None = None, *, later: bool = False) -> int:
        """A broadcast to everyone (or to ``tag_ids``), now or 10 minutes ahead."""
        send_at = (datetime.now(UTC) + timedelta(minutes=10)).isoformat() if later else None
        body = {
            "name": f"faults {self.name}",
            "channel_id": self.channel_id,
            "audience": {"tag_ids": tag_ids} if tag_ids else {},
            "content": {"text": f"fault suite: {self.name}"},
            "send_at": send_at,
        }
        return int(self.call("POST", "/v1/broadcasts", 201, json=body)["id"])

    # --- the database -------------------------------------------------------------------------

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        """One statement on a fresh connection (the database may have restarted since)."""
        with psycopg.connect(self.database_url, autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def try_sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]] | None:
        """``sql``, or None while the database is out of reach."""
        try:
            return self.sql(query, params)
        except psycopg.OperationalError:
            return None

    def progress(self, broadcast_ids: list[int]) -> Progress | None:
        rows = self.try_sql(
            "SELECT status, total_count, sent_count, failed_count + partial_count "
            "+ skipped_count + canceled_count FROM broadcast WHERE id = ANY(%s)",
            (broadcast_ids,),
        )
        if rows is None:
            return None
        return Progress(
            statuses=[r[0] for r in rows],
            total=sum(r[1] for r in rows),
            sent=sum(r[2] for r in rows),
            other_final=sum(r[3] for r in rows),
        )

    def wait_progress(
        self, broadcast_ids: list[int], expected: int, share: float, timeout: float
    ) -> Progress:
        """Wait until ``share`` of ``expected`` recipients are final."""

        def far_enough() -> Progress | None:
            p = self.progress(broadcast_ids)
            return p if p is not None and p.final >= share * expected else None

        return wait_for(  # type: ignore[no-any-return]
            f"{share:.0%} of {expected} recipients to be sent", far_enough, timeout
        )


@dataclass(frozen=True)
class Progress:
    statuses: list[str]
    total: int
    sent: int
    other_final: int

    @property
    def final(self) -> int:
        return self.sent + self.other_final
