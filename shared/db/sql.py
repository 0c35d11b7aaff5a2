"""Small SQL helpers shared by the domain modules."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, TypeVar

from sqlalchemy import BigInteger, ColumnElement, all_, any_, bindparam
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from shared.domain.errors import NotFound


def id_array(ids: Iterable[int]) -> Any:
    """One array parameter for a list of ids: ``col == any_(...)`` stays one bind parameter
    however long the list (``IN`` would need one parameter per id, and Postgres stops at 65535).
    """
    return bindparam(None, list(dict.fromkeys(ids)), type_=ARRAY(BigInteger))


def in_ids(column: Any, ids: Iterable[int]) -> ColumnElement[bool]:
    """``column = ANY(:ids)``."""
    result: ColumnElement[bool] = column == any_(id_array(ids))
    return result


def not_in_ids(column: Any, ids: Iterable[int]) -> ColumnElement[bool]:
    """``column <> ALL(:ids)``."""
    result: ColumnElement[bool] = column != all_(id_array(ids))
    return result


class _Owned(Protocol):
    workspace_id: Any


M = TypeVar("M", bound=_Owned)


def owned(session: Session, model: type[M], id_: int, workspace_id: int, kind: str) -> M:
    """The row of ``model`` with this id in this workspace; ``NotFound`` for any other
    workspace's row exactly as for a missing one, so ids reveal nothing across workspaces.
    """
    row = session.get(model, id_)
    if row is None or row.workspace_id != workspace_id:
        raise NotFound(kind, id_)
    return row


def contains(text: str) -> str:
    """A LIKE pattern (escape character ``\\``) matching values that hold ``text`` as typed:
    its ``%``, ``_`` and ``\\`` match themselves.
    """
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
