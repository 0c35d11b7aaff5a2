"""The alert rules under Prometheus' own tools: `promtool check rules` accepts them, and the
unit tests in deploy/prometheus/rules_test*.yml (every alert firing when it should and silent
when it should not, with its labels and rendered annotations) pass. promtool comes with
Debian's `prometheus` package (deploy/local/services.sh installs it).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

PROMETHEUS = Path(__file__).parents[2] / "deploy" / "prometheus"
TEST_FILES = sorted(p.name for p in PROMETHEUS.glob("rules_test*.yml"))


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: bash deploy/local/services.sh installs it"
    return subprocess.run(
        [tool, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120
    )


def test_promtool_accepts_the_rules() -> None:
    done = promtool("check", "rules", "rules.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_fires_when_it_should_and_not_otherwise() -> None:
    done = promtool("test", "rules", *TEST_FILES)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_case_that_fires_and_one_that_does_not() -> None:
    rules = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = [
        group
        for name in TEST_FILES
        for group in yaml.safe_load((PROMETHEUS / name).read_text())["tests"]
    ]
    cases = [case for group in tests for case in group.get("alert_rule_test", [])]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    silent = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert alerts - fires == set(), "alerts never shown firing"
    assert alerts - silent == set(), "alerts never shown silent"
