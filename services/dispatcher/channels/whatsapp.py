"""WhatsApp Cloud API: ``POST /{version}/{phone_number_id}/messages`` with text, image or
template messages.

WhatsApp has no albums: several images are several messages (the text as the first caption),
and a retry skips the ones already accepted. Errors are judged by their code: throughput and
temporary codes (130429, 80007, 131000, 131016, ...) are transient, the pair's limit (131056)
only for that recipient; an undeliverable
recipient (131026) is permanent and marks the contact unreachable; 133010 says the business's
own phone number is not registered on the platform, which no recipient can be sent from, so it
pauses the broadcast.
A recipient outside the 24-hour customer service window (131047) or over the marketing cap
(131049) fails with that reason and is not retried; a template problem (132xxx) pauses the
broadcast with the reason, since every recipient would be refused alike.
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

MAX_CAPTION = 1024
#: Rate and throughput limits: the whole channel must slow down.
THROTTLE_CODES = frozenset({4, 80007, 130429, 613})
#: Too many messages to one recipient in a short time (the business and user pair's limit):
#: that recipient waits, not the channel.
PAIR_CODE = 131056
#: The pair's limit: about one message every six seconds to one user.
PAIR_WAIT = 6.0
#: Temporary trouble on the provider's side.
TRANSIENT_CODES = frozenset({1, 2, 131000, 131016, 133004, PAIR_CODE}) | THROTTLE_CODES
#: The recipient is not reachable on WhatsApp at all.
UNREACHABLE_CODES = frozenset({131026, 131021})
#: The business's own number cannot send at all (133010: not registered on the platform; 368:
#: the account restricted for a policy): every recipient would be refused alike.
SENDER_CODES = frozenset({133010, 368})
#: Template problems (132000-132999: unknown template or language, wrong parameters, paused
#: or disabled template): every recipient would be refused alike, so the broadcast is paused
#: with the reason for an operator to fix.
TEMPLATE_CODES = range(132000, 133000)
#: Refused for this recipient, not worth trying again now: outside the 24-hour customer
#: service window (131047; only a template may go) and the marketing frequency cap (131049).
NOT_NOW_CODES = frozenset({131047, 131049})
#: Wait when a throughput error gives no Retry-After.
THROTTLE_WAIT = 1.0


class WhatsappAdapter:
    """Parameters:
    config: ``access_token``, ``phone_number_id``, ``api_version``, ``api_base_url``.
    http: the process's shared HTTP client.
    """

    max_in_flight: int | None = None

    def __init__(self, config: dict[str, Any], http: HttpClient) -> None:
        base = str(config["api_base_url"]).rstrip("/")
        self.url = f"{base}/{config['api_version']}/{config['phone_number_id']}/messages"
        self.token = str(config["access_token"])
        self.http = http

    def parts(self, message: OutboundMessage) -> list[dict[str, Any]]:
        """One message body per call, in order: a template alone, or the text and images."""
        if message.template is not None:
            return [{"type": "template", "template": message.template}]
        text, media = message.text, message.media
        caption = text if text and len(text) <= MAX_CAPTION else None
        parts: list[dict[str, Any]] = []
        if text and media and caption is None:
            parts.append({"type": "text", "text": {"body": text, "preview_url": False}})
        for i, m in enumerate(media):
            image: dict[str, Any] = {"link": m.url}
            if i == 0 and caption:
                image["caption"] = caption
            parts.append({"type": "image", "image": image})
        if text and not media:
            parts.append({"type": "text", "text": {"body": text, "preview_url": False}})
        return parts

    async def send(
        self,
        message: OutboundMessage,
        address: str,
        idempotency_key: str,
        *,
        parts_done: int = 0,
        may_go_on: Callable[[], bool] = go_on,
    ) -> Outcome:
        parts = self.parts(message)

        async def call(index: int, key: str) -> Outcome:
            body = {
                "messaging_product": "whatsapp",
                "recipient_type": "individual",
                "to": address,
                **parts[index],
            }
            return await self._call(body, key)

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
        status, raw, retry_after = got.status, got.body, got.headers.get("retry-after")
        answer = json_object(raw)
        if 200 <= status < 300:
            return Sent(_message_id(answer.get("messages")))
        error = answer.get("error")
        error = error if isinstance(error, dict) else {}
        code = graph_code(error.get("code"))
        described = provider_message(raw, (("error", "message"),), self._scrub)
        details = provider_message(raw, (("error", "error_data", "details"),), self._scrub)
        text = f"WhatsApp {code or f'HTTP {status}'}" + (f": {described}" if described else "")
        text = reason(f"{text} ({details})" if details else text)
        if 300 <= status < 400:
            # Not an answer of the Cloud API: redirects are never followed.
            return Permanent(text)
        if code == PAIR_CODE:
            return Transient(text, parse_retry_after(retry_after) or PAIR_WAIT)
        if code in THROTTLE_CODES or status == 429:
            return Transient(text, parse_retry_after(retry_after) or THROTTLE_WAIT, throttled=True)
        if code in TRANSIENT_CODES or status >= 500:
            return Transient(text)
        if code in TEMPLATE_CODES or code in SENDER_CODES:
            return Transient(text, refused=True, by_provider=True)
        if code in NOT_NOW_CODES:
            return Permanent(text)
        return Permanent(text, unreachable=code in UNREACHABLE_CODES)

    def _scrub(self, text: str) -> str:
        # The access token must never reach a stored reason, even quoted back by an error.
        return text.replace(self.token, "<access token>") if self.token else text

    async def close(self) -> None:
        """The HTTP client belongs to the process."""


def _message_id(messages: Any) -> str | None:
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        return message_id(messages[0].get("id"))
    return None
