"""Settings read from the environment (prefix ``BCAST_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of bcast, read from ``BCAST_*`` environment variables.

    Parameters:
      database_url: a plain ``postgresql://user@host:port/db`` URL; the driver is chosen by code.
      broker_url: the RabbitMQ AMQP URL, vhost included.
      api_port: the port ``bcast api`` listens on.
    """

    model_config = SettingsConfigDict(env_prefix="BCAST_", extra="ignore")

    database_url: str = "postgresql://postgres@127.0.0.1:5432/bcast"
    broker_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    #: The address operators and providers reach the API at; used to build media URLs.
    public_url: str = ""
    media_dir: Path = Path("var/media")
    media_max_bytes: int = Field(default=5 * 1024 * 1024, gt=0)
    media_max_pixels: int = Field(default=40_000_000, gt=0)
    #: Largest request body for ordinary JSON routes.
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    #: Largest request body for ``POST /v1/contacts/import``.
    import_max_body_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    import_max_rows: int = Field(default=100_000, gt=0)
    db_pool_size: int = Field(default=10, gt=0)

    @field_validator("database_url")
    @classmethod
    def _plain_postgres_url(cls, value: str) -> str:
        if not value.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
            raise ValueError(
                "must be a postgresql:// URL, e.g. postgresql://postgres@127.0.0.1/bcast"
            )
        return value

    def public_base_url(self) -> str:
        """The API's base URL as seen from outside, without a trailing slash."""
        return (self.public_url or f"http://{self.api_host}:{self.api_port}").rstrip("/")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
