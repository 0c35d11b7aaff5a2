"""Database errors in log lines: the class and SQLSTATE, never the value a statement broke on."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from shared.db.engine import get_engine, libpq_url
from shared.logsafe import error_text, listed_ids


def test_a_data_error_is_named_without_its_value(database_url: str) -> None:
    with (
        psycopg.connect(libpq_url(database_url)) as conn,
        pytest.raises(psycopg.errors.InvalidTextRepresentation) as caught,
    ):
        conn.execute("SELECT CAST(%s AS integer)", ("sekrit-value",))
    assert "sekrit-value" in str(caught.value)  # what the driver says...
    said = error_text(caught.value)
    assert "sekrit-value" not in said  # ...and what a log line says
    assert said == "InvalidTextRepresentation (SQLSTATE 22P02)"


def test_a_wrapped_error_is_unwrapped_and_its_parameters_never_shown(database_url: str) -> None:
    with get_engine().connect() as conn, pytest.raises(DBAPIError) as caught:
        conn.execute(text("SELECT CAST(:v AS integer)"), {"v": "sekrit-value"})
    assert "sekrit-value" not in error_text(caught.value)


def test_a_connection_error_keeps_its_words() -> None:
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect("postgresql://postgres@127.0.0.1:1/x", connect_timeout=2)
    said = error_text(caught.value)
    assert said.startswith("OperationalError: ")
    assert len(said) > len("OperationalError: ")


def test_a_log_line_names_the_first_ten_ids_and_says_when_there_are_more() -> None:
    assert listed_ids([3, 1, 2]) == "3, 1, 2"
    assert listed_ids(list(range(10))) == "0, 1, 2, 3, 4, 5, 6, 7, 8, 9"
    assert listed_ids(list(range(12))) == "0, 1, 2, 3, 4, 5, 6, 7, 8, 9 ..."
    assert listed_ids([]) == ""
