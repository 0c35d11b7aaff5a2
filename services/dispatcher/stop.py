"""A flag that wakes whoever sleeps on it at once when set.

A batch run's halt (its sends sleeping until their slots) and the end of its result writes'
tick (which sleeps 20 times a second for each run) both sleep on one: a future and a timer per
sleep, without the task and timeout ``asyncio.wait_for`` makes for each wait on an
``asyncio.Event``.
"""

from __future__ import annotations

import asyncio


class Stop:
    """A flag that wakes whoever sleeps on it at once when set."""

    def __init__(self) -> None:
        self._set = False
        self._sleepers: set[asyncio.Future[None]] = set()

    def set(self) -> None:
        self._set = True
        for waiter in self._sleepers:
            wake(waiter)

    def is_set(self) -> bool:
        return self._set

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, or until set (at once if it already is)."""
        if self._set:
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(seconds, wake, waiter)
        self._sleepers.add(waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._sleepers.discard(waiter)


def wake(waiter: asyncio.Future[None]) -> None:
    """Wake a sleeper (its future), unless it is already awake."""
    if not waiter.done():
        waiter.set_result(None)
