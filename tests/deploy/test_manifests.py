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
    rabbit = [t for t in triggers if t["type"] == "rabbitmq"]
    queues = {t["metadata"]["queueName"] for t in rabbit}
    # Each queue and its delay queue, counted with the messages taken but not acknowledged
    # (only the management API's count has those).
    assert queues == {SEND_QUEUE, START_QUEUE, f"{SEND_QUEUE}.DQ", f"{START_QUEUE}.DQ"}
    assert {t["metadata"]["protocol"] for t in rabbit} == {"http"}
    [prometheus] = [t for t in triggers if t["type"] == "prometheus"]
    used = used_metrics(prometheus["metadata"]["query"])
    assert used == {"bcast_batches"}
    assert used <= defined_metrics()


def test_scrape_ports_match_the_services_defaults() -> None:
    settings = Settings()
    [prom] = yaml_docs(DEPLOY / "prometheus/prometheus.yml")
    ports = {
        job["job_name"]: job["dns_sd_configs"][0]["port"]
        for job in prom["scrape_configs"]
        if "dns_sd_configs" in job
    }
    [rabbitmq] = [job for job in prom["scrape_configs"] if job["job_name"] == "rabbitmq"]
    assert rabbitmq["static_configs"][0]["targets"] == ["rabbitmq:15692"]
    assert ports == {
        "bcast-api": settings.api_port,
        "bcast-scheduler": settings.scheduler_metrics_port,
        "bcast-dispatcher": settings.dispatcher_metrics_port,
    }


def kustomize(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl")


@needs_kubectl
def test_kustomize_builds_every_manifest_and_never_a_secret() -> None:
    kinds = {d["kind"] for d in kustomize(DEPLOY / "k8s")}
    assert {"Deployment", "ScaledObject", "Job", "Service", "ConfigMap"} <= kinds
    assert "PodDisruptionBudget" in kinds
    # Applying the manifests must never overwrite the real credentials.
    assert "Secret" not in kinds
    [example] = yaml_docs(DEPLOY / "k8s/secret.example.yaml")
    assert example["kind"] == "Secret"
    assert {"BCAST_DATABASE_URL", "BCAST_BROKER_URL", "BCAST_SECRET_KEYS"} <= set(
        example["stringData"]
    )


def pods(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (d["metadata"]["name"], d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in ("Deployment", "Job")
    ]


@needs_kubectl
def test_every_pod_runs_pinned_unprivileged_and_after_the_migration() -> None:
    docs = kustomize(DEPLOY / "k8s")
    for name, pod in pods(docs):
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            image = c["image"]
            assert ":" in image, f"{name}: {image} has no tag"
            assert not image.endswith(":latest"), f"{name}: {image} is not pinned"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            # Python needs a writable temporary directory (settings, metrics, heartbeats).
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]  # noqa: S108
            assert tmp, f"{name}/{c['name']}: read-only root and no /tmp"
            [volume] = [v for v in pod["volumes"] if v["name"] == tmp[0]["name"]]
            assert "emptyDir" in volume
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        pod = d["spec"]["template"]["spec"]
        [wait] = pod["initContainers"]
        assert wait["args"][:2] == ["db", "check"], "waits for the migration Job"
        [main] = pod["containers"]
        assert "livenessProbe" in main, d["metadata"]["name"]
    budgets = {
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
        for d in docs
        if d["kind"] == "PodDisruptionBudget"
    }
    assert budgets == {"api", "scheduler", "dispatcher"}


@needs_kubectl
def test_operator_objects_scrape_every_role_under_the_rules_job_names() -> None:
    docs = kustomize(DEPLOY / "k8s/monitoring")
    jobs = {
        r["replacement"]
        for d in docs
        if d["kind"] in ("ServiceMonitor", "PodMonitor")
        for e in d["spec"].get("endpoints", []) + d["spec"].get("podMetricsEndpoints", [])
        for r in e["relabelings"]
        if r["targetLabel"] == "job"
    }
    assert jobs == {"bcast-api", "bcast-scheduler", "bcast-dispatcher", "rabbitmq"}
    # RabbitMQ scraped as compose scrapes it: the same path and metric families.
    [rabbit] = [d for d in docs if d["metadata"]["name"] == "bcast-rabbitmq"]
    [compose_job] = [
        j
        for j in yaml_docs(DEPLOY / "prometheus/prometheus.yml")[0]["scrape_configs"]
        if j["job_name"] == "rabbitmq"
    ]
    [endpoint] = rabbit["spec"]["endpoints"]
    assert endpoint["path"] == compose_job["metrics_path"]
    assert endpoint["params"] == compose_job["params"]
    rules = (DEPLOY / "prometheus/rules.yml").read_text()
    assert set(re.findall(r'job="([a-z-]+)"', rules)) <= jobs
    [rule] = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["spec"]["groups"] == yaml_docs(DEPLOY / "prometheus/rules.yml")[0]["groups"]
