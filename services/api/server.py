"""The HTTP server's connection handling: uvicorn's HTTP/1.1 protocol, with a deadline for
the request head.

uvicorn closes idle keep-alive connections, but a client that opens a connection and sends
its request line and headers a byte at a time (slowloris) would hold the connection for as
long as it likes. Here the head of every request (the first on a connection, and each next
one on a kept-alive connection) must arrive within ``header_timeout`` seconds, or the
connection is closed. Bodies have their own deadline (``middleware.BodyLimit``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeadTimeoutH11(H11Protocol):
    """``H11Protocol`` that closes a connection whose request head is too slow to arrive."""

    #: Seconds a request's line and headers may take to arrive (set by ``serve``).
    header_timeout = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:
            self._disarm()  # a head arrived whole: the request is under way

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._head_timer is None:
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _too_slow(self) -> None:
        self._head_timer = None
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()
