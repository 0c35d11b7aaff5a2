"""The tick of a run's result writes: a sleep that its run's end cuts short."""

from __future__ import annotations

import asyncio
import time

from services.dispatcher.stop import Stop

#: However a tick is broken, a test ends within this.
DEADLINE = 5.0


def test_a_tick_sleeps_its_time_unless_the_run_ends() -> None:
    async def go() -> None:
        stop = Stop()
        began = time.monotonic()
        await asyncio.wait_for(stop.sleep(0.05), DEADLINE)
        assert time.monotonic() - began >= 0.045
        assert not stop.is_set()

        sleeper = asyncio.create_task(stop.sleep(30))
        await asyncio.sleep(0)
        began = time.monotonic()
        stop.set()
        await asyncio.wait_for(sleeper, DEADLINE)
        assert time.monotonic() - began < 1, "set wakes the sleeper at once"
        assert stop.is_set()

        began = time.monotonic()
        await asyncio.wait_for(stop.sleep(30), DEADLINE)
        assert time.monotonic() - began < 1, "once set, a sleep returns at once"

    asyncio.run(go())


def test_setting_wakes_every_sleeper_though_one_was_cancelled() -> None:
    async def go() -> None:
        stop = Stop()
        gone = asyncio.create_task(stop.sleep(30))
        sleepers = [asyncio.create_task(stop.sleep(30)) for _ in range(3)]
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        began = time.monotonic()
        stop.set()
        await asyncio.wait_for(asyncio.gather(*sleepers), DEADLINE)
        assert time.monotonic() - began < 1

    asyncio.run(go())


def test_setting_a_stop_nobody_sleeps_on_is_kept() -> None:
    async def go() -> None:
        stop = Stop()
        stop.set()
        stop.set()
        await asyncio.wait_for(stop.sleep(30), DEADLINE)

    asyncio.run(go())
