"""The scale-out section of the results reaches the README table and docs/scaling.md."""

from __future__ import annotations

from typing import Any

from bench.readme import scaling_blocks
from bench.results import markdown
from bench.scale_out import TARGET_RATES, capacity


def _run(name: str, groups: int, per_second: float, idle: int = 0) -> dict[str, Any]:
    return {
        "name": name,
        "groups": groups,
        "schedulers": 1,
        "recipients": 20_000,
        "seconds": 20_000 / per_second,
        "per_second": per_second,
        "vs_first_run": per_second / 4000,
        "per_group": [
            {
                "per_second": 0.0 if g < idle else per_second / groups,
                "first_send_s": None if g < idle else 0.4,
                "most_batches_at_once": 0 if g < idle else 16 // groups,
            }
            for g in range(groups)
        ],
        "idle_groups": idle,
        "last_first_send_s": 0.4,
        "batch_runs": 41,
        "batches_done": 40,
        "cpu_us_per_recipient": {
            "dispatchers": 220.0,
            "schedulers": 2.0,
            "api": 1.0,
            "postgres": 200.0 + groups,
        },
        "rabbitmq_per_recipient": {
            "published_by_schedulers": 0.0009,
            "taken_by_dispatchers": 0.001,
        },
        "postgres_per_recipient": {
            "rows_written": 3.4,
            "wal_bytes": 1600.0,
            "wal_bytes_by_kind": {"Btree": 700.0, "CLOG": 0.1, "Heap": 800.0, "Transaction": 20.0},
            "wal_full_page_images": 0.001,
            "delivery_bytes": 400.0,
            "delivery_table_bytes": 250.0,
            "delivery_index_bytes": 150.0,
            "transactions": 0.5,
            "statements": 0.6,
            "tables": {"delivery": {"inserted": 20_000, "updated": 40_000, "deleted": 0}},
        },
    }


SECTION = {
    "recipients": 20_000,
    "group": "2 processes x 8 threads",
    "note": "every group shares this machine's 2 cores",
    "postgres": {"server": "private cluster, PostgreSQL 15.20", "settings": {}},
    "runs": [
        _run("1 group, 1 scheduler", 1, 4000.0),
        _run("4 groups, 1 scheduler", 4, 3600.0, idle=1),
    ],
}


def test_the_readme_table_has_a_row_per_run_and_names_an_idle_group() -> None:
    table = markdown({"scale_out": SECTION, "machine": {"cores": 2}})
    assert "| 1 group, 1 scheduler | 4,000 recipients/s" in table
    assert "1 group(s) sent nothing" in table
    assert "not more hardware" in table


def test_the_capacity_model_scales_the_costliest_run_linearly() -> None:
    postgres = next(c for c in capacity(SECTION) if c["label"] == "Postgres CPU µs")
    assert postgres["run"] == "4 groups, 1 scheduler"
    assert postgres["at"][TARGET_RATES[0]] == 204.0 * TARGET_RATES[0] / 1e6


def test_the_scaling_page_blocks_render_with_and_without_figures() -> None:
    runs, model = scaling_blocks({"scale_out": SECTION, "commands": {}, "machine": {}})
    assert "| recipients / s | 4,000 | 3,600 |" in runs
    assert "Heap 800, Btree 700, Transaction 20 |" in runs  # largest first, as the file sorts keys
    assert "`scale_out.runs[].postgres_per_recipient.wal_bytes`" in model
    assert "3.46 TB/day" in model  # 400 bytes a recipient at 100,000/s
    empty = scaling_blocks({})
    assert all("No scale-out figures" in block for block in empty)
