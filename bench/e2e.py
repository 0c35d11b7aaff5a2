"""End to end, create -> completed, against the raw limit of the same path in the same run.

Raw limit: a plain aiohttp client posting unique, signed webhook bodies (the shape and size the
dispatcher sends) to the simulator route the pipeline uses, ``concurrency`` at a time. The
pipeline: contacts imported through the API's CSV import, one broadcast created through the
API, timed from the create call to the API answering ``completed``; only unique accepted
sends count, and the run fails unless the provider accepted every recipient exactly once with
no bad signature.

Also measured: CPU microseconds per recipient of each process (dispatchers, scheduler, API,
Postgres, RabbitMQ) and the dispatchers' peak resident memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx2 as httpx
import psycopg

from bench.common import (
    Children,
    _descendants,
    bench_system,
    busy_fraction,
    check_provider,
    completed,
    cpu_seconds,
    create_broadcast,
    import_contacts,
    machine_busy,
    start_api,
    start_simulator,
    wait_for,
    webhook_channel,
)
from shared.db.engine import libpq_url
from shared.domain.channels import MAX_RATE_PER_SECOND

SIGNATURE_HEADER = "X-Bcast-Signature"


@dataclass(frozen=True)
class Shape:
    """How the pipeline runs: dispatcher processes and threads, raw client concurrency."""

    processes: int = 2
    threads: int = 8
    concurrency: int = 64


def raw_limit(url: str, secret: str, n: int, concurrency: int) -> float:
    """Unique, signed bodies per second the simulator route takes from a plain client."""

    async def go() -> float:
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as http:
            queue = iter(range(n))

            async def worker() -> None:
                for i in queue:
                    body = json.dumps(
                        {
                            "idempotency_key": f"raw-{i}",
                            "timestamp": int(time.time()),
                            "to": f"b-{i}",
                            "broadcast_id": 0,
                            "text": "bench",
                            "media": [],
                        },
                        separators=(",", ":"),
                    ).encode()
                    signature = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
                    headers = {
                        "Content-Type": "application/json",
                        "Idempotency-Key": f"raw-{i}",
                        SIGNATURE_HEADER: f"sha256={signature}",
                    }
                    async with http.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        if resp.status != 200:
                            raise SystemExit(f"raw limit: the simulator answered {resp.status}")

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return n / (time.perf_counter() - started)

    return asyncio.run(go())


class PeakRss:
    """The largest resident memory, in MiB, of one process tree, sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _watch(self) -> None:
        from bench.common import _descendants

        while not self._stop.wait(0.2):
            for pid in _descendants(self.pid):
                with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            self.peak = max(self.peak, int(line.split()[1]) / 1024)


def webhook_audience(client: httpx.Client, url: str, secret: str, n: int) -> tuple[int, float]:
    """The benchmark's audience, made through the API: a webhook channel posting to ``url``
    signed with ``secret``, one account, and ``n`` contacts (``b-0``, ``b-1``, ...) imported
    with the CSV import. Returns the channel id and the seconds the import took.
    """
    channel_id, account_id = webhook_channel(client, url, secret)
    return channel_id, import_contacts(client, account_id, n)


def pids_named(name: str) -> list[int]:
    """Processes whose command name is ``name`` (``postgres``, ``beam.smp``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                if (proc / "comm").read_text().strip() == name:
                    pids.append(int(proc.name))
    return pids


def postmaster(database_url: str) -> int:
    """The first process of the Postgres server of ``database_url`` (its backends come and go
    as its children).
    """
    with psycopg.connect(libpq_url(database_url)) as conn:
        row = conn.execute("SHOW data_directory").fetchone()
    if row is None:
        raise SystemExit("Postgres did not say where its data directory is")
    return int((Path(row[0]) / "postmaster.pid").read_text().split("\n", 1)[0])


def postgres_settings(database_url: str) -> dict[str, str]:
    """The server settings that decide what a benchmark's figures mean."""
    names = ("autovacuum", "shared_buffers", "max_wal_size", "checkpoint_timeout", "fsync")
    with psycopg.connect(libpq_url(database_url)) as conn:
        rows = conn.execute(
            "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY(%s)",
            (list(names),),
        ).fetchall()
    return dict(sorted(rows))


def cpu_of(pids: list[int], *, descendants: bool = True) -> float:
    """CPU seconds of these processes (and, unless told, their descendants)."""
    return sum(cpu_seconds(p, descendants=descendants) for p in pids)


def run(
    n: int, shape: Shape = Shape(), *, history: int = 0, flame: Path | None = None
) -> dict[str, Any]:
    """One end-to-end run of ``n`` recipients; returns the ``e2e`` section of the results.

    With ``history`` (>= 2), the same audience is then sent again as broadcast number
    ``history``, after the rows of the broadcasts between were written (by SQL, as sent): what
    one more broadcast costs once the delivery table holds ``history - 1`` of them. With
    ``flame``, a py-spy flame graph of one dispatcher worker while it sends is kept there.
    """
    with bench_system() as (children, env, api):
        return _run(children, env, n, shape, api, history, flame)


def _run(
    children: Children,
    env: dict[str, str],
    n: int,
    shape: Shape,
    api: str,
    history: int,
    flame: Path | None,
) -> dict[str, Any]:
    sim = start_simulator(children)
    sim_pid = children.procs[-1].pid
    secret = secrets.token_urlsafe(24)
    for hook in ("raw", "raw-after", "bench"):
        httpx.put(f"{sim}/_sim/hooks/{hook}", json={"secret": secret}).raise_for_status()
    raw_n = min(n, 50_000)
    # The raw limit is measured before the pipeline and again after it, and the better of the
    # two is the limit: a shared box's speed drifts from minute to minute (runs minutes apart
    # measured 4,163 and 5,519/s), and the pipeline must not be set against its slowest one.
    raw_before, raw_used = measure_raw(sim, sim_pid, secret, "raw", raw_n, shape.concurrency)

    client, api_proc = start_api(children, api)
    channel_id, import_seconds = webhook_audience(client, f"{sim}/hooks/bench", secret, n)
    settle(env["BCAST_DATABASE_URL"])

    scheduler = children.start("scheduler", "scheduler")
    dispatcher = children.start(
        "dispatcher",
        "dispatcher",
        "--processes",
        str(shape.processes),
        "--threads",
        str(shape.threads),
    )
    time.sleep(6)  # every worker process boots before the clock starts
    server = postmaster(env["BCAST_DATABASE_URL"])

    def cpu_now() -> dict[str, float]:
        return {
            "dispatcher": cpu_of([dispatcher.pid]),
            "scheduler": cpu_of([scheduler.pid]),
            "api": cpu_of([api_proc.pid]),
            # The server and its backends, those that ended since included.
            "postgres": cpu_seconds(server, ended=True),
            "rabbitmq": cpu_of(pids_named("beam.smp"), descendants=False),
            "simulator": cpu_of([sim_pid]),
        }

    def send_all() -> tuple[int, float, dict[str, float], dict[str, dict[str, int]], float]:
        """One broadcast to the whole audience: its id, seconds create -> completed, CPU
        seconds of each process meanwhile, the autovacuum passes that ran meanwhile, and the
        share of the cores' time used meanwhile.
        """
        vacuums_before = vacuum_counts(env["BCAST_DATABASE_URL"])
        cpu_before = cpu_now()
        busy_before = machine_busy()
        broadcast_id = create_broadcast(client, channel_id)
        # Polled twice a second: each poll is an API request on the same cores, and the time
        # is the broadcast's own (created to finished, both stamped by Postgres), not the poll's.
        wait_for(
            "the broadcast to complete",
            lambda: completed(client, broadcast_id),
            timeout=max(600, n / 200),
            every=0.5,
        )
        cpu = {k: v - cpu_before[k] for k, v in cpu_now().items()}
        busy = busy_fraction(busy_before, machine_busy())
        vacuums = {}
        for table, counts in vacuum_counts(env["BCAST_DATABASE_URL"]).items():
            ran = {k: v - vacuums_before.get(table, {}).get(k, 0) for k, v in counts.items()}
            if any(ran.values()):
                vacuums[table] = ran
        with psycopg.connect(libpq_url(env["BCAST_DATABASE_URL"])) as conn:
            row = conn.execute(
                "SELECT extract(epoch FROM finished_at - created_at)::float8 FROM broadcast "
                "WHERE id = %s",
                (broadcast_id,),
            ).fetchone()
        if row is None or row[0] is None:
            raise SystemExit(f"broadcast {broadcast_id} is completed without finished_at")
        return broadcast_id, float(row[0]), cpu, vacuums, busy

    def profiled() -> FlameGraph | None:
        return (
            FlameGraph(dispatcher.pid, f"{sim}/_sim/hooks/bench/stats", n, flame) if flame else None
        )

    # py-spy takes CPU of its own: it samples the last broadcast of the history when there is
    # one (its growth figure is then the conservative one), never the one the ratio is of.
    profiler = profiled() if history < 2 else None
    with PeakRss(dispatcher.pid) as rss:
        if profiler:
            profiler.start()
        broadcast_id, seconds, cpu, vacuums, busy = send_all()
    if profiler:
        profiler.join(timeout=60)
    stats = httpx.get(f"{sim}/_sim/hooks/bench/stats").json()
    check_provider(stats, n)
    raw_after, raw_used_after = measure_raw(
        sim, sim_pid, secret, "raw-after", raw_n, shape.concurrency
    )
    raw = max(raw_before, raw_after)
    raw_cpu_each = {"before": raw_used, "after": raw_used_after}
    if raw_after > raw_before:
        raw_used = raw_used_after
    later: dict[str, Any] = {}
    if history >= 2:
        filled = fill_history(env["BCAST_DATABASE_URL"], broadcast_id, history - 2)
        settle(env["BCAST_DATABASE_URL"])
        profiler = profiled()
        if profiler:
            profiler.start()
        _, last_seconds, last_cpu, last_vacuums, _ = send_all()
        if profiler:
            profiler.join(timeout=60)
        check_provider(httpx.get(f"{sim}/_sim/hooks/bench/stats").json(), 2 * n)
        later = {
            "history": {
                "broadcasts": history,
                "rows_before_last": (history - 1) * n,
                "fill_seconds": round(filled, 1),
                "first_seconds": round(seconds, 2),
                "last_seconds": round(last_seconds, 2),
                "growth": round(last_seconds / seconds, 3),
                "postgres_us_first": round(cpu["postgres"] / n * 1e6, 1),
                "postgres_us_last": round(last_cpu["postgres"] / n * 1e6, 1),
                "dispatcher_us_first": round(cpu["dispatcher"] / n * 1e6, 1),
                "dispatcher_us_last": round(last_cpu["dispatcher"] / n * 1e6, 1),
                "vacuums_last": last_vacuums,
                "profiled": bool(profiler and profiler.made),
            }
        }
    client.close()
    per_second = n / seconds
    return {
        "recipients": n,
        "accepted": stats["accepted"],
        "duplicates": stats["duplicates"],
        "bad_signatures": stats["bad_signatures"],
        "seconds": round(seconds, 2),
        "per_second": round(per_second, 1),
        "raw_per_second": round(raw, 1),
        "raw_per_second_before": round(raw_before, 1),
        "raw_per_second_after": round(raw_after, 1),
        "raw_cpu": raw_used,
        "raw_cpu_each": raw_cpu_each,
        # Of both cores' time from create to completed (the poll included), the part used: below
        # 1, the pipeline waited on something other than CPU for the rest.
        "machine_busy": round(busy, 3),
        "ratio_to_raw": round(per_second / raw, 3),
        "import_seconds": round(import_seconds, 2),
        "dispatchers": f"{shape.processes} processes x {shape.threads} threads",
        # The channel's own limit, held as on any channel; set above what this box can send.
        "channel_rate_per_second": MAX_RATE_PER_SECOND,
        "cpu_us_per_recipient": {name: round(v / n * 1e6, 1) for name, v in cpu.items()},
        "dispatcher_peak_rss_mib": round(rss.peak, 1),
        "postgres_settings": postgres_settings(env["BCAST_DATABASE_URL"]),
        # Autovacuum and autoanalyze passes that ran during the send, by table.
        "vacuums": vacuums,
        # The import's vacuum, analyze and checkpoint were done before the clock (``settle``).
        "settled": True,
        **({"flame_graph": profiler.out.name} if profiler and profiler.made else {}),
        **later,
    }


def measure_raw(
    sim: str, sim_pid: int, secret: str, hook: str, n: int, concurrency: int
) -> tuple[float, dict[str, float]]:
    """The raw limit on ``hook`` (``n`` unique signed bodies), and where its CPU went."""
    cpu = (cpu_seconds(sim_pid), cpu_seconds(os.getpid(), descendants=False))
    busy = machine_busy()
    rate = raw_limit(f"{sim}/hooks/{hook}", secret, n, concurrency)
    used = {
        # Where the raw limit's CPU goes: the simulator, and the plain client (this process).
        "simulator_us_per_request": round((cpu_seconds(sim_pid) - cpu[0]) / n * 1e6, 1),
        "client_us_per_request": round(
            (cpu_seconds(os.getpid(), descendants=False) - cpu[1]) / n * 1e6, 1
        ),
        "machine_busy": round(busy_fraction(busy, machine_busy()), 3),
    }
    stats = httpx.get(f"{sim}/_sim/hooks/{hook}/stats").json()
    if stats["bad_signatures"] or stats["duplicates"] or stats["accepted"] != n:
        raise SystemExit(f"raw limit: the simulator counted {stats}")
    return rate, used


def vacuum_counts(database_url: str) -> dict[str, dict[str, int]]:
    """Autovacuum and autoanalyze passes so far, by table (delivery partitions by name)."""
    with psycopg.connect(libpq_url(database_url)) as conn:
        rows = conn.execute(
            "SELECT relname, autovacuum_count, autoanalyze_count FROM pg_stat_user_tables"
        ).fetchall()
    return {name: {"autovacuum": int(v), "autoanalyze": int(a)} for name, v, a in rows}


def settle(database_url: str) -> None:
    """What a bulk write leaves Postgres to do, done before the clock starts: the vacuum and
    analyze autovacuum would soon start on the freshly written rows, and a checkpoint of the
    pages they dirtied. The contacts of a broadcast are most often imported long before it;
    without this, a million-row import's aftermath ran through the first minute of the send.
    """
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) contact")
        conn.execute("VACUUM (ANALYZE) delivery")
        conn.execute("CHECKPOINT")


def fill_history(database_url: str, first: int, count: int) -> float:
    """``count`` more completed broadcasts of broadcast ``first``'s audience, their delivery
    rows written as sent (by SQL: what the table holds after they were sent). Returns seconds.
    """
    started = time.perf_counter()
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        for _ in range(count):
            conn.execute(
                """
                WITH b AS (
                    INSERT INTO broadcast (workspace_id, name, channel_id, origin, audience,
                                           content, send_at, status, snapshot_at, started_at,
                                           finished_at, part_day)
                    SELECT workspace_id, 'history', channel_id, origin, audience, content,
                           send_at, 'completed', now(), now(), now(), part_day
                    FROM broadcast WHERE id = %(first)s
                    RETURNING id, workspace_id, part_day
                )
                INSERT INTO delivery (workspace_id, broadcast_id, contact_id, address, status,
                                      attempts, provider_message_id, sent_at, part_day)
                SELECT b.workspace_id, b.id, d.contact_id, d.address, 'sent', 1,
                       'history-' || d.id, now(), b.part_day
                FROM b, delivery d WHERE d.broadcast_id = %(first)s
                """,
                {"first": first},
            )
        conn.execute("ANALYZE delivery")
    return time.perf_counter() - started


class FlameGraph(threading.Thread):
    """A py-spy flame graph (SVG) of one dispatcher worker process, 20 s from when a tenth of
    the audience was sent.
    """

    def __init__(self, dispatcher: int, stats_url: str, n: int, out: Path) -> None:
        super().__init__(daemon=True)
        self.dispatcher = dispatcher
        self.stats_url = stats_url
        self.n = n
        self.out = out
        self.made = False

    def run(self) -> None:
        spy = Path(sys.executable).parent / "py-spy"
        if not spy.exists():
            print("py-spy is not installed: no flame graph")
            return
        with contextlib.suppress(Exception):
            wait_for(
                "a tenth of the audience sent",
                lambda: httpx.get(self.stats_url).json()["accepted"] >= self.n // 10,
                timeout=600,
                every=0.2,
            )
            workers = _descendants(self.dispatcher)
            if not workers:
                return
            # The worker that has used the most CPU (not dramatiq's fork helpers or
            # multiprocessing's resource tracker).
            workers.sort(key=lambda pid: cpu_seconds(pid, descendants=False), reverse=True)
            self.out.parent.mkdir(parents=True, exist_ok=True)
            done = subprocess.run(
                [
                    str(spy),
                    "record",
                    "--duration",
                    "20",
                    "--rate",
                    "200",
                    "--format",
                    "flamegraph",
                    # Read without stopping the worker: the run being profiled is the one
                    # measured (py-spy stops a process for each sample by default).
                    "--nonblocking",
                    "--output",
                    str(self.out),
                    "--pid",
                    str(workers[0]),
                ],
                capture_output=True,
                check=False,
            )
            self.made = done.returncode == 0 and self.out.exists()
            if not self.made:
                print(f"no flame graph: py-spy said {done.stderr.decode(errors='replace')[-300:]}")
