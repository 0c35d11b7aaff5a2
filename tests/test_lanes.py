"""The lanes a run with workers splits the suite into (``lane_of`` in ``tests/conftest.py``)."""

from __future__ import annotations

import pytest

from tests.conftest import E2E, IN_PROCESS, OWN_PROCESSES, REST, lane_of


@pytest.mark.parametrize(
    ("nodeid", "three", "two"),
    [
        ("tests/api/test_contacts.py::test_x", IN_PROCESS, REST),
        ("tests/dispatcher/test_batch_run.py::test_x[a-b]", IN_PROCESS, REST),
        ("tests/e2e/test_fairness.py::test_x", E2E, REST),
        ("tests/e2e/test_rate_limits.py::test_x", E2E, REST),
        ("tests/e2e/test_faults.py::test_x[kill-dispatcher]", OWN_PROCESSES, OWN_PROCESSES),
        ("tests/e2e/test_console_browser.py::test_x", OWN_PROCESSES, OWN_PROCESSES),
        ("tests/cli/test_tokens_cli.py::test_x", OWN_PROCESSES, OWN_PROCESSES),
        ("tests/deploy/test_alert_rules.py::test_x", OWN_PROCESSES, OWN_PROCESSES),
        # A file named like a whole-stack file outside tests/e2e/ stays with the rest.
        ("tests/api/test_faults.py::test_x", IN_PROCESS, REST),
    ],
)
def test_each_test_has_one_lane_by_its_file(nodeid: str, three: str, two: str) -> None:
    assert lane_of(nodeid, 3) == three
    assert lane_of(nodeid, 2) == two


def test_the_tests_that_measure_rates_never_share_the_niced_lane() -> None:
    # The niced lane gives way on the cores: a test that checks a rate or a delay must not
    # run in it, with two lanes or three.
    for lanes in (2, 3):
        for path in ("tests/e2e/test_fairness.py", "tests/e2e/test_rate_limits.py"):
            assert lane_of(f"{path}::t", lanes) != OWN_PROCESSES
