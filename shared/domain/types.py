"""Value types every input shares: ids within the database's range, one-line names, and text
free of characters that cannot be stored or would break a provider's header.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field

#: The largest id a request may name. Ids are Postgres ``bigint`` counted up from 1, so none
#: this large exists; the bound is the largest integer JSON clients (JavaScript's
#: ``Number.MAX_SAFE_INTEGER``) and JSON Schema tools carry exactly.
MAX_ID = 2**53 - 1

#: Characters no stored string may hold: NUL (Postgres text refuses it), the other C0 controls
#: but tab, line feed and carriage return, DEL, the C1 controls, and lone UTF-16 surrogates
#: (JSON can spell them, UTF-8 cannot store them).
FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
#: What may not appear in a one-line value (a name, which may become an email subject or a
#: provider header): every control character, and the Unicode line and paragraph separators.
NOT_ONE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")

#: A row id given in a request body: a JSON integer (never a string, boolean or float) from 1
#: to ``MAX_ID``.
Id = Annotated[int, Field(strict=True, gt=0, le=MAX_ID)]


#: Deepest nesting of arrays and objects a JSON document may have.
MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_INNERMOST = re.compile(rb"\[\]|\{\}")


def json_too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a JSON text nests arrays and objects deeper than ``limit`` (brackets inside
    strings aside). Each pass removes one level of innermost pairs, at C speed.
    """
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKET)
    for _ in range(limit):
        if not brackets:
            return False
        brackets, removed = _INNERMOST.subn(b"", brackets)
        if not removed:
            return False  # unbalanced: the JSON parser will say it is not JSON
    return bool(brackets)


def describe_forbidden(char: str) -> str:
    return f"U+{ord(char):04X}"


def check_text(value: str) -> str:
    """Refuse characters no stored string may hold (see ``FORBIDDEN``)."""
    found = FORBIDDEN.search(value)
    if found:
        raise ValueError(
            f"contains the control character {describe_forbidden(found.group())}, which is not "
            "allowed: use printable text (line breaks and tabs are fine)"
        )
    return value


def check_one_line(value: str) -> str:
    """Refuse line breaks, tabs and every other control character (see ``NOT_ONE_LINE``)."""
    found = NOT_ONE_LINE.search(value)
    if found:
        raise ValueError(
            f"contains {describe_forbidden(found.group())}; it must be one line of printable "
            "text (no line breaks, tabs or control characters)"
        )
    return value


#: ``FORBIDDEN`` and ``NOT_ONE_LINE`` as JSON Schema patterns, so the API's document states them.
TEXT_PATTERN = "^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]*$"
ONE_LINE_PATTERN = "^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*$"


def text_schema() -> Any:
    return Field(json_schema_extra={"pattern": TEXT_PATTERN})


def one_line_schema() -> Any:
    return Field(json_schema_extra={"pattern": ONE_LINE_PATTERN})


Text = Annotated[str, AfterValidator(check_text), text_schema()]
OneLine = Annotated[str, AfterValidator(check_one_line), one_line_schema()]


#: An ISO-8601 date and time (RFC 3339 profile): ``T`` between them, seconds and up to six
#: fractional digits optional, ``Z`` or an offset optional (a missing offset is refused later,
#: with its own message).
_ISO = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?(?:Z|[+-]\d{2}:\d{2})?")


def _iso_only(value: Any) -> Any:
    if value is None or isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _ISO.fullmatch(value):
        raise ValueError(
            "must be an ISO-8601 time as a string, e.g. 2026-12-01T09:00:00Z or "
            "2026-12-01T10:00:00+01:00 (Unix epochs, numbers and other forms are not accepted)"
        )
    return value


#: A time given as an ISO-8601 string (never an epoch number).
IsoDatetime = Annotated[datetime, BeforeValidator(_iso_only)]


def tag_name(name: str) -> str:
    """A tag name as stored and shown: NFKC-normalised, trimmed."""
    return unicodedata.normalize("NFKC", name).strip()


def tag_key(name: str) -> str:
    """What makes two tag names the same tag: Unicode's NFKC_Casefold, computed here only.

    The database never folds case itself (Postgres's ``lower`` and Python's ``casefold``
    disagree: ``Straße`` and ``STRASSE``, ``İstanbul``), it compares the key this function
    stored next to the name.
    """
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold()).strip()
