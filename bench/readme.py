"""README figures come from results files, never by hand.

Each block of figures in README.md sits between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->`` and is rendered here from its results file; ``python -m bench.readme``
rewrites every block, and tests/test_readme_figures.py fails when a block and its file differ.
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


#: Block name -> (results file, renderer).
BLOCKS: dict[str, tuple[Path, Callable[[dict[str, Any]], str]]] = {
    "faults": (ROOT / "results" / "faults.json", faults_block),
    "bench": (ROOT / "bench" / "results" / "latest.json", bench_block),
}


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- {name}:start -->\n)(.*?)(<!-- {name}:end -->)", re.S)


def rendered(name: str) -> str:
    path, render = BLOCKS[name]
    return render(json.loads(path.read_text())) + "\n"


def current(name: str, text: str | None = None) -> str | None:
    """What README.md holds in the block now (None: no such block)."""
    found = _pattern(name).search(text if text is not None else README.read_text())
    return found.group(2) if found else None


def rewrite() -> list[str]:
    """Render every block into README.md; returns the names of the blocks that changed."""
    text = README.read_text()
    changed = []
    for name in BLOCKS:
        block = rendered(name)
        if current(name, text) not in (None, block):
            found = _pattern(name).search(text)
            assert found is not None
            text = text[: found.start(2)] + block + text[found.end(2) :]
            changed.append(name)
    README.write_text(text)
    return changed


if __name__ == "__main__":
    names = rewrite()
    print("README.md: " + (", ".join(names) + " rewritten" if names else "up to date"))
    sys.exit(0)
