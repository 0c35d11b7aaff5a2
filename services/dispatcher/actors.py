"""The dispatcher's dramatiq actors. Run them with ``bcast dispatcher``.

Each actor is a thin shell: ``start_broadcast`` snapshots and fans out, ``send_batch`` runs
the send loop of ``sender.run_batch`` on the process's I/O loop. Both are safe to run twice
for the same message: the work they do is decided by rows in Postgres, not by the message.
"""

from __future__ import annotations

import logging
from typing import Any

import dramatiq
from dramatiq.middleware.prometheus import Prometheus

from services.dispatcher import sender, snapshot
from services.dispatcher.runtime import get_runtime
from shared.broker import (
    SEND_ACTOR,
    SEND_QUEUE,
    START_ACTOR,
    START_QUEUE,
    make_broker,
    send_batch_message,
)
from shared.db.engine import get_sessionmaker
from shared.settings import get_settings

log = logging.getLogger(__name__)

settings = get_settings()
broker = make_broker(settings.broker_url)
if settings.dispatcher_metrics_port:
    broker.add_middleware(Prometheus())
dramatiq.set_broker(broker)

#: Below RabbitMQ's consumer_timeout (30 min), so a long message is never requeued under us.
TIME_LIMIT_MS = 10 * 60 * 1000
#: Retries of a message whose actor raised (database or broker trouble); delivery-level
#: retries are decided per recipient in Postgres, not here.
ACTOR_OPTIONS: dict[str, Any] = {
    "max_retries": 20,
    "min_backoff": 1000,
    "max_backoff": 60_000,
    "time_limit": TIME_LIMIT_MS,
}


def enqueue_batch(
    broadcast_id: int, first_id: int, last_id: int, *, delay_ms: int | None = None
) -> None:
    broker.enqueue(send_batch_message(broadcast_id, first_id, last_id), delay=delay_ms)


@dramatiq.actor(actor_name=START_ACTOR, queue_name=START_QUEUE, **ACTOR_OPTIONS)
def start_broadcast(broadcast_id: int) -> None:
    """Snapshot the audience (once) and enqueue a ``send_batch`` per range of queued rows."""
    batches = snapshot.start(
        get_sessionmaker(),
        broadcast_id,
        batch_size=settings.batch_size,
        enqueue_batch=enqueue_batch,
    )
    log.info("broadcast %s: %s batches enqueued", broadcast_id, batches)


# notify_shutdown: on SIGTERM the batch is interrupted at once and gives back the rows it
# holds (another worker takes them), instead of sending on until the shutdown timeout.
@dramatiq.actor(actor_name=SEND_ACTOR, queue_name=SEND_QUEUE, notify_shutdown=True, **ACTOR_OPTIONS)
def send_batch(broadcast_id: int, first_id: int, last_id: int) -> None:
    """Send the queued deliveries of one id range; arrange retries and the rest, if any."""
    rt = get_runtime()
    result = rt.call(sender.run_batch(rt, broadcast_id, first_id, last_id))
    if result.more:
        enqueue_batch(broadcast_id, first_id, last_id)
    elif result.retry_in is not None:
        enqueue_batch(broadcast_id, first_id, last_id, delay_ms=int(result.retry_in * 1000) + 50)
