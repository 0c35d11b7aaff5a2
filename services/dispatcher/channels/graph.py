"""Messenger and Instagram through Meta's Graph Send API: ``POST /{version}/me/messages`` for a
Facebook Page, ``POST /{version}/{ig_user_id}/messages`` for an Instagram professional account.

Both take one message per call: the text first (split at whitespace into several messages
when longer than the provider takes), then one call per image, given as the API's signed URL
for Meta to fetch. A retry skips the calls already accepted. Inside the 24-hour window a message
goes with ``messaging_type`` UPDATE; outside it the dispatcher picks a message tag and it goes
with MESSAGE_TAG and that tag. The page access token travels in the ``Authorization`` header,
never in the URL, and is scrubbed from every reason.

Errors are judged by the Graph error's code and subcode: rate limits (613, 4, 17, 32, 80006,
HTTP 429) slow the whole channel; temporary trouble (1, 2, 1200, HTTP 5xx) is retried; a person
who is not available (551) or not found (100/2018001) is permanent and marks the contact
unreachable; a message outside the allowed window (10/2018278) fails with the provider's
words and is not retried; an invalid or expired token (190) and other permission errors
(10, 200-299) pause the broadcast, since every send would fail alike.
"""

from __future__ import annotations

from collections.abc import Callable
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
from services.dispatcher.channels.client import HttpClient
from services.dispatcher.channels.http import (
    graph_code,
    json_body,
    json_object,
    post,
    provider_message,
)

#: Rate limits (application, page, user and Messenger's own): the whole channel slows down.
THROTTLE_CODES = frozenset({4, 17, 32, 613, 80006})
#: Temporary trouble on Meta's side ("unknown error", "service unavailable", "temporary send
#: message failure").
TRANSIENT_CODES = frozenset({1, 2, 1200})
#: The person cannot be reached from this page or account at all.
UNREACHABLE_CODES = frozenset({551})
UNREACHABLE_SUBCODES = frozenset({(100, 2018001)})  # no matching user found
#: The message went outside the 24-hour window without a tag that allows it.
OUTSIDE_WINDOW_SUBCODE = 2018278
OUTSIDE_WINDOW_WORDS = "outside of allowed window"
#: One person not receiving the page's messages (code 10, 200 or 551 and these subcodes).
NOT_RECEIVING = frozenset({(10, 2018108), (200, 2018108), (551, 1545041)})
NOT_RECEIVING_WORDS = "isn't receiving messages"
#: Invalid or expired access token.
TOKEN_CODE = 190
#: Permission errors: the app or token lacks a permission, so every send would be refused.
PERMISSION_CODES = frozenset({10, *range(200, 300)})
#: Wait when a rate limit comes without a Retry-After.
THROTTLE_WAIT = 1.0


class GraphAdapter:
    """What Messenger and Instagram share: the Send API's body, its answers and its errors.

    Parameters:
      config: ``page_access_token``, ``api_version``, ``api_base_url`` (and, for Instagram,
        ``ig_user_id``).
      http: the process's shared HTTP client.
    """

    #: How reasons name the provider.
    label = "Graph"
    #: The longest text one message may hold; longer text goes as several messages.
    max_text = 2000

    max_in_flight: int | None = None

    def __init__(self, config: dict[str, Any], http: HttpClient) -> None:
        base = str(config["api_base_url"]).rstrip("/")
        self.url = f"{base}/{config['api_version']}/{self.sender(config)}/messages"
        self.token = str(config["page_access_token"])
        self.http = http

    @staticmethod
    def sender(config: dict[str, Any]) -> str:
        """The path segment that names who sends."""
        return "me"

    def fit(self, text: str) -> str:
        """The longest start of ``text`` one message can hold."""
        return text[: self.max_text]

    def texts(self, text: str) -> list[str]:
        """``text`` as the messages that carry it, in order: split at a line break or a space
        where one is near the limit, mid-word only when a word is longer than a message.
        """
        parts: list[str] = []
        rest = text
        while rest:
            window = self.fit(rest)
            if len(window) == len(rest):
                parts.append(rest)
                break
            cut = _cut(window)
            part = rest[:cut].rstrip()
            if part:
                parts.append(part)
            rest = rest[cut:].lstrip()
        return parts

    def messages(self, message: OutboundMessage) -> list[dict[str, Any]]:
        """The ``message`` object of each call, in order: the text, then one per image."""
        calls: list[dict[str, Any]] = [{"text": t} for t in self.texts(message.text or "")]
        calls.extend(
            {"attachment": {"type": "image", "payload": {"url": m.url, "is_reusable": True}}}
            for m in message.media
        )
        return calls

    def body(self, message: OutboundMessage, address: str, part: dict[str, Any]) -> dict[str, Any]:
        """One call's body: who gets it, under which messaging type, and what it holds."""
        body: dict[str, Any] = {"recipient": {"id": address}}
        if message.tag:
            body["messaging_type"] = "MESSAGE_TAG"
            body["tag"] = message.tag
        else:
            body["messaging_type"] = "UPDATE"
        body["message"] = part
        return body

    async def send(
        self,
        message: OutboundMessage,
        address: str,
        idempotency_key: str,
        *,
        parts_done: int = 0,
        may_go_on: Callable[[], bool] = go_on,
    ) -> Outcome:
        parts = self.messages(message)

        async def call(index: int, key: str) -> Outcome:
            return await self._call(self.body(message, address, parts[index]), key)

        return await send_in_parts(len(parts), parts_done, idempotency_key, call, may_go_on)

    async def _call(self, body: dict[str, Any], key: str) -> Outcome:
        headers = {
            "Authorization": f"Bearer {self.token}",
            "Content-Type": "application/json",
            "Idempotency-Key": key,
        }
        got = await post(self.http, self.url, json_body(body), headers)
        if isinstance(got, Transient):
            return got
        return self.judge(got.status, got.body, got.headers.get("retry-after"))

    def judge(self, status: int, raw: bytes, retry_after: str | None) -> Outcome:
        """The outcome of one answer."""
        answer = json_object(raw)
        if 200 <= status < 300:
            return Sent(message_id(answer.get("message_id")))
        error = answer.get("error")
        error = error if isinstance(error, dict) else {}
        code, subcode = graph_code(error.get("code")), graph_code(error.get("error_subcode"))
        described = provider_message(raw, (("error", "message"),), self._scrub)
        head = f"{self.label} {code}" if code else f"{self.label} HTTP {status}"
        if code and subcode:
            head = f"{head}/{subcode}"
        text = reason(f"{head}: {described}" if described else head)
        if 300 <= status < 400:
            # Not an answer of the Graph API: redirects are never followed.
            return Permanent(text)
        if code in THROTTLE_CODES or status == 429:
            return Transient(text, parse_retry_after(retry_after) or THROTTLE_WAIT, throttled=True)
        if code in UNREACHABLE_CODES or (code, subcode) in UNREACHABLE_SUBCODES:
            return Permanent(text, unreachable=True)
        if code in (10, 200) and (
            subcode == OUTSIDE_WINDOW_SUBCODE or OUTSIDE_WINDOW_WORDS in (described or "").lower()
        ):
            # This recipient only, and not before they write in again: no retry, and no
            # reason to think them unreachable.
            return Permanent(text)
        if (code, subcode) in NOT_RECEIVING or (
            code in (10, 200) and NOT_RECEIVING_WORDS in (described or "").lower()
        ):
            # This person does not take messages from the page now (blocked it, or turned
            # its messages off): this recipient fails, the broadcast goes on.
            return Permanent(text)
        if code == TOKEN_CODE or code in PERMISSION_CODES:
            return Transient(text, refused=True, by_provider=True)
        if code in TRANSIENT_CODES or status >= 500:
            return Transient(text)
        return Permanent(text)

    def _scrub(self, text: str) -> str:
        # The access token must never reach a stored reason, even quoted back by an error.
        return text.replace(self.token, "<access token>") if self.token else text

    async def close(self) -> None:
        """The HTTP client belongs to the process."""


class MessengerAdapter(GraphAdapter):
    """A Facebook Page's messages: ``POST {api_base_url}/{api_version}/me/messages``."""

    label = "Messenger"
    max_text = 2000


class InstagramAdapter(GraphAdapter):
    """An Instagram professional account's messages:
    ``POST {api_base_url}/{api_version}/{ig_user_id}/messages``.
    """

    label = "Instagram"
    #: Instagram takes text of at most 1000 bytes of UTF-8 (fewer characters when they are
    #: not ASCII), so that is what a message is measured in.
    max_text = 1000

    @staticmethod
    def sender(config: dict[str, Any]) -> str:
        return str(config["ig_user_id"])

    def fit(self, text: str) -> str:
        # Bytes cut mid-character are dropped, so the start is whole characters.
        return text.encode()[: self.max_text].decode(errors="ignore")


def _cut(window: str) -> int:
    """Where to end a message whose text fills ``window`` and goes on after it: after the
    last line break in its second half, else at its last whitespace, else at its end.
    """
    line = window.rfind("\n")
    if line >= len(window) // 2:
        return line + 1
    for i in range(len(window) - 1, 0, -1):
        if window[i].isspace():
            return i
    return len(window)
