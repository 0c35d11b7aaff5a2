"""Publishing many messages at once: one AMQP transaction, every message taken, in order."""

from __future__ import annotations

from collections.abc import Iterator

import pika
import pytest
from dramatiq import Message

from shared.broker import START_QUEUE, BatchPublisher, make_broker, start_message
from tests.conftest import scratch_vhost

pytestmark = pytest.mark.e2e


@pytest.fixture
def own_vhost() -> Iterator[str]:
    """A vhost no dispatcher consumes from (the running system's would take the messages)."""
    with scratch_vhost("bcast_broker") as name:
        yield name


def test_a_batch_of_messages_is_taken_whole_and_in_order(own_vhost: str) -> None:
    url = f"amqp://guest:guest@127.0.0.1:5672/{own_vhost}"
    broker = make_broker(url)
    publisher = BatchPublisher(broker, url)
    try:
        publisher.publish([start_message(i) for i in range(1, 501)])
        publisher.publish([start_message(i) for i in range(501, 601)])
        publisher.publish([])
        connection = pika.BlockingConnection(pika.URLParameters(url))
        try:
            channel = connection.channel()
            depth = channel.queue_declare(START_QUEUE, passive=True).method.message_count
            assert depth == 600
            ids = []
            for _ in range(600):
                _, properties, body = channel.basic_get(START_QUEUE, auto_ack=True)
                assert properties.delivery_mode == 2  # persistent
                ids.append(Message.decode(body).args[0])
        finally:
            connection.close()
    finally:
        publisher.close()
        broker.close()
    assert ids == list(range(1, 601))


def test_a_broken_connection_is_opened_again_on_the_next_publish(own_vhost: str) -> None:
    url = f"amqp://guest:guest@127.0.0.1:5672/{own_vhost}"
    broker = make_broker(url)
    publisher = BatchPublisher(broker, url)
    try:
        publisher.publish([start_message(1)])
        publisher._connection.close()  # as if RabbitMQ had dropped it
        publisher.publish([start_message(2)])
    finally:
        publisher.close()
        broker.close()
