"""The suite's table, the details of a failed scenario, and the JSON report."""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.faults.checks import Verdict

#: Log lines shown per process of a failed scenario.
LOG_TAIL = 40
COLUMNS = ("scenario", "recipients", "seconds", "sent/failed", "lost", "repeats (bound)", "stuck")


def row(v: Verdict) -> tuple[str, ...]:
    return (
        v.scenario,
        f"{v.recipients:,}",
        "-" if v.seconds is None else f"{v.seconds:.1f}",
        f"{v.sent:,}/{v.failed:,}",
        str(v.lost),
        f"{v.repeats} (<= {v.repeat_bound})",
        str(v.stuck),
        "PASS" if v.passed else "FAIL",
    )


def table(verdicts: list[Verdict]) -> str:
    rows = [(*COLUMNS, "result"), *(row(v) for v in verdicts)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def bounds(verdicts: list[Verdict]) -> str:
    """How each scenario's repeat bound was counted, and the repeats seen."""
    lines = []
    for v in verdicts:
        line = f"  {v.scenario}: repeats {v.repeats} <= {v.repeat_bound} ({v.bound_rule})"
        if v.repeated_keys:
            keys = ", ".join(f"{k} x{n}" for k, n in v.repeated_keys.items())
            line += f"; repeated keys: {keys}"
        lines.append(line)
    return "\n".join(lines)


def describe(v: Verdict, *, logs: bool = True) -> str:
    """What happened in a scenario: its events, problems, and (failed) what was stuck and
    the tail of each process's log.
    """
    out = [f"== {v.scenario}: {'PASS' if v.passed else 'FAIL'}"]
    out += [f"   {e}" for e in v.events]
    for problem in v.problems:
        out.append(f"   problem: {problem}")
    if not v.passed:
        out.append(f"   batches by state: {v.batches_by_state}")
        out.append(f"   deliveries by status: {v.deliveries_by_status}")
        out.append(f"   provider: {v.provider}")
        if logs:
            out.append(f"   logs: {v.logs}")
            for path in sorted(Path(v.logs).glob("*.log")):
                tail = path.read_text(errors="replace").splitlines()[-LOG_TAIL:]
                out.append(f"   --- {path.name} (last {len(tail)} lines)")
                out += [f"   | {line}" for line in tail]
    return "\n".join(out)


def write_json(path: Path, verdicts: list[Verdict], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
        **meta,
        "passed": all(v.passed for v in verdicts),
        "scenarios": [v.as_json() for v in verdicts],
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
