"""RabbitMQ through dramatiq: the broker and the messages services send each other.

Messages carry pointers to work (a broadcast id, a batch id), never the only copy of anything:
each can be lost or delivered twice without losing or duplicating a send. The scheduler
enqueues both kinds by name, so it never imports the dispatcher.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import pika
from dramatiq import Message
from dramatiq.brokers.rabbitmq import RabbitmqBroker

#: Queue of "start this broadcast" messages (snapshot the audience, enqueue batches): one
#: broadcast, or a group of small ones copied together.
START_QUEUE = "bcast_start"
START_ACTOR = "start_broadcast"
#: Queue of "run this batch" messages.
SEND_QUEUE = "bcast_send"
SEND_ACTOR = "send_batch"


def make_broker(url: str) -> RabbitmqBroker:
    """A RabbitMQ broker that waits for the server to confirm every publish."""
    return RabbitmqBroker(url=url, confirm_delivery=True)


def start_message(broadcast_ids: int | Sequence[int]) -> Message[None]:
    """Start one broadcast (an id), or several small ones copied together (a list of ids)."""
    ids = broadcast_ids if isinstance(broadcast_ids, int) else list(broadcast_ids)
    return Message(
        queue_name=START_QUEUE, actor_name=START_ACTOR, args=(ids,), kwargs={}, options={}
    )


def send_batch_message(batch_id: int) -> Message[None]:
    return Message(
        queue_name=SEND_QUEUE, actor_name=SEND_ACTOR, args=(batch_id,), kwargs={}, options={}
    )


#: pika's loggers that report a connection found broken.
PIKA_LOGGERS = (
    "pika.adapters.utils.io_services_utils",
    "pika.adapters.base_connection",
    "pika.adapters.blocking_connection",
)
#: What pika says of a connection RabbitMQ already dropped.
_DROPPED = (
    "Connection reset by peer",
    "Broken pipe",
    "Stream connection lost",
    "StreamLostError",
    # Closing one it already found dropped.
    "called on closed connection",
)


class _DroppedWhileStopping(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(words in text for words in _DROPPED)


def quiet_dropped_connections() -> None:
    """The process is stopping: pika's reports of connections RabbitMQ already dropped are
    not errors any more. A blocking connection answers heartbeats only while it is used, so
    one a thread opened to publish and then left idle is dropped by RabbitMQ after its
    heartbeat timeout; closing it at a normal stop would log pika's ERROR lines, with a
    traceback, for nothing lost (the next publish would have opened a new one).
    """
    for name in PIKA_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DroppedWhileStopping) for f in logger.filters):
            logger.addFilter(_DroppedWhileStopping())


#: Seconds a publisher waits while RabbitMQ blocks publishing (a memory or disk alarm).
BLOCKED_TIMEOUT = 30.0


class BatchPublisher:
    """Publishes many messages with one round trip to RabbitMQ, all or none.

    The broker's own channel confirms each publish before the next (one round trip per
    message, about 0.5 ms on loopback: 2,000 messages a second at most). This publisher uses a
    channel of its own in AMQP transaction mode: a list of messages is published and committed
    together, and ``publish`` returns only once RabbitMQ has taken them all (durable queue,
    persistent messages), or raises, having taken none. An outbox row is deleted in the
    database transaction that commits after ``publish`` returned.

    Parameters:
      broker: the dramatiq broker whose queues the messages go to (it declares them).
      url: the AMQP URL.
    """

    def __init__(self, broker: RabbitmqBroker, url: str) -> None:
        self.broker = broker
        self.url = url
        self._connection: Any = None
        self._channel: Any = None

    def publish(self, messages: Sequence[Message[Any]]) -> None:
        if not messages:
            return
        for queue in {m.queue_name for m in messages}:
            self.broker.declare_queue(queue, ensure=True)
        try:
            channel = self._open()
            for message in messages:
                channel.basic_publish(
                    exchange="",
                    routing_key=message.queue_name,
                    body=message.encode(),
                    properties=pika.BasicProperties(
                        delivery_mode=2, priority=message.options.get("broker_priority")
                    ),
                )
            channel.tx_commit()
        except BaseException:
            self.close()  # a channel left mid-transaction is not fit to reuse
            raise

    def _open(self) -> Any:
        if self._channel is None or not self._channel.is_open:
            self.close()
            params = pika.URLParameters(self.url)
            # A broker out of memory or disk blocks publishers: give up (the rows stay in the
            # outbox, the stage fails and is counted) rather than wait for ever.
            params.blocked_connection_timeout = BLOCKED_TIMEOUT
            self._connection = pika.BlockingConnection(params)
            self._channel = self._connection.channel()
            self._channel.tx_select()
        return self._channel

    def keep_alive(self) -> None:
        """Answer RabbitMQ's heartbeats on the connection while it is idle (a blocking
        connection does so only while it is used), so that it is not dropped between
        publishes; a connection found broken is closed, and the next publish opens another.
        """
        connection = self._connection
        if connection is None or not connection.is_open:
            return
        try:
            connection.process_data_events(time_limit=0)
        except Exception:
            self.close()

    def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            with contextlib.suppress(Exception):  # closing a connection already broken
                connection.close()
