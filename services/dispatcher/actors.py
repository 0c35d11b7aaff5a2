"""The dispatcher's dramatiq actors. Run them with ``bcast dispatcher``.

Each actor is a thin shell over the process's engine: ``start_broadcast`` starts an audience
copy (of one broadcast, or of a group of small ones), ``send_batch`` starts a batch run, and the
thread is free again at once. Both are safe to
run twice for the same message: the work they do is decided by rows in Postgres, not by the
message. A message that arrives while the process is stopping goes back to the queue for
another process; one that finds the process full comes back a moment later.
"""

from __future__ import annotations

import logging
from typing import Any

import dramatiq
from dramatiq.middleware.prometheus import Prometheus

from services.dispatcher.engine import Taken
from services.dispatcher.runtime import RuntimeClosed, RuntimeMiddleware
from shared import logs
from shared.broker import (
    SEND_ACTOR,
    SEND_QUEUE,
    START_ACTOR,
    START_QUEUE,
    make_broker,
    send_batch_message,
    start_message,
)
from shared.settings import get_settings

log = logging.getLogger(__name__)

settings = get_settings()
# A worker process: its stderr is the pipe to the parent's (dramatiq runs with --skip-logging).
logs.configure("dispatcher", settings.log_format)


class ZeroedPrometheus(Prometheus):
    """dramatiq's Prometheus middleware with its per-actor counters at 0 from the worker's
    boot: its first error (or retry, or dead letter) reads as a rise in ``rate()``, and the
    dashboard's panels answer before anything went wrong.
    """

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        super().after_process_boot(broker)  # type: ignore[no-untyped-call]
        for name in broker.get_declared_actors():
            queue = broker.get_actor(name).queue_name
            for metric in (
                self.total_messages,
                self.total_errored_messages,
                self.total_retried_messages,
                self.total_rejected_messages,
                self.message_durations,
            ):
                metric.labels(queue, name)


broker = make_broker(settings.broker_url)
runtime = RuntimeMiddleware()
broker.add_middleware(runtime)
if settings.dispatcher_metrics_port:
    broker.add_middleware(ZeroedPrometheus())
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
#: A batch message that finds this process running all the batches it may comes back after
#: this long (another process may take it meanwhile).
FULL_DELAY_MS = 1000


@dramatiq.actor(actor_name=START_ACTOR, queue_name=START_QUEUE, **ACTOR_OPTIONS)
def start_broadcast(broadcast_ids: int | list[int]) -> None:
    """Copy the audience into delivery rows and batches (once); the scheduler hands the
    batches out. One broadcast (an id), or a group of small ones copied together (a list).
    """
    try:
        rt = runtime.current()
        if isinstance(broadcast_ids, int):
            taken = rt.call(rt.engine.start_copy(broadcast_ids))
        else:
            taken = rt.call(rt.engine.start_copies(broadcast_ids))
    except RuntimeClosed:
        taken = Taken.STOPPING
    if taken is not Taken.TAKEN:
        broker.enqueue(start_message(broadcast_ids), delay=FULL_DELAY_MS)


@dramatiq.actor(actor_name=SEND_ACTOR, queue_name=SEND_QUEUE, **ACTOR_OPTIONS)
def send_batch(batch_id: int) -> None:
    """Claim a batch and run it on this process's engine; the thread is free again at once."""
    try:
        rt = runtime.current()
        taken = rt.call(rt.engine.adopt(batch_id))
    except RuntimeClosed:
        taken = Taken.STOPPING
    if taken is not Taken.TAKEN:
        # Full: back in a moment, maybe to another process. Stopping: for another process.
        broker.enqueue(send_batch_message(batch_id), delay=FULL_DELAY_MS)
