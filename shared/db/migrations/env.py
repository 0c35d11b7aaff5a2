"""Alembic environment: migrates the database named by ``BCAST_DATABASE_URL``."""

from __future__ import annotations

from alembic import context

from shared.db.engine import make_engine
from shared.db.migrate import include_name
from shared.db.models import Base
from shared.settings import get_settings

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    url = config.attributes.get("database_url") or get_settings().database_url
    engine = make_engine(url, pool_size=1, application_name="bcast-migrate")
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection, target_metadata=target_metadata, include_name=include_name
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


run_migrations_online()
