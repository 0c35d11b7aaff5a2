"""The HTTP/1.1 client on the send path: keep-alive connections, one timeout per call, answers
read to a limit, and nothing a sender does not need.

A send is one small request and one small answer. A general client pays per call for what a
sender never uses (cookies, redirects, proxies from the environment, decompression, a stream
object per answer, a request object with its hooks): ``bench http-client`` measured
aiohttp's client at 70-120 µs of CPU per call on this path, against 35-45 µs for this one (the
answer parsed by ``httptools``, the C parser uvicorn uses, on the dispatcher's event loop).

What it does:
  * ``http`` and ``https`` (TLS verified against the system's CA store); the request line,
    ``Host``, ``Content-Length`` and the caller's headers, nothing else but ``User-Agent``. A
    URL's user name and password become ``Authorization: Basic``.
  * Connections only where the egress rule allows: names are resolved (results kept for
    ``dns_ttl`` seconds), refused addresses dropped, and each socket checked once more right
    before it connects (``Egress.socket``). Literal addresses, legacy spellings included, are
    judged as the address they are. The connection goes to the address that was checked, so a
    name cannot resolve to something else in between.
  * Never a redirect: a 3xx is an answer like any other.
  * One deadline for the whole call (connect, write, read); a call past it closes its
    connection.
  * At most ``MAX_ANSWER`` bytes of an answer are kept; a longer one is cut there and its
    connection closed (an answer that announces more than that is not read at all).
  * Keep-alive: a connection goes back to its origin's idle list when the answer allowed it
    and was read to its end; idle connections are closed after ``idle_seconds``. A request
    that carries an ``Idempotency-Key`` and finds its reused connection closed before any
    byte of an answer (the server dropped it while idle) is sent once more on a new
    connection, as other clients do with requests marked safe to repeat.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import ssl
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import httptools
import yarl

from shared import values
from shared.egress import Egress, EgressRefused, parse_literal

#: Most bytes of an answer kept: a provider's reply is small, and whatever sends more (a
#: tenant's own endpoint streaming gigabytes) is cut off rather than held in memory.
MAX_ANSWER = 64 * 1024
#: Most bytes of an answer's status line and headers.
MAX_HEAD = 64 * 1024
#: Idle connections older than this are closed, not reused.
IDLE_SECONDS = 15.0
#: Resolved addresses are kept this long.
DNS_TTL = 300.0
#: Parsed URLs kept (an adapter calls a handful).
MAX_TARGETS = 1024
#: Calls waiting for their answer are held to their deadline this often (at most this late):
#: one timer for all of them, not one set and cancelled per call.
DEADLINE_TICK = 0.05

#: Header names already found to be HTTP tokens, each with its lower-case form (an adapter
#: sends the same few on every call).
_TOKENS: dict[str, str] = {}
MAX_TOKENS = 256
_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


class HttpError(Exception):
    """No HTTP answer: the connection failed or closed early, or the peer spoke something
    other than HTTP.
    """


class InvalidUrl(HttpError):
    """The URL cannot be requested (not http or https, no host, not a URL)."""


class _Closed(HttpError):
    """The connection closed before any byte of an answer."""


@values.value
class Answer:
    """An HTTP answer."""

    status: int
    #: Header names lower-cased; a repeated header keeps its last value.
    headers: dict[str, str]
    #: At most ``MAX_ANSWER`` bytes.
    body: bytes


@dataclass(frozen=True, slots=True)
class _Target:
    """A URL taken apart once."""

    origin: tuple[str, str, int]
    host: str
    port: int
    tls: bool
    #: ``Host`` header and request target, ready to write.
    line_rest: bytes
    authorization: str | None


def _target(url: str) -> _Target:
    try:
        parsed = yarl.URL(url)
    except (ValueError, TypeError) as exc:
        raise InvalidUrl("not a URL") from exc
    scheme = parsed.scheme.lower()
    host = parsed.raw_host
    if scheme not in ("http", "https") or not host:
        raise InvalidUrl("not an http or https URL with a host")
    # A fully qualified name's final dot: the same host, but not a name a certificate holds.
    host = host.rstrip(".") or host
    default_port = 443 if scheme == "https" else 80
    port = parsed.port or default_port
    shown_host = f"[{host}]" if ":" in host else host
    if port != default_port:
        shown_host = f"{shown_host}:{port}"
    authorization = None
    if parsed.user is not None or parsed.password is not None:
        pair = f"{parsed.user or ''}:{parsed.password or ''}".encode()
        authorization = "Basic " + base64.b64encode(pair).decode()
    path = parsed.raw_path_qs or "/"
    line_rest = f" {path} HTTP/1.1\r\nHost: {shown_host}\r\n".encode("ascii")
    return _Target((scheme, host, port), host, port, scheme == "https", line_rest, authorization)


def _header_lines(headers: Mapping[str, str]) -> tuple[list[str], set[str]]:
    """The header lines of a request, and the lower-case names they carry."""
    lines = []
    names = set()
    for name, value in headers.items():
        lower = _TOKENS.get(name)
        if lower is None:
            if not name or not _TOKEN_CHARS.issuperset(name):
                raise ValueError(f"header name {name!r} is not an HTTP token")
            if len(_TOKENS) >= MAX_TOKENS:
                _TOKENS.clear()
            lower = _TOKENS[name] = name.lower()
        names.add(lower)
        # Three scans in C: ``str.translate`` with a table looks up each character in Python.
        if "\r" in value or "\n" in value or "\x00" in value:
            raise ValueError(f"header {name} holds a line break or NUL")
        lines.append(f"{name}: {value}\r\n")
    return lines, names


class _Connection(asyncio.Protocol):
    """One keep-alive connection: writes a request, parses its answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        #: When the call waiting on this connection must have its answer (monotonic).
        self.deadline = float("inf")
        self._waiter: asyncio.Future[Answer] | None = None
        self._reset()

    def _reset(self) -> None:
        self._headers: dict[str, str] = {}
        self._head_bytes = 0
        self._headers_done = False
        self._body = bytearray()
        self._status = 0
        self._got_bytes = False
        self._length_known = False
        self._answered = False
        self.reusable = False

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            self.close()  # nothing was asked: a peer that talks out of turn is not reused
            return
        self._got_bytes = True
        if not self._headers_done:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD + MAX_ANSWER:
                self._fail(HttpError("the answer's head is too long"))
                return
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._fail(HttpError("not an HTTP answer"))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._headers_done and not self._length_known and self._status >= 200:
            # An answer without a length ends with its connection.
            self._finish()
        elif self._got_bytes:
            self._fail(HttpError("the connection closed in the middle of an answer"))
        else:
            self._fail(_Closed("the connection closed before an answer"))

    # --- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._answered:
            # A second answer to one request: whatever it is, the connection's framing can no
            # longer be trusted; it is closed, never handed to the next request.
            self.reusable = False
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._status = self.parser.get_status_code()
        self._headers_done = True
        headers = self._headers
        self._length_known = (
            "content-length" in headers or "chunked" in headers.get("transfer-encoding", "").lower()
        )
        length = headers.get("content-length")
        if length is not None and self._status >= 200:
            try:
                too_long = int(length) > MAX_ANSWER
            except ValueError:
                too_long = False
            if too_long:
                self._finish(cut=True)

    def on_body(self, body: bytes) -> None:
        room = MAX_ANSWER - len(self._body)
        if len(body) > room:
            self._body += body[:room]
            self._finish(cut=True)
            return
        self._body += body

    def on_message_complete(self) -> None:
        if self._status < 200:
            # An interim answer (100 Continue and the like): the real one follows.
            self._reset()
            self._got_bytes = True
            return
        self.reusable = self.parser.should_keep_alive() and not self.closed
        self._finish()

    # --- calls --------------------------------------------------------------------------------

    def send(self, request: bytes) -> asyncio.Future[Answer]:
        assert self.transport is not None
        self._reset()
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return waiter

    def _finish(self, *, cut: bool = False) -> None:
        self._answered = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(Answer(self._status, dict(self._headers), bytes(self._body)))
        if cut:
            self.reusable = False
            self.close()

    def expire(self) -> None:
        """The call is past its deadline: it fails, and the connection is closed."""
        self._fail(TimeoutError("no whole answer within the deadline"))

    def _fail(self, exc: Exception) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close()

    def closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        self.reusable = False
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class HttpClient:
    """The process's one HTTP client (not thread-safe: one event loop).

    Parameters:
      egress: where connections may go.
      max_in_flight: the most connections kept idle per origin.
      timeout_seconds: the deadline of a whole call.
      idle_seconds: idle connections older than this are closed.
      dns_ttl: how long resolved addresses are kept.
      user_agent: the ``User-Agent`` of every request.
      tls_context: how TLS peers are verified (the system's authorities unless given).
    """

    def __init__(
        self,
        egress: Egress,
        *,
        max_in_flight: int,
        timeout_seconds: float,
        idle_seconds: float = IDLE_SECONDS,
        dns_ttl: float = DNS_TTL,
        user_agent: str = "bcast",
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.egress = egress
        self.max_idle = max(1, max_in_flight)
        self.timeout_seconds = timeout_seconds
        self.idle_seconds = idle_seconds
        self.dns_ttl = dns_ttl
        self._agent = f"User-Agent: {user_agent}\r\n".encode()
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._targets: dict[str, _Target] = {}
        self._resolved: dict[tuple[str, int], tuple[float, list[tuple[int, str]]]] = {}
        self._tls = tls_context
        self._pruning: asyncio.TimerHandle | None = None
        self._watching: asyncio.TimerHandle | None = None
        self.closed = False

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Answer:
        """POST ``body``; the answer, however its status reads.

        Raises:
          TimeoutError: no whole answer within the deadline.
          EgressRefused: the egress rule refuses every address of the URL's host.
          InvalidUrl: the URL cannot be requested.
          HttpError, OSError: no HTTP answer.
          ValueError: a header a request cannot carry (a line break in a token).
        """
        return await self.request("POST", url, body, headers)

    async def get(self, url: str, headers: Mapping[str, str] | None = None) -> Answer:
        """GET ``url`` (as ``post``)."""
        return await self.request("GET", url, b"", headers or {})

    async def request(
        self, method: str, url: str, body: bytes, headers: Mapping[str, str]
    ) -> Answer:
        if self.closed:
            raise HttpError("the client is closed")
        target = self._targets.get(url)
        if target is None:
            target = _target(url)
            if len(self._targets) >= MAX_TARGETS:
                self._targets.clear()
            self._targets[url] = target
        lines, names = _header_lines(headers)
        if target.authorization is not None and "authorization" not in names:
            lines.append(f"Authorization: {target.authorization}\r\n")
        if body or method == "POST":
            lines.append(f"Content-Length: {len(body)}\r\n")
        request = b"".join(
            (
                method.encode("ascii"),
                target.line_rest,
                self._agent,
                "".join(lines).encode(),
                b"\r\n",
                body,
            )
        )
        repeatable = "idempotency-key" in names
        # One deadline for the whole call: a connection made for it counts against it too.
        deadline = time.monotonic() + self.timeout_seconds
        conn = self._take_idle(target.origin)
        if conn is not None:
            try:
                return await self._exchange(conn, target, request, deadline)
            except _Closed:
                if not repeatable or self.closed:
                    raise
        async with asyncio.timeout(deadline - time.monotonic()):
            conn = await self._connect(target)
        return await self._exchange(conn, target, request, deadline)

    async def _exchange(
        self, conn: _Connection, target: _Target, request: bytes, deadline: float
    ) -> Answer:
        if time.monotonic() >= deadline:
            conn.close()
            raise TimeoutError("no whole answer within the deadline")
        conn.deadline = deadline
        self._busy.add(conn)
        if self._watching is None:
            self._watching = asyncio.get_running_loop().call_later(
                DEADLINE_TICK, self._hold_to_deadlines
            )
        try:
            answer = await conn.send(request)
        except BaseException:
            conn.close()
            raise
        finally:
            self._busy.discard(conn)
        if conn.reusable and not conn.closed and not self.closed:
            self._put_idle(target.origin, conn)
        else:
            conn.close()
        return answer

    def _hold_to_deadlines(self) -> None:
        """Calls past their deadline fail (their connections closed); checked every
        ``DEADLINE_TICK`` while any call waits for its answer.
        """
        self._watching = None
        now = time.monotonic()
        for conn in [c for c in self._busy if c.deadline <= now]:
            conn.expire()
        if self._busy and not self.closed:
            self._watching = asyncio.get_running_loop().call_later(
                DEADLINE_TICK, self._hold_to_deadlines
            )

    def _take_idle(self, origin: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        too_old = time.monotonic() - self.idle_seconds
        while idle:
            conn = idle.pop()
            if conn.closed or conn.idle_since < too_old or conn.closing():
                conn.close()
                continue
            return conn
        return None

    def _prune(self) -> None:
        """Close idle connections past their age, and forget origins with none left."""
        self._pruning = None
        too_old = time.monotonic() - self.idle_seconds
        for origin in list(self._idle):
            idle = self._idle[origin]
            while idle and (idle[0].closed or idle[0].idle_since < too_old):
                idle.popleft().close()
            if not idle:
                del self._idle[origin]
        if self._idle and not self.closed:
            self._pruning = asyncio.get_running_loop().call_later(self.idle_seconds, self._prune)

    def _put_idle(self, origin: tuple[str, str, int], conn: _Connection) -> None:
        if self._pruning is None:
            self._pruning = asyncio.get_running_loop().call_later(self.idle_seconds, self._prune)
        idle = self._idle.setdefault(origin, deque())
        conn.idle_since = time.monotonic()
        idle.append(conn)
        too_old = conn.idle_since - self.idle_seconds
        while idle and (
            len(idle) > self.max_idle or idle[0].closed or idle[0].idle_since < too_old
        ):
            idle.popleft().close()

    async def _addresses(self, host: str, port: int) -> list[tuple[int, str]]:
        """The addresses to try for ``host``, all allowed by the egress rule."""
        literal = parse_literal(host)
        if literal is not None:
            # A legacy spelling of an address (``2130706433``, ``127.1``): judged as the
            # address it is, never handed to DNS.
            self.egress.check(str(literal), host)
            family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
            return [(family, str(literal))]
        now = time.monotonic()
        cached = self._resolved.get((host, port))
        if cached is not None and cached[0] > now:
            return cached[1]
        found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        allowed: list[tuple[int, str]] = []
        first_refusal: EgressRefused | None = None
        for family, _, _, _, sockaddr in found:
            address = str(sockaddr[0])
            try:
                self.egress.check(address, host)
            except EgressRefused as exc:
                first_refusal = first_refusal or exc
                continue
            if (family, address) not in allowed:
                allowed.append((family, address))
        if not allowed:
            raise first_refusal or HttpError("the name resolved to no address")
        if len(self._resolved) >= MAX_TARGETS:
            self._resolved.clear()
        self._resolved[(host, port)] = (now + self.dns_ttl, allowed)
        return allowed

    async def _connect(self, target: _Target) -> _Connection:
        loop = asyncio.get_running_loop()
        last: Exception | None = None
        for family, address in await self._addresses(target.host, target.port):
            # The egress rule's last word, on the very address the socket connects to (a
            # literal: nothing is resolved again).
            self.egress.check(address, target.host)
            try:
                _, conn = await loop.create_connection(
                    _Connection,
                    host=address,
                    port=target.port,
                    family=family,
                    ssl=self._tls_context() if target.tls else None,
                    server_hostname=target.host if target.tls else None,
                )
            except (OSError, ssl.SSLError) as exc:
                last = exc
                continue
            return conn
        raise last or HttpError("no address to connect to")

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    async def close(self) -> None:
        """Close every connection, idle or busy."""
        self.closed = True
        if self._pruning is not None:
            self._pruning.cancel()
            self._pruning = None
        if self._watching is not None:
            self._watching.cancel()
            self._watching = None
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        for conn in list(self._busy):
            conn.close()
        # Let the transports' close callbacks run.
        with contextlib.suppress(RuntimeError):
            await asyncio.sleep(0)
