"""Errors the domain raises; the API turns each into one HTTP answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError


@dataclass(frozen=True)
class FieldError:
    """One broken rule: ``field`` is a dotted path into the request (``audience.tag_ids[2]``)."""

    field: str
    message: str
    type: str = "value_error"


class DomainError(Exception):
    """Base of the errors a caller can act on."""


class ValidationFailed(DomainError):
    """The input breaks one or more rules; nothing was written. Answered with 422."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e.field}: {e.message}" for e in errors))

    @classmethod
    def one(cls, field: str, message: str, type_: str = "value_error") -> ValidationFailed:
        return cls([FieldError(field, message, type_)])

    @classmethod
    def from_pydantic(
        cls, exc: ValidationError, *, prefix: str = "", extra_message: str | None = None
    ) -> ValidationFailed:
        """Translate pydantic's errors, each placed under ``prefix``."""
        return cls(
            [
                FieldError(
                    field_path(err["loc"], prefix),
                    describe(err, extra_message=extra_message),
                    err["type"],
                )
                for err in exc.errors(include_url=False)
            ]
        )


def field_path(loc: Sequence[int | str], prefix: str = "") -> str:
    """``("audience", "tag_ids", 2)`` -> ``"audience.tag_ids[2]"``."""
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else str(part)
    return path or "body"


def describe(err: Any, *, extra_message: str | None = None) -> str:
    """A pydantic error as a sentence a user can act on."""
    kind = err["type"]
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return extra_message or "is not a known field"
    message = str(err["msg"])
    return message.removeprefix("Value error, ")


class NotFound(DomainError):
    """No such row in the caller's workspace. Answered with 404."""

    def __init__(self, kind: str, id_: int | str) -> None:
        self.kind = kind
        self.id = id_
        super().__init__(f"{kind} {id_} not found")


class StateConflict(DomainError):
    """The row's current state forbids the action. Answered with 409."""
