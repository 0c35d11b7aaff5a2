"""Errors as log lines: what went wrong, never the data it went wrong on.

A database error's text can quote the value that broke a statement (``invalid input syntax
for type integer: "<a message's text>"``), and a driver wrapper may list the statement's
parameters. Connection-level errors are worth reading whole (which host, refused, reset);
for every other database error the class and SQLSTATE say enough.
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence

import psycopg

#: Longest error text kept in a log line.
MAX_TEXT = 300
#: Most ids named in one log line.
MAX_IDS = 10


def error_text(exc: BaseException) -> str:
    """``exc`` described for a log line, without any value of the statement it broke on."""
    orig = getattr(exc, "orig", None)  # SQLAlchemy's wrapper around the driver's error
    if isinstance(orig, BaseException):
        exc = orig
    name = type(exc).__name__
    if isinstance(exc, psycopg.Error) and not isinstance(
        exc, psycopg.OperationalError | psycopg.InterfaceError
    ):
        return f"{name} (SQLSTATE {exc.sqlstate or 'unknown'})"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{name}: {first}" if first else name
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def safe_traceback(exc: BaseException) -> str:
    """Where ``exc`` (and the exceptions that led to it) came from: the frames as Python
    prints them, each exception as ``error_text`` gives it. A driver's message, which can
    quote the statement's values, is left out (its SQLSTATE says what failed).
    """
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    parts: list[str] = []
    for i, e in enumerate(reversed(chain)):
        if i:
            parts.append("\nDuring the handling of the above, or caused by it:\n\n")
        parts.append("Traceback (most recent call last):\n")
        parts.extend(traceback.format_tb(e.__traceback__))
        parts.append(error_text(e) + "\n")
    return "".join(parts).rstrip("\n")


def listed_ids(ids: Sequence[int]) -> str:
    """The first ``MAX_IDS`` of ``ids`` for a log line, with "..." when there are more."""
    return ", ".join(map(str, ids[:MAX_IDS])) + (" ..." if len(ids) > MAX_IDS else "")
