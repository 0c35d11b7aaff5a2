"""Who may send now in one dispatcher process: a lane per channel, and a fair pool of calls.

A **lane** is one channel's share of the process: it counts that channel's sends from the
moment a rate-limit slot is taken for them until their provider call ends, and never lets more
than the channel's cap be outstanding. A slow provider fills its own lane and no other; a send
loop that finds its lane full waits in a coroutine, not in a thread.

The **call pool** caps the provider calls under way in the whole process. A place in it is
taken just before a call and given back as soon as the call ends (never while a send waits for
its slot), and when calls wait for places the channels take turns: each channel with a waiter
gets the next free place in round-robin order, so a busy channel cannot crowd out a quiet one.

A waiter is woken with its place already taken for it, so nobody can slip in between. Places
are handed out as objects whose ``release`` is idempotent; callers release them in a
``finally`` or a task's done callback, so no exception or cancellation can leak one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Hashable


class _Places:
    """A count of places; waiters are woken in the order ``_next_waiter`` chooses, each with
    the places it waits for already taken for it.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.used = 0

    @property
    def free(self) -> int:
        return max(0, self.size - self.used)

    async def _take(self, key: Hashable, need: int) -> None:
        """Wait until ``need`` places are free and take them."""
        if self.free >= need and not self.waiting():
            self.used += need
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(key, need, waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give_back(need)  # woken with its places just as it was cancelled
            else:
                self._dequeue(key, waiter)
            raise

    def give_back(self, n: int) -> None:
        self.used -= n
        while True:
            head = self._next_waiter(self.free)
            if head is None:
                return
            need, waiter = head
            if not waiter.done():
                self.used += need
                waiter.set_result(None)

    def waiting(self) -> int:
        raise NotImplementedError

    def _enqueue(self, key: Hashable, need: int, waiter: asyncio.Future[None]) -> None:
        raise NotImplementedError

    def _dequeue(self, key: Hashable, waiter: asyncio.Future[None]) -> None:
        raise NotImplementedError

    def _next_waiter(self, free: int) -> tuple[int, asyncio.Future[None]] | None:
        """The next waiter to wake, if ``free`` places are enough for it (it leaves the queue)."""
        raise NotImplementedError


class Place:
    """One place of a lane or of the call pool; ``release`` gives it back once, however
    often it is called.
    """

    __slots__ = ("_owner",)

    def __init__(self, owner: _Places) -> None:
        self._owner: _Places | None = owner

    def release(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.give_back(1)


class Lane(_Places):
    """One channel's share of a process: at most ``cap`` sends scheduled or under way.
    Waiters are served first come, first served.

    Parameters:
      channel_id: the channel.
      cap: the most sends of this channel outstanding in this process at once.
    """

    def __init__(self, channel_id: int, cap: int) -> None:
        super().__init__(cap)
        self.channel_id = channel_id
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @contextlib.asynccontextmanager
    async def grant(self, up_to: int, *, at_least: int = 1) -> AsyncIterator[Grant]:
        """Wait until ``at_least`` places are free and take up to ``up_to``; places not handed
        out by the end of the block go back. (Waiting for a few places at once, when the lane
        is full, keeps a busy channel from taking its slots one round trip at a time.)
        """
        need = max(1, min(at_least, up_to, self.size))
        await self._take(None, need)
        extra = min(max(0, up_to - need), self.free)
        self.used += extra
        grant = Grant(self, need + extra)
        try:
            yield grant
        finally:
            grant.close()

    def waiting(self) -> int:
        return len(self._waiters)

    def _enqueue(self, key: Hashable, need: int, waiter: asyncio.Future[None]) -> None:
        self._waiters.append((need, waiter))

    def _dequeue(self, key: Hashable, waiter: asyncio.Future[None]) -> None:
        for entry in self._waiters:
            if entry[1] is waiter:
                self._waiters.remove(entry)
                return

    def _next_waiter(self, free: int) -> tuple[int, asyncio.Future[None]] | None:
        while self._waiters and self._waiters[0][1].done():
            self._waiters.popleft()
        if self._waiters and self._waiters[0][0] <= free:
            return self._waiters.popleft()
        return None


class Grant:
    """Places taken from a lane at once; each send gets one with ``hand_out``."""

    def __init__(self, lane: Lane, size: int) -> None:
        self.lane = lane
        self.size = size
        self._left = size

    def hand_out(self) -> Place:
        if self._left == 0:
            raise RuntimeError("no place left in this grant")
        self._left -= 1
        return Place(self.lane)

    def close(self) -> None:
        """Give back the places never handed out."""
        left, self._left = self._left, 0
        if left:
            self.lane.give_back(left)


class CallPool(_Places):
    """Provider calls under way in one process, at most ``size``; channels waiting for a place
    take turns.

    Parameters:
      size: the most calls under way at once in this process.
    """

    def __init__(self, size: int) -> None:
        super().__init__(size)
        #: Waiting calls by channel, channels in turn order.
        self._waiting: OrderedDict[Hashable, deque[asyncio.Future[None]]] = OrderedDict()
        #: Called when a call must wait for a place: places held by answers not yet written
        #: come back sooner if they are written now (see ``ResultGroups.flush_soon``).
        self.on_pressure: Callable[[], None] | None = None

    def call(self, channel_id: int) -> _Call:
        """``async with pool.call(channel_id):`` holds a place for one provider call."""
        return _Call(self, channel_id)

    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values()) if self._waiting else 0

    def _enqueue(self, key: Hashable, need: int, waiter: asyncio.Future[None]) -> None:
        self._waiting.setdefault(key, deque()).append(waiter)
        if self.on_pressure is not None:
            self.on_pressure()

    def _dequeue(self, key: Hashable, waiter: asyncio.Future[None]) -> None:
        queue = self._waiting.get(key)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(waiter)
        if not queue:
            del self._waiting[key]

    def _next_waiter(self, free: int) -> tuple[int, asyncio.Future[None]] | None:
        if not free or not self._waiting:
            return None
        key, queue = next(iter(self._waiting.items()))
        waiter = queue.popleft()
        if queue:
            self._waiting.move_to_end(key)  # its next call waits for the other channels'
        else:
            del self._waiting[key]
        return 1, waiter


class _Call:
    """One place in the call pool, held for the ``async with`` block, or longer if ``keep``
    is called (a plain class: this is entered once per provider call).
    """

    __slots__ = ("_channel_id", "_kept", "_pool")

    def __init__(self, pool: CallPool, channel_id: int) -> None:
        self._pool = pool
        self._channel_id = channel_id
        self._kept = False

    async def __aenter__(self) -> _Call:
        await self._pool._take(self._channel_id, 1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self._kept:
            self._pool.give_back(1)

    def keep(self) -> None:
        """The place outlives the block; whoever keeps it gives it back
        (``CallPool.give_back(1)``).
        """
        self._kept = True
