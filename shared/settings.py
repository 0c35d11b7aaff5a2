"""Settings read from the environment (prefix ``BCAST_``)."""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Literal

from cryptography.fernet import Fernet
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def split_secret_keys(value: str) -> list[str]:
    """The keys of a ``BCAST_SECRET_KEYS`` value, in order. Raises ``ValueError`` naming the
    position of a key that is not a Fernet key, never the key itself.
    """
    keys = [k.strip() for k in value.split(",") if k.strip()]
    for position, key in enumerate(keys, start=1):
        try:
            Fernet(key)
        except (ValueError, TypeError):
            raise ValueError(
                f"key {position} of {len(keys)} is not a valid key (32 bytes, URL-safe base64); "
                "make one with `bcast secrets new-key`"
            ) from None
    return keys


class Settings(BaseSettings):
    """Every knob of bcast, read from ``BCAST_*`` environment variables.

    Parameters:
      database_url: a plain ``postgresql://user@host:port/db`` URL; the driver is chosen by code.
      broker_url: the RabbitMQ AMQP URL, vhost included.
      api_port: the port ``bcast api`` listens on.
      secret_keys: the keys that encrypt secrets at rest (``BCAST_SECRET_KEYS``).
    """

    # Errors name the setting and the rule, never the value: some values are secrets.
    model_config = SettingsConfigDict(
        env_prefix="BCAST_", extra="ignore", hide_input_in_errors=True
    )

    database_url: str = "postgresql://postgres@127.0.0.1:5432/bcast"
    broker_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    #: Where the schedulers' and dispatchers' Prometheus endpoints listen.
    metrics_host: str = "127.0.0.1"
    #: Log lines: ``json`` (one object a line), ``plain`` text, or ``auto`` (plain in a
    #: terminal, JSON otherwise).
    log_format: Literal["auto", "json", "plain"] = "auto"
    #: Where scheduler and dispatcher processes leave their heartbeats (``bcast probe``).
    heartbeat_dir: Path = Path(tempfile.gettempdir()) / "bcast-heartbeat"
    #: The address operators and providers reach the API at; used to build media URLs.
    public_url: str = ""
    #: Where uploaded images are kept: ``local`` (``media_dir``) or ``s3`` (any S3-compatible store).
    media_store: Literal["local", "s3"] = "local"
    media_dir: Path = Path("var/media")
    s3_bucket: str = ""
    #: Empty for AWS itself; the URL of MinIO, Ceph, R2 and the like otherwise.
    s3_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    s3_access_key_id: str = ""
    s3_secret_access_key: SecretStr = SecretStr("")
    s3_prefix: str = "media/"
    media_max_bytes: int = Field(default=5 * 1024 * 1024, gt=0)
    #: Largest image, in pixels, checked before decoding (a small file can claim a huge image).
    media_max_pixels: int = Field(default=25_000_000, gt=0)
    #: Largest request body for ordinary JSON routes.
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    #: Largest request body for ``POST /v1/contacts/import``.
    import_max_body_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    import_max_rows: int = Field(default=100_000, gt=0)
    db_pool_size: int = Field(default=10, gt=0)
    #: Seconds a request to the API waits for a free database connection before it is
    #: answered 503 with Retry-After.
    db_pool_timeout_seconds: float = Field(default=5.0, gt=0)
    #: Seconds a request's line and headers may take to arrive.
    api_header_timeout_seconds: float = Field(default=10.0, gt=0)
    #: Seconds a request body may pause between two of its chunks.
    api_body_timeout_seconds: float = Field(default=30.0, gt=0)
    #: Seconds a whole request body may take to arrive (64 MiB at half a MiB a second).
    api_body_total_seconds: float = Field(default=120.0, gt=0)
    #: Connections and requests the API serves at once; beyond it, 503.
    api_max_connections: int = Field(default=1000, gt=0)
    #: CSV exports of recipient lists one workspace may run at once; beyond it, 429.
    api_exports_per_workspace: int = Field(default=4, gt=0)
    #: Let channels connect to loopback, private and link-local addresses. Off in production:
    #: a workspace could otherwise point a channel at the machine's own services or the
    #: cloud's metadata address. On only for the local simulator, tests and the demo.
    allow_private_targets: bool = False
    #: Keys that encrypt channel secrets and media signing keys at rest, comma-separated: the
    #: first encrypts, every one is tried to decrypt (docs/secrets.md). Empty: stored in plain
    #: text, with a warning once per process.
    secret_keys: SecretStr = SecretStr("")

    # --- scheduler ---
    #: Longest the scheduler sleeps without looking for due tasks (LISTEN/NOTIFY wakes it sooner).
    scheduler_poll_seconds: float = Field(default=1.0, gt=0)
    #: A task found this much past its send time (after downtime) is paused, not fired.
    overdue_limit_seconds: float = Field(default=3600.0, gt=0)
    #: A sending task with no progress for this long is handed to the dispatchers again.
    stall_seconds: float = Field(default=60.0, gt=0)
    scheduler_metrics_port: int = 9102

    # --- dispatcher ---
    #: Deliveries per batch (the unit a dispatcher takes, runs under a lease, and gives back).
    batch_size: int = Field(default=500, gt=0)
    #: Rows claimed from the database at a time inside a batch.
    claim_size: int = Field(default=100, gt=0)
    #: How long a batch (and the rows its run holds) stays a dispatcher's without a renewal.
    lease_seconds: float = Field(default=30.0, ge=3)
    #: Provider calls in flight per dispatcher process.
    max_in_flight: int = Field(default=128, gt=0)
    #: Sends of one channel scheduled or in flight per dispatcher process: a slow provider
    #: takes at most this share of the process.
    channel_max_in_flight: int = Field(default=64, gt=0)
    #: Most batches of one broadcast in flight at once across all dispatchers (fewer for
    #: channels whose rate one batch can reach).
    broadcast_max_batches: int = Field(default=16, gt=0)
    #: Most batches one dispatcher process runs at once.
    dispatcher_max_batches: int = Field(default=256, gt=0)
    #: Postgres connections of each dispatcher process's pool (plus one that listens for
    #: pauses and throttles), whatever its thread count.
    dispatcher_db_connections: int = Field(default=2, ge=2)
    #: How long a dispatcher worker process waits for Postgres when it starts; a process that
    #: cannot reach it by then exits (its supervisor starts it again), never runs without it.
    dispatcher_open_timeout_seconds: float = Field(default=30.0, gt=0)
    #: Longest one provider call may take (HTTP request, SMTP conversation).
    send_timeout_seconds: float = Field(default=10.0, gt=0)
    #: Attempts per recipient before a transient error becomes a failure.
    max_attempts: int = Field(default=5, gt=0)
    retry_base_seconds: float = Field(default=2.0, gt=0)
    retry_max_seconds: float = Field(default=300.0, gt=0)
    #: Longest one run of a batch lasts before it hands the rest back, so work spreads over
    #: dispatchers as they come and go.
    batch_max_seconds: float = Field(default=120.0, gt=0)
    #: A run that finished its batch goes on with the broadcast's next one (no round trip
    #: through the queue) for this long at most; then the next batch goes through the queue,
    #: so a dispatcher that joins a send under way (a scale-up, a restart) gets its share.
    chain_max_seconds: float = Field(default=10.0, gt=0)
    dispatcher_metrics_port: int = 9101

    # --- delivery rows (docs/retention.md) ---
    #: Days of broadcasts whose delivery rows share one partition of the ``delivery`` table.
    delivery_partition_days: int = Field(default=7, ge=1, le=366)
    #: Delivery rows are removed, a whole partition at a time, once every day the partition
    #: covers lies at least this many days back and all its broadcasts are completed or
    #: canceled. The counts on the broadcast stay. 0 keeps them forever.
    delivery_retention_days: int = Field(default=90, ge=0)
    #: Detach partitions past retention and keep them as tables of their own
    #: (``delivery_archived_p...``) instead of dropping them.
    delivery_archive: bool = False

    @field_validator("database_url")
    @classmethod
    def _plain_postgres_url(cls, value: str) -> str:
        if not value.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
            raise ValueError(
                "must be a postgresql:// URL, e.g. postgresql://postgres@127.0.0.1/bcast"
            )
        return value

    @field_validator("secret_keys")
    @classmethod
    def _fernet_keys(cls, value: SecretStr) -> SecretStr:
        split_secret_keys(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _lease_outlasts_a_call(self) -> Settings:
        # A run starts a call only while its lease will outlast it (see lease.py).
        least = 2 * (self.send_timeout_seconds + 1)
        if self.lease_seconds < least:
            raise ValueError(
                f"BCAST_LEASE_SECONDS ({self.lease_seconds:g}) must be at least twice "
                f"BCAST_SEND_TIMEOUT_SECONDS + 1 ({least:g}): a dispatcher starts a provider "
                "call only while its lease will outlast the call"
            )
        return self

    @model_validator(mode="after")
    def _s3_needs_a_bucket(self) -> Settings:
        if self.media_store == "s3" and not self.s3_bucket:
            raise ValueError("BCAST_MEDIA_STORE=s3 needs BCAST_S3_BUCKET")
        return self

    def secret_key_list(self) -> list[str]:
        """The keys of ``BCAST_SECRET_KEYS``, the one that encrypts first."""
        return split_secret_keys(self.secret_keys.get_secret_value())

    def public_base_url(self) -> str:
        """The API's base URL as seen from outside, without a trailing slash."""
        return (self.public_url or f"http://{self.api_host}:{self.api_port}").rstrip("/")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
