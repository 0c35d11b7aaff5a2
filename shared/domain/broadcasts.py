"""Broadcast tasks: create, modify, list, and the operator's pause / resume / cancel."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import Select, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared import delivery_store
from shared.db.engine import raw_connection
from shared.db.models import (
    Account,
    Broadcast,
    Channel,
    Contact,
    Conversation,
    Delivery,
    DispatchOutbox,
)
from shared.db.sql import contains
from shared.domain import templates, zones
from shared.domain.audience import AudienceSpec, breakdown, check_audience
from shared.domain.channels import CONVERSATION_WINDOW, MESSAGE_TAGS
from shared.domain.errors import FieldError, NotFound, StateConflict, ValidationFailed
from shared.domain.lifecycle import (
    ACTION_ALLOWED_FROM,
    FINAL_BROADCAST_STATUSES,
    OVERDUE_REASON_PREFIX,
    REASONED_DELIVERY_STATUSES,
    BroadcastStatus,
    ChannelKind,
    DeliveryStatus,
    Origin,
    allowed_phrase,
)
from shared.domain.media import MAX_IMAGES, check_media_ids
from shared.domain.types import MAX_ID, Id, Text
from shared.domain.wa_templates import WhatsappTemplate
from shared.domain.zones import LocalTime, SendingWindow

#: A scheduled send must lie at least this far ahead when it is written.
MIN_LEAD = timedelta(minutes=5)
#: And at most this far.
MAX_LEAD = timedelta(days=366)
MAX_TEXT = 4096


class AutoPause(BaseModel):
    """Pause a broadcast by itself when too many of its last sends failed."""

    model_config = ConfigDict(extra="forbid")

    failure_ratio: float | None = Field(
        gt=0,
        le=1,
        description="Pause when at least this share of the last sends failed (0.5: half); "
        "null turns auto-pause off.",
    )
    last: int = Field(
        default=100,
        ge=10,
        le=10_000,
        description="How many of the most recent sends (recipients sent to or failed) count.",
    )


class Content(BaseModel):
    """What is sent: text, images, or both; on WhatsApp, a template (to everyone, or to those
    outside the 24-hour window when text or images are given too); on Messenger and
    Instagram, the message tag for those outside it.
    """

    model_config = ConfigDict(extra="forbid")

    text: Text | None = Field(default=None, max_length=MAX_TEXT)
    media_ids: list[Id] = Field(default_factory=list)
    template: WhatsappTemplate | None = Field(
        default=None,
        description="WhatsApp: an approved template message. With text or images too, the "
        "template goes to recipients outside the 24-hour window and the text and images to "
        "those inside it.",
    )
    message_tag: str | None = Field(
        default=None,
        description="Messenger and Instagram: the message tag for recipients outside the "
        "24-hour window (HUMAN_AGENT: within 7 days of their last message).",
    )

    @field_validator("media_ids")
    @classmethod
    def _at_most_ten(cls, value: list[Id]) -> list[Id]:
        if len(value) > MAX_IMAGES:
            raise ValueError(f"has {len(value)} images; a message may carry at most {MAX_IMAGES}")
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> Content:
        if self.text is not None and not self.text.strip():
            self.text = None
        if self.text is None and not self.media_ids and self.template is None:
            raise ValueError("is empty: give text, media_ids, or both (or a WhatsApp template)")
        return self

    @property
    def free_form(self) -> bool:
        """Text or images (which a conversation window restricts), not only a template."""
        return self.text is not None or bool(self.media_ids)


def utcnow() -> datetime:
    return datetime.now(UTC)


def resolve_send_at(send_at: datetime | None, now: datetime, *, field: str = "send_at") -> datetime:
    """``None`` means now; a given time must carry a UTC offset and lie 5 minutes to a year ahead."""
    if send_at is None:
        return now
    if send_at.tzinfo is None or send_at.utcoffset() is None:
        raise ValidationFailed.one(
            field,
            "needs a UTC offset, e.g. 2026-12-01T09:00:00Z or 2026-12-01T10:00:00+01:00",
            "timezone_missing",
        )
    if send_at < now + MIN_LEAD:
        ahead = (send_at - now).total_seconds()
        raise ValidationFailed.one(
            field,
            f"is {ahead:.0f} s from now; a scheduled send must be at least 5 minutes ahead "
            "(or null to send immediately)",
            "too_soon",
        )
    if send_at > now + MAX_LEAD:
        raise ValidationFailed.one(field, "is more than a year ahead", "too_late")
    return send_at.astimezone(UTC)


def request_hash(payload: dict[str, Any]) -> str:
    """A stable digest of a request body, for Idempotency-Key replays."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def get_channel(
    session: Session, workspace_id: int, channel_id: int, *, field: str = "channel_id"
) -> Channel:
    """The workspace's channel, or a 422 naming ``field``."""
    channel = session.get(Channel, channel_id)
    if channel is None or channel.workspace_id != workspace_id:
        raise ValidationFailed.one(field, f"channel {channel_id} not found", "not_found")
    return channel


@dataclass(frozen=True)
class NewBroadcast:
    name: str
    channel_id: int
    audience: AudienceSpec
    content: Content
    send_at: datetime | LocalTime | None
    origin: Origin = Origin.BROADCAST
    conversation_id: int | None = None
    test_of_id: int | None = None
    window: SendingWindow | None = None
    #: None: the channel's.
    auto_pause: AutoPause | None = None


def create_broadcast(
    session: Session,
    workspace_id: int,
    new: NewBroadcast,
    *,
    idempotency_key: str | None = None,
    body_hash: str | None = None,
) -> tuple[Broadcast, bool]:
    """Write a pending broadcast; return it and whether it was created now.

    With an ``idempotency_key`` a repeat of the same request returns the broadcast the first
    one made; the same key with another body is refused.
    """
    if idempotency_key is not None:
        earlier = by_idempotency_key(session, workspace_id, idempotency_key, body_hash)
        if earlier is not None:
            return earlier, False
    now = utcnow()
    given = zones.resolve(new.send_at)
    send_at = resolve_send_at(given.at if given else None, now)
    channel = get_channel(session, workspace_id, new.channel_id)
    size = check_audience(session, workspace_id, new.channel_id, new.audience)
    check_content(session, workspace_id, channel, new.content, new.audience, send_at)
    if new.window is not None:
        zones.check_known(session, [new.window.zone], "sending_window.zone")
    broadcast = Broadcast(
        workspace_id=workspace_id,
        name=new.name,
        channel_id=new.channel_id,
        origin=new.origin.value,
        conversation_id=new.conversation_id,
        test_of_id=new.test_of_id,
        # A broadcast to the failed recipients of another is its retry, however it was made.
        retry_of_id=new.audience.failed_in,
        audience=new.audience.model_dump(mode="json"),
        content=new.content.model_dump(mode="json"),
        send_at=send_at,
        send_at_local=given.local if given else None,
        send_at_zone=given.zone if given else None,
        **_window_columns(new.window, given.zone if given else None),
        auto_pause=new.auto_pause.model_dump() if new.auto_pause else None,
        status=BroadcastStatus.PENDING.value,
        audience_size=size,
        idempotency_key=idempotency_key,
        request_hash=body_hash,
    )
    if idempotency_key is None:
        session.add(broadcast)
        session.flush()
        return broadcast, True
    # A concurrent request with the same key may win the race: let the unique index decide.
    try:
        with session.begin_nested():
            session.add(broadcast)
            session.flush()
    except IntegrityError:
        earlier = by_idempotency_key(session, workspace_id, idempotency_key, body_hash)
        if earlier is None:
            raise
        return earlier, False
    return broadcast, True


def check_content(
    session: Session,
    workspace_id: int,
    channel: Channel,
    content: Content,
    audience: AudienceSpec,
    send_at: datetime,
) -> None:
    """Refuse content the channel cannot send: images of a type or size its provider refuses,
    malformed placeholders, a template anywhere but WhatsApp, a message tag anywhere but
    Messenger and Instagram, and, where the provider has a conversation window, free-form
    content for recipients who will be outside it at ``send_at`` with nothing given for them
    (a template, a message tag).
    """
    kind = ChannelKind(channel.kind)
    check_media_ids(session, workspace_id, content.media_ids, field="content.media_ids", kind=kind)
    templates.check(session, workspace_id, content.text, "content.text")
    if content.template is not None:
        if kind is not ChannelKind.WHATSAPP:
            raise ValidationFailed.one(
                "content.template",
                f"only a WhatsApp channel sends templates; channel {channel.id} is {kind.value}",
                "template_not_supported",
            )
        for path, value in content.template.texts():
            templates.check(session, workspace_id, value, f"content.template.{path}")
        for path, media_id in content.template.images():
            try:
                check_media_ids(session, workspace_id, [media_id], field=path, kind=kind)
            except ValidationFailed as exc:
                # Named where it is given, not as an item of a list of images.
                raise ValidationFailed(
                    [replace(e, field=f"content.template.{path}") for e in exc.errors]
                ) from None
    tags = MESSAGE_TAGS.get(kind)
    if content.message_tag is not None and (tags is None or content.message_tag not in tags):
        allowed = (
            f"one of {', '.join(tags)}"
            if tags
            else "none: only Messenger and Instagram channels take message tags"
        )
        raise ValidationFailed.one(
            "content.message_tag",
            f"{content.message_tag!r} is not a message tag of a {kind.value} channel; allowed: "
            f"{allowed}",
            "invalid_tag",
        )
    window = CONVERSATION_WINDOW.get(kind)
    if window is None or not content.free_form:
        return
    if content.template is not None:
        return  # the template goes to everyone outside the window
    tag_window = window
    if content.message_tag is not None and tags is not None:
        allowed_for = tags[content.message_tag]
        if allowed_for is None:
            return  # the tag may be used whenever the contact last wrote
        tag_window = allowed_for
    found = breakdown(session, workspace_id, channel.id, audience, window=tag_window, at=send_at)
    outside = found.sendable - (found.inside_window or 0)
    if outside <= 0:
        return
    hours = int(tag_window.total_seconds() // 3600)
    span = f"{hours // 24} days" if hours % 24 == 0 and hours > 24 else f"{hours} hours"
    remedy = (
        "give content.template (an approved template: it goes to them, and the text and "
        "images to the others)"
        if kind is ChannelKind.WHATSAPP
        else "give content.message_tag (HUMAN_AGENT reaches those who wrote within 7 days)"
        if content.message_tag is None
        else "narrow the audience to those who wrote in since"
    )
    raise ValidationFailed.one(
        "content",
        f"{outside} of {found.sendable} recipients will not have written in within {span} of "
        f"the send time: {kind.value} takes free-form messages only inside that window; "
        f"{remedy}",
        "outside_window",
    )


def _window_columns(window: SendingWindow | None, send_zone: str | None) -> dict[str, Any]:
    """The broadcast's window columns: all None, or its hours and the zone for recipients
    without one of their own (the window's, else the send time's, else UTC).
    """
    if window is None:
        return {"window_start": None, "window_end": None, "window_zone": None}
    return {
        "window_start": window.start,
        "window_end": window.end,
        "window_zone": window.zone or send_zone or "UTC",
    }


def auto_pause_of(broadcast: Broadcast) -> AutoPause | None:
    """The auto-pause a broadcast was given (None: its channel's)."""
    return AutoPause.model_validate(broadcast.auto_pause) if broadcast.auto_pause else None


def sending_window(broadcast: Broadcast) -> SendingWindow | None:
    """The broadcast's window as it was given (its zone filled in), or None."""
    if broadcast.window_start is None or broadcast.window_end is None:
        return None
    return SendingWindow(
        start=broadcast.window_start, end=broadcast.window_end, zone=broadcast.window_zone
    )


def by_idempotency_key(
    session: Session, workspace_id: int, key: str, body_hash: str | None
) -> Broadcast | None:
    earlier = session.execute(
        select(Broadcast).where(
            Broadcast.workspace_id == workspace_id, Broadcast.idempotency_key == key
        )
    ).scalar_one_or_none()
    if earlier is not None and earlier.request_hash != body_hash:
        raise ValidationFailed.one(
            "Idempotency-Key",
            f"was already used for broadcast {earlier.id} with a different body; "
            "use a new key for a different request",
            "idempotency_key_reused",
        )
    return earlier


def get_broadcast(
    session: Session, workspace_id: int, broadcast_id: int, *, lock: bool = False
) -> Broadcast:
    query = select(Broadcast).where(
        Broadcast.id == broadcast_id, Broadcast.workspace_id == workspace_id
    )
    if lock:
        query = query.with_for_update()
    broadcast = session.execute(query).scalar_one_or_none()
    if broadcast is None:
        raise NotFound("broadcast", broadcast_id)
    return broadcast


def audience_fixed(broadcast: Broadcast) -> bool:
    """Its audience is copied, or its copy in parts has begun: its recipients are rows now,
    no longer what the audience query would find.
    """
    return broadcast.snapshot_at is not None or broadcast.total_count > 0


def counts(broadcast: Broadcast) -> dict[str, int]:
    """Recipients by delivery status; ``queued`` counts every one not yet final."""
    done = (
        broadcast.sent_count
        + broadcast.failed_count
        + broadcast.canceled_count
        + broadcast.skipped_count
        + broadcast.partial_count
    )
    return {
        "total": broadcast.total_count,
        "queued": broadcast.total_count - done,
        "sent": broadcast.sent_count,
        "failed": broadcast.failed_count,
        "canceled": broadcast.canceled_count,
        "skipped": broadcast.skipped_count,
        "partial": broadcast.partial_count,
    }


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(str(last_id).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, *, field: str = "cursor") -> int:
    try:
        value = int(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode())
        if not 0 < value <= MAX_ID:
            raise ValueError(value)
        return value
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise ValidationFailed.one(
            field, "is not a cursor this API handed out", "cursor_invalid"
        ) from None


@dataclass(frozen=True)
class ListFilter:
    """What a list of broadcasts is narrowed by (each optional); ranges are half-open:
    ``*_from`` included, ``*_before`` not.
    """

    statuses: Sequence[BroadcastStatus] = ()
    origin: Origin | None = None
    channel_id: int | None = None
    #: Part of the name, any case.
    name: str | None = None
    created_from: datetime | None = None
    created_before: datetime | None = None
    send_from: datetime | None = None
    send_before: datetime | None = None
    #: The test sends of this broadcast (origin ``test`` implied).
    test_of: int | None = None


def broadcasts_query(workspace_id: int, where: ListFilter = ListFilter()) -> Select[Broadcast]:
    """Broadcasts of a workspace, narrowed by ``where``."""
    query = select(Broadcast).where(Broadcast.workspace_id == workspace_id)
    if where.statuses:
        query = query.where(Broadcast.status.in_([s.value for s in where.statuses]))
    if where.origin is not None:
        query = query.where(Broadcast.origin == where.origin.value)
    elif where.test_of is None:
        # Test sends are recorded apart: listed only when asked for (origin, or test_of).
        query = query.where(Broadcast.origin != Origin.TEST.value)
    if where.test_of is not None:
        query = query.where(Broadcast.test_of_id == where.test_of)
    if where.channel_id is not None:
        query = query.where(Broadcast.channel_id == where.channel_id)
    if where.name:
        query = query.where(Broadcast.name.ilike(contains(where.name), escape="\\"))
    for column, low, high in (
        (Broadcast.created_at, where.created_from, where.created_before),
        (Broadcast.send_at, where.send_from, where.send_before),
    ):
        if low is not None:
            query = query.where(column >= low)
        if high is not None:
            query = query.where(column < high)
    return query


def create_retry(
    session: Session,
    workspace_id: int,
    broadcast_id: int,
    *,
    name: str | None,
    send_at: datetime | LocalTime | None,
    idempotency_key: str | None = None,
    body_hash: str | None = None,
) -> tuple[Broadcast, bool]:
    """Write the retry of ``broadcast_id``'s failed recipients (``_retry_of_failed``), as
    ``create_broadcast`` writes any broadcast. A 409 when every one that failed has opted out
    or was found unreachable since (rather than an audience error about fields never given).
    """
    new = _retry_of_failed(session, workspace_id, broadcast_id, name=name)
    try:
        return create_broadcast(
            session,
            workspace_id,
            replace(new, send_at=send_at),
            idempotency_key=idempotency_key,
            body_hash=body_hash,
        )
    except ValidationFailed as exc:
        if [e.type for e in exc.errors] != ["empty_audience"]:
            raise
        raise StateConflict(
            f"none of the recipients that failed in broadcast {broadcast_id} can be sent to "
            "now: each has opted out or was found unreachable since"
        ) from None


def _retry_of_failed(
    session: Session, workspace_id: int, broadcast_id: int, *, name: str | None
) -> NewBroadcast:
    """A new broadcast to exactly the recipients that failed in ``broadcast_id`` (not the
    skipped ones, and none opted out or unreachable since), with its channel and content, linked
    to it. However many they are: the audience names the broadcast, not a list of contacts.
    """
    # Locked: two requests at once (a double click) make one retry, not two.
    source = get_broadcast(session, workspace_id, broadcast_id, lock=True)
    if source.failed_count == 0:
        raise StateConflict(
            f"broadcast {source.id} has no failed recipients to retry "
            f"(sent {source.sent_count}, skipped {source.skipped_count}, "
            f"partly sent {source.partial_count}, canceled {source.canceled_count})"
        )
    reason = recipients_removed(source)
    if reason is not None:
        raise StateConflict(f"{reason}: who failed is no longer known")
    # A second retry would send again to everyone the first one reaches.
    earlier = session.execute(
        select(Broadcast.id, Broadcast.status)
        .where(Broadcast.retry_of_id == source.id, Broadcast.status != BroadcastStatus.CANCELED)
        .order_by(Broadcast.id)
        .limit(1)
    ).first()
    if earlier is not None:
        raise StateConflict(
            f"broadcast {source.id} is already retried by broadcast {earlier.id} "
            f"({earlier.status}): retry that one's failed recipients instead, or cancel it first"
        )
    return NewBroadcast(
        name=name or f"{source.name} (retry of failed)",
        channel_id=source.channel_id,
        audience=AudienceSpec(failed_in=source.id),
        content=Content.model_validate(source.content),
        send_at=None,
        window=sending_window(source),
        auto_pause=auto_pause_of(source),
    )


def retries_of(
    session: Session, workspace_id: int, broadcast_ids: Sequence[int]
) -> dict[int, list[int]]:
    """The ids of the broadcasts made to retry each of these, oldest first."""
    found: dict[int, list[int]] = {i: [] for i in broadcast_ids}
    if broadcast_ids:
        rows = session.execute(
            select(Broadcast.retry_of_id, Broadcast.id)
            .where(
                Broadcast.workspace_id == workspace_id,
                Broadcast.retry_of_id.in_(list(broadcast_ids)),
            )
            .order_by(Broadcast.id)
        ).all()
        for source, retry in rows:
            if source is not None:
                found[source].append(retry)
    return found


def _require(broadcast: Broadcast, action: str) -> None:
    if broadcast.status not in ACTION_ALLOWED_FROM[action]:
        raise StateConflict(
            f"broadcast {broadcast.id} is {broadcast.status}; {action} is allowed only while "
            f"{allowed_phrase(action)}"
        )


@dataclass(frozen=True)
class Changes:
    """Fields a PATCH may change; ``fields`` says which were given (send_at may be given as None)."""

    fields: frozenset[str]
    name: str | None = None
    channel_id: int | None = None
    audience: AudienceSpec | None = None
    content: Content | None = None
    send_at: datetime | LocalTime | None = None
    window: SendingWindow | None = None
    auto_pause: AutoPause | None = None


def modify_broadcast(
    session: Session, workspace_id: int, broadcast_id: int, changes: Changes
) -> Broadcast:
    """Change a broadcast before its first send: while pending, or paused before it started."""
    broadcast = get_broadcast(session, workspace_id, broadcast_id, lock=True)
    _require(broadcast, "modify")
    if broadcast.started_at is not None:
        raise StateConflict(
            f"broadcast {broadcast.id} has started sending; it can be modified only before its "
            "first send (while pending, or paused before it started)"
        )
    if broadcast.origin == Origin.TEST.value:
        raise StateConflict(
            f"broadcast {broadcast.id} is a test send; it cannot be changed: cancel it and "
            "test again"
        )
    if broadcast.origin == Origin.CONVERSATION.value and changes.fields & {
        "channel_id",
        "audience",
    }:
        raise ValidationFailed.one(
            "audience",
            "a conversation's timed send always goes to that conversation's contact",
            "fixed_audience",
        )
    now = utcnow()
    if "send_at" in changes.fields:
        given = zones.resolve(changes.send_at)
        broadcast.send_at = resolve_send_at(given.at if given else None, now)
        broadcast.send_at_local = given.local if given else None
        broadcast.send_at_zone = given.zone if given else None
    if "auto_pause" in changes.fields:
        broadcast.auto_pause = changes.auto_pause.model_dump() if changes.auto_pause else None
    if "window" in changes.fields and changes.window is not None:
        zones.check_known(session, [changes.window.zone], "sending_window.zone")
    if "window" in changes.fields:
        for key, value in _window_columns(changes.window, broadcast.send_at_zone).items():
            setattr(broadcast, key, value)
    if changes.name is not None:
        broadcast.name = changes.name
    channel_id = changes.channel_id if changes.channel_id is not None else broadcast.channel_id
    channel = get_channel(session, workspace_id, channel_id)
    if changes.channel_id is not None:
        broadcast.channel_id = changes.channel_id
    if changes.channel_id is not None or changes.audience is not None:
        audience = changes.audience or AudienceSpec.model_validate(broadcast.audience)
        broadcast.audience_size = check_audience(session, workspace_id, channel_id, audience)
        broadcast.audience = audience.model_dump(mode="json")
        # A broadcast to the failed recipients of another is its retry, however it was made.
        broadcast.retry_of_id = audience.failed_in
    if changes.fields & {"content", "channel_id", "audience", "send_at"}:
        content = changes.content or Content.model_validate(broadcast.content)
        audience = changes.audience or AudienceSpec.model_validate(broadcast.audience)
        check_content(session, workspace_id, channel, content, audience, broadcast.send_at)
        broadcast.content = content.model_dump(mode="json")
    broadcast.updated_at = now
    session.flush()
    return broadcast


def pause_broadcast(session: Session, workspace_id: int, broadcast_id: int) -> Broadcast:
    """Stop sending: once this commits, no dispatcher starts another provider call for it."""
    broadcast = get_broadcast(session, workspace_id, broadcast_id, lock=True)
    _require(broadcast, "pause")
    broadcast.status = BroadcastStatus.PAUSED.value
    broadcast.status_reason = None
    broadcast.updated_at = utcnow()
    session.flush()
    return broadcast


def resume_broadcast(
    session: Session, workspace_id: int, broadcast_id: int, *, confirm_late_start: bool = False
) -> Broadcast:
    """Go on: a task that never started is pending again (and may start late, the operator
    having said so); one that had started continues with exactly its unsent recipients. A
    task the scheduler paused for being found too late is resumed only with
    ``confirm_late_start``: it would go out that late.
    """
    broadcast = get_broadcast(session, workspace_id, broadcast_id, lock=True)
    _require(broadcast, "resume")
    overdue = broadcast.started_at is None and (broadcast.status_reason or "").startswith(
        OVERDUE_REASON_PREFIX
    )
    if overdue and not confirm_late_start:
        late = utcnow() - broadcast.send_at
        raise StateConflict(
            f"broadcast {broadcast.id} was paused as overdue: it was due at "
            f"{broadcast.send_at.isoformat()}, {int(late.total_seconds() // 60)} minutes ago, and "
            "resuming sends it now; resume with confirm_late_start true to send it anyway, or "
            "cancel it"
        )
    if broadcast.started_at is None:
        broadcast.status = BroadcastStatus.PENDING.value
        broadcast.late_start_approved = True
    else:
        broadcast.status = BroadcastStatus.IN_PROGRESS.value
        if broadcast.snapshot_at is None:
            # Paused before its audience was copied: it needs its start again. (Once copied,
            # its batches are handed out by the scheduler as soon as it is in progress.) The
            # API never talks to RabbitMQ: the scheduler publishes the outbox.
            broadcast.heartbeat_at = utcnow()
            session.add(
                DispatchOutbox(
                    workspace_id=workspace_id, broadcast_id=broadcast.id, reason="resume"
                )
            )
    broadcast.status_reason = None
    # A task that paused itself for its failures starts its window of recent sends afresh
    # (and is no longer counted as paused by itself).
    broadcast.recent_outcomes = None
    broadcast.auto_paused_at = None
    broadcast.auto_pause_logged_at = None
    broadcast.updated_at = utcnow()
    session.flush()
    # A task whose rows all ended while it was paused completes as it resumes (the store's
    # completion rule, in Postgres): read back what the database made of it.
    session.refresh(broadcast)
    return broadcast


def cancel_broadcast(session: Session, workspace_id: int, broadcast_id: int) -> Broadcast:
    """Stop for good: recipients not yet sent to become ``canceled``; sent ones stay sent."""
    broadcast = get_broadcast(session, workspace_id, broadcast_id, lock=True)
    _require(broadcast, "cancel")
    delivery_store.run(raw_connection(session), delivery_store.cancel(broadcast.id))
    session.refresh(broadcast)
    return broadcast


def recipients_removed(broadcast: Broadcast) -> str | None:
    """Why a broadcast's recipient list is empty though it had recipients: retention removed
    its rows (None while they are kept).
    """
    if broadcast.recipients_removed_at is None:
        return None
    return (
        f"the recipient rows of broadcast {broadcast.id} were removed by retention on "
        f"{broadcast.recipients_removed_at.date().isoformat()} (BCAST_DELIVERY_RETENTION_DAYS); "
        "its counts remain"
    )


def recipients_query(
    workspace_id: int,
    broadcast_id: int,
    part_day: date,
    *,
    statuses: Sequence[DeliveryStatus] = (),
    after_id: int | None = None,
) -> Select[Delivery, str]:
    """Deliveries of a broadcast with the contact's name, in snapshot order. ``part_day`` is
    the broadcast's: its rows are read from that one partition.
    """
    query = (
        select(Delivery, func.coalesce(Contact.name, ""))
        # An erased contact's rows stay, nameless (their address reads "(erased)").
        .outerjoin(Contact, Contact.id == Delivery.contact_id)
        .where(
            Delivery.broadcast_id == broadcast_id,
            Delivery.part_day == part_day,
            Delivery.workspace_id == workspace_id,
        )
    )
    if statuses:
        query = query.where(Delivery.status.in_([s.value for s in statuses]))
        if REASONED_DELIVERY_STATUSES.issuperset(statuses):
            # Implied by the statuses; lets the few not reached of a large broadcast be read
            # from their own index rather than among all its rows.
            query = query.where(Delivery.last_error.is_not(None))
    if after_id is not None:
        query = query.where(Delivery.id > after_id)
    return query.order_by(Delivery.id)


def conversation_broadcast(
    session: Session,
    workspace_id: int,
    conversation_id: int,
    content: Content,
    send_at: datetime | LocalTime | None,
    *,
    name: str | None = None,
) -> NewBroadcast:
    """The broadcast a conversation's timed send becomes: that conversation's one contact.
    A contact who opted out or was found unreachable is refused by name, with the reason.
    """
    row = session.execute(
        select(Conversation, Contact, Account.channel_id)
        .join(Contact, Contact.id == Conversation.contact_id)
        .join(Account, Account.id == Conversation.account_id)
        .where(Conversation.id == conversation_id, Conversation.workspace_id == workspace_id)
    ).one_or_none()
    if row is None:
        raise NotFound("conversation", conversation_id)
    conversation, contact, channel_id = row
    refused = unsendable(contact, "conversation_id")
    if refused is not None:
        raise ValidationFailed([refused])
    return NewBroadcast(
        name=name or f"Timed send to {contact.name or 'contact ' + str(contact.id)}",
        channel_id=channel_id,
        audience=AudienceSpec(
            account_ids=[conversation.account_id],
            selection="manual",
            contact_ids=[conversation.contact_id],
        ),
        content=content,
        send_at=send_at,
        origin=Origin.CONVERSATION,
        conversation_id=conversation.id,
    )


def unsendable(contact: Contact, field: str) -> FieldError | None:
    """Why nothing may be sent to ``contact`` (it opted out, or was found unreachable), as an
    error on ``field`` naming the contact, the date and the reason; None when it may be.
    """
    who = f"contact {contact.id} ({contact.name or contact.address})"
    if contact.opted_out_at is not None:
        return FieldError(
            field,
            f"{who} opted out on {contact.opted_out_at.date().isoformat()}: nothing is sent "
            "to them",
            "opted_out",
        )
    if contact.unreachable_at is not None:
        return FieldError(
            field,
            f"{who} was found unreachable on {contact.unreachable_at.date().isoformat()}: "
            f"{contact.unreachable_reason or 'no reason given'}",
            "unreachable",
        )
    return None


#: Most contacts one test send goes to.
MAX_TEST_CONTACTS = 10


def new_test_send(
    session: Session, workspace_id: int, broadcast_id: int, contact_ids: Sequence[int]
) -> NewBroadcast:
    """The test send of ``broadcast_id`` to ``contact_ids``: its content, on its channel, to
    those contacts only, now, whatever the broadcast's status. It is a broadcast of its own
    (origin ``test``, linked by ``test_of_id``), so the tried one's counts never include it.
    Each contact must be of the channel and neither opted out nor unreachable; an error names
    each one that is not, by its place in ``contact_ids``.
    """
    source = get_broadcast(session, workspace_id, broadcast_id)
    found = {
        c.id: (c, channel)
        for c, channel in session.execute(
            select(Contact, Account.channel_id)
            .join(Account, Account.id == Contact.account_id)
            .where(Contact.workspace_id == workspace_id, Contact.id.in_(list(contact_ids)))
        ).all()
    }
    errors: list[FieldError] = []
    for i, contact_id in enumerate(contact_ids):
        field = f"contact_ids[{i}]"
        if contact_id in contact_ids[:i]:
            errors.append(FieldError(field, f"contact {contact_id} is listed twice", "duplicate"))
        elif contact_id not in found:
            errors.append(FieldError(field, f"contact {contact_id} not found", "not_found"))
        elif found[contact_id][1] != source.channel_id:
            errors.append(
                FieldError(
                    field,
                    f"contact {contact_id} is reached through channel {found[contact_id][1]}, "
                    f"not through the broadcast's channel {source.channel_id}",
                    "wrong_channel",
                )
            )
        else:
            refused = unsendable(found[contact_id][0], field)
            if refused is not None:
                errors.append(refused)
    if errors:
        raise ValidationFailed(errors)
    return NewBroadcast(
        name=f"Test of {source.name}"[:200],
        channel_id=source.channel_id,
        audience=AudienceSpec(selection="manual", contact_ids=list(contact_ids)),
        content=Content.model_validate(source.content),
        send_at=None,
        origin=Origin.TEST,
        # A test of a test tries out the same broadcast.
        test_of_id=source.test_of_id or source.id,
    )


@dataclass(frozen=True)
class Waiting:
    """Recipients of a broadcast being sent that wait for their next attempt: outside the
    sending window (or, for a moment, held back by the channel's rate), and when the first of
    them may go.
    """

    recipients: int
    until: datetime | None


def waiting(session: Session, broadcast: Broadcast) -> Waiting | None:
    """For a broadcast with a sending window whose audience was copied; None otherwise."""
    if broadcast.window_start is None or broadcast.part_day is None:
        return None
    if broadcast.status in FINAL_BROADCAST_STATUSES:
        return Waiting(0, None)
    row = session.execute(
        select(func.count(), func.min(Delivery.next_attempt_at)).where(
            Delivery.broadcast_id == broadcast.id,
            Delivery.part_day == broadcast.part_day,
            Delivery.status == DeliveryStatus.QUEUED.value,
            Delivery.last_error.is_(None),
            Delivery.next_attempt_at > func.now(),
        )
    ).one()
    return Waiting(int(row[0]), row[1])


def inside_window(session: Session, broadcast: Broadcast, window: timedelta) -> int:
    """How many of a broadcast's recipients are inside the provider's conversation window now
    (wrote in less than ``window`` ago): of its audience before it starts, of the recipients
    it has yet to send to once it has.
    """
    since = func.now() - window
    if broadcast.part_day is None:
        found = breakdown(
            session,
            broadcast.workspace_id,
            broadcast.channel_id,
            AudienceSpec.model_validate(broadcast.audience),
            window=window,
        )
        return found.inside_window or 0
    return int(
        session.execute(
            select(func.count())
            .select_from(Delivery)
            .join(Contact, Contact.id == Delivery.contact_id)
            .where(
                Delivery.broadcast_id == broadcast.id,
                Delivery.part_day == broadcast.part_day,
                Delivery.status == DeliveryStatus.QUEUED.value,
                Contact.last_inbound_at > since,
            )
        ).scalar_one()
    )
