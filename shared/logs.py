"""Log lines for operators: one JSON object a line, the same shape for every bcast process and
for the libraries they run (dramatiq, uvicorn).

Every line has ``time`` (UTC, milliseconds), ``level``, ``service`` (api, scheduler,
dispatcher, ...), ``logger``, ``pid`` and ``message``; the ids of the work a line is about
(``broadcast_id``, ``channel_id``, ``batch_id``, ``stage``, ...) come as fields of their own from
the call's ``extra``. An exception becomes ``error`` (its class and first line) and
``traceback`` (one string): one line still. ``BCAST_LOG_FORMAT=plain`` gives the readable text
form instead (the default in a terminal).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

from shared.logsafe import error_text, safe_traceback

LogFormat = Literal["auto", "json", "plain"]

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
#: Attributes every LogRecord has: anything else on a record came from ``extra``.
_STANDARD = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName"}
)
#: Extra fields libraries add that say nothing more than the message (uvicorn's message with
#: terminal colour codes).
_DROPPED = frozenset({"color_message"})
#: Most items of a list field kept in a line.
MAX_ITEMS = 20


def _field(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple | set | frozenset):
        return [_field(v) for v in list(value)[:MAX_ITEMS]]
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key in _STANDARD or key in _DROPPED or key.startswith("_") or key in entry:
                continue
            entry[key] = _field(value)
        if record.exc_info and record.exc_info[1] is not None:
            # The class and SQLSTATE of a database error, never the values it broke on.
            entry["error"] = error_text(record.exc_info[1])
            entry["traceback"] = safe_traceback(record.exc_info[1])
        elif record.exc_text:
            entry["traceback"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, ensure_ascii=False, default=str)


class PlainFormatter(logging.Formatter):
    """Plain text for a terminal; tracebacks without the values a driver's message quotes."""

    def format(self, record: logging.LogRecord) -> str:
        # Another handler's formatter may have cached the whole traceback on the record.
        cached, record.exc_text = record.exc_text, None
        try:
            return super().format(record)
        finally:
            record.exc_text = cached

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        if ei and ei[1] is not None:
            return safe_traceback(ei[1])
        return super().formatException(ei)


class _BcastHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler ``configure`` installs (told apart from others so it can be replaced)."""


def resolve(fmt: LogFormat) -> Literal["json", "plain"]:
    """``auto``: plain text in a terminal, JSON otherwise."""
    if fmt == "auto":
        return "plain" if sys.stderr.isatty() else "json"
    return fmt


def configure(service: str, fmt: LogFormat = "auto", level: int = logging.INFO) -> None:
    """Every record of the process (bcast's, dramatiq's, uvicorn's) to stderr, one line each,
    in ``fmt``. Configuring again replaces the handler set up before; other handlers of the
    root logger (a test runner's) stay.
    """
    handler = _BcastHandler(sys.stderr)
    if resolve(fmt) == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(PlainFormatter(PLAIN_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _BcastHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("pika").setLevel(logging.WARNING)
    # Their own handlers would print a second, differently shaped line.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "dramatiq"):
        library = logging.getLogger(name)
        for other in list(library.handlers):
            library.removeHandler(other)
        library.propagate = True
