"""Connections to Postgres give up after a bounded time unless the URL says otherwise."""

from __future__ import annotations

import psycopg

from shared.db.engine import CONNECT_TIMEOUT_SECONDS, libpq_url, make_engine, sqlalchemy_url


def test_every_url_gets_a_connect_timeout_unless_it_sets_one() -> None:
    url = sqlalchemy_url("postgres://bcast@db:5432/bcast")
    assert url.query["connect_timeout"] == str(CONNECT_TIMEOUT_SECONDS)
    assert url.drivername == "postgresql+psycopg"
    mine = sqlalchemy_url("postgresql://bcast@db/bcast?connect_timeout=3&sslmode=require")
    assert mine.query == {"connect_timeout": "3", "sslmode": "require"}


def test_the_timeout_reaches_the_connections(database_url: str) -> None:
    with psycopg.connect(libpq_url(database_url)) as conn:
        assert conn.info.get_parameters()["connect_timeout"] == str(CONNECT_TIMEOUT_SECONDS)
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.connect() as c:
            raw = c.connection.driver_connection
            assert raw is not None
            assert raw.info.get_parameters()["connect_timeout"] == str(CONNECT_TIMEOUT_SECONDS)
    finally:
        engine.dispose()
