"""Engine and session factory for the one Postgres database bcast keeps its state in."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, cast

import psycopg
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, sessionmaker

from shared.settings import get_settings

#: Seconds a new connection may take before it fails, unless the URL sets ``connect_timeout``:
#: without it, a database whose packets are dropped holds a connect (and the scheduler's pass,
#: a request, a batch run) for the kernel's TCP timeout, minutes.
CONNECT_TIMEOUT_SECONDS = 10


def sqlalchemy_url(database_url: str) -> URL:
    """Turn a plain ``postgresql://`` URL into one that names the psycopg 3 driver (with a
    connect timeout of ``CONNECT_TIMEOUT_SECONDS`` unless it gives one).
    """
    url = make_url(database_url.replace("postgres://", "postgresql://", 1))
    if "connect_timeout" not in url.query:
        url = url.update_query_dict({"connect_timeout": str(CONNECT_TIMEOUT_SECONDS)})
    return url.set(drivername="postgresql+psycopg")


def libpq_url(database_url: str) -> str:
    """The same URL in the form libpq (and so ``psycopg.connect``) accepts."""
    return (
        sqlalchemy_url(database_url)
        .set(drivername="postgresql")
        .render_as_string(hide_password=False)
    )


def make_engine(
    database_url: str,
    *,
    pool_size: int = 5,
    application_name: str = "bcast",
    pool_timeout: float = 30.0,
) -> Engine:
    """Create an engine for ``database_url``; every service holds one per process.
    ``pool_timeout``: seconds a checkout waits for a free connection before it raises.
    """
    return create_engine(
        sqlalchemy_url(database_url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_timeout=pool_timeout,
        # An error's text names the statement but never its values (a secret, a message).
        hide_parameters=True,
        connect_args={"application_name": application_name},
    )


def pool_exhausted(engine: Engine) -> bool:
    """Every connection the engine's pool may open is checked out."""
    pool: Any = engine.pool
    try:
        return bool(pool.checkedout() >= pool.size() + max(pool._max_overflow, 0))
    except AttributeError:  # a pool without a fixed size
        return False


@lru_cache(maxsize=1)
def get_engine() -> Engine:
    """The process-wide engine built from settings."""
    settings = get_settings()
    return make_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        pool_timeout=settings.db_pool_timeout_seconds,
    )


@lru_cache(maxsize=1)
def get_sessionmaker() -> sessionmaker[Session]:
    """The process-wide session factory."""
    return sessionmaker(get_engine(), expire_on_commit=False)


@contextmanager
def transaction() -> Iterator[Session]:
    """One unit of work: commit when the block ends normally, roll back when it raises."""
    with get_sessionmaker().begin() as session:
        yield session


def raw_connection(session: Session) -> psycopg.Connection[Any]:
    """The psycopg connection under ``session``, inside the session's transaction: the
    delivery store's operations run on it and commit or roll back with the session's work.
    """
    conn = cast(psycopg.Connection[Any], session.connection().connection.driver_connection)
    if conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        # The session's transaction begins with its first statement; begin it now, or the
        # store's work would run (and commit) in a transaction of its own.
        session.execute(text("SELECT 1"))
    return conn
