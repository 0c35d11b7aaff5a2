"""README and docs figures come from results files, never by hand.

Each block of figures in README.md (or a page under docs/) sits between
``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` and is rendered here from its results file;
``python -m bench.readme`` rewrites every block, and tests/test_readme_figures.py fails when a
block and its file differ.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SCALING = ROOT / "docs" / "scaling.md"
LATEST = ROOT / "bench" / "results" / "latest.json"


def faults_block(results: dict[str, Any]) -> str:
    """The fault suite's last run (``results/faults.json``) as a table and one sentence."""
    rows = [
        "| scenario | recipients | create to completed | sent / failed | lost | repeats (bound) | stuck | result |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for s in results["scenarios"]:
        seconds = "-" if s["seconds"] is None else f"{s['seconds']:.1f} s"
        rows.append(
            f"| {s['scenario']} | {s['recipients']:,} | {seconds} | {s['sent']:,} / "
            f"{s['failed']:,} | {s['lost']:,} | {s['repeats']:,} (<= {s['repeat_bound']:,}) | "
            f"{s['stuck']:,} | {s['result']} |"
        )
    machine = results.get("machine", {})
    when = str(results.get("written_at", ""))[:10]
    verdict = "every scenario passed" if results.get("passed") else "NOT every scenario passed"
    return "\n".join(
        [
            f"From `results/faults.json` (`{results.get('command', 'python -m bench.faults')}`, "
            f"{when}, {machine.get('cores', '?')} cores, "
            f"{results.get('total_seconds', 0):.0f} s in all): {verdict}.",
            "",
            *rows,
        ]
    )


def bench_block(results: dict[str, Any]) -> str:
    """The benchmarks' latest results (``bench/results/latest.json``) as the README's table."""
    from bench.results import markdown

    when = str(results.get("written_at", ""))[:10]
    commands = ", ".join(f"`{c}`" for c in sorted(set(results.get("commands", {}).values())))
    return f"From `bench/results/latest.json` ({commands}, {when}):\n\n" + markdown(results)


def scaling_blocks(results: dict[str, Any]) -> tuple[str, str]:
    """The scale-out runs and the capacity model worked out from them, for docs/scaling.md."""
    from bench.scale_out import capacity_table, runs_table

    scaled = results.get("scale_out")
    if not scaled:
        missing = (
            "No scale-out figures in `bench/results/latest.json` yet: run "
            "`.venv/bin/python -m bench scale-out` (or `all`), then `.venv/bin/python -m bench.readme`."
        )
        return missing, missing
    when = str(results.get("written_at", ""))[:10]
    command = results.get("commands", {}).get("scale_out", "python -m bench scale-out")
    machine = results.get("machine", {})
    source = (
        f"From `bench/results/latest.json`, section `scale_out` (`{command}`, {when}, "
        f"{machine.get('cores', '?')} cores; {scaled['recipients']:,} recipients a run; each "
        f"group {scaled['group']}; Postgres: {scaled['postgres']['server']})"
    )
    return (
        f"{source}. Note: {scaled['note']}.\n\n{runs_table(scaled)}",
        f"{source}, carried linearly to each rate:\n\n{capacity_table(scaled)}",
    )


def scaling_runs_block(results: dict[str, Any]) -> str:
    """docs/scaling.md's table of the scale-out runs."""
    return scaling_blocks(results)[0]


def scaling_capacity_block(results: dict[str, Any]) -> str:
    """docs/scaling.md's capacity table."""
    return scaling_blocks(results)[1]


#: Block name -> (results file, renderer, the file that shows it).
BLOCKS: dict[str, tuple[Path, Callable[[dict[str, Any]], str], Path]] = {
    "faults": (ROOT / "results" / "faults.json", faults_block, README),
    "bench": (LATEST, bench_block, README),
    "scale-out-runs": (LATEST, scaling_runs_block, SCALING),
    "scale-out-capacity": (LATEST, scaling_capacity_block, SCALING),
}


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- {name}:start -->\n)(.*?)(<!-- {name}:end -->)", re.S)


def rendered(name: str) -> str:
    path, render, _ = BLOCKS[name]
    return render(json.loads(path.read_text())) + "\n"


def current(name: str, text: str | None = None) -> str | None:
    """What the block's file holds in the block now (None: no such block)."""
    found = _pattern(name).search(text if text is not None else BLOCKS[name][2].read_text())
    return found.group(2) if found else None


def rewrite() -> list[str]:
    """Render every block into its file; returns the names of the blocks that changed."""
    changed = []
    for doc in sorted({target for _, _, target in BLOCKS.values()}):
        text = doc.read_text()
        for name, (_, _, target) in BLOCKS.items():
            if target != doc:
                continue
            block = rendered(name)
            if current(name, text) not in (None, block):
                found = _pattern(name).search(text)
                assert found is not None
                text = text[: found.start(2)] + block + text[found.end(2) :]
                changed.append(name)
        doc.write_text(text)
    return changed


if __name__ == "__main__":
    names = rewrite()
    print("README.md, docs/: " + (", ".join(names) + " rewritten" if names else "up to date"))
    sys.exit(0)
