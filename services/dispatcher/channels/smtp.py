"""Email over SMTP: one MIME message per recipient, text plus the images inline.

smtplib is blocking, so each send runs in one of the adapter's own threads (a slow relay
takes only those, never the threads other channels need) over a small pool of open
connections (STARTTLS and login once per connection); the dispatcher keeps no more calls
under way than the pool holds. Answers are judged by their SMTP code:
4xx is transient, 5xx permanent; a refused mailbox (550, 551, 553) marks the contact
unreachable. The Message-ID is derived from the idempotency key, so a repeat is recognisable.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import html
import smtplib
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any, cast

from services.dispatcher.channels.base import (
    OutboundMessage,
    Outcome,
    Permanent,
    Sent,
    Transient,
    go_on,
    reason,
)
from services.dispatcher.channels.http import clean
from shared.egress import Egress, EgressRefused, parse_literal
from shared.media_store import MediaStore

#: Any failure to reach the server or to hear an SMTP greeting from it.
UNREACHABLE_SERVER = (
    "could not reach the SMTP server (no connection, no SMTP greeting, or timed out)"
)
STRICT = Egress()
#: Open connections kept per channel.
POOL_SIZE = 8
#: How long a looked-up server address is used before it is looked up again.
RESOLVE_SECONDS = 60.0
#: Longest one send may take (connecting included), unless the dispatcher says otherwise.
TIMEOUT_SECONDS = 30.0
UNREACHABLE_CODES = frozenset({550, 551, 553})
#: The server is shedding load: slow the whole channel down. (450/451/452 are about one
#: mailbox, e.g. greylisting: that recipient is retried, the channel keeps its pace.)
THROTTLE_CODES = frozenset({421})


class SmtpAdapter:
    """Parameters:
    config: ``host``, ``port``, ``username``, ``password``, ``starttls``, ``from_address``.
    store: where the images' bytes are, to embed them.
    timeout: seconds one send may take, connecting included.
    """

    max_in_flight: int | None = POOL_SIZE

    def __init__(
        self,
        config: dict[str, Any],
        store: MediaStore,
        *,
        timeout: float = TIMEOUT_SECONDS,
        egress: Egress = STRICT,
    ) -> None:
        self.host = str(config["host"])
        self.port = int(config.get("port") or 587)
        self.username = config.get("username") or None
        self.password = config.get("password") or None
        self.starttls = bool(config.get("starttls", True))
        self.from_address = str(config["from_address"])
        self.store = store
        self.timeout = timeout
        self.egress = egress
        self._pool: deque[smtplib.SMTP] = deque()
        self._lock = threading.Lock()
        self._images: tuple[OutboundMessage, list[tuple[bytes, str, str]]] | None = None
        self._threads = ThreadPoolExecutor(max_workers=POOL_SIZE, thread_name_prefix="bcast-smtp")
        #: The server's address and until when it holds (``time.monotonic()``).
        self._resolved: tuple[str, float] | None = None

    def build(self, message: OutboundMessage, address: str, idempotency_key: str) -> EmailMessage:
        """The MIME message: text/plain, and with images an HTML part showing them inline."""
        email = EmailMessage()
        email["From"] = self.from_address
        email["To"] = address
        email["Subject"] = message.subject or "Message"
        email["Date"] = formatdate(localtime=False)
        email["Message-ID"] = f"<bcast-{idempotency_key}@{self.from_address.split('@')[-1]}>"
        email["X-Bcast-Idempotency-Key"] = idempotency_key
        text = message.text or ""
        email.set_content(text)
        if message.media:
            images = self._image_parts(message)
            cids = [make_msgid(domain="bcast")[1:-1] for _ in images]
            body = html.escape(text).replace("\n", "<br>\n")
            tags = "".join(f'<p><img src="cid:{cid}" alt=""></p>' for cid in cids)
            email.add_alternative(f"<html><body><p>{body}</p>{tags}</body></html>", subtype="html")
            html_part = cast(EmailMessage, email.get_payload()[1])  # type: ignore[index]
            for (data, maintype, subtype), cid in zip(images, cids, strict=True):
                html_part.add_related(
                    data, maintype=maintype, subtype=subtype, cid=f"<{cid}>", disposition="inline"
                )
        return email

    def _image_parts(self, message: OutboundMessage) -> list[tuple[bytes, str, str]]:
        if self._images is None or self._images[0] is not message:
            parts = []
            for m in message.media:
                maintype, _, subtype = m.content_type.partition("/")
                parts.append((self.store.get(m.storage_key), maintype, subtype))
            self._images = (message, parts)
        return self._images[1]

    async def send(
        self,
        message: OutboundMessage,
        address: str,
        idempotency_key: str,
        *,
        parts_done: int = 0,
        may_go_on: Callable[[], bool] = go_on,
    ) -> Outcome:
        try:
            email = self.build(message, address, idempotency_key)
        except OSError as exc:
            return Transient(reason(f"could not read an image: {type(exc).__name__}"))
        except ValueError as exc:
            # A header the email format cannot carry (a line break in the subject, say).
            return Permanent(reason(f"the message cannot be written as an email: {exc}"))
        loop = asyncio.get_running_loop()
        # The whole send, looking up the server and connecting included, ends within the
        # timeout: at the deadline the connection's socket is shut, and whatever command was
        # waiting fails at once.
        watch = _Watch(time.monotonic() + self.timeout)
        deadline = loop.call_later(self.timeout, watch.abort)
        try:
            try:
                address_of_server = await asyncio.wait_for(self._resolve(), self.timeout)
            except EgressRefused as exc:
                return Transient(f"the channel's provider address is refused: {exc}", refused=True)
            except (OSError, TimeoutError):
                return Transient(UNREACHABLE_SERVER)
            return await loop.run_in_executor(
                self._threads, self._send, email, address, watch, address_of_server
            )
        finally:
            deadline.cancel()

    async def _resolve(self) -> str:
        """The server's address, looked up at most once a minute: the first one the egress
        rule allows (``EgressRefused`` when it allows none).
        """
        if self._resolved is not None and self._resolved[1] > time.monotonic():
            return self._resolved[0]
        literal = parse_literal(self.host)
        if literal is not None:
            addresses = [str(literal)]
        else:
            infos = await asyncio.get_running_loop().getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM
            )
            addresses = [str(info[4][0]) for info in infos]
        refused: EgressRefused | None = None
        for found in addresses:
            try:
                self.egress.check(found, self.host)
            except EgressRefused as exc:
                refused = refused or exc
                continue
            self._resolved = (found, time.monotonic() + RESOLVE_SECONDS)
            return found
        raise refused or EgressRefused(self.host, "not resolvable to an address")

    def _send(self, email: EmailMessage, address: str, watch: _Watch, server: str) -> Outcome:
        for fresh in (False, True):
            try:
                conn = self._connection(fresh, watch, server)
            except (UnicodeError, ValueError):
                # A login or sender SMTP cannot carry (set before these were checked).
                return Transient(
                    "the channel's SMTP settings cannot be used: the login or sender holds "
                    "characters SMTP cannot carry; fix the channel",
                    refused=True,
                )
            except smtplib.SMTPAuthenticationError as exc:
                return Permanent(
                    f"SMTP login refused: {exc.smtp_code} {self._said(exc.smtp_error)}"
                )
            except (OSError, smtplib.SMTPException):
                # Whatever answered (or did not): the same words, so a reason cannot tell an
                # open port from a closed one, nor hand back what a non-SMTP peer said.
                return Transient(UNREACHABLE_SERVER)
            try:
                conn.send_message(email, from_addr=self.from_address, to_addrs=[address])
            except (UnicodeError, ValueError) as exc:
                _close(conn)  # it may be mid-transaction: not fit to reuse
                watch.done(conn)
                return Permanent(reason(f"the message cannot be sent over SMTP: {exc}"))
            except smtplib.SMTPServerDisconnected:
                _close(conn)
                if watch.aborted:
                    return Transient(f"SMTP timed out after {self.timeout:g} s")
                if not fresh:
                    continue  # an idle pooled connection was closed by the server; try a new one
                return Transient("SMTP server disconnected")
            except smtplib.SMTPRecipientsRefused as exc:
                self._give_back(conn, watch)
                code, text = exc.recipients.get(address, (550, b"refused"))
                return _judge(code, f"SMTP {code}: {self._said(text)}")
            except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as exc:
                self._give_back(conn, watch)
                return _judge(exc.smtp_code, f"SMTP {exc.smtp_code}: {self._said(exc.smtp_error)}")
            except (OSError, smtplib.SMTPException):
                _close(conn)
                if watch.aborted:
                    return Transient(f"SMTP timed out after {self.timeout:g} s")
                return Transient("SMTP conversation failed")
            self._give_back(conn, watch)
            return Sent(str(email["Message-ID"]))
        return Transient("SMTP server disconnected")

    def _connection(self, fresh: bool, watch: _Watch, server: str) -> smtplib.SMTP:
        if not fresh:
            with self._lock:
                if self._pool:
                    return watch.on(self._pool.popleft())
        left = watch.left()
        if left <= 0:
            raise TimeoutError("no time left to connect")
        # Connecting and the greeting take at most the time left; from then on the watch
        # bounds every command. The certificate is checked against the name, not the address.
        conn = smtplib.SMTP(timeout=left)
        conn._host = self.host  # type: ignore[attr-defined]
        try:
            conn.connect(server, self.port)
            watch.on(conn)
            conn.ehlo()
            if self.starttls:
                conn.starttls(context=ssl.create_default_context())
                conn.ehlo()
            if self.username:
                conn.login(self.username, self.password or "")
        except BaseException:
            _close(conn)
            raise
        return conn

    def _said(self, value: bytes | str) -> str:
        """What the server said, cleaned and bounded, credentials scrubbed."""
        return clean(_text(value), self._scrub)

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "<credential>")
        return text

    @functools.cached_property
    def _secrets(self) -> list[str]:
        """The login as it may come back: plain, or base64 as AUTH LOGIN and PLAIN send it."""
        plain = [s for s in (self.password, self.username) if s]
        encoded = [base64.b64encode(s.encode()).decode() for s in plain]
        if self.username:
            auth_plain = f"\0{self.username}\0{self.password or ''}".encode()
            encoded.append(base64.b64encode(auth_plain).decode())
        # Longest first, so a credential inside another is replaced whole.
        return sorted(plain + encoded, key=len, reverse=True)

    def _give_back(self, conn: smtplib.SMTP, watch: _Watch) -> None:
        if not watch.done(conn):
            _close(conn)
            return
        with self._lock:
            if len(self._pool) < POOL_SIZE:
                self._pool.append(conn)
                return
        _close(conn)

    async def close(self) -> None:
        """QUIT every pooled connection, then stop the adapter's threads."""
        with self._lock:
            conns, self._pool = list(self._pool), deque()
        loop = asyncio.get_running_loop()
        for conn in conns:
            await loop.run_in_executor(self._threads, _quit, conn)
        self._threads.shutdown(wait=False)


class _Watch:
    """The connection one send is using, so its deadline can shut it from another thread."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.aborted = False
        self._conn: smtplib.SMTP | None = None
        self._lock = threading.Lock()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def on(self, conn: smtplib.SMTP) -> smtplib.SMTP:
        with self._lock:
            self._conn = conn
            if self.aborted:
                _shut(conn)
        return conn

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            if self._conn is not None:
                _shut(self._conn)

    def done(self, conn: smtplib.SMTP) -> bool:
        """The send is over: let go of the connection (so a late deadline cannot shut it under
        another send). False when the deadline already shut it (not fit to reuse).
        """
        with self._lock:
            self._conn = None
            return not self.aborted


def _shut(conn: smtplib.SMTP) -> None:
    sock = getattr(conn, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _judge(code: int, text: str) -> Outcome:
    if code in THROTTLE_CODES:
        return Transient(reason(text), throttled=True)
    if 400 <= code < 500:
        return Transient(reason(text))
    return Permanent(reason(text), unreachable=code in UNREACHABLE_CODES)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _quit(conn: smtplib.SMTP) -> None:
    try:
        conn.quit()
    except (OSError, smtplib.SMTPException):
        _close(conn)


def _close(conn: smtplib.SMTP) -> None:
    with contextlib.suppress(OSError):
        conn.close()
