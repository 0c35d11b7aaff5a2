"""Cursor pagination: fetch one row more than asked to know whether another page exists."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar

from fastapi import Query
from sqlalchemy import Select
from sqlalchemy.orm import Session

from shared.domain.broadcasts import decode_cursor, encode_cursor

T = TypeVar("T")

Limit = Annotated[int, Query(ge=1, le=500, description="Items per page.")]
Cursor = Annotated[str | None, Query(description="next_cursor from the previous page.")]


def cursor_id(cursor: str | None) -> int | None:
    return None if cursor is None else decode_cursor(cursor)


def fetch_page(
    session: Session, query: Select[*tuple[Any, ...]], limit: int, id_of: Callable[[Any], int]
) -> tuple[Sequence[Any], str | None]:
    """Rows of one page and the cursor of the next (None at the end)."""
    rows = session.execute(query.limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (encode_cursor(id_of(rows[-1])) if more and rows else None)


def newest_first(
    session: Session, query: Select[T], id_column: Any, limit: int, cursor: str | None
) -> tuple[list[T], str | None]:
    """One page of ``query``'s rows, newest (highest id) first, after ``cursor``."""
    before = cursor_id(cursor)
    if before is not None:
        query = query.where(id_column < before)
    rows, next_cursor = fetch_page(
        session, query.order_by(id_column.desc()), limit, lambda r: r[0].id
    )
    return [r[0] for r in rows], next_cursor
