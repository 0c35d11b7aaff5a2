"""The deploy files agree with the code: metric names, CLI commands, queues and ports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import services.api.middleware
import services.dispatcher.metrics
import services.scheduler.scheduler  # noqa: F401 - registers the scheduler's metrics
from services.cli import app as cli
from shared.broker import SEND_QUEUE, START_QUEUE
from shared.settings import Settings

DEPLOY = Path(__file__).parents[2] / "deploy"


def yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def defined_metrics() -> set[str]:
    """Every sample name the registered metrics can expose (labelled ones included)."""
    return set(REGISTRY._names_to_collectors)


def used_metrics(text: str) -> set[str]:
    return set(re.findall(r"\bbcast_[a-z_]+\b", text))


@pytest.mark.parametrize(
    "path", sorted(DEPLOY.rglob("*.y*ml")), ids=lambda p: str(p.relative_to(DEPLOY))
)
def test_every_yaml_file_parses(path: Path) -> None:
    assert yaml_docs(path)


def test_dashboard_and_alerts_use_only_metrics_the_code_defines() -> None:
    defined = defined_metrics()
    dashboard = json.loads((DEPLOY / "grafana/dashboards/bcast.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    rules = (DEPLOY / "prometheus/rules.yml").read_text()
    used = used_metrics(exprs) | used_metrics(rules)
    assert len(used) >= 10
    unknown = {m for m in used if m not in defined and not m.startswith("bcast:")}
    assert unknown == set()


def test_every_dashboard_panel_has_a_query_and_a_unique_id() -> None:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/bcast.json").read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in dashboard["panels"])


def test_alert_rules_are_well_formed() -> None:
    [doc] = yaml_docs(DEPLOY / "prometheus/rules.yml")
    for rule in doc["groups"][0]["rules"]:
        assert ("alert" in rule) != ("record" in rule)
        assert rule["expr"].strip()
        if "alert" in rule:
            assert rule["annotations"]["summary"]
            assert rule["annotations"]["description"]


def test_every_alert_has_a_runbook_section() -> None:
    [doc] = yaml_docs(DEPLOY / "prometheus/rules.yml")
    runbooks = (DEPLOY.parent / "docs/runbooks.md").read_text()
    anchors = {line[3:].strip().lower() for line in runbooks.splitlines() if line.startswith("## ")}
    for rule in doc["groups"][0]["rules"]:
        if "alert" in rule:
            name = rule["alert"]
            assert rule["annotations"]["runbook_url"] == f"docs/runbooks.md#{name.lower()}"
            assert name.lower() in anchors, f"docs/runbooks.md has no section {name}"


def test_compose_and_k8s_run_real_cli_commands() -> None:
    commands = {c.name for c in cli.registered_commands} | {g.name for g in cli.registered_groups}
    [compose] = yaml_docs(DEPLOY / "compose/compose.yaml")
    used = {
        svc["command"][0]
        for svc in compose["services"].values()
        if "command" in svc and svc.get("image") == "bcast:latest"
    }
    for path in (DEPLOY / "k8s").glob("*.yaml"):
        for doc in yaml_docs(path):
            pod = doc.get("spec", {}).get("template", {}).get("spec", {})
            used |= {c["args"][0] for c in pod.get("containers", []) if "args" in c}
    assert used == {"api", "scheduler", "dispatcher", "db", "simulator"}
    assert used <= commands


def test_keda_scales_on_batches_in_flight_and_the_queues_the_dispatchers_consume() -> None:
    docs = yaml_docs(DEPLOY / "k8s/dispatcher.yaml")
    [scaled] = [d for d in docs if d["kind"] == "ScaledObject"]
    triggers = scaled["spec"]["triggers"]
    queues = {t["metadata"]["queueName"] for t in triggers if t["type"] == "rabbitmq"}
    assert queues == {SEND_QUEUE, START_QUEUE}
    [prometheus] = [t for t in triggers if t["type"] == "prometheus"]
    used = used_metrics(prometheus["metadata"]["query"])
    assert used == {"bcast_batches"}
    assert used <= defined_metrics()


def test_scrape_ports_match_the_services_defaults() -> None:
    settings = Settings()
    [prom] = yaml_docs(DEPLOY / "prometheus/prometheus.yml")
    ports = {job["job_name"]: job["dns_sd_configs"][0]["port"] for job in prom["scrape_configs"]}
    assert ports == {
        "bcast-api": settings.api_port,
        "bcast-scheduler": settings.scheduler_metrics_port,
        "bcast-dispatcher": settings.dispatcher_metrics_port,
    }


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_every_manifest() -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, check=True
    ).stdout
    kinds = [d["kind"] for d in yaml.safe_load_all(out) if d]
    assert {"Deployment", "ScaledObject", "Job", "Service", "Secret", "ConfigMap"} <= set(kinds)
