"""RabbitMQ through dramatiq: the broker and the messages services send each other.

Messages carry pointers to work (a broadcast id, a batch id), never the only copy of anything:
each can be lost or delivered twice without losing or duplicating a send. The scheduler
enqueues both kinds by name, so it never imports the dispatcher.
"""

from __future__ import annotations

from dramatiq import Message
from dramatiq.brokers.rabbitmq import RabbitmqBroker

#: Queue of "start this broadcast" messages (snapshot the audience, enqueue batches).
START_QUEUE = "bcast_start"
START_ACTOR = "start_broadcast"
#: Queue of "run this batch" messages.
SEND_QUEUE = "bcast_send"
SEND_ACTOR = "send_batch"


def make_broker(url: str) -> RabbitmqBroker:
    """A RabbitMQ broker that waits for the server to confirm every publish."""
    return RabbitmqBroker(url=url, confirm_delivery=True)


def start_message(broadcast_id: int) -> Message[None]:
    return Message(
        queue_name=START_QUEUE, actor_name=START_ACTOR, args=(broadcast_id,), kwargs={}, options={}
    )


def send_batch_message(batch_id: int) -> Message[None]:
    return Message(
        queue_name=SEND_QUEUE, actor_name=SEND_ACTOR, args=(batch_id,), kwargs={}, options={}
    )
