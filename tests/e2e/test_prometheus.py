"""The dashboard and the rules against a real Prometheus (Debian's package) scraping the running
system: every query of the Grafana dashboard answers with data during the first broadcast
after the scheduler and the dispatchers start (their series exist at 0 from the start, so the
first sends read as a rise), the panels that show sending move, and the recording rules
evaluate.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2 as httpx
import pytest
import yaml

from bench.ports import free_port
from tests.e2e.conftest import Api, System, wait_for

pytestmark = pytest.mark.e2e

DEPLOY = Path(__file__).parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "bcast.json"
#: Metrics the broadcast of this test moves: a panel reading one of them through rate() or
#: increase() must show a value above 0 at some point, not only answer.
MOVED = (
    "bcast_deliveries_total",
    "bcast_channel_sends_total",
    "bcast_channel_deliveries_total",
    "bcast_snapshot_recipients_total",
    "bcast_provider_request_duration_seconds_bucket",
    "bcast_scheduler_started_total",
    "bcast_provider_throttled_total",
    "bcast_channel_throttled_total",
    "bcast_api_requests_total",
)
#: What Grafana would put in for the dashboard's variables and interval macros.
VARIABLES = {
    "channel": ".*",
    "kind": ".*",
    "__rate_interval": "1m",
    "__interval": "5s",
    "__range": "5m",
}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every Prometheus query of the dashboard, variables put in."""

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    def fill(expr: str) -> str:
        return re.sub(
            r"\$\{?(\w+)\}?",
            lambda m: VARIABLES[m.group(1)] if m.group(1) in VARIABLES else m.group(0),
            expr,
        )

    board = json.loads(DASHBOARD.read_text())
    return [
        (p.get("title", "?"), fill(t["expr"]))
        for p in panels(board["panels"])
        for t in p.get("targets", [])
        if t.get("expr")
    ]


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=10)

    def get(self, path: str, **params: Any) -> Any:
        r = self.http.get(path, params=params)
        assert r.status_code == 200, (path, params, r.text[:500])
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]

    def targets_up(self) -> dict[str, str]:
        return {
            t["labels"]["job"]: t["health"] for t in self.get("/api/v1/targets")["activeTargets"]
        }

    def instant(self, expr: str) -> list[dict[str, Any]]:
        return self.get("/api/v1/query", query=expr)["result"]  # type: ignore[no-any-return]

    def range(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        return self.get(  # type: ignore[no-any-return]
            "/api/v1/query_range", query=expr, start=start, end=end, step=1
        )["result"]


def scrape_config(system: System, scheduler_port: int, dispatcher_port: int) -> dict[str, Any]:
    """Compose's configuration (deploy/prometheus/prometheus.yml) with this run's targets, a
    scrape every second and the rules file of the repository.
    """
    deployed = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    api = urlsplit(system.api_url).netloc
    targets = {
        "bcast-api": api,
        "bcast-scheduler": f"127.0.0.1:{scheduler_port}",
        "bcast-dispatcher": f"127.0.0.1:{dispatcher_port}",
        "rabbitmq": "127.0.0.1:15692",
    }
    jobs = []
    for job in deployed["scrape_configs"]:
        job = {k: v for k, v in job.items() if not k.endswith("sd_configs")}
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
        jobs.append(job)
    assert {j["job_name"] for j in jobs} == set(targets)
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "prometheus" / "rules.yml")],
        "scrape_configs": jobs,
    }


@pytest.fixture
def channel(system: System) -> tuple[Api, dict[str, Any]]:
    """A channel with 400 contacts (2 refused by the provider, 5% of calls throttled), made
    before the processes start: a restart, then the first broadcast. Returns (the client of
    its workspace, the channel).
    """
    api = system.client()
    channel, _ = api.webhook_channel(
        rate=200, fail_addresses=["prom-7", "prom-8"], throttle_ratio=0.05, seed=11, retry_after=0.2
    )
    account = api.account(channel["id"])
    api.import_contacts(account["id"], [f"prom-{i}" for i in range(400)])
    return api, channel


@pytest.fixture
def metered(system: System, channel: Any) -> Iterator[tuple[int, int]]:
    """A scheduler and two dispatcher processes started now (after the channel was made),
    serving their metrics; the session's own ones are back afterwards.
    """
    procs = system.procs
    scheduler_port, dispatcher_port = free_port(), free_port()
    procs.stop("dispatcher")
    procs.stop("scheduler")
    procs.start("prom-scheduler", "scheduler", "--metrics-port", str(scheduler_port))
    procs.start(
        "prom-dispatcher",
        "dispatcher",
        "--processes",
        "2",
        "--threads",
        "2",
        "--metrics-port",
        str(dispatcher_port),
    )
    try:
        yield scheduler_port, dispatcher_port
    finally:
        procs.stop("prom-dispatcher")
        procs.stop("prom-scheduler")
        procs.start("dispatcher", "dispatcher", "--processes", "1", "--threads", "4")
        procs.start("scheduler", "scheduler")
    # With their metrics servers on (dramatiq's exposition process included), every line they
    # wrote, up to their stop, is one JSON object.
    for name in ("prom-dispatcher", "prom-scheduler"):
        for line in filter(None, procs.log(name).splitlines()):
            assert line.startswith("{"), (name, line)
            assert isinstance(json.loads(line), dict), (name, line)


@pytest.fixture
def prometheus(system: System, metered: tuple[int, int], tmp_path: Path) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: bash deploy/local/services.sh installs it"
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(system, *metered)))
    port = free_port()
    with (tmp_path / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    client = Prometheus(f"http://127.0.0.1:{port}")
    try:
        yield client
    finally:
        client.http.close()
        proc.terminate()
        proc.wait(timeout=30)


def test_every_dashboard_query_answers_during_the_first_broadcast_after_a_start(
    channel: tuple[Api, dict[str, Any]], prometheus: Prometheus
) -> None:
    api, made = channel

    def all_up() -> bool:
        try:
            # 503 while Prometheus opens its storage.
            if prometheus.http.get("/-/ready").status_code != 200:
                return False
            health = prometheus.targets_up()
        except httpx.TransportError:
            return False
        return len(health) == 4 and set(health.values()) == {"up"}

    wait_for("Prometheus to scrape every target", all_up, timeout=60, every=0.5)

    def scraped_before(n: int) -> bool:
        # A few scrapes of the fresh processes before any send: the 0 every series starts at.
        counts = prometheus.instant('min(count_over_time(up{job=~"bcast-.*"}[1m]))')
        return bool(counts) and float(counts[0]["value"][1]) >= n

    wait_for("three scrapes before the broadcast", lambda: scraped_before(3), timeout=30)
    started = time.time()
    b = api.broadcast(made["id"], {})
    api.wait_status(b["id"], "completed", timeout=90)

    def sent_seen() -> bool:
        # Every answer scraped: the 398 sends and the 2 refusals.
        for outcome, least in (("sent", 398), ("failed|partial", 2)):
            result = prometheus.instant(f'sum(bcast_deliveries_total{{outcome=~"{outcome}"}})')
            if not result or float(result[0]["value"][1]) < least:
                return False
        return True

    wait_for("Prometheus to scrape the last sends", sent_seen, timeout=30, every=0.5)
    end = time.time()

    empty, still = [], []
    for title, expr in dashboard_queries():
        result = prometheus.range(expr, started - 5, end)
        values = [float(v) for s in result for _, v in s["values"]]
        if not values:
            empty.append(f"{title}: {expr}")
        elif (
            any(m in expr for m in MOVED)
            and re.search(r"\b(rate|increase)\(", expr)
            and not any(v > 0 for v in values)
        ):
            still.append(f"{title}: {expr}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
    assert not still, "panels that did not move during the broadcast:\n" + "\n".join(still)

    # The SLO's recording rules evaluate: once the last sends are in, 2 of 400 failed. Only an
    # evaluation made after those sends were scraped counts: an instant query answers with the
    # rule's latest sample, which may have been computed a moment before the last scrape.
    rule = "bcast:send_errors:ratio_rate5m"

    def recorded() -> float | None:
        errors = prometheus.instant(f"{rule} and on() (timestamp({rule}) > {end:.3f})")
        return float(errors[0]["value"][1]) if errors else None

    assert wait_for("the send error ratio to be recorded", recorded, timeout=30) == (
        pytest.approx(2 / 400, rel=0.2)
    )
    # A healthy start and a healthy broadcast raise no alert, not even a pending one (a
    # "time since" gauge starting at 0, say, would page at once).
    alerts = prometheus.range("ALERTS", started, time.time())
    assert not alerts, [(a["metric"]["alertname"], a["values"][0][0] - started) for a in alerts]
    # RabbitMQ's own endpoint: the run's queues and their consumers.
    consumers = prometheus.instant('sum(rabbitmq_detailed_queue_consumers{queue=~"bcast_.*"})')
    assert consumers
    assert float(consumers[0]["value"][1]) >= 1
