"""The naive design's worker: one dramatiq message per recipient, one synchronous HTTP call.

Run by ``bench.naive`` as ``python -m dramatiq bench.naive_worker:broker``. Each message names
one delivery row. The actor loads the row with its broadcast's text, posts the signed webhook
body (the shape, signature and idempotency key bcast's webhook adapter sends) with a keep-alive
``requests`` session of its thread, and writes ``sent`` or ``failed`` back with one UPDATE.
429, 5xx and broken connections raise, so dramatiq's ``Retries`` sends the message again later;
a row whose retries ran out is marked ``failed``. Webhook channels and text only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from typing import Any

import dramatiq
import psycopg
import requests
from dramatiq import Message
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware import Middleware

from shared.db.engine import libpq_url
from shared.domain.channels import open_config
from shared.domain.lifecycle import ChannelKind, DeliveryStatus
from shared.secrets_box import get_secrets_box
from shared.settings import get_settings

#: The queue and actor of "send to this recipient" messages.
QUEUE = "naive_send"
ACTOR = "naive_send_one"
#: Called by ``Retries`` with a message whose retries ran out.
GAVE_UP_ACTOR = "naive_gave_up"
#: Retries after the first attempt: ``BCAST_MAX_ATTEMPTS`` attempts in all, as bcast makes.
MAX_RETRIES = 4
SEND_TIMEOUT_SECONDS = 10.0
SIGNATURE_HEADER = "X-Bcast-Signature"

LOAD = """
    SELECT d.status, d.address, d.broadcast_id, b.channel_id, b.content ->> 'text'
    FROM delivery d JOIN broadcast b ON b.id = d.broadcast_id
    WHERE d.id = %s
"""
SENT = """
    UPDATE delivery
    SET status = 'sent', attempts = attempts + 1, provider_message_id = %s, sent_at = now(),
        updated_at = now()
    WHERE id = %s AND status = 'queued'
"""
FAILED = """
    UPDATE delivery
    SET status = 'failed', attempts = attempts + 1, last_error = %s, updated_at = now()
    WHERE id = %s AND status = 'queued'
"""


def send_message(delivery_id: int) -> Message[Any]:
    """The message that sends to one recipient: what ``send_one.send(delivery_id)`` enqueues."""
    return Message(queue_name=QUEUE, actor_name=ACTOR, args=(delivery_id,), kwargs={}, options={})


def signed_request(
    secret: bytes, key: str, address: str, broadcast_id: int, text: str | None
) -> tuple[bytes, dict[str, str]]:
    """The body and headers bcast's webhook adapter sends to one recipient."""
    body = json.dumps(
        {
            "idempotency_key": key,
            "timestamp": int(time.time()),
            "to": address,
            "broadcast_id": broadcast_id,
            "text": text,
            "media": [],
        },
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    signature = hmac.new(secret, body, hashlib.sha256).hexdigest()
    return body, {
        "Content-Type": "application/json",
        "Idempotency-Key": key,
        SIGNATURE_HEADER: f"sha256={signature}",
    }


class Transient(Exception):
    """The provider asked to try again later (429, 5xx): ``Retries`` sends the message again."""


class ThreadResources(Middleware):
    """A Postgres connection (autocommit: each statement commits by itself) and a keep-alive
    HTTP session for every worker thread, opened when the thread boots and closed when it stops.

    Parameters:
      database_url: the plain Postgres URL of bcast's database.
    """

    def __init__(self, *, database_url: str) -> None:
        self.database_url = database_url
        self._local = threading.local()

    def after_worker_thread_boot(self, broker: Any, thread: Any) -> None:
        self._local.db = psycopg.connect(libpq_url(self.database_url), autocommit=True)
        self._local.http = requests.Session()

    def before_worker_thread_shutdown(self, broker: Any, thread: Any) -> None:
        self._local.http.close()
        self._local.db.close()

    @property
    def db(self) -> psycopg.Connection[Any]:
        db: psycopg.Connection[Any] = self._local.db
        return db

    @property
    def http(self) -> requests.Session:
        http: requests.Session = self._local.http
        return http


settings = get_settings()
broker = RabbitmqBroker(url=settings.broker_url)
resources = ThreadResources(database_url=settings.database_url)
broker.add_middleware(resources)
#: Channel id -> (url, secret), read once per process.
_channels: dict[int, tuple[str, bytes]] = {}
_channels_lock = threading.Lock()


def _channel(db: psycopg.Connection[Any], channel_id: int) -> tuple[str, bytes]:
    with _channels_lock:
        if channel_id not in _channels:
            row = db.execute(
                "SELECT config FROM channel WHERE id = %s AND kind = %s",
                (channel_id, ChannelKind.WEBHOOK.value),
            ).fetchone()
            if row is None:
                raise ValueError(f"channel {channel_id} is not a webhook channel")
            opened = open_config(ChannelKind.WEBHOOK, row[0], get_secrets_box())
            _channels[channel_id] = (str(opened["url"]), str(opened["secret"]).encode())
        return _channels[channel_id]


@dramatiq.actor(
    actor_name=ACTOR,
    queue_name=QUEUE,
    broker=broker,
    max_retries=MAX_RETRIES,
    min_backoff=1000,
    max_backoff=60_000,
    on_retry_exhausted=GAVE_UP_ACTOR,
)
def send_one(delivery_id: int) -> None:
    """Send the broadcast's text to one recipient and record the answer."""
    db, http = resources.db, resources.http
    row = db.execute(LOAD, (delivery_id,)).fetchone()
    if row is None or row[0] != DeliveryStatus.QUEUED:
        return  # gone, or already final: a message delivered twice sends once
    _status, address, broadcast_id, channel_id, text = row
    url, secret = _channel(db, channel_id)
    body, headers = signed_request(secret, str(delivery_id), address, broadcast_id, text)
    resp = http.post(
        url, data=body, headers=headers, timeout=SEND_TIMEOUT_SECONDS, allow_redirects=False
    )
    if resp.status_code == 429 or resp.status_code >= 500:
        raise Transient(f"webhook answered {resp.status_code}")
    if 200 <= resp.status_code < 300:
        db.execute(SENT, (_message_id(resp), delivery_id))
    else:
        db.execute(FAILED, (f"webhook answered {resp.status_code}", delivery_id))


def _message_id(resp: requests.Response) -> str | None:
    try:
        answer = resp.json()
    except ValueError:
        return None
    found = answer.get("id") if isinstance(answer, dict) else None
    return None if found is None else str(found)


@dramatiq.actor(actor_name=GAVE_UP_ACTOR, queue_name=QUEUE, broker=broker)
def gave_up(message: dict[str, Any], retries: dict[str, Any]) -> None:
    """A recipient whose every attempt failed transiently: record it as failed."""
    delivery_id = int(message["args"][0])
    reason = f"no answer after {retries['retries'] + 1} attempts"
    resources.db.execute(FAILED, (reason, delivery_id))
