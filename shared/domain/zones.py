"""Time zones: a send time given as a wall-clock time in a zone, contacts' zones, and sending
windows in each recipient's local time.

A wall-clock time names no moment by itself where the clocks change: in a spring-forward gap
(``2026-03-29T02:30`` in Europe/Berlin) it names none, and in an autumn overlap
(``2026-10-25T02:30``) it names two. A gap is refused; an overlap is refused unless ``fold``
says which of the two is meant (0: the first, before the clocks went back; 1: the second).

A sending window (``09:00``-``20:00``, say) holds each recipient to its own local time: the
contact's zone, or the window's own when the contact has none. A recipient outside it waits,
queued, until its window next opens; the dispatcher asks Postgres (``bcast_window_open`` and
``bcast_window_next``, migration 0016), which knows the same zones.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, time
from functools import lru_cache
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from sqlalchemy import text
from sqlalchemy.orm import Session

from shared.domain.errors import ValidationFailed
from shared.domain.types import _iso_only


@lru_cache(maxsize=1)
def _zones() -> frozenset[str]:
    return frozenset(available_timezones())


def check_zone(name: str) -> str:
    """An IANA time zone name (``Europe/Berlin``, ``UTC``), or a ``ValueError`` saying so."""
    if name not in _zones():
        raise ValueError(
            f"{name!r} is not a time zone name: use an IANA name such as Europe/Berlin, "
            "America/New_York or UTC"
        )
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name!r} is not a time zone this system knows") from None
    return name


#: An IANA time zone name.
Zone = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(check_zone)]

_LOCAL = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2})?")


class LocalTime(BaseModel):
    """A send time as a wall-clock time in a zone."""

    model_config = ConfigDict(extra="forbid")

    local: str = Field(
        description="Wall-clock time without offset, e.g. 2026-12-01T09:00",
        examples=["2026-12-01T09:00"],
    )
    zone: Zone = Field(description="IANA time zone, e.g. Europe/Berlin")
    fold: Literal[0, 1] | None = Field(
        default=None,
        description="Where the clocks go back and the time happens twice: 0 the first, "
        "1 the second. Needed only then.",
    )

    @model_validator(mode="after")
    def _wall_time(self) -> LocalTime:
        if not _LOCAL.fullmatch(self.local):
            raise ValueError(
                f"local {self.local!r} must be a wall-clock time without offset, "
                "e.g. 2026-12-01T09:00"
            )
        datetime.fromisoformat(self.local)  # a real date and time
        return self


def _send_at(value: Any) -> Any:
    if isinstance(value, dict):
        try:
            return LocalTime.model_validate(value)
        except ValidationError as exc:
            raise ValueError(
                "as an object takes local and zone (and fold): "
                + "; ".join(
                    (".".join(str(p) for p in e["loc"]) + ": " if e["loc"] else "")
                    + str(e["msg"]).removeprefix("Value error, ")
                    for e in exc.errors()
                )
            ) from None
    return _iso_only(value)


#: A send time: an ISO-8601 string with its offset, or ``{"local", "zone"[, "fold"]}``.
SendAt = Annotated[datetime | LocalTime, BeforeValidator(_send_at)]


def check_known(session: Session, names: Iterable[str | None], field: str) -> None:
    """Refuse zones Postgres does not know (its time zone data may differ from Python's):
    a window in such a zone would make every claim of its broadcast fail.
    """
    wanted = sorted({n for n in names if n})
    if not wanted:
        return
    known = set(
        session.execute(
            text("SELECT name FROM pg_timezone_names WHERE name = ANY(:names)"),
            {"names": wanted},
        ).scalars()
    )
    missing = [n for n in wanted if n not in known]
    if missing:
        raise ValidationFailed.one(
            field,
            f"{', '.join(repr(m) for m in missing[:5])} is not a time zone the database "
            "knows; use another name for the same zone (e.g. Europe/Berlin)",
            "zone_unknown",
        )


@dataclass(frozen=True)
class Resolved:
    """A send time as stored: the moment, and the wall-clock time and zone it was given as."""

    at: datetime
    local: str | None = None
    zone: str | None = None


def resolve(value: datetime | LocalTime | None, *, field: str = "send_at") -> Resolved | None:
    """The moment a send time names; a wall-clock time in a gap, or in an overlap without
    ``fold``, is a 422 on ``field`` saying what the clocks do there.
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        return Resolved(value)
    zone = ZoneInfo(value.zone)
    wall = datetime.fromisoformat(value.local)
    first, second = wall.replace(tzinfo=zone, fold=0), wall.replace(tzinfo=zone, fold=1)
    try:
        back = first.astimezone(UTC).astimezone(zone).replace(tzinfo=None)
        second.astimezone(UTC)
    except OverflowError:
        raise ValidationFailed.one(
            field, f"{value.local} in {value.zone} is out of the range of times", "out_of_range"
        ) from None
    if back != wall:
        before, after = first.utcoffset(), second.utcoffset()
        raise ValidationFailed.one(
            field,
            f"{value.local} does not exist in {value.zone}: the clocks jump forward there "
            f"(UTC{_offset(before)} to UTC{_offset(after)}); pick a time outside the gap",
            "nonexistent_local_time",
        )
    if first.utcoffset() != second.utcoffset():
        if value.fold is None:
            raise ValidationFailed.one(
                field,
                f"{value.local} happens twice in {value.zone}: the clocks go back there; give "
                f'"fold": 0 for the first (UTC{_offset(first.utcoffset())}) or 1 for the '
                f"second (UTC{_offset(second.utcoffset())})",
                "ambiguous_local_time",
            )
        chosen = second if value.fold else first
    else:
        chosen = first
    return Resolved(chosen.astimezone(UTC), wall.isoformat(timespec="seconds"), value.zone)


def _offset(delta: Any) -> str:
    minutes = int(delta.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


_CLOCK = re.compile(r"([01]\d|2[0-3]):[0-5]\d")


def _clock(value: Any) -> Any:
    if isinstance(value, str) and not _CLOCK.fullmatch(value):
        raise ValueError(f"{value!r} must be a time of day as HH:MM, e.g. 09:00")
    return value


#: A time of day, ``HH:MM``.
Clock = Annotated[time, BeforeValidator(_clock)]


class SendingWindow(BaseModel):
    """Hours of the recipient's day in which it may be sent to."""

    model_config = ConfigDict(extra="forbid")

    start: Clock = Field(description="HH:MM, recipient local time; sends start then.")
    end: Clock = Field(
        description="HH:MM; sends stop then (earlier than start: the window runs over "
        "midnight, e.g. 22:00-06:00)."
    )
    zone: Zone | None = Field(
        default=None,
        description="For recipients whose contact has no time_zone; default: the zone of "
        "send_at, or UTC.",
    )

    @model_validator(mode="after")
    def _not_empty(self) -> SendingWindow:
        if self.start == self.end:
            raise ValueError("start and end are the same: the window would never open")
        return self
