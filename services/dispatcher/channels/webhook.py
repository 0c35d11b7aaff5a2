"""Signed webhook: POST the message as JSON, signed with HMAC-SHA256 of the body."""

from __future__ import annotations

import hashlib
import hmac
import time
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
)
from services.dispatcher.channels.client import HttpClient
from services.dispatcher.channels.http import (
    http_reason,
    json_body,
    json_object,
    post,
)

SIGNATURE_HEADER = "X-Bcast-Signature"
#: Where a receiver's JSON error body may say what went wrong.
ERROR_PATHS = (("error", "message"), ("error",), ("message",), ("detail",), ("title",))


def sign(secret: bytes | hmac.HMAC, body: bytes) -> str:
    """The signature header value a receiver recomputes to trust the body. ``secret`` may be
    an HMAC already keyed with it (``keyed``): copying one costs less than keying afresh.
    """
    if not isinstance(secret, hmac.HMAC):
        return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    mac = secret.copy()
    mac.update(body)
    return "sha256=" + mac.hexdigest()


def keyed(secret: bytes) -> hmac.HMAC:
    """An HMAC-SHA256 keyed with ``secret`` and fed nothing, for ``sign`` to copy."""
    return hmac.new(secret, digestmod=hashlib.sha256)


class WebhookAdapter:
    """POST ``{"idempotency_key", "broadcast_id", "to", "text", "media"}`` to ``config.url``.

    2xx is sent (the answer's ``id``, if any, is the provider message id); 429, 5xx and
    timeouts are transient (``Retry-After`` honoured); any other answer is permanent.

    Parameters:
      config: the channel config: ``url`` and ``secret``.
      http: the process's shared HTTP client (keep-alive connections).
    """

    max_in_flight: int | None = None

    def __init__(self, config: dict[str, Any], http: HttpClient) -> None:
        self.url = str(config["url"])
        self.secret_text = str(config["secret"])
        self.secret = self.secret_text.encode()
        self._mac = keyed(self.secret)
        self.http = http
        self._cached: tuple[OutboundMessage, bytes] | None = None

    async def send(
        self,
        message: OutboundMessage,
        address: str,
        idempotency_key: str,
        *,
        parts_done: int = 0,
        may_go_on: Callable[[], bool] = go_on,
    ) -> Outcome:
        body = b"".join(
            (
                b'{"idempotency_key":',
                json_body(idempotency_key),
                b',"timestamp":',
                str(int(time.time())).encode(),
                b',"to":',
                json_body(address),
                b",",
                self._rest(message),
            )
        )
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": idempotency_key,
            SIGNATURE_HEADER: sign(self._mac, body),
        }
        got = await post(self.http, self.url, body, headers)
        if isinstance(got, Transient):
            return got
        status, answer, retry_after = got.status, got.body, got.headers.get("retry-after")
        if 200 <= status < 300:
            return Sent(message_id(json_object(answer).get("id")))
        text = http_reason("webhook", status, answer, ERROR_PATHS, self._scrub)
        if status == 429:
            return Transient(text, parse_retry_after(retry_after), throttled=True)
        if status >= 500:
            return Transient(text, parse_retry_after(retry_after))
        return Permanent(text)

    def _scrub(self, text: str) -> str:
        return text.replace(self.secret_text, "<secret>") if self.secret_text else text

    async def close(self) -> None:
        """Nothing of its own to close: the HTTP client belongs to the process."""

    def _rest(self, message: OutboundMessage) -> bytes:
        """The part of the body every recipient shares, encoded once per message."""
        if self._cached is None or self._cached[0] is not message:
            rest = json_body(
                {
                    "broadcast_id": message.broadcast_id,
                    "text": message.text,
                    "media": [
                        {"url": m.url, "content_type": m.content_type} for m in message.media
                    ],
                }
            )[1:]
            self._cached = (message, rest)
        return self._cached[1]
