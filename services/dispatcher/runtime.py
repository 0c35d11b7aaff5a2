"""What a dispatcher process shares, opened when its worker boots and closed when it stops.

One asyncio loop in its own thread holds the Postgres pool (a fixed number of connections,
whatever the thread count, and one more for copies of small audiences), the HTTP keep-alive
pool, the status board, the rate limiter, one
lane per channel, the process's call pool and the engine that runs batches. dramatiq's worker
threads hand their work (a batch to run, an audience to copy) to this loop and are free again
at once.

``RuntimeMiddleware`` opens it in ``after_worker_boot`` and closes it in
``before_worker_shutdown``: every batch is given back, every SMTP connection QUITs, the HTTP
session and the pools close.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import dramatiq
from psycopg_pool import AsyncConnectionPool

from services.dispatcher import metrics
from services.dispatcher.channels.base import ChannelAdapter
from services.dispatcher.channels.client import HttpClient
from services.dispatcher.channels.http import make_client
from services.dispatcher.engine import Engine
from services.dispatcher.jobs import Job
from services.dispatcher.lease import LeaseKeeper
from services.dispatcher.pacing import CallPool, Lane
from services.dispatcher.ratelimit import RateLimiter, SlotCache
from services.dispatcher.recorder import ResultGroups
from services.dispatcher.status import StatusBoard
from shared import heartbeat
from shared.broker import quiet_dropped_connections
from shared.db.engine import libpq_url
from shared.egress import Egress
from shared.logsafe import error_text
from shared.media_store import MediaStore, make_media_store
from shared.secrets_box import SecretsBox
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)

T = TypeVar("T")
#: How long a stopping process waits for its runs to give their batches back.
STOP_SECONDS = 20.0
#: Exit code of a worker process that could not open its runtime (dramatiq's own code for a
#: connection that failed at boot).
BOOT_FAILED = 3
#: How long an interrupted actor's coroutine may take to give back what it holds.
CLEANUP_SECONDS = 15.0
WAIT_SLICE = 0.25
#: Copies of large audiences one process makes at once (each holds a pool connection while it
#: runs).
COPIES_AT_ONCE = 1
#: Copies of groups of small audiences one process makes at once, besides the large ones (each
#: on a connection of its own, outside the pool: a group's copy is short by design).
GROUPS_AT_ONCE = 1
#: Young-generation collection threshold. Each send allocates tasks, futures and buffers that
#: are almost all freed by reference counting; the default (700) runs the cycle collector
#: every few sends and cost a seventh of the send loop's time.
GC_THRESHOLD = (50_000, 20, 100)
#: The newest channels whose series a worker makes at start (with those that have work).
RECENT_CHANNELS = 100


class RuntimeClosed(Exception):
    """The runtime is not open (the worker is booting or stopping)."""


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (it costs less CPU per send), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class Runtime:
    """Parameters:
    settings: the process settings.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.conninfo = libpq_url(settings.database_url)
        self.loop = _new_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="bcast-io", daemon=True)
        self._adapters: dict[tuple[int, str], ChannelAdapter] = {}
        self._lanes: dict[int, Lane] = {}
        self._slots: dict[int, SlotCache] = {}
        #: Results of the runs of each task, written together.
        self.results = ResultGroups()
        self.media: MediaStore = make_media_store(settings)
        #: Where channels may connect (public addresses only, unless the settings allow more).
        self.egress = Egress(allow_private=settings.allow_private_targets)
        #: Opens channel secrets and signing keys (see jobs.load_job).
        self.secrets = SecretsBox.from_settings(settings)
        self.closed = True
        #: Names of the process's dramatiq threads that died (set by the middleware that
        #: opens the runtime in a worker; None elsewhere): while any, no heartbeat.
        self.dead_threads: Callable[[], list[str]] | None = None

    def open(self) -> None:
        self._thread.start()
        self.closed = False
        self.call(self._open())

    async def _open(self) -> None:
        size = self.settings.dispatcher_db_connections
        self.pool = AsyncConnectionPool(
            self.conninfo,
            min_size=size,
            max_size=size,
            kwargs={"autocommit": True, "application_name": "bcast-dispatcher"},
            open=False,
        )
        await self.pool.open(wait=True, timeout=self.settings.dispatcher_open_timeout_seconds)
        # Copies of small audiences have a connection of their own: timed sends due by the
        # thousand are not queued behind the statements of every run, nor behind a large copy.
        self.group_pool = AsyncConnectionPool(
            self.conninfo,
            min_size=1,
            max_size=GROUPS_AT_ONCE,
            kwargs={"autocommit": True, "application_name": "bcast-dispatcher-copy"},
            open=False,
        )
        await self.group_pool.open(wait=True, timeout=self.settings.dispatcher_open_timeout_seconds)
        self.http = make_client(
            self.egress,
            max_in_flight=self.settings.max_in_flight,
            timeout_seconds=self.settings.send_timeout_seconds,
        )
        self.calls = CallPool(self.settings.max_in_flight)
        self.calls.on_pressure = self.results.flush_soon
        self.status = StatusBoard(self.conninfo, self.pool)
        await self.status.start()
        self.limiter = RateLimiter(self.pool)
        self.status.on_channel_notice = self.limiter.hear
        self.leases = LeaseKeeper(self)
        self.leases.start()
        self.engine = Engine(
            self, self.settings.dispatcher_max_batches, COPIES_AT_ONCE, GROUPS_AT_ONCE
        )
        self._beating = asyncio.create_task(self._beat())
        await self._init_channels()

    async def _init_channels(self) -> None:
        """Per-channel series at 0 from the start for the channels likely to send soon: those
        with a broadcast being sent or due within the hour, and the ``RECENT_CHANNELS``
        newest. After a restart or a scale-up their first results read as a rise in
        ``rate()`` (a series that appears with its first results shows none). Bounded: any
        other channel gets its series when this process first sends for it.
        """
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(
                    """
                    SELECT id, kind FROM channel WHERE id IN (
                        SELECT channel_id FROM broadcast WHERE status = 'in_progress'
                        UNION
                        SELECT channel_id FROM broadcast
                        WHERE status = 'pending' AND send_at < now() + interval '1 hour'
                    )
                    UNION
                    (SELECT id, kind FROM channel ORDER BY id DESC LIMIT %s)
                    """,
                    (RECENT_CHANNELS,),
                )
                channels = await cur.fetchall()
        except Exception as exc:
            log.warning("channel series not made at start: %s", error_text(exc))
            return
        for channel_id, kind in channels:
            metrics.init_channel(channel_id, kind)

    async def _beat(self) -> None:
        """The process's heartbeat, from the loop that runs every batch: it stops when the
        loop does (a blocking call, a stopped process), whatever the metrics server says.
        """
        while True:
            dead = self.dead_threads() if self.dead_threads is not None else []
            if dead:
                # dramatiq's consumer or worker threads that died take no more messages: the
                # process is not alive for its work, whatever its loop does; the probe says so.
                log.error(
                    "dispatcher threads died (%s): no heartbeat until the process is restarted",
                    ", ".join(dead),
                )
            else:
                heartbeat.beat(self.settings.heartbeat_dir, "dispatcher")
            await asyncio.sleep(heartbeat.BEAT_SECONDS)

    def adapter(
        self,
        channel_id: int,
        kind: str,
        config: dict[str, Any],
        make: Callable[[str, dict[str, Any], HttpClient, MediaStore, Egress], ChannelAdapter],
    ) -> ChannelAdapter:
        """One adapter per channel and config, reused by every run of the process."""
        key = (channel_id, json.dumps(config, sort_keys=True))
        adapter = self._adapters.get(key)
        if adapter is None:
            adapter = self._adapters[key] = make(kind, config, self.http, self.media, self.egress)
        return adapter

    def lane(self, job: Job) -> Lane:
        """The channel's share of this process."""
        cap = self.settings.channel_max_in_flight
        if job.adapter.max_in_flight is not None:
            cap = min(cap, job.adapter.max_in_flight)
        lane = self._lanes.get(job.channel_id)
        if lane is None:
            metrics.init_channel(job.channel_id, job.kind)
            lane = self._lanes[job.channel_id] = Lane(job.channel_id, cap)
        elif lane.size != cap:
            lane.size = cap
        return lane

    def slots(self, job: Job) -> SlotCache:
        """The channel's rate-limit slots this process took ahead."""
        cache = self._slots.get(job.channel_id)
        if cache is None:
            cache = self._slots[job.channel_id] = SlotCache(
                self.limiter, job.channel_id, job.workspace_id, job.kind
            )
        return cache

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for it. If the waiting thread is interrupted
        (dramatiq's time limit or shutdown notice), the coroutine is cancelled and given up to
        ``CLEANUP_SECONDS`` to give back what it holds before the interruption goes on.
        """
        if self.closed:
            coro.close()
            raise RuntimeClosed("the dispatcher runtime is not open")
        finished = threading.Event()

        async def run() -> T:
            try:
                return await coro
            finally:
                finished.set()

        future: Future[T] = asyncio.run_coroutine_threadsafe(run(), self.loop)
        try:
            while True:
                # Short waits: dramatiq interrupts a thread only between bytecodes.
                with contextlib.suppress(FutureTimeout):
                    return future.result(timeout=WAIT_SLICE)
        except BaseException:
            future.cancel()
            finished.wait(CLEANUP_SECONDS)
            raise

    def stop_taking_work(self) -> None:
        """Halt every run now and take no new work: each run gives its batch back (calls
        already at a provider finish and are written) while the process goes on stopping.
        ``close`` waits for the runs. Safe to call from any thread.
        """
        if not self.closed:
            self.loop.call_soon_threadsafe(self.engine.stopping.set)

    def close(self) -> None:
        """Give back every batch, then close adapters (SMTP QUIT), HTTP session and pools."""
        if self.closed:
            return

        async def _close() -> None:
            self._beating.cancel()
            heartbeat.forget(self.settings.heartbeat_dir, "dispatcher")
            await self.engine.stop(STOP_SECONDS)
            await self.leases.stop()
            for adapter in self._adapters.values():
                with contextlib.suppress(Exception):
                    await adapter.close()
            await self.http.close()
            await self.status.stop()
            await self.group_pool.close()
            await self.pool.close()

        try:
            asyncio.run_coroutine_threadsafe(_close(), self.loop).result(timeout=STOP_SECONDS + 15)
        finally:
            self.closed = True
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self.loop.close()


def dead_threads(worker: dramatiq.Worker) -> list[str]:
    """The worker's consumer and worker threads that are no longer alive (once started)."""
    threads = [*worker.consumers.values(), *worker.workers]
    return [t.name for t in threads if t.ident is not None and not t.is_alive()]


class RuntimeMiddleware(dramatiq.Middleware):
    """Opens the process's runtime when a worker boots and closes it when the worker stops.

    Parameters:
      settings: read when the worker boots (defaults to the environment's).
    """

    def __init__(self, settings: Callable[[], Settings] = get_settings) -> None:
        self._settings = settings
        self.runtime: Runtime | None = None

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        # What exists at boot (modules, settings) lives as long as the worker process: the
        # collector need not look at it again, and runs less often (see GC_THRESHOLD).
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLD)
        metrics.init_metrics()
        runtime = Runtime(self._settings())
        runtime.dead_threads = lambda: dead_threads(worker)
        try:
            runtime.open()
        except Exception as exc:
            # dramatiq would log this and boot the worker anyway, a worker that takes messages
            # and can send none: the process exits instead, and dramatiq's main process stops
            # the rest and exits with its code, for the supervisor to start it again.
            log.critical(
                "dispatcher runtime could not open (%s); the process exits",
                error_text(exc),
                extra={"event": "boot_failed"},
            )
            raise SystemExit(BOOT_FAILED) from None
        self.runtime = runtime
        log.info("dispatcher runtime open")

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        # The broker's idle publishing connections may have been dropped by RabbitMQ long ago.
        quiet_dropped_connections()
        runtime, self.runtime = self.runtime, None
        if runtime is not None:
            # The runs halt and give their batches back at once: a stopping dispatcher starts
            # no more calls, and another one takes its batches sooner.
            log.info("dispatcher stopping: giving back its batches")
            runtime.stop_taking_work()
        # The worker threads take no new message while the runs give their batches back: what
        # the consumers fetch meanwhile waits in memory, and the worker puts it back on its
        # queue when it stops (a message already taken finds the runtime closed and goes back
        # itself). Not ``worker.pause()``: pausing the consumers too costs seconds (dramatiq
        # ends their fetch loop and sleeps before it looks again), for nothing at a stop.
        for thread in worker.workers:
            thread.pause()
        if runtime is not None:
            runtime.close()
            log.info("dispatcher runtime closed")

    def current(self) -> Runtime:
        """The open runtime; ``RuntimeClosed`` while the worker boots or stops."""
        if self.runtime is None or self.runtime.closed:
            raise RuntimeClosed("the dispatcher runtime is not open")
        return self.runtime
