"""Shared pieces of the benchmarks: a throwaway database and vhost, and child processes."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from bench.ports import free_port
from shared.db import migrate
from shared.db.engine import libpq_url
from shared.domain.channels import MAX_RATE_PER_SECOND

if TYPE_CHECKING:
    import httpx2

BCAST = [sys.executable, "-m", "services.cli"]
ADMIN_URL = os.environ.get("BCAST_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def wait_for(
    what: str,
    check: Callable[[], Any],
    timeout: float = 120.0,
    every: float = 0.05,
    *,
    fail: Callable[[str], BaseException] = SystemExit,
) -> Any:
    """Poll ``check`` until it returns something truthy; raise ``fail`` naming ``what``
    after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


@contextlib.contextmanager
def scratch_database(admin_url: str = ADMIN_URL) -> Iterator[str]:
    """A migrated database on the server of ``admin_url``, dropped afterwards."""
    name = f"bcast_bench_{secrets.token_hex(4)}"
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    migrate.upgrade(url)
    try:
        yield url
    finally:
        with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@contextlib.contextmanager
def scratch_vhost() -> Iterator[str]:
    name = f"bcast_bench_{secrets.token_hex(4)}"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", name], check=True, capture_output=True)
    subprocess.run(
        ["rabbitmqctl", "-q", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
        check=True,
        capture_output=True,
    )
    try:
        yield name
    finally:
        subprocess.run(
            ["rabbitmqctl", "-q", "delete_vhost", name], check=False, capture_output=True
        )


class Children:
    """Processes started for a benchmark (bcast's own, or another ``program``), stopped when
    it ends.
    """

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.logs = Path(tempfile.mkdtemp(prefix="bcast-bench-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self._files: list[Any] = []

    def start(
        self, name: str, *args: str, program: Sequence[str] = BCAST
    ) -> subprocess.Popen[bytes]:
        """Start ``program`` with ``args`` (the ``bcast`` command unless told), its output
        logged to ``NAME.log``.
        """
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop_all
        self._files.append(log)
        proc = subprocess.Popen(
            [*program, *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        for f in self._files:
            f.close()


def bench_env(db_url: str, vhost: str) -> dict[str, str]:
    """The environment of every bcast process in a benchmark (metrics servers off)."""
    return {
        **os.environ,
        "BCAST_DATABASE_URL": db_url,
        "BCAST_BROKER_URL": f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
        "BCAST_SCHEDULER_METRICS_PORT": "0",
        # The providers are simulators on loopback.
        "BCAST_ALLOW_PRIVATE_TARGETS": "true",
        "BCAST_DISPATCHER_METRICS_PORT": "0",
    }


def start_simulator(children: Children) -> str:
    """Start the provider simulator; return its base URL once it answers."""
    port = free_port()
    children.start("simulator", "simulator", "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    wait_for("the simulator", lambda: simulator_up(base))
    return base


def simulator_up(base: str) -> bool:
    import httpx2

    try:
        return httpx2.get(f"{base}/_sim/health").status_code == 200
    except httpx2.TransportError:
        return False


def machine_busy() -> tuple[float, float]:
    """The machine's CPU time so far, busy and in all, in clock ticks over every core (from
    /proc/stat). Two readings give how much of the cores an interval used.
    """
    return cpu_line_ticks(Path("/proc/stat").read_text().split("\n", 1)[0])


def cpu_line_ticks(line: str) -> tuple[int, int]:
    """Busy and all ticks of /proc/stat's ``cpu`` line: user nice system idle iowait irq
    softirq steal [guest guest_nice]. Idle and I/O wait are not busy; steal (time the
    hypervisor gave to other machines) is left out of both, so the share is of the time the
    cores were this machine's; guest time is counted in user and nice already.
    """
    user, nice, system, idle, iowait, irq, softirq = (int(v) for v in line.split()[1:8])
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait


def busy_fraction(before: tuple[float, float], after: tuple[float, float]) -> float:
    """Of the cores' time between two ``machine_busy`` readings, the part that was busy."""
    spent = after[1] - before[1]
    return (after[0] - before[0]) / spent if spent > 0 else 0.0


def cpu_seconds(pid: int, *, descendants: bool = True, ended: bool = False) -> float:
    """User + system CPU time of a process and (unless told) all its descendants, from /proc.
    With ``ended``, also the time of its children that already ended (a server whose workers
    come and go, like Postgres's backends).
    """
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for p in [pid, *(_descendants(pid) if descendants else [])]:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            if ended and p == pid:
                total += (int(fields[13]) + int(fields[14])) / tick
    return total


def _descendants(pid: int) -> list[int]:
    """The process's descendants now (one that ends while they are listed is left out)."""
    out: list[int] = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except (FileNotFoundError, ProcessLookupError):
        return out
    for child in children:
        out.append(int(child))
        out.extend(_descendants(int(child)))
    return out


def start_api(children: Children, base_url: str) -> tuple[httpx2.Client, subprocess.Popen[bytes]]:
    """A workspace token, the API started and ready, and a client signed in with the token."""
    import httpx2

    token = subprocess.run(
        [*BCAST, "token", "create", "--workspace", "bench"],
        env=children.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    proc = children.start("api", "api")
    client = httpx2.Client(
        base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=600
    )

    def ready() -> bool:
        try:
            return client.get("/readyz").status_code == 200
        except httpx2.TransportError:
            return False

    wait_for("the API", ready)
    return client, proc


def ok(response: httpx2.Response) -> Any:
    """The JSON of a successful answer; the benchmark stops, saying why, on any other."""
    if response.status_code >= 300:
        raise SystemExit(f"{response.request.method} {response.request.url}: {response.text}")
    return response.json()


def quantile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of sorted values; 0 for none."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def follow_database() -> None:
    """Make this process's settings, engine and sessions follow ``BCAST_DATABASE_URL`` again
    (each benchmark case has a database of its own).
    """
    from shared.db.engine import get_engine, get_sessionmaker
    from shared.settings import get_settings

    get_settings.cache_clear()
    get_engine.cache_clear()
    get_sessionmaker.cache_clear()


#: Contacts per import call (the API's limit).
IMPORT_ROWS = 100_000


def webhook_channel(
    client: httpx2.Client,
    url: str,
    secret: str,
    *,
    rate: float = MAX_RATE_PER_SECOND,
    name: str = "bench",
) -> tuple[int, int]:
    """A signed webhook channel to ``url`` and an account on it, both called ``name``,
    through the API; returns (channel id, account id).

    Its rate limit defaults to the highest a channel takes, so what a benchmark measures is
    bcast's own speed, never the channel's limit (held all the same: its slots are reserved
    as on any channel). At 10,000/s, a box whose raw limit was 15,000/s could not have shown
    a ratio above 0.64.
    """
    channel = ok(
        client.post(
            "/v1/channels",
            json={
                "name": name,
                "kind": "webhook",
                "config": {"url": url, "secret": secret},
                "rate_limit_per_second": rate,
            },
        )
    )
    account = ok(client.post("/v1/accounts", json={"channel_id": channel["id"], "name": name}))
    return int(channel["id"]), int(account["id"])


def import_contacts(client: httpx2.Client, account_id: int, n: int, prefix: str = "b-") -> float:
    """Import ``n`` contacts (addresses ``b-0`` ... with the default ``prefix``) through the
    API's CSV import; returns the seconds it took.
    """
    started = time.perf_counter()
    for start in range(0, n, IMPORT_ROWS):
        rows = "".join(
            f"{account_id},{prefix}{i}\n" for i in range(start, min(n, start + IMPORT_ROWS))
        )
        ok(
            client.post(
                "/v1/contacts/import",
                content=("account_id,address\n" + rows).encode(),
                headers={"Content-Type": "text/csv"},
            )
        )
    return time.perf_counter() - started


def create_broadcast(
    client: httpx2.Client, channel_id: int, *, name: str = "bench", text: str = "bench"
) -> int:
    """An immediate broadcast of ``text`` to every contact of the workspace, through the API;
    returns its id.
    """
    broadcast = ok(
        client.post(
            "/v1/broadcasts",
            json={
                "name": name,
                "channel_id": channel_id,
                "audience": {},
                "content": {"text": text},
            },
        )
    )
    return int(broadcast["id"])


def completed(client: httpx2.Client, broadcast_id: int) -> bool:
    """Whether the API answers the broadcast ``completed``."""
    return bool(client.get(f"/v1/broadcasts/{broadcast_id}").json()["status"] == "completed")


def check_provider(stats: dict[str, Any], n: int) -> None:
    """Stop the benchmark unless the provider accepted every one of ``n`` recipients exactly
    once, with no bad signature.
    """
    accepted, duplicates, bad = stats["accepted"], stats["duplicates"], stats["bad_signatures"]
    if accepted != n or duplicates or bad:
        raise SystemExit(
            f"the provider accepted {accepted} of {n} (duplicates {duplicates}, bad signatures {bad})"
        )


#: The Postgres a benchmark runs on, as a deployment would run it: autovacuum on (this
#: machine's own cluster has it off for the test suite, and a million-recipient send leaves
#: two million dead row versions), a shared_buffers of 2 GB (of 24 GiB), WAL room for a long
#: write burst between checkpoints. Written into the results with the figures.
BENCH_POSTGRES = {
    "autovacuum": "on",
    "shared_buffers": "2GB",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "15min",
}


@contextlib.contextmanager
def bench_system() -> Iterator[tuple[Children, dict[str, str], str]]:
    """A private Postgres cluster (``BENCH_POSTGRES``) with a migrated database, a scratch
    vhost, an API port: the children to start on them (all stopped at the end), their
    environment, and the API's URL.
    """
    from bench.faults.servers import PrivatePostgres

    with (
        PrivatePostgres(settings=BENCH_POSTGRES, prefix="bcast-bench-pg-") as pg,
        scratch_database(pg.url()) as db_url,
        scratch_vhost() as vhost,
    ):
        env = bench_env(db_url, vhost)
        api = f"http://127.0.0.1:{free_port()}"
        env["BCAST_API_PORT"] = api.rsplit(":", 1)[1]
        env["BCAST_PUBLIC_URL"] = api
        children = Children(env)
        try:
            yield children, env, api
        finally:
            children.stop_all()


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


def scrape(port: int) -> list[Sample] | None:
    """Every sample a metrics endpoint on loopback serves; None while it does not answer."""
    import httpx2

    try:
        response = httpx2.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    except httpx2.TransportError:
        return None
    if response.status_code != 200:
        return None
    return [
        Sample(s.name, s.labels, s.value)
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    ]


def metric(samples: Sequence[Sample], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )
