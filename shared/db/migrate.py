"""Create the database if it is missing and bring its schema to the newest migration."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
from alembic import command
from alembic.config import Config
from psycopg import sql
from sqlalchemy import make_url

from shared.db.engine import libpq_url
from shared.delivery_partitions import is_partition_table


def alembic_config(database_url: str) -> Config:
    """An Alembic config pointing at the packaged migrations and at ``database_url``."""
    config = Config()
    config.set_main_option("script_location", "shared.db:migrations")
    config.attributes["database_url"] = database_url
    return config


def include_name(name: str | None, type_: str, parent_names: Mapping[Any, str | None]) -> bool:
    """What Alembic compares with the models: not the partitions of ``delivery`` and the
    tables retention archived, nor their indexes, which the models do not describe (they
    come and go at run time, ``shared.delivery_partitions``).
    """
    table = name if type_ == "table" else parent_names.get("table_name")
    return table is None or not is_partition_table(table)


def create_database_if_missing(database_url: str) -> bool:
    """Create the database named in ``database_url``; return True when it was created."""
    url = make_url(database_url.replace("postgres://", "postgresql://", 1))
    name = url.database
    if not name:
        raise ValueError("the database URL names no database")
    admin = libpq_url(url.set(database="postgres").render_as_string(hide_password=False))
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists:
            return False
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return True


def upgrade(database_url: str, revision: str = "head") -> None:
    """Create the database if needed and run every migration up to ``revision``."""
    create_database_if_missing(database_url)
    command.upgrade(alembic_config(database_url), revision)


def head_revision() -> str:
    """The newest migration this code knows."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("")).get_current_head()
    assert head is not None
    return head


def known_revisions() -> set[str]:
    """Every migration this code knows."""
    from alembic.script import ScriptDirectory

    return {s.revision for s in ScriptDirectory.from_config(alembic_config("")).walk_revisions()}


def current_revision(database_url: str) -> str | None:
    """The database's migration, or None when it has none (or cannot be reached: raises)."""
    with psycopg.connect(libpq_url(database_url), connect_timeout=5) as conn:
        exists = conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return None
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        return str(row[0]) if row else None
