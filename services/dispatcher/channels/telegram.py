"""Telegram Bot API: ``sendMessage``, ``sendPhoto``, ``sendMediaGroup`` for several images.

A 429 carries ``parameters.retry_after``; 403 (the user blocked the bot, or deactivated) and
"chat not found" mean the contact is unreachable; other 4xx are permanent; 5xx and network
trouble are transient. Images go as the API's signed, expiring URLs (Telegram fetches them).
The calls of one message to one chat go a second apart (three to a group): Telegram's per-chat
limit, beside the bot-wide one the channel's rate holds. User text is sent with no
``parse_mode``, so it is never read as markup.
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
    send_in_parts,
    wait_asked,
)
from services.dispatcher.channels.client import HttpClient
from services.dispatcher.channels.http import (
    json_body,
    json_object,
    post,
    provider_message,
)

#: Longest caption Telegram accepts; longer text goes as its own message after the images.
MAX_CAPTION = 1024
UNREACHABLE_HINTS = ("chat not found", "user is deactivated", "bot was blocked", "user not found")


#: Telegram's limits of messages to one chat, beside the bot-wide limit (the channel's rate):
#: about one a second to a private chat, 20 a minute to a group or channel (negative ids,
#: @usernames). A message of several calls (an album and its long text) keeps its calls apart.
PRIVATE_CHAT_GAP = 1.0
GROUP_CHAT_GAP = 3.0


def chat_gap(address: str) -> float:
    """Seconds between two calls to one chat."""
    return GROUP_CHAT_GAP if address.startswith(("-", "@")) else PRIVATE_CHAT_GAP


class TelegramAdapter:
    """Parameters:
    config: ``bot_token`` and ``api_base_url``.
    http: the process's shared HTTP client.
    """

    max_in_flight: int | None = None

    def __init__(self, config: dict[str, Any], http: HttpClient) -> None:
        self.token = str(config["bot_token"])
        self.base = f"{str(config['api_base_url']).rstrip('/')}/bot{self.token}"
        self.http = http

    def calls(self, message: OutboundMessage, chat_id: str) -> list[tuple[str, dict[str, Any]]]:
        """The API calls that deliver ``message``, in order."""
        text, media = message.text, message.media
        caption = text if text and len(text) <= MAX_CAPTION else None
        calls: list[tuple[str, dict[str, Any]]] = []
        if len(media) == 1:
            photo: dict[str, Any] = {"chat_id": chat_id, "photo": media[0].url}
            if caption:
                photo["caption"] = caption
            calls.append(("sendPhoto", photo))
        elif media:
            group = [{"type": "photo", "media": m.url} for m in media]
            if caption:
                group[0]["caption"] = caption
            calls.append(("sendMediaGroup", {"chat_id": chat_id, "media": group}))
        if text and (not media or caption is None):
            calls.append(("sendMessage", {"chat_id": chat_id, "text": text}))
        return calls

    async def send(
        self,
        message: OutboundMessage,
        address: str,
        idempotency_key: str,
        *,
        parts_done: int = 0,
        may_go_on: Callable[[], bool] = go_on,
    ) -> Outcome:
        calls = self.calls(message, address)

        async def call(index: int, key: str) -> Outcome:
            method, payload = calls[index]
            return await self._call(method, payload, key)

        return await send_in_parts(
            len(calls), parts_done, idempotency_key, call, may_go_on, gap=chat_gap(address)
        )

    async def _call(self, method: str, payload: dict[str, Any], key: str) -> Outcome:
        got = await post(
            self.http,
            f"{self.base}/{method}",
            json_body(payload),
            {"Content-Type": "application/json", "Idempotency-Key": key},
        )
        if isinstance(got, Transient):
            return got
        status, raw = got.status, got.body
        answer = json_object(raw)
        if status == 200 and answer.get("ok") is True:
            return Sent(_message_id(answer.get("result")))
        code = _code(answer.get("error_code"), status)
        description = provider_message(raw, (("description",),), self._scrub) or ""
        text = f"Telegram {code}: {description}" if description else f"Telegram HTTP {status}"
        if code == 429:
            parameters = answer.get("parameters")
            retry_after = parameters.get("retry_after") if isinstance(parameters, dict) else None
            return Transient(text, wait_asked(retry_after), throttled=True)
        if code >= 500 or status >= 500:
            return Transient(text)
        if not 400 <= status < 500:
            # Not an answer of the Bot API (a redirect, a page from something else).
            return Permanent(text)
        unreachable = code == 403 or any(h in description.lower() for h in UNREACHABLE_HINTS)
        return Permanent(text, unreachable=unreachable)

    def _scrub(self, text: str) -> str:
        # The bot token is part of every URL; it must never reach a stored reason.
        return text.replace(self.token, "<bot token>")

    async def close(self) -> None:
        """The HTTP client belongs to the process."""


def _code(value: Any, status: int) -> int:
    """The Bot API's ``error_code``, or the HTTP status when it gave none worth reading."""
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 999:
        return value
    return status


def _message_id(result: Any) -> str | None:
    if isinstance(result, dict) and "message_id" in result:
        return message_id(result["message_id"])
    if isinstance(result, list):
        ids = [message_id(r.get("message_id")) for r in result if isinstance(r, dict)]
        return ",".join(i for i in ids if i) or None
    return None
