"""Small SQL helpers shared by the domain modules."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, all_, any_, bindparam
from sqlalchemy.dialects.postgresql import ARRAY


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
