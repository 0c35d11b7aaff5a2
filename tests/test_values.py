"""``shared.values.value``: records the send path makes per recipient, frozen to mypy."""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
import textwrap
from pathlib import Path

import pytest
from mypy import api as mypy_api

from services.dispatcher.channels.base import Permanent, Sent, Transient
from services.dispatcher.channels.client import Answer
from services.dispatcher.retry import Decision
from shared.delivery_store import Claimed, Record
from shared.domain.lifecycle import DeliveryStatus
from shared.values import value

ROOT = Path(__file__).resolve().parent.parent


@value
class Point:
    x: int
    label: str = "p"


def test_a_value_compares_hashes_and_copies_by_its_fields() -> None:
    a = Point(1)
    assert a == Point(1, "p")
    assert a != Point(2)
    assert hash(a) == hash(Point(1))
    assert len({a, Point(1), Point(2)}) == 2
    assert dataclasses.replace(a, label="q") == Point(1, "q")
    assert a.label == "p"
    assert not hasattr(a, "__dict__")  # slots: no per-instance dict
    with pytest.raises(AttributeError):
        a.z = 3  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "record", [Claimed, Record, Decision, Sent, Transient, Permanent, Answer], ids=str
)
def test_send_path_records_are_made_without_a_frozen_setattr(record: type) -> None:
    """A frozen dataclass defines ``__setattr__`` (to refuse writes), and its ``__init__``
    goes through ``object.__setattr__`` for each field: what ``@value`` leaves out.
    """
    assert dataclasses.is_dataclass(record)
    assert "__setattr__" not in record.__dict__
    assert "__slots__" in record.__dict__
    assert record.__hash__ is not None


def test_send_path_records_are_values() -> None:
    record = Record(7, DeliveryStatus.SENT, provider_message_id="m-1")
    assert record == Record(7, DeliveryStatus.SENT, provider_message_id="m-1")
    assert hash(record) == hash(dataclasses.replace(record))
    assert dataclasses.fields(Claimed)[0].name == "id"


def test_mypy_refuses_an_assignment_to_a_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The records are frozen where it is checked: mypy (CI runs it) rejects a write."""
    monkeypatch.setenv("MYPYPATH", str(ROOT))
    probe = tmp_path / "probe.py"
    probe.write_text(
        textwrap.dedent(
            """
            from shared.delivery_store import Record
            from shared.domain.lifecycle import DeliveryStatus
            from shared.values import value

            @value
            class Point:
                x: int

            p = Point(1)
            p.x = 2
            r = Record(1, DeliveryStatus.SENT)
            r.error = "changed"
            """
        )
    )
    # mypy raises the recursion limit and the collector's thresholds for its own process and
    # leaves them so: the tests after this one in the process get them back.
    limit, threshold = sys.getrecursionlimit(), gc.get_threshold()
    try:
        out, err, code = mypy_api.run(
            [
                "--no-incremental",
                "--cache-dir",
                os.devnull,  # the project's own cache stays as CI's mypy run left it
                "--follow-imports=silent",
                "--ignore-missing-imports",
                "--config-file",
                "",
                str(probe),
            ]
        )
    finally:
        sys.setrecursionlimit(limit)
        gc.set_threshold(*threshold)
    assert code == 1, (out, err)
    assert out.count("is read-only") == 2, out
