"""Alertmanager's configuration under its own tool: amtool accepts it (and its commented
notifier examples once uncommented), every alert of rules.yml reaches the receiver its
severity names, the inhibitions name alerts that exist, and compose's Prometheus sends to it.
amtool comes with Debian's prometheus-alertmanager package (deploy/local/services.sh).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).parents[2] / "deploy"
CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
RECEIVER_OF = {"page": "on-call", "ticket": "team", "warn": "team", "info": "blackhole"}


def amtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("amtool")
    assert tool, "amtool is missing: bash deploy/local/services.sh installs it"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)


def alerts() -> list[dict[str, object]]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    return [r for g in rules["groups"] for r in g["rules"] if "alert" in r]


def test_amtool_accepts_the_configuration() -> None:
    done = amtool("check-config", str(CONFIG))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_commented_notifier_examples_are_valid_once_uncommented(tmp_path: Path) -> None:
    text = re.sub(r"(?m)^    # ", "    ", CONFIG.read_text())
    config = yaml.safe_load(text)
    receivers = {r["name"]: r for r in config["receivers"]}
    assert "pagerduty_configs" in receivers["on-call"]
    assert "slack_configs" in receivers["team"]
    # Secrets come from files, never from this file.
    assert "routing_key_file" in receivers["on-call"]["pagerduty_configs"][0]
    assert "api_url_file" in receivers["team"]["slack_configs"][0]
    (tmp_path / "alertmanager.yml").write_text(text)
    done = amtool("check-config", str(tmp_path / "alertmanager.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("rule", alerts(), ids=lambda r: str(r["alert"]))
def test_every_alert_reaches_the_receiver_its_severity_names(rule: dict[str, object]) -> None:
    labels = dict(rule.get("labels") or {})  # type: ignore[call-overload]
    severity = labels["severity"]
    done = amtool(
        "config",
        "routes",
        "test",
        f"--config.file={CONFIG}",
        f"alertname={rule['alert']}",
        *(f"{k}={v}" for k, v in labels.items()),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == RECEIVER_OF[severity], (rule["alert"], done.stdout)


def test_every_inhibition_names_alerts_that_exist() -> None:
    names = [str(r["alert"]) for r in alerts()]
    config = yaml.safe_load(CONFIG.read_text())
    for rule in config["inhibit_rules"]:
        for matcher in [*rule["source_matchers"], *rule["target_matchers"]]:
            match = re.fullmatch(r'alertname(=~?)"(.+)"', matcher)
            assert match, matcher
            op, value = match.groups()
            pattern = value if op == "=~" else re.escape(value)
            hit = [n for n in names if re.fullmatch(pattern, n)]
            assert hit, f"{matcher} matches no alert of rules.yml"
            if op == "=~":
                for part in value.split("|"):
                    assert any(re.fullmatch(part, n) for n in names), f"{part} in {matcher}"


def test_compose_prometheus_sends_its_alerts_to_alertmanager() -> None:
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [target] = prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    host, port = target.split(":")
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    service = compose["services"][host]
    assert f"{port}:{port}" in service["ports"]
    assert any(v.startswith("../alertmanager:/etc/alertmanager") for v in service["volumes"])
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in service["command"]
