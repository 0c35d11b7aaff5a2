"""Per-process machinery the actors share: one asyncio loop in its own thread, holding the
HTTP keep-alive pool, the Postgres pool, the broadcast status board and the rate limiter.

dramatiq runs actors in worker threads; each hands its coroutine to this loop and waits, so
every provider call of the process shares one event loop and one connection pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections import Counter
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import aiohttp
from psycopg_pool import AsyncConnectionPool

from services.dispatcher.channels.base import ChannelAdapter
from services.dispatcher.ratelimit import RateLimiter
from services.dispatcher.status import StatusBoard
from shared.db.engine import libpq_url
from shared.media_store import MediaStore, make_media_store
from shared.settings import Settings, get_settings

T = TypeVar("T")
#: How long an interrupted batch may take to give back its rows and write its results.
CLEANUP_SECONDS = 15.0
WAIT_SLICE = 0.25


class Runtime:
    """Started once per process, on first use.

    Parameters:
      settings: the process settings.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="bcast-io", daemon=True)
        self._thread.start()
        self.conninfo = libpq_url(settings.database_url)
        self._adapters: dict[tuple[int, str], ChannelAdapter] = {}
        #: Provider calls under way in this process, by channel kind.
        self.calls: Counter[str] = Counter()
        self.media: MediaStore = make_media_store(settings)
        self.call(self._open())

    async def _open(self) -> None:
        self.pool = AsyncConnectionPool(
            self.conninfo,
            min_size=2,
            max_size=max(4, self.settings.db_pool_size),
            kwargs={"autocommit": True, "application_name": "bcast-dispatcher"},
            open=False,
        )
        await self.pool.open(wait=True, timeout=30)
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.settings.max_in_flight, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=self.settings.send_timeout_seconds),
            # Providers' cookies mean nothing to a sender, and parsing them costs CPU per call.
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": "bcast"},
        )
        self.in_flight = asyncio.Semaphore(self.settings.max_in_flight)
        self.status = StatusBoard(self.conninfo, self.pool)
        await self.status.start()
        self.limiter = RateLimiter(self.pool)
        self.status.on_channel_notice = self.limiter.hear

    def adapter(
        self,
        channel_id: int,
        kind: str,
        config: dict[str, Any],
        make: Callable[[str, dict[str, Any], aiohttp.ClientSession, MediaStore], ChannelAdapter],
    ) -> ChannelAdapter:
        """One adapter per channel and config, reused by every batch of the process."""
        key = (channel_id, json.dumps(config, sort_keys=True))
        adapter = self._adapters.get(key)
        if adapter is None:
            adapter = self._adapters[key] = make(kind, config, self.http, self.media)
        return adapter

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for it. If the waiting thread is interrupted
        (dramatiq's time limit or shutdown notice), the coroutine is cancelled and given up to
        ``CLEANUP_SECONDS`` to give back what it holds before the interruption goes on.
        """
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

    def close(self) -> None:
        async def _close() -> None:
            await self.status.stop()
            for adapter in self._adapters.values():
                await adapter.close()
            await self.http.close()
            await self.pool.close()

        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(_close(), self.loop).result(timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)


_runtime: Runtime | None = None
_lock = threading.Lock()


def get_runtime() -> Runtime:
    """The process's runtime, started on first use."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = Runtime(get_settings())
        return _runtime
