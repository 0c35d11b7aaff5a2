"""The tick of a run's result writes: a sleep that its run's end cuts short."""

from __future__ import annotations

import asyncio
import time

from services.dispatcher.recorder import Stop


def test_a_tick_sleeps_its_time_unless_the_run_ends() -> None:
    async def go() -> None:
        stop = Stop()
        began = time.monotonic()
        await stop.sleep(0.05)
        assert time.monotonic() - began >= 0.045
        assert not stop.is_set()

        sleeper = asyncio.create_task(stop.sleep(30))
        await asyncio.sleep(0)
        began = time.monotonic()
        stop.set()
        await asyncio.wait_for(sleeper, 5)
        assert time.monotonic() - began < 1, "set wakes the sleeper at once"
        assert stop.is_set()

        began = time.monotonic()
        await stop.sleep(30)
        assert time.monotonic() - began < 1, "once set, a sleep returns at once"

    asyncio.run(go())


def test_setting_a_stop_nobody_sleeps_on_is_kept() -> None:
    async def go() -> None:
        stop = Stop()
        stop.set()
        stop.set()
        await asyncio.wait_for(stop.sleep(30), 5)

    asyncio.run(go())
