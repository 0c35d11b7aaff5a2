"""The simulator's listener: webhook calls answered by a lean HTTP/1.1 protocol, everything
else by the aiohttp app.

A provider's cost is not the sender's, but on one box the simulator shares the cores with
what it measures, and aiohttp's server machinery (request and response objects, routing,
middlewares, the handler's task) cost it about 80 µs a webhook call, as much as the
dispatcher spends on a send. ``POST /hooks/{name}`` is parsed here with ``httptools`` and
answered by the same ``Simulator`` methods the app's route calls (``take_webhook``,
``answer_webhook``), so both answer alike: signature, idempotency, records, faults, rate
limit, latency, closed extra ports.

A connection starts on this protocol. A request it does not take whole (another route, a
percent-escaped or nested name, a chunked body, ``Expect``, an upgrade) hands the connection
to the aiohttp app for good: the request's bytes, as received, are fed to aiohttp's own
protocol on the same transport. Clients here never pipeline; a pipelined request that would
need the hand-over is refused (400) rather than split by guesswork.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, cast

import httptools

if TYPE_CHECKING:
    from services.simulator.app import Arrival, ExtraPorts, Simulator

#: Largest webhook body taken (the app takes up to 16 MiB on its other routes).
MAX_BODY = 1024 * 1024
_PREFIX = b"/hooks/"
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


class _HandOver(Exception):
    """The request is the aiohttp app's (raised inside the parser's callbacks)."""


def _head(status: int, length: int, extra: dict[str, str], close: bool) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "Content-Type: application/json; charset=utf-8",
        f"Content-Length: {length}",
        *(f"{k}: {v}" for k, v in extra.items()),
    ]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Front(asyncio.Protocol):
    """One connection: webhook calls here, the rest handed to ``app_protocol()``."""

    def __init__(
        self,
        sim: Simulator,
        app_protocol: Callable[[], asyncio.Protocol],
        ports: ExtraPorts | None,
        conns: set[Front],
    ) -> None:
        self.sim = sim
        self.app_protocol = app_protocol
        self.ports = ports
        self.conns = conns
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.port: int | None = None
        # Bytes received since the current request began (for a hand-over), and whether
        # they begin exactly at a request's start (not so after a pipelined request).
        self.since = bytearray()
        self.clean = True
        self.between = True
        # A request completed in the data being fed (a next one beginning in it is pipelined).
        self.completed = False
        # A request the app must answer was found: the connection is being handed over.
        self.handing_over = False
        self.url = b""
        self.name = ""
        self.headers: dict[bytes, bytes] = {}
        self.body = bytearray()
        self.too_big = False
        # Answers wait for the one before (a hook with latency answers later).
        self.tail: asyncio.Task[None] | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sockname = self.transport.get_extra_info("sockname")
        self.port = sockname[1] if isinstance(sockname, tuple) else None
        self.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.conns.discard(self)
        self.transport = None
        if self.tail is not None:
            self.tail.cancel()

    def data_received(self, data: bytes) -> None:
        self.since += data
        self.completed = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            # httptools raises its own error for one a callback raised.
            if self.handing_over:
                self._hand_over()
            else:
                self._refuse(400, "malformed request")
            return
        if self.between:
            self.since.clear()
            self.clean = True

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        if self.completed:
            self.clean = False
        self.between = False
        self.url = b""
        self.headers = {}
        self.body = bytearray()
        self.too_big = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        path = self.url.split(b"?", 1)[0]
        name = path[len(_PREFIX) :]
        if (
            self.parser.get_method() != b"POST"
            or not path.startswith(_PREFIX)
            or not name
            or b"/" in name
            or b"%" in name
            or b"transfer-encoding" in self.headers
            or b"expect" in self.headers
            or self.parser.should_upgrade()
        ):
            self.handing_over = True
            raise _HandOver
        self.name = name.decode("utf-8", "replace")

    def on_body(self, body: bytes) -> None:
        if len(self.body) + len(body) > MAX_BODY:
            self.too_big = True
        else:
            self.body += body

    def on_message_complete(self) -> None:
        self.between = True
        self.completed = True
        if self.transport is None or self.transport.is_closing():
            return  # a request pipelined behind one that closed the connection: never taken
        keep_alive = self.parser.should_keep_alive()
        if self.too_big:
            self._answer(413, {"error": f"body over {MAX_BODY} bytes"}, {}, close=True)
            return
        if self.ports is not None and self.port is not None and self.ports.is_closed(self.port):
            # Never answered: the port was closed, as when a provider goes down.
            if self.transport is not None:
                self.transport.close()
            return
        got = self.sim.take_webhook(
            self.name,
            bytes(self.body),
            _text(self.headers.get(b"x-bcast-signature")),
            _text(self.headers.get(b"idempotency-key")),
        )
        if isinstance(got, tuple):
            status, answer = got
            self._later(None, status, answer, keep_alive)
            return
        if self.tail is None and not self.sim.lags(got.hook):
            self._reply(got, keep_alive)
            return
        self._later(got, 0, None, keep_alive)

    # -- answers

    def _reply(self, got: Arrival, keep_alive: bool) -> None:
        status, answer, extra = self.sim.answer_webhook(got)
        self._answer(status, answer, extra, close=not keep_alive)

    def _later(self, got: Arrival | None, status: int, answer: Any, keep_alive: bool) -> None:
        """Answer after the answers before it (and after the hook's latency)."""
        if got is None and self.tail is None:
            self._answer(status, answer, {}, close=not keep_alive)
            return
        before = self.tail

        async def run() -> None:
            if before is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await before
            if got is None:
                self._answer(status, answer, {}, close=not keep_alive)
            else:
                await self.sim.lag(got.hook)
                self._reply(got, keep_alive)

        task = asyncio.get_running_loop().create_task(run())
        self.tail = task
        if self.transport is not None:
            self.transport.pause_reading()

        def done(t: asyncio.Task[None]) -> None:
            if self.tail is t:
                self.tail = None
                if self.transport is not None and not self.transport.is_closing():
                    self.transport.resume_reading()

        task.add_done_callback(done)

    def _answer(self, status: int, answer: Any, extra: dict[str, str], *, close: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        body = _ENCODE(answer).encode()
        transport.write(_head(status, len(body), extra, close) + body)
        if close:
            transport.close()

    def _refuse(self, status: int, reason: str) -> None:
        self._answer(status, {"error": reason}, {}, close=True)

    def _hand_over(self) -> None:
        """Give the connection to the aiohttp app, replaying the request's bytes so far."""
        transport = self.transport
        if transport is None:
            return
        if not self.clean or self.tail is not None:
            self._refuse(400, "a pipelined request the webhook listener cannot pass on")
            return
        self.conns.discard(self)
        protocol = self.app_protocol()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(bytes(self.since))
        self.transport = None


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")
