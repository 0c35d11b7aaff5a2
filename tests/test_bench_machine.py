"""How busy the machine's cores were, as the end-to-end benchmark reads it from /proc/stat."""

from __future__ import annotations

import os
import time

from bench.common import busy_fraction, cpu_line_ticks, machine_busy
from bench.results import markdown


def test_busy_fraction_is_the_busy_part_of_the_time_between_two_readings() -> None:
    assert busy_fraction((50, 100), (150, 300)) == 0.5
    assert busy_fraction((50, 100), (50, 300)) == 0.0
    # No tick between the readings: nothing to divide, not a division by zero.
    assert busy_fraction((50, 100), (50, 100)) == 0.0


def test_idle_and_io_wait_are_not_busy_and_steal_and_guest_are_left_out() -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice
    assert cpu_line_ticks("cpu  1 2 3 40 50 6 7 800 9 10") == (1 + 2 + 3 + 6 + 7, 19 + 40 + 50)
    # Older kernels stop after steal, or before it.
    assert cpu_line_ticks("cpu 1 2 3 40 50 6 7 800") == (19, 109)
    assert cpu_line_ticks("cpu 1 2 3 40 50 6 7") == (19, 109)


def test_the_cpu_this_process_burns_shows_as_busy_time() -> None:
    tick = os.sysconf("SC_CLK_TCK")
    before, own_before = machine_busy(), os.times()
    deadline = time.process_time() + 0.5
    while time.process_time() < deadline:
        pass
    after, own_after = machine_busy(), os.times()
    own = (own_after.user + own_after.system - own_before.user - own_before.system) * tick
    assert after[0] - before[0] >= 0.8 * own  # every core's busy ticks include this one's
    assert 0 < busy_fraction(before, after) <= 1


def test_the_results_table_shows_how_busy_the_cores_were() -> None:
    e2e = {
        "recipients": 100_000,
        "seconds": 15.0,
        "per_second": 6_666.7,
        "raw_per_second": 8_000.0,
        "ratio_to_raw": 0.833,
        "accepted": 100_000,
        "duplicates": 0,
        "bad_signatures": 0,
        "machine_busy": 0.861,
        "raw_cpu": {
            "machine_busy": 0.927,
            "simulator_us_per_request": 108.2,
            "client_us_per_request": 123.8,
        },
    }
    table = markdown({"e2e": e2e})
    assert (
        "| cores busy: pipeline / raw limit | 86% / 93% (raw CPU µs per request: "
        "simulator 108, client 124) |"
    ) in table
