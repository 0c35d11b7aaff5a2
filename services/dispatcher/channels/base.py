"""The one small interface every channel adapter implements, and the three outcomes of a send."""

from __future__ import annotations

import asyncio
import email.utils
import time
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from shared.values import value

#: Longest provider answer kept as a failure reason.
MAX_REASON = 500
#: Longest wait a provider may ask for (Retry-After); a longer one is taken as this.
MAX_WAIT_ASKED = 3600.0
#: Longest provider message id kept.
MAX_ID = 200


@dataclass(frozen=True)
class MediaRef:
    """An image attached to a message: where a provider can fetch it, and what it is."""

    media_id: int
    url: str
    content_type: str
    storage_key: str


@dataclass(frozen=True)
class OutboundMessage:
    """What goes to every recipient of one broadcast."""

    broadcast_id: int
    text: str | None
    media: tuple[MediaRef, ...] = field(default_factory=tuple)
    #: The broadcast's name: an email's subject.
    subject: str | None = None
    #: WhatsApp: the template message (the Cloud API's ``template`` object, its parameters
    #: rendered for the recipient) sent in place of text and images, to a recipient outside
    #: the 24-hour window or when the broadcast is a template only.
    template: dict[str, Any] | None = None
    #: Messenger and Instagram: the message tag a message outside the 24-hour window goes
    #: with (``messaging_type`` MESSAGE_TAG); None inside it (``messaging_type`` UPDATE).
    tag: str | None = None


@value
class Sent:
    """The provider accepted the message."""

    provider_message_id: str | None


@value
class Transient:
    """Try again later: throttled, provider trouble, timeout. ``retry_after`` in seconds, if told."""

    reason: str
    retry_after: float | None = None
    #: The provider asked this whole channel to slow down (HTTP 429 and the like).
    throttled: bool = False
    #: Parts of a several-call message the provider already accepted (kept for the retry).
    parts_done: int = 0
    provider_message_id: str | None = None
    #: Not a failure: the sender stopped before the next part (a pause, a lost lease); the
    #: rest goes later, and no attempt is spent.
    held_back: bool = False
    #: No send of this broadcast can work until an operator acts (the egress rule refused the
    #: provider's address, or the provider refused the message's template), so the broadcast
    #: is paused with this reason.
    refused: bool = False
    #: The refusal is the provider's answer to a call (not the sender's own refusal to
    #: connect): the attempt counts, so a refusal of one recipient misjudged as everyone's
    #: cannot hold the broadcast for ever (after the last attempt the recipient fails).
    by_provider: bool = False


@value
class Permanent:
    """It will never work for this recipient; ``reason`` says why, in the provider's words."""

    reason: str
    #: The recipient cannot be reached on this channel at all (blocked the bot, no such user).
    unreachable: bool = False
    #: Parts of a several-call message the provider accepted before this one was refused: the
    #: recipient got part of the message.
    parts_done: int = 0
    provider_message_id: str | None = None


Outcome = Sent | Transient | Permanent


def go_on() -> bool:
    """The default answer to "may the next part of a message go?": yes."""
    return True


class ChannelAdapter(Protocol):
    """Turns one message for one address into provider calls, and the answers into an outcome.

    ``idempotency_key`` is the delivery id: a provider that honours it never delivers twice.
    """

    #: Most calls this adapter can have under way at once (a connection pool's size), or None
    #: when only the dispatcher's own caps apply.
    max_in_flight: int | None

    async def send(
        self,
        message: OutboundMessage,
        address: str,
        idempotency_key: str,
        *,
        parts_done: int = 0,
        may_go_on: Callable[[], bool] = go_on,
    ) -> Outcome:
        """Send to one address. A message that takes several provider calls (several images
        on a provider without albums) skips the first ``parts_done`` calls, which an earlier
        attempt already made, so a retry never repeats them, and makes each next call only
        if ``may_go_on()`` (a pause stops a message between its parts, not only between
        recipients).
        """
        ...

    async def close(self) -> None: ...


class Multicaster(ChannelAdapter, Protocol):
    """An adapter whose provider sends one message to many recipients in one call
    (``max_recipients`` of them), every call under a retry key stored before it is made.
    """

    max_recipients: int

    async def send_many(
        self,
        message: OutboundMessage,
        addresses: Sequence[str],
        idempotency_key: str,
        *,
        parts_done: int = 0,
        may_go_on: Callable[[], bool] = go_on,
    ) -> Outcome:
        """Send to every address in one call; the outcome is each one's."""
        ...


def printable(text: str) -> str:
    """``text`` with every control, format, surrogate and unassigned character (NUL, escape
    sequences, lone surrogates Postgres cannot store) and every line break made a space.
    """
    return "".join(
        ch if ch == " " or unicodedata.category(ch)[0] not in "CZ" else " " for ch in text
    )


def reason(text: str) -> str:
    """A failure reason fit to store: one line of printable text (Postgres refuses NUL and
    lone surrogates), at most ``MAX_REASON`` characters. Whatever a provider answers, it can
    be written.
    """
    text = " ".join(printable(text).split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"


def message_id(value: object) -> str | None:
    """A provider's message id fit to store, or None when it gave none worth keeping:
    printable, without commas (they join the ids of several-part messages), at most
    ``MAX_ID`` characters.
    """
    if value is None or isinstance(value, bool | dict | list):
        return None
    if (
        type(value) is str
        and len(value) <= MAX_ID
        and value.isascii()
        and value.isprintable()
        and " " not in value
        and "," not in value
    ):
        return value or None  # the common case, already fit: no character to look at
    kept = "".join(ch for ch in str(value) if ch == " " or unicodedata.category(ch)[0] not in "CZ")
    text = " ".join(kept.replace(",", " ").split())[:MAX_ID]
    return text or None


def wait_asked(seconds: object) -> float | None:
    """A wait a provider asked for, in seconds, fit to act on: finite, from 0 to
    ``MAX_WAIT_ASKED``; None when it is not a number.
    """
    try:
        value = float(seconds)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if value != value:  # NaN
        return None
    return min(max(0.0, value), MAX_WAIT_ASKED)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if (seconds := wait_asked(value)) is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return wait_asked(when.timestamp() - (time.time() if now is None else now))


def join_ids(earlier: str | None, more: list[str]) -> str | None:
    """Provider message ids of a several-call message, comma-separated."""
    if not earlier and len(more) == 1:
        return more[0] or None  # one call, the common case
    ids = [*(earlier.split(",") if earlier else []), *more]
    return ",".join(ids) or None


async def send_in_parts(
    count: int,
    parts_done: int,
    idempotency_key: str,
    call: Callable[[int, str], Awaitable[Outcome]],
    may_go_on: Callable[[], bool] = go_on,
    *,
    gap: float = 0.0,
) -> Outcome:
    """Make the calls of a several-call message in order, from ``parts_done`` on, ``gap``
    seconds apart (a provider's limit of messages to one chat).

    ``call(index, key)`` makes one call; each gets its own idempotency key when there are
    several. A failure reports how many parts the provider accepted (a transient one so the
    retry starts after them, a permanent one so the recipient shows as partly reached); the ids
    of accepted parts are kept, comma-separated.
    """
    ids: list[str] = []
    for index in range(parts_done, count):
        if index > parts_done and gap > 0:
            await asyncio.sleep(gap)
        if index > parts_done and not may_go_on():
            return Transient(
                f"held back before part {index + 1} of {count}",
                parts_done=index,
                provider_message_id=join_ids(None, ids),
                held_back=True,
            )
        key = idempotency_key if count == 1 else f"{idempotency_key}-{index}"
        outcome = await call(index, key)
        if isinstance(outcome, Transient):
            return Transient(
                outcome.reason,
                outcome.retry_after,
                throttled=outcome.throttled,
                parts_done=index,
                provider_message_id=join_ids(None, ids),
                refused=outcome.refused,
                by_provider=outcome.by_provider,
            )
        if isinstance(outcome, Permanent):
            return Permanent(
                outcome.reason,
                unreachable=outcome.unreachable,
                parts_done=index,
                provider_message_id=join_ids(None, ids),
            )
        if outcome.provider_message_id:
            ids.append(outcome.provider_message_id)
    return Sent(join_ids(None, ids))
