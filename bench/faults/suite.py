"""Run scenarios one after the other on one private Postgres cluster and RabbitMQ node."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bench.faults.checks import Verdict
from bench.faults.scenarios import Scale, run_scenario
from bench.faults.servers import PrivatePostgres, PrivateRabbit


def run_suite(
    names: list[str],
    scale: Scale,
    logs: Path,
    on_verdict: Callable[[Verdict], None] = lambda _: None,
) -> list[Verdict]:
    """Run the named scenarios in order; the servers are stopped and removed at the end,
    whatever happens (Ctrl-C included).
    """
    verdicts: list[Verdict] = []
    with PrivatePostgres() as pg, PrivateRabbit() as rabbit:
        for name in names:
            verdict = run_scenario(pg, rabbit, name, scale, logs / name)
            verdicts.append(verdict)
            on_verdict(verdict)
    return verdicts
