"""The HTTP client every HTTP channel shares, and how its failures read.

The session connects only where the egress rule allows (``shared.egress``): names are
resolved, refused addresses dropped, and the socket factory checks the address once more just
before it connects (literal addresses skip resolution). Redirects are never followed, so a
provider's 3xx cannot send a request somewhere the rule would refuse.

A failure stored for an operator holds bcast's own words and at most a short, cleaned
message the provider gave in a JSON error body, never raw bytes of whatever answered: an
address that is not a provider must not be able to hand its banner back through a reason.
Connection failures read the same whatever their cause, so a reason cannot map ports.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from services.dispatcher.channels.base import Transient, printable
from shared.egress import Egress, EgressRefused, parse_literal

#: What any failure to reach a provider, or to read an HTTP answer from it, is stored as.
UNREACHABLE_PROVIDER = "could not reach the provider (no connection, no HTTP answer, or timed out)"
#: Longest part of a provider's own error message kept in a reason.
MAX_PROVIDER_MESSAGE = 200
#: Most bytes of an answer read: a provider's reply is small, and whatever sends more (a
#: tenant's own endpoint streaming gigabytes) is cut off rather than held in memory.
MAX_ANSWER = 64 * 1024


async def read_answer(resp: aiohttp.ClientResponse) -> bytes:
    """The answer's body, or its first ``MAX_ANSWER`` bytes when it is longer (the connection
    is then closed, not reused).
    """
    if resp.content_length is not None:
        if resp.content_length > MAX_ANSWER:
            resp.close()
            return b""
        return await resp.read()  # its length is known and small: one read
    body = bytearray()
    while len(body) <= MAX_ANSWER:
        chunk = await resp.content.read(MAX_ANSWER + 1 - len(body))
        if not chunk:
            return bytes(body)
        body += chunk
    resp.close()
    return bytes(body[:MAX_ANSWER])


class EgressResolver(AbstractResolver):
    """Resolves names, then keeps only the addresses the egress rule allows.

    Parameters:
      egress: the rule.
      inner: the resolver that does the lookups.
    """

    def __init__(self, egress: Egress, inner: AbstractResolver | None = None) -> None:
        self.egress = egress
        self.inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        literal = parse_literal(host)
        if literal is not None:
            # A legacy spelling of an address (``2130706433``, ``127.1``): judged as the
            # address it is, never handed to DNS.
            self.egress.check(str(literal), host)
            return [
                {
                    "hostname": host,
                    "host": str(literal),
                    "port": port,
                    "family": socket.AF_INET6 if literal.version == 6 else socket.AF_INET,
                    "proto": 0,
                    "flags": socket.AI_NUMERICHOST,
                }
            ]
        found = await self.inner.resolve(host, port, family)
        if self.egress.allow_private:
            return found
        allowed: list[ResolveResult] = []
        first_refusal: EgressRefused | None = None
        for result in found:
            try:
                self.egress.check(result["host"], host)
            except EgressRefused as exc:
                first_refusal = first_refusal or exc
            else:
                allowed.append(result)
        if not allowed and first_refusal is not None:
            raise first_refusal
        return allowed

    async def close(self) -> None:
        await self.inner.close()


def make_session(
    egress: Egress, *, max_in_flight: int, timeout_seconds: float
) -> aiohttp.ClientSession:
    """The process's one client session: keep-alive pool, egress rule, one timeout for a
    whole call (connect, send, read).
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=max_in_flight,
            ttl_dns_cache=300,
            resolver=EgressResolver(egress),
            socket_factory=egress.socket,
        ),
        timeout=aiohttp.ClientTimeout(total=timeout_seconds),
        # Providers' cookies mean nothing to a sender, and parsing them costs CPU per call.
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"User-Agent": "bcast"},
        # No environment proxies: every connection goes where the egress rule looked.
        trust_env=False,
    )


def refused_by_egress(exc: BaseException) -> EgressRefused | None:
    """The egress refusal behind a client error, if that is what it was."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, EgressRefused):
            return current
        if isinstance(current, aiohttp.ClientConnectorError):
            current = current.os_error
            continue
        current = current.__cause__ or current.__context__
    return None


def header_refused(_: ValueError) -> Transient:
    """A credential or address in the channel's config that HTTP cannot carry (a line break
    in a token): every send would fail alike, so the broadcast waits for the operator.
    """
    return Transient(
        "the channel's config cannot be used: a credential or address holds characters an "
        "HTTP request cannot carry; fix the channel",
        refused=True,
    )


def connection_failure(exc: BaseException) -> Transient:
    """The outcome of a call that got no HTTP answer: the same words for every cause
    (refused, reset, not HTTP, timed out), except a refusal by the egress rule, which stops
    the channel until an operator fixes its config.
    """
    refused = refused_by_egress(exc)
    if refused is not None:
        return Transient(f"the channel's provider address is refused: {refused}", refused=True)
    if isinstance(exc, aiohttp.InvalidURL):
        # Legacy address spellings (``http://2130706433/``) and the like: never connected.
        return Transient(
            "the channel's provider address is refused: its URL is not a valid address",
            refused=True,
        )
    return Transient(UNREACHABLE_PROVIDER)


def clean(text: str, scrub: Callable[[str], str] = str) -> str:
    """A provider's message fit to show: printable characters only, one line, at most
    ``MAX_PROVIDER_MESSAGE`` characters, credentials scrubbed.
    """
    one_line = " ".join(scrub(printable(text)).split())
    if len(one_line) > MAX_PROVIDER_MESSAGE:
        return one_line[: MAX_PROVIDER_MESSAGE - 1] + "…"
    return one_line


def provider_message(
    raw: bytes, paths: Iterable[tuple[str, ...]], scrub: Callable[[str], str] = str
) -> str | None:
    """The provider's own error message from a JSON answer: the first string found at one of
    ``paths`` (``("error", "message")``), cleaned; None for anything that is not JSON.
    """
    try:
        data: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    for path in paths:
        value = data
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, str) and value.strip():
            return clean(value, scrub)
    return None


def http_reason(
    label: str,
    status: int,
    raw: bytes,
    paths: Iterable[tuple[str, ...]],
    scrub: Callable[[str], str] = str,
) -> str:
    """``"<label> HTTP 503: <provider's message>"``, or without the message when it gave none."""
    said = provider_message(raw, paths, scrub)
    head = f"{label} HTTP {status}"
    return f"{head}: {said}" if said else head
