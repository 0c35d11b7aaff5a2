"""The naive design on the same audience: one dramatiq message per recipient, a synchronous
HTTP call in the actor.

What a first implementation would be: a producer copies the audience into delivery rows (one
``INSERT ... SELECT ... RETURNING id``) and enqueues one message per row; dramatiq workers load
their row, POST it with a keep-alive ``requests`` session and write the answer back with one
UPDATE (``bench.naive_worker``). Everything else is what ``bench.e2e`` gives bcast's pipeline:
the same schema, the same audience (a webhook channel and ``n`` contacts imported through the
API's CSV import, one broadcast created through the API), the same simulator route, bodies
signed as bcast's webhook adapter signs them with the delivery id as idempotency key, and
workers of the same shape as its dispatchers (``Shape``: processes x threads).

Timed from the start of the producer (copy and enqueue included) to the last row final (the
broadcast ``completed``); the run fails unless the provider accepted every recipient exactly
once with no bad signature. ``compared`` adds bcast's pipeline rate on an audience of the same
size, measured in the same run, and the speed-up.
"""

from __future__ import annotations

import contextlib
import secrets
import sys
import time
from datetime import UTC, datetime
from typing import Any

import httpx2 as httpx
import pika
import pika.exceptions
import psycopg
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from sqlalchemy import Engine, func, insert, literal, update

from bench.common import (
    Children,
    bench_system,
    cpu_seconds,
    ok,
    start_api,
    start_simulator,
    wait_for,
)
from bench.e2e import PeakRss, Shape, pids_named, webhook_audience
from bench.naive_worker import QUEUE, send_message
from shared import delivery_partitions
from shared import delivery_store as store
from shared.db.engine import libpq_url, make_engine
from shared.db.models import Broadcast, Contact, Delivery
from shared.domain.audience import AudienceSpec, audience_query
from shared.domain.lifecycle import BroadcastStatus

WORKER = [sys.executable, "-m", "dramatiq"]


def run(n: int, shape: Shape = Shape()) -> dict[str, Any]:
    """One run of the naive design on ``n`` recipients; returns the ``naive`` section of the
    results without the comparison (see ``compared``).
    """
    with bench_system() as (children, env, api):
        return _run(children, env, n, shape, api)


def compared(naive: dict[str, Any], pipeline: dict[str, Any]) -> dict[str, Any]:
    """The ``naive`` section with bcast's pipeline rate on the same audience (an ``e2e``
    section) and the speed-up: the pipeline's unique accepted sends per second over the naive
    design's.
    """
    if naive["recipients"] != pipeline["recipients"]:
        raise ValueError(
            f"the naive design sent to {naive['recipients']:,} recipients and the pipeline to "
            f"{pipeline['recipients']:,}: compare runs of the same audience size"
        )
    return {
        **naive,
        "e2e_per_second": pipeline["per_second"],
        "speedup": round(pipeline["per_second"] / naive["per_second"], 2),
    }


def _run(children: Children, env: dict[str, str], n: int, shape: Shape, api: str) -> dict[str, Any]:
    db_url, broker_url = env["BCAST_DATABASE_URL"], env["BCAST_BROKER_URL"]
    sim = start_simulator(children)
    secret = secrets.token_urlsafe(24)
    httpx.put(f"{sim}/_sim/hooks/naive", json={"secret": secret}).raise_for_status()
    client, _api = start_api(children, api)
    channel_id, import_seconds = webhook_audience(client, f"{sim}/hooks/naive", secret, n)
    broadcast = ok(
        client.post(
            "/v1/broadcasts",
            json={
                "name": "naive",
                "channel_id": channel_id,
                "audience": {},
                "content": {"text": "bench"},
            },
        )
    )
    client.close()

    workers = children.start(
        "naive-workers",
        "bench.naive_worker:broker",
        "--processes",
        str(shape.processes),
        "--threads",
        str(shape.threads),
        program=WORKER,
    )
    wait_for(
        "the naive workers", lambda: _consumers(broker_url, QUEUE) >= shape.processes, every=0.2
    )
    time.sleep(1)  # every worker thread has its connections before the clock starts

    with Timed(db_url, broadcast["id"], workers.pid) as timed:
        ids = _copy_audience(timed.engine, broadcast["id"])
        timed.copied = time.perf_counter()
        _enqueue(broker_url, ids)
        timed.produced()
        timed.wait(timeout=max(600.0, n / 50))
    stats = httpx.get(f"{sim}/_sim/hooks/naive/stats").json()
    accepted, duplicates, bad = stats["accepted"], stats["duplicates"], stats["bad_signatures"]
    if accepted != n or duplicates or bad or timed.sent != n:
        raise SystemExit(
            f"naive: the provider accepted {accepted} of {n} (duplicates {duplicates}, bad "
            f"signatures {bad}); rows sent {timed.sent}, failed {timed.failed}"
        )
    per_second = n / timed.seconds
    return {
        "recipients": n,
        "accepted": accepted,
        "duplicates": duplicates,
        "bad_signatures": bad,
        "seconds": round(timed.seconds, 2),
        "per_second": round(per_second, 1),
        "copy_seconds": round(timed.copied - timed.started, 2),
        "enqueue_seconds": round(timed.enqueued - timed.copied, 2),
        "import_seconds": round(import_seconds, 2),
        "workers": f"{shape.processes} processes x {shape.threads} threads",
        "http_client": "requests",
        "cpu_us_per_recipient": {name: round(v / n * 1e6, 1) for name, v in timed.cpu.items()},
        "workers_peak_rss_mib": round(timed.rss.peak, 1),
    }


class Timed:
    """One timed send: the clock, the CPU of the workers, Postgres, RabbitMQ and the producer
    (this process, while it copies and enqueues), and the workers' peak memory. ``wait``
    returns once the broadcast is ``completed``, that is once every row is final.

    Parameters:
      db_url: the database's plain URL.
      broadcast_id: the broadcast being sent.
      workers: the pid of the dramatiq main process.
    """

    def __init__(self, db_url: str, broadcast_id: int, workers: int) -> None:
        self.broadcast_id = broadcast_id
        self.workers = workers
        self.engine = make_engine(db_url, pool_size=1)
        self.db = psycopg.connect(libpq_url(db_url), autocommit=True)
        self.rss = PeakRss(workers)
        self.started = self.copied = self.enqueued = self.seconds = 0.0
        self.producer_cpu = 0.0
        self.cpu: dict[str, float] = {}
        self.sent = self.failed = 0
        self._cpu_before: dict[str, dict[int, float]] = {}

    def __enter__(self) -> Timed:
        self._cpu_before = self._cpu_now()
        self.rss.__enter__()
        self.started, self.producer_cpu = time.perf_counter(), time.process_time()
        return self

    def produced(self) -> None:
        """Every message is enqueued: the producer's part ends here."""
        self.enqueued = time.perf_counter()
        self.producer_cpu = time.process_time() - self.producer_cpu

    def wait(self, timeout: float) -> None:
        def completed() -> bool:
            row = self.db.execute(
                "SELECT status FROM broadcast WHERE id = %s", (self.broadcast_id,)
            ).fetchone()
            return row is not None and row[0] == BroadcastStatus.COMPLETED

        wait_for("the last row to be final", completed, timeout=timeout, every=0.05)
        self.seconds = time.perf_counter() - self.started

    def __exit__(self, *exc: object) -> None:
        try:
            self.rss.__exit__(*exc)
            after = self._cpu_now()
            self.cpu = {name: _cpu_spent(self._cpu_before[name], after[name]) for name in after}
            self.cpu["producer"] = self.producer_cpu
            self.sent, self.failed = self.db.execute(
                "SELECT count(*) FILTER (WHERE status = 'sent'), "
                "count(*) FILTER (WHERE status = 'failed') FROM delivery WHERE broadcast_id = %s",
                (self.broadcast_id,),
            ).fetchone() or (0, 0)
        finally:
            self.db.close()
            self.engine.dispose()

    def _cpu_now(self) -> dict[str, dict[int, float]]:
        return {
            "workers": {self.workers: cpu_seconds(self.workers)},
            "postgres": _cpu_by_pid("postgres"),
            "rabbitmq": _cpu_by_pid("beam.smp"),
        }


PARTITION_DAYS = 7


def _copy_audience(engine: Engine, broadcast_id: int) -> list[int]:
    """Start the broadcast: its audience copied into delivery rows in one transaction, the way
    the schema records a broadcast being sent. Returns the rows' ids.
    """
    day = datetime.now(UTC).date()
    # The delivery partition of the day, as the dispatcher's copy makes sure of it.
    with psycopg.connect(libpq_url(engine.url.render_as_string(hide_password=False))) as conn:
        store.run(conn, delivery_partitions.ensure(day, PARTITION_DAYS))
    with engine.begin() as conn:
        task = conn.execute(
            update(Broadcast)
            .where(Broadcast.id == broadcast_id)
            .values(status=BroadcastStatus.IN_PROGRESS, started_at=func.now(), part_day=day)
            .returning(Broadcast.workspace_id, Broadcast.channel_id, Broadcast.audience)
        ).one()
        audience = audience_query(
            task.workspace_id, task.channel_id, AudienceSpec.model_validate(task.audience)
        ).with_only_columns(
            literal(task.workspace_id),
            literal(broadcast_id),
            Contact.id,
            Contact.address,
            literal(day),
        )
        ids = list(
            conn.execute(
                insert(Delivery)
                .from_select(
                    ["workspace_id", "broadcast_id", "contact_id", "address", "part_day"], audience
                )
                .returning(Delivery.id)
            ).scalars()
        )
        conn.execute(
            update(Broadcast).where(Broadcast.id == broadcast_id).values(snapshot_at=func.now())
        )
    return ids


def _cpu_by_pid(name: str) -> dict[int, float]:
    return {pid: cpu_seconds(pid, descendants=False) for pid in pids_named(name)}


def _cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two readings by the processes alive at the second (one that
    started in between counts whole; one that ended in between is not seen).
    """
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def _enqueue(broker_url: str, ids: list[int]) -> None:
    """One message per recipient, as ``send_one.send(delivery_id)`` in a loop enqueues them."""
    broker = RabbitmqBroker(url=broker_url)
    try:
        for delivery_id in ids:
            broker.enqueue(send_message(delivery_id))
    finally:
        broker.close()


def _consumers(broker_url: str, queue: str) -> int:
    """Consumers on ``queue`` (0 while it does not exist)."""
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        declared = connection.channel().queue_declare(queue, passive=True)
        return int(declared.method.consumer_count)
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        with contextlib.suppress(Exception):  # closing a connection the broker closed
            connection.close()
