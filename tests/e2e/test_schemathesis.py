"""The served API against Schemathesis: every check, every phase (stateful included), cases
generated from the OpenAPI document the API serves. 0 failures, at least 1,000 cases.

Settings (which answers count as expected for schema-valid input the business rules refuse)
are in tests/api/schemathesis.toml.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import Api, System

pytestmark = pytest.mark.e2e

CONFIG = Path(__file__).parents[1] / "api" / "schemathesis.toml"
#: Seconds of fuzzing and stateful testing; the examples and coverage phases come first.
BUDGET = int(os.environ.get("BCAST_SCHEMATHESIS_SECONDS", "25"))
LEAST_CASES = 1000


def test_schemathesis_finds_nothing(api: Api, system: System) -> None:
    token = api.http.headers["Authorization"]
    run = subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "--config-file",
            str(CONFIG),
            "run",
            f"{system.api_url}/openapi.json",
            "--header",
            f"Authorization: {token}",
            "--checks",
            "all",
            "--phases",
            "examples,coverage,fuzzing,stateful",
            "--max-time",
            str(BUDGET),
            "--workers",
            "1",
            "--continue-on-failure",
            "--request-timeout",
            "30",
        ],
        capture_output=True,
        text=True,
        timeout=BUDGET * 4 + 120,
        check=False,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-20_000:]
    generated = re.search(r"(\d+) generated", output)
    assert generated, output[-5000:]
    assert int(generated.group(1)) >= LEAST_CASES, output[-5000:]
    assert "Stateful" in output
    assert "❌" not in output, output[-20_000:]
