"""Publishing many messages at once: one AMQP transaction, every message taken, in order."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pika
import pytest
from dramatiq import Message

from shared.broker import (
    PIKA_LOGGERS,
    START_QUEUE,
    BatchPublisher,
    make_broker,
    quiet_dropped_connections,
    start_message,
)
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


def idle(publisher: BatchPublisher, seconds: float, *, keep_alive: bool) -> None:
    """Publish nothing for ``seconds``, answering heartbeats (or not) twice a heartbeat."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        if keep_alive:
            publisher.keep_alive()
        time.sleep(0.5)


def test_an_idle_publisher_answers_heartbeats_and_keeps_its_connection(own_vhost: str) -> None:
    # A heartbeat of 1 s: RabbitMQ drops a connection silent for about two of them.
    url = f"amqp://guest:guest@127.0.0.1:5672/{own_vhost}?heartbeat=1"
    broker = make_broker(url)
    publisher = BatchPublisher(broker, url)
    try:
        publisher.publish([start_message(1)])
        kept = publisher._connection
        idle(publisher, 5, keep_alive=True)
        assert kept.is_open
        publisher.publish([start_message(2)])
        assert publisher._connection is kept, "the same connection, never dropped"
        # Without the heartbeats answered, RabbitMQ drops it: what keep_alive prevents.
        idle(publisher, 5, keep_alive=False)
        with pytest.raises(pika.exceptions.AMQPError):
            kept.channel()
    finally:
        publisher.close()
        broker.close()


def test_pikas_reports_of_a_dropped_connection_are_silenced_only_once_stopping(
    caplog: pytest.LogCaptureFixture,
) -> None:
    for name in PIKA_LOGGERS:  # as in a process not stopping (others in this one may have)
        logging.getLogger(name).filters.clear()
    logger = logging.getLogger("pika.adapters.base_connection")
    dropped = "connection_lost: StreamLostError: (\"Stream connection lost: ConnectionResetError(104, 'Connection reset by peer')\",)"
    with caplog.at_level(logging.ERROR, logger="pika"):
        logger.error(dropped)
        assert [r.getMessage() for r in caplog.records] == [dropped], "reported while running"
        caplog.clear()
        quiet_dropped_connections()
        logger.error(dropped)
        logger.error("something else went wrong")
        for name in PIKA_LOGGERS:
            logging.getLogger(name).error("Broken pipe")
        logging.getLogger("pika.adapters.blocking_connection").error(
            "BlockingConnection.close(200, 'Normal shutdown') called on closed connection."
        )
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]
    for name in PIKA_LOGGERS:
        logging.getLogger(name).filters.clear()
