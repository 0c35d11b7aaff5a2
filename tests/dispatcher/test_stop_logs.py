"""A stopping dispatcher's log reads as a stop: dramatiq's pause of its consumers is not
reported as a restart of them, while a real restart still is.
"""

from __future__ import annotations

import logging

import pytest

from services.dispatcher.runtime import QUIET_PAUSED_RESTART


def test_the_paused_consumers_restart_line_is_dropped_and_nothing_else(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("dramatiq.worker.ConsumerThread(bcast_test_stop)")
    logger.addFilter(QUIET_PAUSED_RESTART)
    try:
        with caplog.at_level(logging.INFO):
            logger.info("Restarting consumer in %0.2f seconds.", 3)
            logger.critical("Consumer encountered a connection error: %s", "gone")
            logger.debug("Consumer thread stopped.")
            logger.info("Consumer is stopping.")
    finally:
        logger.removeFilter(QUIET_PAUSED_RESTART)
    assert [r.getMessage() for r in caplog.records] == [
        "Consumer encountered a connection error: gone",
        "Consumer is stopping.",
    ]


def test_a_consumer_logger_without_the_filter_still_reports_a_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The filter goes on only when the worker stops: while it runs, a restart after a lost
    # connection is reported.
    logger = logging.getLogger("dramatiq.worker.ConsumerThread(bcast_test_running)")
    with caplog.at_level(logging.INFO):
        logger.info("Restarting consumer in %0.2f seconds.", 3)
    assert [r.getMessage() for r in caplog.records] == ["Restarting consumer in 3.00 seconds."]
