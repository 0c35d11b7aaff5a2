"""Lanes and the call pool: caps hold, waiting channels take turns, no place ever leaks."""

from __future__ import annotations

import asyncio

import pytest

from services.dispatcher.pacing import CallPool, Lane


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_a_lane_grants_up_to_what_is_free_and_takes_back_what_is_not_handed_out() -> None:
    async def go() -> None:
        lane = Lane(1, 4)
        async with lane.grant(3) as grant:
            assert grant.size == 3
            first = grant.hand_out()
            assert lane.used == 3
        assert lane.used == 1, "two places never handed out went back"
        first.release()
        first.release()  # twice is once
        assert lane.used == 0
        async with lane.grant(10) as grant:
            assert grant.size == 4
            for _ in range(4):
                grant.hand_out()
            with pytest.raises(RuntimeError):
                grant.hand_out()
        assert lane.used == 4
        lane.give_back(4)

    run(go())


def test_a_full_lane_waits_for_the_group_it_asked_for() -> None:
    async def go() -> None:
        lane = Lane(1, 4)
        held = []
        async with lane.grant(4) as grant:
            held = [grant.hand_out() for _ in range(4)]
        got: list[int] = []

        async def want_three() -> None:
            async with lane.grant(4, at_least=3) as g:
                got.append(g.size)
                for _ in range(g.size):
                    g.hand_out()

        waiter = asyncio.create_task(want_three())
        await asyncio.sleep(0)
        held.pop().release()
        held.pop().release()
        await asyncio.sleep(0)
        assert got == [], "two free places are not the three it waits for"
        held.pop().release()
        await asyncio.sleep(0)
        await waiter
        assert got == [3]
        assert lane.used == 4

    run(go())


def test_a_waiter_cancelled_before_or_after_its_turn_leaks_nothing() -> None:
    async def go() -> None:
        lane = Lane(1, 1)
        async with lane.grant(1) as grant:
            place = grant.hand_out()

        async def wait_for_one() -> None:
            async with lane.grant(1) as g:
                g.hand_out()
                await asyncio.sleep(3600)

        before = asyncio.create_task(wait_for_one())
        await asyncio.sleep(0)
        before.cancel()  # cancelled while still waiting
        await asyncio.gather(before, return_exceptions=True)
        after = asyncio.create_task(wait_for_one())
        await asyncio.sleep(0)
        place.release()  # its turn comes ...
        after.cancel()  # ... and it is cancelled before it runs
        await asyncio.gather(after, return_exceptions=True)
        assert lane.used == 0
        assert lane.waiting() == 0

    run(go())


def test_an_exception_in_the_block_gives_the_grant_back() -> None:
    async def go() -> None:
        lane = Lane(1, 5)
        with pytest.raises(ValueError, match="boom"):
            async with lane.grant(5):
                raise ValueError("boom")
        assert lane.used == 0

    run(go())


def test_the_call_pool_caps_calls_and_channels_take_turns() -> None:
    async def go() -> None:
        pool = CallPool(2)
        order: list[str] = []
        release = asyncio.Event()

        async def call(channel: int, name: str) -> None:
            async with pool.call(channel):
                order.append(name)
                await release.wait()

        # Two calls of a busy channel fill the pool; five more of it wait, then one of a quiet
        # channel arrives last.
        busy = [asyncio.create_task(call(1, f"busy-{i}")) for i in range(7)]
        await asyncio.sleep(0)
        quiet = asyncio.create_task(call(2, "quiet"))
        await asyncio.sleep(0)
        assert order == ["busy-0", "busy-1"]
        assert pool.waiting() == 6
        release.set()
        await asyncio.gather(*busy, quiet)
        # Places free up one by one and the waiting channels take turns: the busy channel's
        # next call, then the quiet channel's, not the busy channel's whole queue first.
        assert order[:4] == ["busy-0", "busy-1", "busy-2", "quiet"]
        assert pool.used == 0

    run(go())


def test_a_call_that_raises_gives_its_place_back() -> None:
    async def go() -> None:
        pool = CallPool(1)
        with pytest.raises(OSError, match="reset"):
            async with pool.call(1):
                raise OSError("connection reset")
        async with pool.call(1):
            assert pool.used == 1
        assert pool.used == 0

    run(go())
