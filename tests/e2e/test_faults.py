"""The fault suite (bench/faults, docs/faults.md) at a small scale: every scenario sends a
real broadcast through real processes on a private Postgres cluster and RabbitMQ node, breaks
something mid-send, and must end completed with nothing lost, repeats within their bound and
nothing stuck.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.faults.report import describe
from bench.faults.scenarios import SCENARIOS, Scale, run_scenario
from bench.faults.servers import PrivatePostgres, PrivateRabbit

pytestmark = pytest.mark.e2e

#: Small enough for CI on two cores; the same scenarios as ``python -m bench.faults``.
SMALL = Scale(
    recipients=2_000,
    send_seconds=4.0,
    outage_seconds=4.0,
    storm_seconds=3.0,
    deadline_seconds=120.0,
    lease_seconds=8.0,
)


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[PrivatePostgres, PrivateRabbit]]:
    """The suite's own servers: the scenarios restart them, so never the machine's."""
    with PrivatePostgres() as pg, PrivateRabbit() as rabbit:
        yield pg, rabbit


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_ends_completed_with_nothing_lost_or_stuck(
    name: str, servers: tuple[PrivatePostgres, PrivateRabbit], tmp_path: Path
) -> None:
    pg, rabbit = servers
    verdict = run_scenario(pg, rabbit, name, SMALL, tmp_path / name)
    assert verdict.passed, describe(verdict)
