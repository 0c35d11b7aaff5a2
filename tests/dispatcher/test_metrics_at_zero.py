"""A dispatcher worker's series exist at 0 before its first send (a fresh process with
Prometheus' multiprocess directory, as a worker has): the first increment after a start or a
scale-up reads as a rise, not as a new series that ``rate()`` cannot see.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from services.dispatcher import metrics
from services.dispatcher.retry import Decision
from shared.domain.lifecycle import CHANNEL_KINDS

SCRIPT = """
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from services.dispatcher import metrics
metrics.init_metrics()
metrics.init_channel(7, "webhook")
registry = CollectorRegistry()
MultiProcessCollector(registry)
print(generate_latest(registry).decode())
"""


def exported(tmp_path: Path) -> str:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True
    ).stdout


def test_every_known_series_of_a_worker_starts_at_zero(tmp_path: Path) -> None:
    text = exported(tmp_path)
    for kind in CHANNEL_KINDS:
        for outcome in metrics.OUTCOMES:
            assert f'bcast_deliveries_total{{kind="{kind}",outcome="{outcome}"}} 0.0' in text
        assert f'bcast_provider_request_duration_seconds_count{{kind="{kind}"}} 0.0' in text
        assert f'bcast_provider_throttled_total{{kind="{kind}"}} 0.0' in text
    for reason in metrics.BATCH_END_REASONS:
        assert f'bcast_batch_runs_ended_total{{reason="{reason}"}} 0.0' in text
    # A channel's series, from when the process first sees it.
    assert 'bcast_channel_sends_total{channel="7",kind="webhook"} 0.0' in text
    assert 'bcast_channel_throttled_total{channel="7",kind="webhook"} 0.0' in text
    for outcome in metrics.CHANNEL_OUTCOMES:
        assert (
            f'bcast_channel_deliveries_total{{channel="7",kind="webhook",outcome="{outcome}"}} 0.0'
            in text
        )


def test_every_outcome_the_retry_policy_names_is_one_made_at_start() -> None:
    labels = {Decision.__dataclass_fields__["label"].default}
    source = Path("services/dispatcher/retry.py").read_text()
    labels |= {part.split('"')[0] for part in source.split('label="')[1:]}
    assert labels <= set(metrics.OUTCOMES)
