"""The naive design the pipeline is measured against: what it sends, and how it is reported."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from bench.naive import compared
from bench.naive_worker import signed_request
from bench.readme import bench_block
from bench.results import markdown
from services.dispatcher.channels.base import OutboundMessage, Sent
from services.dispatcher.channels.client import Answer
from services.dispatcher.channels.webhook import WebhookAdapter

NAIVE: dict[str, Any] = {
    "recipients": 100_000,
    "accepted": 100_000,
    "duplicates": 0,
    "bad_signatures": 0,
    "seconds": 80.0,
    "per_second": 1250.0,
    "workers": "2 processes x 8 threads",
    "http_client": "requests",
    "cpu_us_per_recipient": {"workers": 900.0, "postgres": 300.0},
}


class _Capture:
    """Keeps what the adapter posts; answers 200 with ``{"id": "m1"}``."""

    def __init__(self) -> None:
        self.posted: list[tuple[bytes, dict[str, str]]] = []

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Answer:
        self.posted.append((body, dict(headers)))
        return Answer(200, {}, b'{"id":"m1"}')


def test_the_naive_design_posts_the_webhook_adapters_body_and_signature(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.5)
    http = _Capture()
    adapter = WebhookAdapter({"url": "https://hooks.test/a", "secret": "s3cret"}, http)  # type: ignore[arg-type]
    outcome = asyncio.run(adapter.send(OutboundMessage(7, 'Grüße "all"'), "b-1", "42"))
    assert outcome == Sent("m1")
    assert http.posted == [signed_request(b"s3cret", "42", "b-1", 7, 'Grüße "all"')]


def test_the_speedup_is_the_pipelines_rate_over_the_naive_designs_on_as_many_recipients() -> None:
    section = compared(NAIVE, {"recipients": 100_000, "per_second": 5000.0})
    assert section["speedup"] == 4.0
    assert section["e2e_per_second"] == 5000.0
    with pytest.raises(ValueError, match="same audience size"):
        compared(NAIVE, {"recipients": 1_000_000, "per_second": 5000.0})


def test_the_naive_design_and_the_speedup_are_in_the_table_and_the_readme_block() -> None:
    results = {
        "naive": compared(NAIVE, {"recipients": 100_000, "per_second": 5000.0}),
        "commands": {"naive": "python -m bench naive --recipients 100000"},
    }
    table = markdown(results)
    assert "| 100,000 in 80.0 s, 1,250 / s; accepted / duplicates / bad signatures" in table
    assert "**4.0x** (5,000 / s against 1,250 / s, 100,000 recipients each, same run)" in table
    assert "| naive design CPU µs per recipient | workers 900, postgres 300 |" in table
    assert table in bench_block(results)
    assert "`python -m bench naive --recipients 100000`" in bench_block(results)
