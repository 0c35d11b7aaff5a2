"""Waiting for a server a test started."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx2 as httpx


def wait_until_up(
    url: str,
    what: str,
    *,
    ready: Callable[[httpx.Response], bool] = lambda _: True,
    timeout: float = 30,
) -> None:
    """Ask ``url`` until it answers (and ``ready`` holds for the answer); fail the test naming
    ``what`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready(httpx.get(url)):
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{what} did not come up"
        time.sleep(0.05)
