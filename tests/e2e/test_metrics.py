"""Every service's Prometheus endpoint counts what really happened."""

from __future__ import annotations

import re

import httpx2 as httpx
import pytest

from bench.ports import free_port
from tests.e2e.conftest import Api, System, wait_for

pytestmark = pytest.mark.e2e


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.match(r"^([a-z_:]+)(?:\{(.*)\})? (\S+)$", line)
        if match and match.group(1) == name:
            got = ",".join(sorted((match.group(2) or "").split(","))) if match.group(2) else ""
            if got == wanted:
                return float(match.group(3))
    return 0.0


def test_dispatcher_scheduler_and_api_metrics_count_each_send_once(
    api: Api, system: System
) -> None:
    procs = system.procs
    dispatcher_port, scheduler_port = free_port(), free_port()
    procs.stop("dispatcher")
    procs.stop("scheduler")
    procs.start(
        "metered-dispatcher",
        "dispatcher",
        "--processes",
        "2",
        "--threads",
        "2",
        "--metrics-port",
        str(dispatcher_port),
    )
    procs.start("metered-scheduler", "scheduler", "--metrics-port", str(scheduler_port))
    try:
        channel, _ = api.webhook_channel(fail_addresses=["x-1", "x-2", "x-3"])
        account = api.account(channel["id"])
        api.import_contacts(account["id"], [f"x-{i}" for i in range(50)])
        b = api.broadcast(channel["id"], {})
        api.wait_status(b["id"], "completed")

        def scraped() -> str | None:
            try:
                text = httpx.get(f"http://127.0.0.1:{dispatcher_port}/metrics").text
            except httpx.TransportError:
                return None
            done = sample(text, "bcast_deliveries_total", kind="webhook", outcome="sent")
            return text if done >= 47 else None

        text = wait_for("the dispatcher's metrics", scraped, timeout=30)
        assert sample(text, "bcast_deliveries_total", kind="webhook", outcome="sent") == 47
        assert sample(text, "bcast_deliveries_total", kind="webhook", outcome="failed") == 3
        # The same, told apart by channel.
        mine = {"channel": str(channel["id"]), "kind": "webhook"}
        assert sample(text, "bcast_channel_deliveries_total", **mine, outcome="sent") == 47
        assert sample(text, "bcast_channel_deliveries_total", **mine, outcome="failed") == 3
        assert (
            f'bcast_channel_deliveries_total{{channel="{channel["id"]}",kind="webhook",outcome="retry"}} 0.0'
            in text
        )
        assert sample(text, "bcast_channel_sends_total", **mine) == 50
        assert sample(text, "bcast_provider_request_duration_seconds_count", kind="webhook") == 50
        assert sample(text, "bcast_snapshot_recipients_total") == 50
        # The start message may be handled more than once (one reaching a worker process that
        # is still booting goes back to the queue), but the audience is copied once.
        assert (
            sample(
                text,
                "dramatiq_messages_total",
                actor_name="start_broadcast",
                queue_name="bcast_start",
            )
            >= 1
        )

        scheduler = httpx.get(f"http://127.0.0.1:{scheduler_port}/metrics").text
        assert sample(scheduler, "bcast_scheduler_started_total") == 1
        assert sample(scheduler, "bcast_outbox_published_total", reason="start") == 1
        assert "bcast_outbox_backlog" in scheduler

        api_metrics = httpx.get(f"{system.api_url}/metrics").text
        assert (
            sample(
                api_metrics,
                "bcast_api_requests_total",
                method="POST",
                route="/v1/broadcasts",
                status="201",
            )
            >= 1
        )
    finally:
        procs.stop("metered-dispatcher")
        procs.stop("metered-scheduler")
        procs.start("dispatcher", "dispatcher", "--processes", "1", "--threads", "4")
        procs.start("scheduler", "scheduler")
