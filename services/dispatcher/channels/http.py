"""The HTTP client every HTTP channel shares, and how its failures read.

The client (``channels.client``) connects only where the egress rule allows
(``shared.egress``): names are resolved, refused addresses dropped, and the socket is checked
once more just before it connects (literal addresses skip resolution). Redirects are never
followed, so a provider's 3xx cannot send a request somewhere the rule would refuse.

A failure stored for an operator holds bcast's own words and at most a short, cleaned
message the provider gave in a JSON error body, never raw bytes of whatever answered: an
address that is not a provider must not be able to hand its banner back through a reason.
Connection failures read the same whatever their cause, so a reason cannot map ports.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from services.dispatcher.channels.base import Transient, printable
from services.dispatcher.channels.client import MAX_ANSWER as MAX_ANSWER
from services.dispatcher.channels.client import Answer, HttpClient, HttpError, InvalidUrl
from shared.egress import Egress, EgressRefused

#: Whatever a call can raise when it got no HTTP answer.
NO_ANSWER = (TimeoutError, HttpError, OSError)

#: What any failure to reach a provider, or to read an HTTP answer from it, is stored as.
UNREACHABLE_PROVIDER = "could not reach the provider (no connection, no HTTP answer, or timed out)"
#: Longest part of a provider's own error message kept in a reason.
MAX_PROVIDER_MESSAGE = 200


def make_client(egress: Egress, *, max_in_flight: int, timeout_seconds: float) -> HttpClient:
    """The process's one HTTP client: keep-alive connections, the egress rule, one timeout
    for a whole call (connect, send, read).
    """
    return HttpClient(egress, max_in_flight=max_in_flight, timeout_seconds=timeout_seconds)


#: One encoder for every body: ``json.dumps`` with options of its own builds an encoder per
#: call, which costs more than encoding a recipient's address or key.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def json_body(value: Any) -> bytes:
    """``value`` as a compact UTF-8 JSON body."""
    return _ENCODER.encode(value).encode()


def refused_by_egress(exc: BaseException) -> EgressRefused | None:
    """The egress refusal behind a client error, if that is what it was."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, EgressRefused):
            return current
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
    if isinstance(exc, InvalidUrl):
        # Not an http(s) URL with a host: never connected.
        return Transient(
            "the channel's provider address is refused: its URL is not a valid address",
            refused=True,
        )
    return Transient(UNREACHABLE_PROVIDER)


async def post(
    http: HttpClient, url: str, body: bytes, headers: Mapping[str, str]
) -> Answer | Transient:
    """One provider call: its answer, or the outcome of a call that got none (see
    ``connection_failure``) or whose headers HTTP cannot carry (see ``header_refused``).
    """
    try:
        return await http.post(url, body, headers)
    except NO_ANSWER as exc:
        return connection_failure(exc)
    except ValueError as exc:
        return header_refused(exc)


_DECODER = json.JSONDecoder()


def json_object(raw: bytes) -> dict[str, Any]:
    """An answer's JSON object; an empty one for a body that is not one."""
    try:
        # UTF-8 (RFC 8259), the common case, decoded here: ``json.loads`` of bytes first
        # guesses their encoding, a third of the cost of a small answer.
        text = raw.decode()
        answer = _DECODER.decode(text[1:] if text.startswith("\ufeff") else text)
    except ValueError:  # UnicodeDecodeError included
        try:
            # Whatever else ``json.loads`` reads (UTF-16 or -32, a lone surrogate).
            answer = json.loads(raw)
        except ValueError:
            return {}
    return answer if isinstance(answer, dict) else {}


def graph_code(value: Any) -> int:
    """A Graph API error's ``code`` or ``error_subcode`` (Meta's: WhatsApp, Messenger,
    Instagram), or 0 when it gave none worth reading.
    """
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10**9:
        return value
    return 0


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
