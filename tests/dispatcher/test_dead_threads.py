"""A dispatcher whose dramatiq threads died stops beating: the threads it looks at."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

from services.dispatcher.runtime import dead_threads


def test_threads_that_ran_and_ended_are_dead_the_running_and_unstarted_are_not() -> None:
    release = threading.Event()
    running = threading.Thread(target=release.wait, name="worker-running")
    ended = threading.Thread(target=lambda: None, name="consumer-ended")
    unstarted = threading.Thread(target=lambda: None, name="worker-unstarted")
    running.start()
    ended.start()
    ended.join()
    try:
        worker: Any = SimpleNamespace(consumers={"bcast_send": ended}, workers=[running, unstarted])
        assert dead_threads(worker) == ["consumer-ended"]
        worker.consumers = {}
        assert dead_threads(worker) == []
    finally:
        release.set()
        running.join()
