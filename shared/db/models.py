"""SQLAlchemy models: the whole of bcast's state. Every row belongs to a workspace."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from datetime import time as dt_time
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Text,
    Time,
    UniqueConstraint,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import BIT, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.domain.lifecycle import (
    BATCH_STATES,
    BROADCAST_ORIGINS,
    BROADCAST_STATUSES,
    CHANNEL_KINDS,
    DELIVERY_STATUSES,
)

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _in(column: str, values: tuple[str, ...]) -> str:
    listed = ", ".join(f"'{v}'" for v in values)
    return f"{column} IN ({listed})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute
        dict[str, Any]: JSONB,
        datetime: DateTime(timezone=True),
        int: BigInteger,
    }


def _pk() -> Mapped[int]:
    return mapped_column(BigInteger, Identity(always=True), primary_key=True)


def _workspace_fk() -> Mapped[int]:
    return mapped_column(ForeignKey("workspace.id", ondelete="CASCADE"), nullable=False)


def _created_at() -> Mapped[datetime]:
    return mapped_column(server_default=func.now(), nullable=False)


class Workspace(Base):
    __tablename__ = "workspace"

    id: Mapped[int] = _pk()
    name: Mapped[str] = mapped_column(Text, unique=True)
    #: Signs this workspace's expiring media URLs; never leaves the server. Stored sealed
    #: (``shared.secrets_box``); made by ``shared.domain.tokens.ensure_workspace``.
    signing_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()


class ApiToken(Base):
    """A bearer token; only its SHA-256 digest is stored."""

    __tablename__ = "api_token"

    id: Mapped[int] = _pk()
    workspace_id: Mapped[int] = _workspace_fk()
    name: Mapped[str] = mapped_column(Text, server_default="")
    token_hash: Mapped[str] = mapped_column(Text, unique=True)
    #: The first characters of the token, enough to tell tokens apart in a listing.
    prefix: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    #: After this the token is refused; None: it never expires.
    expires_at: Mapped[datetime | None]


class ConsoleSession(Base):
    """An operator signed in to the web console with an API token. The browser holds the
    session's random id in an HttpOnly cookie; only its SHA-256 digest is stored. Revoking the
    token ends its sessions (checked on every request, and the rows go with the token).
    """

    __tablename__ = "console_session"

    id_hash: Mapped[str] = mapped_column(Text, primary_key=True)
    api_token_id: Mapped[int] = mapped_column(
        ForeignKey("api_token.id", ondelete="CASCADE"), index=True
    )
    workspace_id: Mapped[int] = _workspace_fk()
    #: Every form of the session carries it back (a cross-site form cannot know it).
    csrf_token: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()
    expires_at: Mapped[datetime] = mapped_column(index=True)


class Channel(Base):
    __tablename__ = "channel"
    __table_args__ = (
        UniqueConstraint("workspace_id", "name"),
        CheckConstraint(_in("kind", CHANNEL_KINDS), name="kind"),
        CheckConstraint("rate_limit_per_second > 0", name="rate_limit_positive"),
    )

    id: Mapped[int] = _pk()
    workspace_id: Mapped[int] = _workspace_fk()
    name: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text)
    config: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    rate_limit_per_second: Mapped[float] = mapped_column(Float)
    #: The default auto-pause of its broadcasts: ``{"failure_ratio", "last"}``; None: off.
    auto_pause: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))
    created_at: Mapped[datetime] = _created_at()


class Account(Base):
    """A channel's sending identity: a WhatsApp number, a Telegram bot, a mailbox."""

    __tablename__ = "account"
    __table_args__ = (
        UniqueConstraint("channel_id", "name"),
        Index(None, "workspace_id", "id"),
    )

    id: Mapped[int] = _pk()
    workspace_id: Mapped[int] = _workspace_fk()
    channel_id: Mapped[int] = mapped_column(ForeignKey("channel.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()


class Contact(Base):
    """A person reachable through one account, at one address."""

    __tablename__ = "contact"
    __table_args__ = (
        UniqueConstraint("account_id", "address"),
        Index(None, "workspace_id", "id"),
    )

    id: Mapped[int] = _pk()
    workspace_id: Mapped[int] = _workspace_fk()
    account_id: Mapped[int] = mapped_column(ForeignKey("account.id", ondelete="CASCADE"))
    address: Mapped[str] = mapped_column(Text)
    name: Mapped[str] = mapped_column(Text, server_default="")
    opted_out_at: Mapped[datetime | None]
    unreachable_at: Mapped[datetime | None]
    unreachable_reason: Mapped[str | None] = mapped_column(Text)
    #: IANA zone, for sending windows in the recipient's local time.
    time_zone: Mapped[str | None] = mapped_column(Text)
    #: Custom fields (``{"city": "Berlin"}``), for personalised text: ``{{city}}``.
    fields: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    #: When the contact last wrote to the business on its account: the start of the
    #: provider's conversation window (24 hours on WhatsApp, Messenger, Instagram).
    last_inbound_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _created_at()


class Tag(Base):
    __tablename__ = "tag"
    __table_args__ = (
        Index("uq_tag_workspace_id_name_key", "workspace_id", "name_key", unique=True),
    )

    id: Mapped[int] = _pk()
    workspace_id: Mapped[int] = _workspace_fk()
    name: Mapped[str] = mapped_column(Text)
    #: The name's NFKC_Casefold (``shared.domain.types.tag_key``): tags are the same when it is.
    name_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()


class ContactTag(Base):
    __tablename__ = "contact_tag"
    # The primary key serves "tags of a contact"; this index serves audience resolution by tag.
    __table_args__ = (Index(None, "tag_id", "contact_id"),)

    contact_id: Mapped[int] = mapped_column(
        ForeignKey("contact.id", ondelete="CASCADE"), primary_key=True
    )
    tag_id: Mapped[int] = mapped_column(ForeignKey("tag.id", ondelete="CASCADE"), primary_key=True)
    workspace_id: Mapped[int] = _workspace_fk()


class Conversation(Base):
    __tablename__ = "conversation"
    __table_args__ = (
        UniqueConstraint("account_id", "contact_id"),
        Index(None, "workspace_id", "id"),
    )

    id: Mapped[int] = _pk()
    workspace_id: Mapped[int] = _workspace_fk()
    account_id: Mapped[int] = mapped_column(ForeignKey("account.id", ondelete="CASCADE"))
    contact_id: Mapped[int] = mapped_column(ForeignKey("contact.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = _created_at()


class Media(Base):
    """An uploaded image; its bytes live in the media store under ``storage_key``."""

    __tablename__ = "media"

    id: Mapped[int] = _pk()
    workspace_id: Mapped[int] = _workspace_fk()
    content_type: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(Text)
    storage_key: Mapped[str] = mapped_column(Text, unique=True)
    filename: Mapped[str] = mapped_column(Text, server_default="")
    created_at: Mapped[datetime] = _created_at()


class Broadcast(Base):
    """One message to one audience on one channel: the task operators see and steer."""

    __tablename__ = "broadcast"
    __table_args__ = (
        CheckConstraint(_in("status", BROADCAST_STATUSES), name="status"),
        CheckConstraint(_in("origin", BROADCAST_ORIGINS), name="origin"),
        CheckConstraint(
            "(window_start IS NULL) = (window_end IS NULL) "
            "AND (window_start IS NULL) = (window_zone IS NULL)",
            name="window",
        ),
        Index("ix_broadcast_workspace_id_id", "workspace_id", text("id DESC")),
        Index("ix_broadcast_workspace_id_status_id", "workspace_id", "status", text("id DESC")),
        Index("ix_broadcast_workspace_id_origin_id", "workspace_id", "origin", text("id DESC")),
        # The scheduler's due-task pick reads only this small partial index.
        Index("ix_broadcast_due", "send_at", postgresql_where=text("status = 'pending'")),
        # The scheduler's sweep of sending tasks, across workspaces.
        Index("ix_broadcast_in_progress", "id", postgresql_where=text("status = 'in_progress'")),
        # Ended tasks whose end the scheduler has not logged yet (a handful at any time).
        Index(
            "ix_broadcast_end_unlogged",
            "id",
            postgresql_where=text("end_logged_at IS NULL AND status IN ('completed', 'canceled')"),
        ),
        Index(
            "uq_broadcast_workspace_id_idempotency_key",
            "workspace_id",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
        # Retention: the broadcasts whose rows sit in one partition of ``delivery``.
        Index(None, "part_day"),
        # The retries of a broadcast (its detail lists them).
        Index(
            "ix_broadcast_retry_of_id",
            "retry_of_id",
            postgresql_where=text("retry_of_id IS NOT NULL"),
        ),
        # Broadcasts that paused themselves (and were not resumed since): the scheduler logs
        # each once and counts those paused.
        Index(
            "ix_broadcast_auto_paused", "id", postgresql_where=text("auto_paused_at IS NOT NULL")
        ),
        # The test sends of a broadcast.
        Index(
            "ix_broadcast_test_of_id",
            "test_of_id",
            postgresql_where=text("test_of_id IS NOT NULL"),
        ),
    )

    id: Mapped[int] = _pk()
    workspace_id: Mapped[int] = _workspace_fk()
    name: Mapped[str] = mapped_column(Text)
    channel_id: Mapped[int] = mapped_column(ForeignKey("channel.id", ondelete="CASCADE"))
    origin: Mapped[str] = mapped_column(Text, server_default="broadcast")
    conversation_id: Mapped[int | None] = mapped_column(
        ForeignKey("conversation.id", ondelete="SET NULL")
    )
    #: The broadcast whose failed recipients this one retries (``POST .../retry-failed``).
    retry_of_id: Mapped[int | None] = mapped_column(ForeignKey("broadcast.id", ondelete="SET NULL"))
    #: The broadcast whose content this one tries out on a few contacts (origin ``test``).
    test_of_id: Mapped[int | None] = mapped_column(ForeignKey("broadcast.id", ondelete="CASCADE"))
    audience: Mapped[dict[str, Any]]
    content: Mapped[dict[str, Any]]
    send_at: Mapped[datetime]
    #: The wall-clock time and IANA zone ``send_at`` was given as (None: given as a moment).
    send_at_local: Mapped[str | None] = mapped_column(Text)
    send_at_zone: Mapped[str | None] = mapped_column(Text)
    #: A sending window in each recipient's local time (the contact's zone, else
    #: ``window_zone``): recipients outside it wait until it opens. All three or none.
    window_start: Mapped[dt_time | None] = mapped_column(Time)
    window_end: Mapped[dt_time | None] = mapped_column(Time)
    window_zone: Mapped[str | None] = mapped_column(Text)
    #: Auto-pause as given for this broadcast (None: its channel's; ``failure_ratio`` None:
    #: off), and the values it runs with, fixed when it starts (migration 0017).
    auto_pause: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))
    pause_ratio: Mapped[float | None] = mapped_column(Float)
    pause_last: Mapped[int | None] = mapped_column(Integer)
    #: One bit per recent outcome (1: failed), the last ``pause_last``.
    recent_outcomes: Mapped[str | None] = mapped_column(BIT(varying=True))
    #: When it paused itself; when the scheduler logged that.
    auto_paused_at: Mapped[datetime | None]
    auto_pause_logged_at: Mapped[datetime | None]
    status: Mapped[str] = mapped_column(Text, server_default="pending")
    #: Why the task is in its status when that is not the operator's own doing.
    status_reason: Mapped[str | None] = mapped_column(Text)
    #: Audience size when the task was written; the snapshot at start fixes ``total_count``.
    audience_size: Mapped[int] = mapped_column(BigInteger, server_default="0")
    total_count: Mapped[int] = mapped_column(BigInteger, server_default="0")
    sent_count: Mapped[int] = mapped_column(BigInteger, server_default="0")
    failed_count: Mapped[int] = mapped_column(BigInteger, server_default="0")
    canceled_count: Mapped[int] = mapped_column(BigInteger, server_default="0")
    skipped_count: Mapped[int] = mapped_column(BigInteger, server_default="0")
    partial_count: Mapped[int] = mapped_column(BigInteger, server_default="0")
    idempotency_key: Mapped[str | None] = mapped_column(Text)
    request_hash: Mapped[str | None] = mapped_column(Text)
    #: Set when an operator resumes a task the scheduler held back for being too late.
    late_start_approved: Mapped[bool] = mapped_column(Boolean, server_default="false")
    #: When the audience was copied into delivery rows; it is copied once, never again.
    snapshot_at: Mapped[datetime | None]
    #: The UTC day the copy of its audience was made (fixed just before it is made): every
    #: delivery row and batch of the broadcast carries it, and it picks their partition.
    part_day: Mapped[date | None] = mapped_column(Date)
    #: When retention removed its delivery rows (their partition was dropped or archived);
    #: the counts stay.
    recipients_removed_at: Mapped[datetime | None]
    #: When the task was last handed to the dispatchers to start; the scheduler hands out again
    #: a task whose audience was not copied within the stall time (a lost start message).
    heartbeat_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _created_at()
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    #: When a scheduler logged the task's end (completed or canceled, with its counts): once,
    #: by whichever scheduler set this first.
    end_logged_at: Mapped[datetime | None]


class Delivery(Base):
    """One recipient of one broadcast, snapshotted when the broadcast starts.

    The table is partitioned by range of ``part_day`` (``shared.delivery_partitions``): all
    rows of a broadcast sit in one partition, every statement of the delivery store names the
    day and so touches that partition only, and retention removes a whole partition at once.
    It has no foreign keys: its rows are written only by the snapshot, from the broadcast and
    its contacts, and a foreign key would make each copied row check (and lock) its contact
    and broadcast, and every partition made or removed lock those tables too. Deleting a
    broadcast or a contact deletes its rows (triggers of migration 0007).
    """

    __tablename__ = "delivery"
    __table_args__ = (
        UniqueConstraint("broadcast_id", "contact_id", "part_day"),
        CheckConstraint(_in("status", DELIVERY_STATUSES), name="status"),
        # A recipient not reached carries its reason (which ix_delivery_not_reached finds).
        CheckConstraint(
            "status NOT IN ('failed', 'partial', 'skipped', 'canceled') OR last_error IS NOT NULL",
            name="reason",
        ),
        # No index names ``status``, ``lease_token`` or the other columns a send changes, so
        # a send's claim and answer are heap-only (HOT) updates (migration 0011). Rows that
        # failed, waited for a retry or were skipped carry ``last_error``; a send that succeeds
        # the first time never writes it.
        Index(None, "broadcast_id", "id"),
        # A contact's rows in every broadcast (its erasure; migration 0015).
        Index(None, "contact_id"),
        Index(
            "ix_delivery_not_reached",
            "broadcast_id",
            "id",
            postgresql_where=text("last_error IS NOT NULL"),
        ),
        {"postgresql_partition_by": "RANGE (part_day)"},
    )

    id: Mapped[int] = _pk()
    #: The broadcast's ``part_day``: the partition key.
    part_day: Mapped[date] = mapped_column(Date, primary_key=True)
    workspace_id: Mapped[int] = mapped_column(BigInteger)
    broadcast_id: Mapped[int] = mapped_column(BigInteger)
    contact_id: Mapped[int] = mapped_column(BigInteger)
    #: The contact's address when the audience was snapshotted.
    address: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default="queued")
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    provider_message_id: Mapped[str | None] = mapped_column(Text)
    #: Provider calls of a several-call message already accepted; a retry starts after them.
    parts_done: Mapped[int] = mapped_column(Integer, server_default="0")
    #: The key of the one provider call that carries this row with others (a LINE multicast),
    #: written before the call is made: a repeat after a crash or a timeout is the same call,
    #: to the same recipients under the same key, which the provider refuses as a repeat.
    call_key: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    #: The run of a batch that holds the row while ``sending``; that run's lease (on its batch)
    #: is the row's lease, and results written under any other token are ignored.
    lease_token: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    next_attempt_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _created_at()
    sent_at: Mapped[datetime | None]


class DeliveryBatch(Base):
    """A range of one broadcast's deliveries, sent as one unit of work.

    The snapshot cuts the audience into batches. The scheduler hands a batch to the dispatchers
    when it is due (``ready`` -> ``queued``), at most a few per broadcast at once; a dispatcher
    runs it under a lease it renews (``running``). A run that must wait (rate limit, Retry-After,
    backoff) gives the batch back with the time it may go on (``ready``, ``due_at``), so waiting
    holds no worker; a run whose lease ran out (a dead dispatcher) is taken back by the sweeper,
    batch and rows, and nothing else is handed out again.
    """

    __tablename__ = "delivery_batch"
    __table_args__ = (
        CheckConstraint(_in("state", BATCH_STATES), name="state"),
        Index(None, "broadcast_id", "state", "due_at"),
        Index(
            "ix_delivery_batch_lease_expires_at_running",
            "lease_expires_at",
            postgresql_where=text("state = 'running'"),
        ),
        Index(
            "ix_delivery_batch_published_at_queued",
            "published_at",
            postgresql_where=text("state = 'queued'"),
        ),
        # The relay's pick (tasks in the order their batches fell due) and its next wake-up read
        # only the batches waiting to be handed out.
        Index(
            "ix_delivery_batch_due_at_broadcast_id_ready",
            "due_at",
            "broadcast_id",
            postgresql_where=text("state = 'ready'"),
        ),
    )

    id: Mapped[int] = _pk()
    workspace_id: Mapped[int] = _workspace_fk()
    broadcast_id: Mapped[int] = mapped_column(ForeignKey("broadcast.id", ondelete="CASCADE"))
    #: The broadcast's ``part_day``: where its deliveries are.
    part_day: Mapped[date] = mapped_column(Date)
    first_id: Mapped[int] = mapped_column(BigInteger)
    last_id: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(Text, server_default="ready")
    #: Not handed out before this moment.
    due_at: Mapped[datetime] = mapped_column(server_default=func.now())
    #: The run that holds it while ``running``; its deliveries carry the same token.
    run_token: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    lease_expires_at: Mapped[datetime | None]
    #: When a message pointing at it was last published.
    published_at: Mapped[datetime | None]
    #: How many runs it took (more than one: it waited, or a dispatcher died).
    runs: Mapped[int] = mapped_column(Integer, server_default="0")
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _created_at()


class DispatchOutbox(Base):
    """A broadcast to hand to the dispatchers. Written in the same transaction that makes the
    task ``in_progress``; the scheduler publishes it to RabbitMQ and only then deletes it, so a
    crash between the commit and the publish loses nothing.
    """

    __tablename__ = "dispatch_outbox"

    id: Mapped[int] = _pk()
    workspace_id: Mapped[int] = _workspace_fk()
    broadcast_id: Mapped[int] = mapped_column(ForeignKey("broadcast.id", ondelete="CASCADE"))
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()


class ChannelRate(Base):
    """A channel's shared rate limit state (GCRA): the time its next send may go out.

    Every dispatcher takes its send slots from this one row, so the limit holds across all
    processes and machines; a provider's Retry-After pushes ``tat`` for everyone.
    """

    __tablename__ = "channel_rate"

    channel_id: Mapped[int] = mapped_column(
        ForeignKey("channel.id", ondelete="CASCADE"), primary_key=True
    )
    workspace_id: Mapped[int] = _workspace_fk()
    #: Theoretical arrival time: the earliest moment the next slot may start.
    tat: Mapped[datetime] = mapped_column(server_default=func.now())
    #: Set by a provider's "slow down" answer: no slot starts before it.
    blocked_until: Mapped[datetime | None]
    block_reason: Mapped[str | None] = mapped_column(Text)


class ContactErasure(Base):
    """A deleted contact whose delivery rows may still hold its address: the scheduler's
    sweep erases them in small steps (``shared.delivery_store.settle_erasures``).
    """

    __tablename__ = "contact_erasure"

    contact_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    created_at: Mapped[datetime] = _created_at()


class DeliveryPurge(Base):
    """The recipient rows of a deleted broadcast, still to be removed. Deleting a broadcast
    (or its channel) is one quick statement; its rows, which may be millions, are removed in
    small steps by the partition keeper (``shared.delivery_store.purge_step``).
    """

    __tablename__ = "delivery_purge"

    broadcast_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    part_day: Mapped[date] = mapped_column(Date)
    created_at: Mapped[datetime] = _created_at()
