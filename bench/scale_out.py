"""Past one machine: 1, 2 and 4 dispatcher groups, and two schedulers, on one Postgres and one
RabbitMQ.

A dispatcher group is one ``bcast dispatcher --processes P --threads T`` command with worker
processes of its own, as one machine would run it. Each run sends one broadcast, create ->
completed through the API (as ``bench.e2e`` does), and fails unless the provider accepted every
recipient exactly once. Reported for each run:

* recipients per second overall and per group, and whether every group sent from the start:
  each group serves its own metrics, read every half second (recipients it sent, batches it
  ran at once, when it first sent), and its CPU is read from /proc;
* what Postgres did per recipient: rows written (``pg_stat_user_tables``), WAL bytes
  (``pg_current_wal_lsn``, and by what wrote them: ``pg_walinspect``), transactions
  (``pg_stat_database``), statements (``pg_stat_statements``) and CPU;
* RabbitMQ messages per recipient: published by the schedulers and taken by the groups (their
  metrics).

Postgres is a private cluster (``bench.faults.servers.PrivatePostgres``) with
``pg_stat_statements`` loaded, so its WAL and CPU are this benchmark's alone; RabbitMQ is the
machine's, with a vhost of its own.

The groups share this machine's cores: more groups add no hardware here, so the figures show
what coordinating more dispatchers costs and where throughput flattens, not how far more
machines would go.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psycopg

from bench.common import (
    Children,
    Sample,
    bench_env,
    check_provider,
    completed,
    cpu_seconds,
    create_broadcast,
    import_contacts,
    metric,
    scrape,
    scratch_database,
    scratch_vhost,
    start_api,
    start_simulator,
    wait_for,
    webhook_channel,
)
from bench.e2e import Shape
from bench.faults.servers import PrivatePostgres
from bench.ports import free_port
from shared.db.engine import libpq_url
from shared.domain.channels import MAX_RATE_PER_SECOND

#: Settings of the private Postgres beyond the fault suite's: statement counts.
PG_SETTINGS = {"shared_preload_libraries": "pg_stat_statements"}
#: Postgres settings reported with the figures: they decide WAL volume and commit cost.
REPORTED_SETTINGS = (
    "shared_buffers",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_level",
    "wal_compression",
    "checkpoint_timeout",
    "max_wal_size",
    "autovacuum",
)
#: An idle backend reports its table and transaction counts within 10 s
#: (``PGSTAT_IDLE_INTERVAL``): the counts a run starts from are read this long after the
#: contact import, so none of the import's rows land in the run's.
STATS_SETTLE_SECONDS = 11.0
#: How often each group's and scheduler's metrics are read during a run.
SAMPLE_SECONDS = 0.5
#: The API is asked whether the broadcast completed (every 50 ms, as ``bench.e2e`` does) only
#: once the groups' metrics say this little time is left: its reads stay out of the counts.
FINAL_SECONDS = 1.0
#: Statements listed per run, most called first.
TOP_STATEMENTS = 8
#: Send rates the capacity model is worked out for (docs/scaling.md).
TARGET_RATES = (10_000, 50_000, 100_000)


@dataclass(frozen=True)
class Case:
    """One run: dispatcher groups (``bcast dispatcher`` commands), schedulers, and the
    channels the recipients are spread over (one broadcast each), each limited to ``rate``
    sends per second.
    """

    groups: int
    schedulers: int = 1
    channels: int = 1
    rate: float = MAX_RATE_PER_SECOND

    @property
    def name(self) -> str:
        name = (
            f"{self.groups} group{'s' if self.groups != 1 else ''}, "
            f"{self.schedulers} scheduler{'s' if self.schedulers != 1 else ''}"
        )
        if self.channels > 1:
            name += f", {self.channels} channels at {self.rate:g}/s"
        return name


#: The last case is what a provider's limits make of the load: many channels at a WhatsApp
#: number's default 80 sends per second, one broadcast each, instead of one unlimited channel.
CASES = (Case(1), Case(2), Case(4), Case(2, schedulers=2), Case(2, channels=25, rate=80))


def note(cores: int | None) -> str:
    """What the figures can and cannot say on the machine they were measured on."""
    return (
        f"every group, the schedulers, the API, Postgres, RabbitMQ and the simulator share this "
        f"machine's {cores or '?'} cores: more groups add no hardware here, so the runs show what "
        "coordinating more dispatchers costs and where throughput flattens, not how far more "
        "machines would go"
    )


def run(n: int, shape: Shape = Shape(), cases: Sequence[Case] = CASES) -> dict[str, Any]:
    """Every case with ``n`` recipients; returns the ``scale_out`` section of the results."""
    with PrivatePostgres(settings=PG_SETTINGS, prefix="bcast-scale-pg-") as pg:
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
            settings = {name: _show(conn, name) for name in REPORTED_SETTINGS}
            version = _show(conn, "server_version")
        runs = [run_case(pg, n, shape, case) for case in cases]
    first = runs[0]["per_second"]
    for r in runs:
        r["vs_first_run"] = round(r["per_second"] / first, 3)
    return {
        "recipients": n,
        "group": f"{shape.processes} processes x {shape.threads} threads",
        "note": note(os.cpu_count()),
        "postgres": {
            "server": f"private cluster, PostgreSQL {version.split()[0]}",
            "settings": settings,
        },
        "runs": runs,
    }


def _show(conn: psycopg.Connection[Any], name: str) -> str:
    row = conn.execute(f"SHOW {name}").fetchone()
    assert row is not None
    return str(row[0])


def run_case(pg: PrivatePostgres, n: int, shape: Shape, case: Case) -> dict[str, Any]:
    """One run on a fresh database of ``pg`` and a fresh vhost."""
    began = time.monotonic()
    n = n // case.channels * case.channels  # the same audience on every channel
    with scratch_database(pg.url()) as db_url, scratch_vhost() as vhost:
        env = bench_env(db_url, vhost)
        api_port = free_port()
        env["BCAST_API_PORT"] = str(api_port)
        env["BCAST_PUBLIC_URL"] = f"http://127.0.0.1:{api_port}"
        counters = PostgresCounters(pg, db_url)
        children = Children(env)
        try:
            result, before = _send(children, counters, n, shape, case, api_port)
        finally:
            # Every backend reports its last counts as it ends.
            stopping = time.monotonic()
            children.stop_all()
        result["stop_seconds"] = round(time.monotonic() - stopping, 1)
        result["postgres_per_recipient"] = counters.per_recipient(before, counters.read(), n)
        result["postgres_per_recipient"].update(result.pop("_postgres_now"))
        result["postgres_per_recipient"].update(counters.delivery_bytes(n))
    result["wall_seconds"] = round(time.monotonic() - began, 1)
    return result


def _send(
    children: Children,
    counters: PostgresCounters,
    n: int,
    shape: Shape,
    case: Case,
    api_port: int,
) -> tuple[dict[str, Any], Counts]:
    began = time.monotonic()
    sim = start_simulator(children)
    client, api_proc = start_api(children, f"http://127.0.0.1:{api_port}")
    hooks: dict[str, int] = {}
    for c in range(case.channels):
        hook, secret = f"bench-{c}", secrets.token_urlsafe(24)
        httpx.put(f"{sim}/_sim/hooks/{hook}", json={"secret": secret}).raise_for_status()
        channel_id, account_id = webhook_channel(
            client, f"{sim}/hooks/{hook}", secret, rate=case.rate, name=hook
        )
        import_contacts(client, account_id, n // case.channels, prefix=f"{c}-")
        hooks[hook] = channel_id
    imported = time.monotonic()

    scheduler_ports = [free_port() for _ in range(case.schedulers)]
    schedulers = [
        children.start(f"scheduler-{i}", "scheduler", "--metrics-port", str(port))
        for i, port in enumerate(scheduler_ports)
    ]
    group_ports = [free_port() for _ in range(case.groups)]
    groups = [
        children.start(
            f"dispatcher-{i}",
            "dispatcher",
            "--processes",
            str(shape.processes),
            "--threads",
            str(shape.threads),
            "--metrics-port",
            str(port),
        )
        for i, port in enumerate(group_ports)
    ]
    for i, port in enumerate(group_ports):
        # Every worker process has opened its runtime (and so consumes) before the clock
        # starts: a group still booting when the batches are handed out would get none.
        wait_for(
            f"the workers of dispatcher group {i}",
            _group_ready(children.logs / f"dispatcher-{i}.log", port, shape.processes),
            timeout=180,
            every=0.2,
        )
    time.sleep(max(0.0, STATS_SETTLE_SECONDS - (time.monotonic() - imported)))

    def cpu_now() -> dict[str, float]:
        return {
            "dispatchers": sum(cpu_seconds(g.pid) for g in groups),
            "schedulers": sum(cpu_seconds(s.pid) for s in schedulers),
            "api": cpu_seconds(api_proc.pid),
            "postgres": cpu_seconds(counters.postmaster, ended=True),
        }

    before = counters.read()
    counters.reset_statements()
    began_at = counters.lsn()
    cpu_before = cpu_now()
    group_cpu_before = [cpu_seconds(g.pid) for g in groups]
    sampler = Sampler(group_ports)
    setup_seconds = time.monotonic() - began
    created = time.perf_counter()
    broadcasts = [create_broadcast(client, channel_id) for channel_id in hooks.values()]
    sampler.start(created)
    try:
        wait_for(
            "the groups to send nearly every recipient",
            lambda: sampler.left_seconds(n) < FINAL_SECONDS,
            timeout=max(600, n / 200),
            every=0.05,
        )
        left = set(broadcasts)

        def all_completed() -> bool:
            left.difference_update([b for b in left if completed(client, b)])
            return not left

        wait_for("every broadcast to complete", all_completed, timeout=600, every=0.05)
        seconds = time.perf_counter() - created
    finally:
        sampler.stop()
    cpu = {name: v - cpu_before[name] for name, v in cpu_now().items()}
    group_cpu = [cpu_seconds(g.pid) - c for g, c in zip(groups, group_cpu_before, strict=True)]
    postgres_now = {**counters.wal(began_at, counters.lsn(), n), **counters.statements(n)}
    client.close()
    stats = {"accepted": 0, "duplicates": 0, "bad_signatures": 0}
    for hook in hooks:
        one = httpx.get(f"{sim}/_sim/hooks/{hook}/stats").json()
        check_provider(one, n // case.channels)
        for key in stats:
            stats[key] += int(one[key])
    finals = [scrape(port) or [] for port in group_ports]
    published = sum(
        metric(samples, "bcast_batches_published_total")
        + metric(samples, "bcast_outbox_published_total")
        for samples in (scrape(port) or [] for port in scheduler_ports)
    )
    per_group = [
        _group(finals[i], sampler, i, n, seconds, group_cpu[i]) for i in range(len(group_ports))
    ]
    taken = sum(metric(samples, "dramatiq_messages_total") for samples in finals)
    return {
        "name": case.name,
        "groups": case.groups,
        "schedulers": case.schedulers,
        "channels": case.channels,
        "channel_rate": case.rate,
        "recipients": n,
        "accepted": stats["accepted"],
        "duplicates": stats["duplicates"],
        "seconds": round(seconds, 2),
        "setup_seconds": round(setup_seconds, 1),
        "per_second": round(n / seconds, 1),
        "per_group": per_group,
        "idle_groups": sum(1 for g in per_group if g["sent"] == 0),
        "last_first_send_s": max((g["first_send_s"] or seconds) for g in per_group),
        "batches_done": sum(g["batch_runs"].get("done", 0) for g in per_group),
        "batch_runs": sum(sum(g["batch_runs"].values()) for g in per_group),
        "cpu_us_per_recipient": {name: round(v / n * 1e6, 1) for name, v in cpu.items()},
        "rabbitmq_per_recipient": {
            "published_by_schedulers": round(published / n, 5),
            "taken_by_dispatchers": round(taken / n, 5),
        },
        "_postgres_now": postgres_now,
    }, before


def _group(
    samples: list[Sample], sampler: Sampler, i: int, n: int, seconds: float, cpu: float
) -> dict[str, Any]:
    sent = metric(samples, "bcast_deliveries_total", outcome="sent")
    calls = metric(samples, "bcast_channel_sends_total")
    ends: dict[str, int] = {}
    for s in samples:
        if s.name == "bcast_batch_runs_ended_total" and s.value:
            ends[s.labels["reason"]] = ends.get(s.labels["reason"], 0) + int(s.value)
    first = sampler.first_send[i]
    return {
        "sent": int(sent),
        "provider_calls": int(calls),
        "share": round(sent / n, 3),
        "per_second": round(sent / seconds, 1),
        "first_send_s": None if first is None else round(first, 2),
        "most_batches_at_once": sampler.most_batches[i],
        "batch_runs": ends,
        "messages_taken": int(metric(samples, "dramatiq_messages_total")),
        "cpu_us_per_send": round(cpu / sent * 1e6, 1) if sent else None,
    }


def _group_ready(log: Path, port: int, processes: int) -> Callable[[], bool]:
    """Whether every worker process of a group opened its runtime, and its metrics answer."""

    def ready() -> bool:
        try:
            opened = log.read_text(errors="replace").count("dispatcher runtime open")
        except FileNotFoundError:
            return False
        return opened >= processes and scrape(port) is not None

    return ready


# --- metrics -----------------------------------------------------------------------------------


class Sampler:
    """Reads every group's metrics every ``SAMPLE_SECONDS`` during a run: recipients sent,
    when each group first sent, and the most batches each ran at once.

    Parameters:
      ports: the groups' metrics ports.
    """

    def __init__(self, ports: Sequence[int]) -> None:
        self.ports = list(ports)
        self.first_send: list[float | None] = [None] * len(self.ports)
        self.most_batches = [0] * len(self.ports)
        self.last_sent = [0.0] * len(self.ports)
        self._history: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._began = 0.0

    def start(self, began: float) -> None:
        """Start sampling; times are seconds from ``began`` (a ``perf_counter`` reading)."""
        self._began = began
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def left_seconds(self, n: int) -> float:
        """Seconds until ``n`` recipients are sent at the latest rate seen (inf before any)."""
        if len(self._history) < 2:
            return math.inf
        (t0, sent0), (t1, sent1) = self._history[-2], self._history[-1]
        if sent1 >= n:
            return 0.0
        rate = (sent1 - sent0) / max(1e-6, t1 - t0)
        return (n - sent1) / rate if rate > 0 else math.inf

    def _watch(self) -> None:
        while True:
            now = time.perf_counter() - self._began
            for i, port in enumerate(self.ports):
                samples = scrape(port)
                if samples is None:
                    continue
                sent = metric(samples, "bcast_deliveries_total", outcome="sent")
                if sent and self.first_send[i] is None:
                    self.first_send[i] = now
                self.last_sent[i] = sent
                self.most_batches[i] = max(
                    self.most_batches[i], int(metric(samples, "bcast_batch_runs"))
                )
            self._history.append((now, sum(self.last_sent)))
            if self._stop.wait(SAMPLE_SECONDS):
                return


# --- Postgres ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    """Cumulative counts of one database and its cluster at one moment."""

    #: Table -> (rows inserted, updated, deleted, updated in place (HOT)).
    tables: Mapping[str, tuple[int, int, int, int]]
    commits: int
    rollbacks: int
    #: Cluster-wide (the cluster is this benchmark's alone): WAL records, full-page images.
    wal_records: int
    wal_fpi: int


class PostgresCounters:
    """What Postgres did for a run, from its statistics views.

    Parameters:
      pg: the private cluster.
      db_url: the run's database on it.
    """

    def __init__(self, pg: PrivatePostgres, db_url: str) -> None:
        self.admin = pg.url()
        self.db = libpq_url(db_url)
        self.db_name = db_url.rsplit("/", 1)[1]
        self.postmaster = pg.postmaster_pid()

    def read(self) -> Counts:
        with psycopg.connect(self.db, autocommit=True) as conn:
            tables = {
                str(r[0]): (int(r[1]), int(r[2]), int(r[3]), int(r[4]))
                for r in conn.execute(
                    "SELECT relname, n_tup_ins, n_tup_upd, n_tup_del, n_tup_hot_upd "
                    "FROM pg_stat_user_tables"
                )
            }
            db = conn.execute(
                "SELECT xact_commit, xact_rollback FROM pg_stat_database "
                "WHERE datname = current_database()"
            ).fetchone()
            wal = conn.execute("SELECT wal_records, wal_fpi FROM pg_stat_wal").fetchone()
        assert db is not None
        assert wal is not None
        return Counts(tables, int(db[0]), int(db[1]), int(wal[0]), int(wal[1]))

    def delivery_bytes(self, n: int) -> dict[str, float]:
        """Disk the ``delivery`` table takes per recipient: its rows (with the versions the
        send's updates left for vacuum) and its indexes.
        """
        with psycopg.connect(self.db, autocommit=True) as conn:
            # ``delivery`` is partitioned: its rows and indexes are its partitions'.
            row = conn.execute(
                "SELECT coalesce(sum(pg_table_size(i.inhrelid)), 0), "
                "coalesce(sum(pg_indexes_size(i.inhrelid)), 0) "
                "FROM pg_inherits i WHERE i.inhparent = 'delivery'::regclass"
            ).fetchone()
        assert row is not None
        return {
            "delivery_bytes": round((int(row[0]) + int(row[1])) / n, 1),
            "delivery_table_bytes": round(int(row[0]) / n, 1),
            "delivery_index_bytes": round(int(row[1]) / n, 1),
        }

    def lsn(self) -> str:
        with psycopg.connect(self.admin, autocommit=True) as conn:
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        return str(row[0])

    def wal(self, start: str, end: str, n: int) -> dict[str, Any]:
        """WAL bytes written between two positions, per recipient: in all, and by what wrote
        them (``pg_walinspect``'s resource managers: Heap, Btree, Transaction, ...).
        """
        with psycopg.connect(self.admin, autocommit=True) as conn:
            row = conn.execute(
                "SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)", (end, start)
            ).fetchone()
            # Columns: resource manager, count, %, record size, %, FPI size, %, combined, %.
            kinds = sorted(
                (
                    (str(k[0]), int(k[7]), int(k[5]))
                    for k in conn.execute(
                        "SELECT * FROM pg_get_wal_stats(%s::pg_lsn, %s::pg_lsn)", (start, end)
                    ).fetchall()
                    if k[7]
                ),
                key=lambda k: -k[1],
            )
        assert row is not None
        return {
            "wal_bytes": round(float(row[0]) / n, 1),
            "wal_bytes_by_kind": {k[0]: round(k[1] / n, 1) for k in kinds},
            "wal_full_page_image_bytes": round(sum(k[2] for k in kinds) / n, 1),
        }

    def reset_statements(self) -> None:
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_statements_reset()")

    def statements(self, n: int) -> dict[str, Any]:
        """Statements the run's database ran since the reset, per recipient, and the most
        called ones (calls per 1,000 recipients).
        """
        with psycopg.connect(self.admin, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT calls, rows, total_exec_time, query FROM pg_stat_statements "
                "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = %s) "
                "ORDER BY calls DESC",
                (self.db_name,),
            ).fetchall()
        calls = sum(int(r[0]) for r in rows)
        return {
            "statements": round(calls / n, 4),
            "statement_ms": round(sum(float(r[2]) for r in rows) / n, 4),
            "top_statements": [
                {
                    "per_1000": round(int(r[0]) / n * 1000, 2),
                    "rows_per_call": round(int(r[1]) / max(1, int(r[0])), 1),
                    "mean_ms": round(float(r[2]) / max(1, int(r[0])), 3),
                    "query": _shorten(str(r[3])),
                }
                for r in rows[:TOP_STATEMENTS]
            ],
        }

    @staticmethod
    def per_recipient(before: Counts, after: Counts, n: int) -> dict[str, Any]:
        """Rows written, transactions and WAL records between two readings, per recipient."""
        deltas = {
            table: tuple(
                a - b for a, b in zip(counts, before.tables.get(table, (0, 0, 0, 0)), strict=True)
            )
            for table, counts in after.tables.items()
        }
        written = {t: d for t, d in deltas.items() if any(d[:3])}
        inserted = sum(d[0] for d in written.values())
        updated = sum(d[1] for d in written.values())
        deleted = sum(d[2] for d in written.values())
        return {
            "rows_written": round((inserted + updated + deleted) / n, 4),
            "rows_inserted": round(inserted / n, 4),
            "rows_updated": round(updated / n, 4),
            "rows_deleted": round(deleted / n, 4),
            "hot_update_share": round(sum(d[3] for d in written.values()) / max(1, updated), 3),
            "transactions": round(
                (after.commits - before.commits + after.rollbacks - before.rollbacks) / n, 4
            ),
            "wal_records": round((after.wal_records - before.wal_records) / n, 2),
            "wal_full_page_images": round((after.wal_fpi - before.wal_fpi) / n, 4),
            "tables": {
                t: {"inserted": d[0], "updated": d[1], "deleted": d[2]}
                for t, d in sorted(written.items())
            },
        }


def _shorten(query: str, width: int = 110) -> str:
    text = re.sub(r"\s+", " ", query).strip()
    return text if len(text) <= width else text[: width - 3] + "..."


# --- what the figures say (docs/scaling.md) ----------------------------------------------------


def runs_table(scaled: Mapping[str, Any]) -> str:
    """Every run side by side, as docs/scaling.md shows them."""
    runs = scaled["runs"]
    header = "| | " + " | ".join(r["name"] for r in runs) + " |"

    def row(label: str, cells: Sequence[str]) -> str:
        return f"| {label} | " + " | ".join(cells) + " |"

    def pg(key: str, fmt: str) -> list[str]:
        return [format(r["postgres_per_recipient"][key], fmt) for r in runs]

    def cpu(key: str) -> list[str]:
        return [f"{r['cpu_us_per_recipient'][key]:,.0f}" for r in runs]

    return "\n".join(
        [
            header,
            "| --- |" + " ---: |" * len(runs),
            row("create -> completed", [f"{r['seconds']:.1f} s" for r in runs]),
            row("recipients / s", [f"{r['per_second']:,.0f}" for r in runs]),
            row(
                "of the first run (or: the channels' limits)",
                [
                    f"{r['vs_first_run']:.2f}"
                    if r.get("channels", 1) == 1
                    else f"({r['channels'] * r['channel_rate']:,.0f}/s)"
                    for r in runs
                ],
            ),
            row(
                "recipients / s by group",
                [" / ".join(f"{g['per_second']:,.0f}" for g in r["per_group"]) for r in runs],
            ),
            row(
                "first send by group (s after create)",
                [
                    " / ".join(
                        "-" if g["first_send_s"] is None else f"{g['first_send_s']:.1f}"
                        for g in r["per_group"]
                    )
                    for r in runs
                ],
            ),
            row(
                "most batches running at once by group",
                [" / ".join(str(g["most_batches_at_once"]) for g in r["per_group"]) for r in runs],
            ),
            row("groups that sent nothing", [str(r["idle_groups"]) for r in runs]),
            row("batch runs / batches", [f"{r['batch_runs']} / {r['batches_done']}" for r in runs]),
            row("Postgres rows written / recipient", pg("rows_written", ".2f")),
            row(
                "of which delivery rows updated",
                [
                    f"{_delivery_updates(r['postgres_per_recipient']['tables']) / r['recipients']:.2f}"
                    for r in runs
                ],
            ),
            row("WAL bytes / recipient", pg("wal_bytes", ",.0f")),
            row(
                "of which (pg_walinspect)",
                [
                    ", ".join(
                        f"{kind} {size:,.0f}"
                        for kind, size in sorted(
                            r["postgres_per_recipient"]["wal_bytes_by_kind"].items(),
                            key=lambda item: -float(item[1]),
                        )[:3]
                    )
                    for r in runs
                ],
            ),
            row("WAL full-page images / recipient", pg("wal_full_page_images", ".4f")),
            row(
                "delivery table + indexes, bytes / recipient",
                [
                    f"{r['postgres_per_recipient'].get('delivery_table_bytes', 0):,.0f} + "
                    f"{r['postgres_per_recipient'].get('delivery_index_bytes', 0):,.0f}"
                    for r in runs
                ],
            ),
            row("transactions / recipient", pg("transactions", ".3f")),
            row("statements / recipient", pg("statements", ".3f")),
            row("Postgres CPU µs / recipient", cpu("postgres")),
            row("dispatcher CPU µs / recipient (all groups)", cpu("dispatchers")),
            row("scheduler CPU µs / recipient", cpu("schedulers")),
            row(
                "RabbitMQ messages / recipient (published / taken)",
                [
                    f"{r['rabbitmq_per_recipient']['published_by_schedulers']:.4f} / "
                    f"{r['rabbitmq_per_recipient']['taken_by_dispatchers']:.4f}"
                    for r in runs
                ],
            ),
        ]
    )


#: (label, where in a run, unit at a rate) of each cost the capacity model carries to the
#: target rates.
COSTS = (
    ("rows written", ("postgres_per_recipient", "rows_written"), "rows/s"),
    ("WAL bytes", ("postgres_per_recipient", "wal_bytes"), "bytes"),
    ("delivery table + indexes bytes", ("postgres_per_recipient", "delivery_bytes"), "stored"),
    ("transactions", ("postgres_per_recipient", "transactions"), "/s"),
    ("statements", ("postgres_per_recipient", "statements"), "/s"),
    ("Postgres CPU µs", ("cpu_us_per_recipient", "postgres"), "cores"),
    ("dispatcher CPU µs", ("cpu_us_per_recipient", "dispatchers"), "cores"),
    ("RabbitMQ messages", ("rabbitmq_per_recipient", "taken_by_dispatchers"), "/s"),
)


def capacity(scaled: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each cost per recipient at its costliest run, carried to ``TARGET_RATES``."""
    out = []
    for label, (group, key), unit in COSTS:
        worst = max(scaled["runs"], key=_cost(group, key))
        per = float(worst[group][key])
        out.append(
            {
                "label": label,
                "key": f"scale_out.runs[].{group}.{key}",
                "run": worst["name"],
                "per_recipient": per,
                "unit": unit,
                "at": {rate: per * rate / (1e6 if unit == "cores" else 1) for rate in TARGET_RATES},
            }
        )
    return out


def _cost(group: str, key: str) -> Callable[[Mapping[str, Any]], float]:
    def cost(run: Mapping[str, Any]) -> float:
        return float(run[group][key])

    return cost


def capacity_table(scaled: Mapping[str, Any]) -> str:
    """The capacity model's table: measured cost per recipient, and what it comes to at each
    target rate (linear: nothing here was measured at those rates).
    """

    def amount(value: float, unit: str) -> str:
        if unit == "bytes":
            return f"{value / 1e6:,.1f} MB/s ({value * 3600 / 1e9:,.0f} GB/h)"
        if unit == "stored":
            return f"{value * 86400 / 1e12:,.2f} TB/day"
        if unit == "cores":
            return f"{value:,.1f} cores"
        return f"{value:,.0f}{'' if unit.startswith('/') else ' '}{unit}"

    rows = [
        "| per recipient (costliest run; key in `bench/results/latest.json`) | measured | "
        + " | ".join(f"at {rate:,}/s" for rate in TARGET_RATES)
        + " |",
        "| --- | ---: |" + " ---: |" * len(TARGET_RATES),
    ]
    for c in capacity(scaled):
        per = c["per_recipient"]
        measured = f"{per:,.0f}" if per >= 100 else f"{per:.4g}"
        rows.append(
            f"| {c['label']} (`{c['key']}`, {c['run']}) | {measured} | "
            + " | ".join(amount(c["at"][rate], c["unit"]) for rate in TARGET_RATES)
            + " |"
        )
    return "\n".join(rows)


def _delivery_updates(tables: dict[str, dict[str, int]]) -> int:
    """Rows updated in ``delivery``: in its partitions (``delivery_p<day>``)."""
    return sum(
        counts.get("updated", 0)
        for name, counts in tables.items()
        if name == "delivery" or name.startswith("delivery_p")
    )
