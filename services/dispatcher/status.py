"""What each broadcast being sent is doing right now, as this process knows it.

A pause or cancel commits in Postgres; a trigger NOTIFYs ``bcast_broadcast`` and this board
hears it within milliseconds and tells the runs that follow the broadcast (so sends waiting
for their slot give their rows back at once). Every send also checks the board just before
its provider call, so no call starts after a pause is known. A poll every half second covers
a dropped connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable

import psycopg
from psycopg_pool import AsyncConnectionPool

from shared.domain.lifecycle import BroadcastStatus
from shared.logsafe import error_text

log = logging.getLogger(__name__)

#: Channels this board listens on.
BROADCAST_CHANNEL = "bcast_broadcast"
CHANNEL_CHANNEL = "bcast_channel"
#: Fallback refresh of tracked statuses, in seconds.
POLL_SECONDS = 0.5


class StatusBoard:
    """Broadcast statuses for the broadcasts this process is sending, kept fresh.

    Parameters:
      conninfo: where to LISTEN.
      pool: connections for loading and polling.
    """

    def __init__(self, conninfo: str, pool: AsyncConnectionPool) -> None:
        self.conninfo = conninfo
        self.pool = pool
        self._status: dict[int, str] = {}
        #: Who follows each broadcast: called with the new status when it changes.
        self._users: defaultdict[int, list[Callable[[str], None]]] = defaultdict(list)
        self._tasks: list[asyncio.Task[None]] = []
        #: Called with the payload of every ``bcast_channel`` notification.
        self.on_channel_notice: Callable[[str], None] | None = None

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._listen()), asyncio.create_task(self._poll())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def track(self, broadcast_id: int, on_change: Callable[[str], None]) -> str:
        """Start following a broadcast (``on_change`` hears each new status); return its
        current status.
        """
        self._users[broadcast_id].append(on_change)
        await self._refresh([broadcast_id])
        return self._status.get(broadcast_id, "missing")

    def untrack(self, broadcast_id: int, on_change: Callable[[str], None]) -> None:
        users = self._users.get(broadcast_id, [])
        if on_change in users:
            users.remove(on_change)
        if not users:
            self._users.pop(broadcast_id, None)
            self._status.pop(broadcast_id, None)

    def is_sending(self, broadcast_id: int) -> bool:
        """May a new provider call start for this broadcast?"""
        return self._status.get(broadcast_id) == BroadcastStatus.IN_PROGRESS

    def status(self, broadcast_id: int) -> str | None:
        return self._status.get(broadcast_id)

    async def _refresh(self, ids: list[int]) -> None:
        if not ids:
            return
        async with self.pool.connection() as conn:
            rows = await (
                await conn.execute("SELECT id, status FROM broadcast WHERE id = ANY(%s)", (ids,))
            ).fetchall()
        for broadcast_id, status in rows:
            self._set(broadcast_id, status)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                await self._refresh(list(self._users))
            except psycopg.Error as exc:
                log.warning("status poll failed: %s", error_text(exc))

    async def _listen(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True, application_name="bcast-dispatcher-listen"
                ) as conn:
                    await conn.execute(f"LISTEN {BROADCAST_CHANNEL}")
                    await conn.execute(f"LISTEN {CHANNEL_CHANNEL}")
                    # Anything that changed while we were not listening.
                    await self._refresh(list(self._users))
                    async for notice in conn.notifies():
                        self._hear(notice.channel, notice.payload)
            except psycopg.Error as exc:
                log.warning(
                    "status listener lost its connection (%s); reconnecting", error_text(exc)
                )
                await asyncio.sleep(1)

    def _hear(self, channel: str, payload: str) -> None:
        if channel == CHANNEL_CHANNEL:
            if self.on_channel_notice is not None:
                self.on_channel_notice(payload)
            return
        raw_id, _, status = payload.partition(":")
        self._set(int(raw_id), status)

    def _set(self, broadcast_id: int, status: str) -> None:
        users = self._users.get(broadcast_id)
        if not users:
            return
        changed = self._status.get(broadcast_id) != status
        self._status[broadcast_id] = status
        if changed:
            for on_change in list(users):
                on_change(status)
