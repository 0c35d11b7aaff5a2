"""Log lines for operators: one JSON object a line, the ids of the work as fields."""

from __future__ import annotations

import json
import logging
import sys

import psycopg
import pytest

from shared import logs
from shared.db.engine import libpq_url


def line(record: logging.LogRecord) -> dict[str, object]:
    text = logs.JsonFormatter("dispatcher").format(record)
    assert "\n" not in text, "one record, one line"
    parsed = json.loads(text)
    assert isinstance(parsed, dict)
    return parsed


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("bcast.test", logging.WARNING, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def test_a_line_carries_when_what_where_and_the_ids_of_its_work() -> None:
    out = line(record("broadcast %s batch %s: run ended", 5, 9, broadcast_id=5, batch_id=9))
    assert out["message"] == "broadcast 5 batch 9: run ended"
    assert (out["level"], out["service"], out["logger"]) == ("WARNING", "dispatcher", "bcast.test")
    assert (out["broadcast_id"], out["batch_id"]) == (5, 9)
    assert str(out["time"]).endswith("Z")
    assert "T" in str(out["time"])
    assert isinstance(out["pid"], int)


def test_an_exception_stays_on_its_line() -> None:
    try:
        raise ValueError("bad value\nsecond line")
    except ValueError:
        made = record("it failed")
        made.exc_info = sys.exc_info()
    out = line(made)
    assert out["error"] == "ValueError: bad value"
    assert "Traceback (most recent call last)" in str(out["traceback"])


def test_odd_extra_values_become_plain_json() -> None:
    out = line(record("m", broadcast_ids=list(range(50)), thing=object(), ratio=0.5))
    assert out["broadcast_ids"] == list(range(logs.MAX_ITEMS))
    assert isinstance(out["thing"], str)
    assert out["ratio"] == 0.5


def test_configure_replaces_its_own_handler_and_leaves_others(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    try:
        logs.configure("scheduler", "json")
        logs.configure("scheduler", "json")
        ours = [h for h in root.handlers if h not in before]
        assert len(ours) == 1, "configuring twice leaves one handler"
        assert all(h in root.handlers for h in before), "a test runner's handlers stay"
        logging.getLogger("dramatiq.worker").info("worker is ready", extra={"stage": "boot"})
        printed = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert (printed["service"], printed["logger"], printed["stage"]) == (
            "scheduler",
            "dramatiq.worker",
            "boot",
        )
        logs.configure("scheduler", "plain")
        logging.getLogger("bcast").warning("plain now")
        assert capsys.readouterr().err.strip().endswith("bcast: plain now")
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
        # The level goes back too: the tests after this one in the process see the root
        # logger as they would have without it.
        root.setLevel(level)


def test_auto_is_plain_in_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert logs.resolve("auto") == "plain"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert logs.resolve("auto") == "json"
    assert logs.resolve("plain") == "plain"


def test_a_database_error_s_traceback_keeps_its_frames_not_the_value_it_quotes(
    database_url: str,
) -> None:
    secret = "recipient-address-4711"
    with psycopg.connect(libpq_url(database_url)) as conn:
        try:
            try:
                conn.execute("SELECT %s::int", (secret,))
            except psycopg.DataError as exc:
                raise RuntimeError("storing the result failed") from exc
        except RuntimeError:
            made = record("it failed")
            made.exc_info = sys.exc_info()
    # The driver's message quotes the value: 'invalid input syntax for type integer: "..."'.
    assert made.exc_info is not None
    cause = made.exc_info[1].__cause__  # type: ignore[union-attr]
    assert secret in str(cause)
    # logging's own formatter would print it.
    assert secret in logging.Formatter().format(made)
    plain = logs.PlainFormatter(logs.PLAIN_FORMAT).format(made)
    for text in (json.dumps(line(made)), plain):
        assert secret not in text
        assert "InvalidTextRepresentation (SQLSTATE 22P02)" in text
        assert "RuntimeError: storing the result failed" in text
        assert "test_a_database_error_s_traceback_keeps_its_frames" in text  # the frames
        assert "During the handling of the above, or caused by it" in text
