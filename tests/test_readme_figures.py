"""Every figure block in README.md and docs/ is exactly what its results file renders to."""

from __future__ import annotations

import pytest

from bench.readme import BLOCKS, current, rendered


@pytest.mark.parametrize("name", list(BLOCKS))
def test_the_readme_block_matches_its_results_file(name: str) -> None:
    doc = BLOCKS[name][2].name
    assert current(name) is not None, f"{doc} has no <!-- {name}:start --> block"
    assert current(name) == rendered(name), (
        f"{doc}'s {name} figures differ from {BLOCKS[name][0].name}: run "
        "`.venv/bin/python -m bench.readme`"
    )
