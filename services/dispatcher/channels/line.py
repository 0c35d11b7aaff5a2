"""LINE Messaging API: ``push`` to one user, ``multicast`` to up to 500 users in one call.

Text and images are message objects, at most five to a request; a message of more (text and
ten images) takes several calls, each a part, which a retry skips once accepted. Every
request carries ``X-Line-Retry-Key``, a UUID stored on the rows before the call is made: a
repeat after a crash or a timeout goes under the same key to the same recipients, and LINE
answers it 409 with the id of the request it accepted first, which counts as sent. So a
recipient gets each message once, whatever happens to the sender between call and answer.

A multicast's answer is one answer for all its recipients: LINE does not say which of them
it did not reach (a user who blocked the account, an id of another provider), so each counts
as sent when the call is accepted.

Answers: 200 sent; 409 (retry key already accepted) sent; 429 throttled (``Retry-After`` when
given), except the monthly message quota, which pauses the broadcast; 401 and 403 (a revoked
token, a plan without the feature) pause it too, as every call would be refused alike; 5xx and
no answer are transient; another 4xx fails the recipients with LINE's message.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

from services.dispatcher.channels.base import (
    OutboundMessage,
    Outcome,
    Permanent,
    Sent,
    Transient,
    go_on,
    message_id,
    parse_retry_after,
    reason,
    send_in_parts,
)
from services.dispatcher.channels.client import Answer, HttpClient
from services.dispatcher.channels.http import (
    clean,
    json_body,
    json_object,
    post,
    provider_message,
)
from shared.domain.lifecycle import MULTICAST_RECIPIENTS, ChannelKind

#: Users one multicast call may carry.
MAX_RECIPIENTS = MULTICAST_RECIPIENTS[ChannelKind.LINE]
#: Message objects one request may carry.
MAX_MESSAGES = 5
#: Longest text object.
MAX_TEXT = 5000
#: Wait after a 429 that names no time.
THROTTLE_WAIT = 1.0
#: The 429 of the monthly quota: no wait makes it pass before the month turns.
QUOTA_HINT = "monthly limit"
#: Namespace of the keys of a message's later parts (derived from the call's key).
_PART_KEYS = uuid.UUID("6f0b0a5e-3c51-4a8f-9a4b-2b8d6c0e4f11")


def retry_key(key: str, index: int) -> str:
    """The ``X-Line-Retry-Key`` of part ``index`` of the call ``key``: the key itself for the
    first part, one derived from it for each later part (a UUID either way).
    """
    try:
        base = uuid.UUID(key)
    except ValueError:
        base = uuid.uuid5(_PART_KEYS, key)
    return str(base if index == 0 else uuid.uuid5(base, f"part-{index}"))


class LineAdapter:
    """Parameters:
    config: ``channel_access_token`` and ``api_base_url``.
    http: the process's shared HTTP client.
    """

    max_in_flight: int | None = None
    #: Recipients one call may carry: a broadcast's rows go in multicasts of up to this many.
    max_recipients = MAX_RECIPIENTS
    #: Every call carries a retry key the run stores on its rows before the call.
    keyed = True

    def __init__(self, config: dict[str, Any], http: HttpClient) -> None:
        base = str(config["api_base_url"]).rstrip("/")
        self.push_url = f"{base}/v2/bot/message/push"
        self.multicast_url = f"{base}/v2/bot/message/multicast"
        self.token = str(config["channel_access_token"])
        self.http = http

    def requests(self, message: OutboundMessage) -> list[list[dict[str, Any]]]:
        """The message objects of each call, in order: the text, then the images."""
        objects: list[dict[str, Any]] = []
        text = message.text
        while text:
            objects.append({"type": "text", "text": text[:MAX_TEXT]})
            text = text[MAX_TEXT:]
        for m in message.media:
            objects.append({"type": "image", "originalContentUrl": m.url, "previewImageUrl": m.url})
        return [objects[i : i + MAX_MESSAGES] for i in range(0, len(objects), MAX_MESSAGES)]

    async def send(
        self,
        message: OutboundMessage,
        address: str,
        idempotency_key: str,
        *,
        parts_done: int = 0,
        may_go_on: Callable[[], bool] = go_on,
    ) -> Outcome:
        """Push to one user."""
        return await self._send(message, address, idempotency_key, parts_done, may_go_on)

    async def send_many(
        self,
        message: OutboundMessage,
        addresses: Sequence[str],
        idempotency_key: str,
        *,
        parts_done: int = 0,
        may_go_on: Callable[[], bool] = go_on,
    ) -> Outcome:
        """Multicast to up to ``MAX_RECIPIENTS`` users; the outcome is each one's. A refusal
        of the request (400: a message LINE does not take) would refuse every call of the
        broadcast alike, never one user (ids are checked when contacts are written, and LINE
        passes over an unknown one): the broadcast pauses with the reason instead of failing
        every recipient.
        """
        if len(addresses) > MAX_RECIPIENTS:
            raise ValueError(f"a multicast carries at most {MAX_RECIPIENTS} users")
        outcome = await self._send(message, list(addresses), idempotency_key, parts_done, may_go_on)
        if isinstance(outcome, Permanent):
            return Transient(
                outcome.reason,
                parts_done=outcome.parts_done,
                provider_message_id=outcome.provider_message_id,
                refused=True,
                by_provider=True,
            )
        return outcome

    async def _send(
        self,
        message: OutboundMessage,
        to: str | list[str],
        key: str,
        parts_done: int,
        may_go_on: Callable[[], bool],
    ) -> Outcome:
        requests = self.requests(message)
        url = self.multicast_url if isinstance(to, list) else self.push_url

        async def call(index: int, _: str) -> Outcome:
            body = {"to": to, "messages": requests[index]}
            return await self._call(url, body, retry_key(key, index))

        return await send_in_parts(len(requests), parts_done, key, call, may_go_on)

    async def _call(self, url: str, body: dict[str, Any], key: str) -> Outcome:
        headers = {
            "Authorization": f"Bearer {self.token}",
            "Content-Type": "application/json",
            "X-Line-Retry-Key": key,
        }
        got = await post(self.http, url, json_body(body), headers)
        return got if isinstance(got, Transient) else self.judge(got)

    def judge(self, got: Answer) -> Outcome:
        """The outcome of one LINE answer."""
        status = got.status
        if status == 200:
            return Sent(_sent_id(got))
        if status == 409 and got.headers.get("x-line-accepted-request-id"):
            # The retry key was accepted before: this call was made already.
            return Sent(message_id(got.headers["x-line-accepted-request-id"]))
        said = provider_message(got.body, (("message",),), self._scrub)
        details = _first_detail(got.body, self._scrub)
        text = reason(
            f"LINE HTTP {status}"
            + (f": {said}" if said else "")
            + (f" ({details})" if details else "")
        )
        if status == 429:
            if said and QUOTA_HINT in said.lower():
                return Transient(text, refused=True, by_provider=True)
            wait = parse_retry_after(got.headers.get("retry-after")) or THROTTLE_WAIT
            return Transient(text, wait, throttled=True)
        if status >= 500:
            return Transient(text)
        if status in (401, 403):
            return Transient(text, refused=True, by_provider=True)
        return Permanent(text)

    def _scrub(self, text: str) -> str:
        return text.replace(self.token, "<channel access token>") if self.token else text

    async def close(self) -> None:
        """The HTTP client belongs to the process."""


def _first_detail(raw: bytes, scrub: Callable[[str], str]) -> str | None:
    """The first of LINE's ``details`` (``{"message", "property"}``), cleaned."""
    details = json_object(raw).get("details")
    if not isinstance(details, list) or not details or not isinstance(details[0], dict):
        return None
    said, where = details[0].get("message"), details[0].get("property")
    if not isinstance(said, str):
        return None
    return clean(f"{where}: {said}" if isinstance(where, str) else said, scrub)


def _sent_id(got: Answer) -> str | None:
    """A push answers the ids of its messages; a multicast only its request id."""
    answer = json_object(got.body)
    if isinstance(answer.get("sentMessages"), list):
        ids = [message_id(m.get("id")) for m in answer["sentMessages"] if isinstance(m, dict)]
        if found := ",".join(i for i in ids if i):
            return found
    return message_id(got.headers.get("x-line-request-id"))
