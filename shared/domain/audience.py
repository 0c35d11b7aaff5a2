"""Audience: which contacts a broadcast goes to, as one SQL query used everywhere.

The same query answers the preview, checks a new broadcast, and (in the dispatcher) snapshots
the recipients when the broadcast starts, so what an operator previews is what gets sent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import ColumnElement, Select, case, false, func, literal, null, select
from sqlalchemy.orm import Session

from shared.db.models import Account, Broadcast, Contact, ContactTag, Delivery, Tag
from shared.db.sql import in_ids, not_in_ids
from shared.domain.errors import FieldError, ValidationFailed
from shared.domain.lifecycle import NO_REASON, OPTED_OUT_REASON, UNREACHABLE_REASON
from shared.domain.types import Id

#: Most ids one audience list may carry (a manual selection of a whole imported list).
MAX_IDS = 100_000
#: How many wrong ids one error answer names before it stops listing.
MAX_LISTED_ERRORS = 10


class AudienceFilter(BaseModel):
    """Filter contacts of a channel by accounts and/or tags (both multi-select)."""

    model_config = ConfigDict(extra="forbid")

    account_ids: list[Id] = Field(default_factory=list, max_length=1000)
    tag_ids: list[Id] = Field(default_factory=list, max_length=1000)
    tag_match: Literal["any", "all"] = "any"


class AudienceSpec(AudienceFilter):
    """The filter, then everyone it matches (``all``, minus exclusions) or a hand-picked subset."""

    selection: Literal["all", "manual"] = "all"
    contact_ids: list[Id] = Field(default_factory=list, max_length=MAX_IDS)
    exclude_contact_ids: list[Id] = Field(default_factory=list, max_length=MAX_IDS)
    failed_in: Id | None = Field(
        default=None,
        description="Only the contacts whose delivery failed in this broadcast (of the same "
        "channel), and who are neither opted out nor unreachable now: what "
        "POST /v1/broadcasts/{id}/retry-failed sets. Any number of them.",
    )

    @model_validator(mode="after")
    def _selection_fits(self) -> AudienceSpec:
        if self.selection == "manual":
            if not self.contact_ids:
                raise ValueError("selection 'manual' needs contact_ids: the hand-picked contacts")
            if self.exclude_contact_ids:
                raise ValueError(
                    "exclude_contact_ids applies to selection 'all' only; with 'manual' "
                    "list just the wanted contacts in contact_ids"
                )
        elif self.contact_ids:
            raise ValueError(
                "contact_ids applies to selection 'manual' only; with 'all' use "
                "exclude_contact_ids to leave contacts out"
            )
        return self


def describe(spec: AudienceSpec) -> str:
    """The audience in a few words: ``everyone on accounts 3, 4 tagged 7 or 9, less 2``."""
    if spec.failed_in is not None:
        who = f"the recipients that failed in broadcast {spec.failed_in}"
    elif spec.selection == "manual":
        n = len(spec.contact_ids)
        who = f"{n} hand-picked contact{'s' if n != 1 else ''}"
    else:
        who = "everyone"
    if spec.account_ids:
        listed = ", ".join(str(a) for a in spec.account_ids[:5])
        more = f" and {len(spec.account_ids) - 5} more" if len(spec.account_ids) > 5 else ""
        who += f" on account{'s' if len(spec.account_ids) != 1 else ''} {listed}{more}"
    else:
        who += " on the channel"
    if spec.tag_ids:
        joiner = " or " if spec.tag_match == "any" else " and "
        listed = joiner.join(str(t) for t in spec.tag_ids[:5])
        more = f"{joiner}{len(spec.tag_ids) - 5} more" if len(spec.tag_ids) > 5 else ""
        who += f" tagged {listed}{more}"
    if spec.exclude_contact_ids:
        who += f", less {len(spec.exclude_contact_ids)} excluded"
    return who


def audience_query(
    workspace_id: int,
    channel_id: int,
    spec: AudienceFilter | AudienceSpec,
    *,
    reachable: bool | None = True,
    opted_out: bool | None = False,
) -> Select[int, int, str]:
    """``SELECT contact.id, contact.account_id, contact.address`` of every recipient.

    Contacts of the channel's accounts only, narrowed by the spec. ``reachable``: True leaves
    out contacts a provider called unreachable, False keeps only them, None takes both.
    ``opted_out`` likewise for contacts who opted out (False: left out). A copy at the start
    takes both (they are recorded as skipped, with the reason), except for a retry of the
    failed: it goes to none who opted out or is unreachable now.
    """
    conditions = [
        Contact.workspace_id == workspace_id,
        Account.channel_id == channel_id,
    ]
    if opted_out is not None:
        conditions.append(
            Contact.opted_out_at.is_not(None) if opted_out else Contact.opted_out_at.is_(None)
        )
    if reachable is not None:
        conditions.append(
            Contact.unreachable_at.is_(None) if reachable else Contact.unreachable_at.is_not(None)
        )
    if spec.account_ids:
        conditions.append(in_ids(Contact.account_id, spec.account_ids))
    if spec.tag_ids:
        tag_ids = spec.tag_ids
        if spec.tag_match == "any":
            conditions.append(
                select(ContactTag.contact_id)
                .where(ContactTag.contact_id == Contact.id, in_ids(ContactTag.tag_id, tag_ids))
                .exists()
            )
        else:
            matched = (
                select(func.count())
                .select_from(ContactTag)
                .where(ContactTag.contact_id == Contact.id, in_ids(ContactTag.tag_id, tag_ids))
                .scalar_subquery()
            )
            conditions.append(matched == len(set(tag_ids)))
    if isinstance(spec, AudienceSpec):
        if spec.selection == "manual":
            conditions.append(in_ids(Contact.id, spec.contact_ids))
        elif spec.exclude_contact_ids:
            conditions.append(not_in_ids(Contact.id, spec.exclude_contact_ids))
        if spec.failed_in is not None:
            conditions.append(Contact.id.in_(failed_in(workspace_id, spec.failed_in)))
            # A retry goes to no contact known to be unreachable or opted out (none is copied
            # as skipped).
            if reachable is False or opted_out is True:
                conditions.append(false())
            if reachable is None:
                conditions.append(Contact.unreachable_at.is_(None))
            if opted_out is None:
                conditions.append(Contact.opted_out_at.is_(None))
    return (
        select(Contact.id, Contact.account_id, Contact.address)
        .join(Account, Account.id == Contact.account_id)
        .where(*conditions)
    )


def failed_in(workspace_id: int, broadcast_id: int) -> Select[int]:
    """The contacts whose delivery failed in a broadcast, read from its one partition and the
    index of recipients not reached (a failed row always carries its reason).
    """
    day = (
        select(Broadcast.part_day)
        .where(Broadcast.id == broadcast_id, Broadcast.workspace_id == workspace_id)
        .scalar_subquery()
    )
    return select(Delivery.contact_id).where(
        Delivery.broadcast_id == broadcast_id,
        Delivery.part_day == day,
        Delivery.workspace_id == workspace_id,
        Delivery.status == "failed",
        Delivery.last_error.is_not(None),
    )


def count_audience(
    session: Session,
    workspace_id: int,
    channel_id: int,
    spec: AudienceFilter | AudienceSpec,
    *,
    reachable: bool | None = True,
) -> int:
    """How many contacts the spec reaches right now (see ``audience_query`` for ``reachable``)."""
    query = audience_query(workspace_id, channel_id, spec, reachable=reachable).subquery()
    return int(session.execute(select(func.count()).select_from(query)).scalar_one())


def skip_reason() -> ColumnElement[str | None]:
    """Why a contact the audience matches is not sent to (NULL: it is): it opted out, or a
    provider called it unreachable. What a copy at the start records for it.
    """
    return case(
        (Contact.opted_out_at.is_not(None), literal(OPTED_OUT_REASON)),
        (
            Contact.unreachable_at.is_not(None),
            literal(UNREACHABLE_REASON) + func.coalesce(Contact.unreachable_reason, ""),
        ),
        else_=null(),
    )


@dataclass(frozen=True)
class Breakdown:
    """Who an audience matches right now, and what becomes of each when it starts."""

    #: Contacts that will be sent to.
    sendable: int
    #: Contacts that opted out: each gets a row, skipped with the reason.
    opted_out: int
    #: Contacts a provider called unreachable (and not opted out): skipped likewise.
    unreachable: int
    #: The most common reasons the unreachable ones were given, most common first.
    reasons: list[tuple[str, int]]
    #: Of those to be sent to, how many wrote in within the provider's conversation window
    #: (None: the channel has no such window).
    inside_window: int | None = None

    @property
    def everyone(self) -> int:
        """Every contact the audience matches: the rows its start copies (``counts.total``)."""
        return self.sendable + self.opted_out + self.unreachable


#: Reasons a breakdown lists.
MAX_REASONS = 10


def breakdown(
    session: Session,
    workspace_id: int,
    channel_id: int,
    spec: AudienceFilter | AudienceSpec,
    *,
    window: timedelta | None = None,
    at: datetime | None = None,
) -> Breakdown:
    """The spec's audience right now, counted by what its start would do with each; with a
    conversation ``window``, how many of those to be sent to are inside it now (or at ``at``).
    """
    matched = audience_query(
        workspace_id, channel_id, spec, reachable=None, opted_out=None
    ).with_only_columns(
        Contact.opted_out_at,
        Contact.unreachable_at,
        Contact.unreachable_reason,
        Contact.last_inbound_at,
    )
    sub = matched.subquery()
    opted, gone = sub.c.opted_out_at.is_not(None), sub.c.unreachable_at.is_not(None)
    inside = sub.c.last_inbound_at > (func.now() if at is None else at) - (window or timedelta(0))
    row = session.execute(
        select(
            func.count().filter(~opted & ~gone),
            func.count().filter(opted),
            func.count().filter(~opted & gone),
            func.count().filter(~opted & ~gone & inside),
        ).select_from(sub)
    ).one()
    reasons: list[tuple[str, int]] = []
    if row[2]:
        reason = func.coalesce(sub.c.unreachable_reason, NO_REASON)
        reasons = [
            (str(r[0]), int(r[1]))
            for r in session.execute(
                select(reason, func.count())
                .select_from(sub)
                .where(~opted, gone)
                .group_by(reason)
                .order_by(func.count().desc(), reason)
                .limit(MAX_REASONS)
            )
        ]
    return Breakdown(
        int(row[0]),
        int(row[1]),
        int(row[2]),
        reasons,
        int(row[3]) if window is not None else None,
    )


def check_audience(
    session: Session,
    workspace_id: int,
    channel_id: int,
    spec: AudienceFilter | AudienceSpec,
    *,
    field: str = "audience",
) -> int:
    """Check every id in the spec against the workspace and channel; return the audience size:
    every contact it matches, those who opted out or are unreachable included (its start
    copies each, as skipped with the reason), so that it is the broadcast's ``counts.total``.

    Raises ``ValidationFailed`` naming each unknown or foreign id, a manual pick outside the
    filtered audience, or an audience that matches nobody.
    """
    errors: list[FieldError] = []
    if spec.account_ids:
        rows = session.execute(
            select(Account.id, Account.channel_id).where(
                Account.workspace_id == workspace_id, in_ids(Account.id, spec.account_ids)
            )
        ).all()
        channel_of = {r.id: r.channel_id for r in rows}

        def wrong_account(account_id: int) -> bool:
            return channel_of.get(account_id) != channel_id

        for i, account_id in _listed(spec.account_ids, wrong_account):
            if account_id not in channel_of:
                errors.append(
                    FieldError(
                        f"{field}.account_ids[{i}]", f"account {account_id} not found", "not_found"
                    )
                )
            elif channel_of[account_id] != channel_id:
                errors.append(
                    FieldError(
                        f"{field}.account_ids[{i}]",
                        f"account {account_id} belongs to channel {channel_of[account_id]}, "
                        f"not to the broadcast's channel {channel_id}; a broadcast uses one channel",
                        "wrong_channel",
                    )
                )
    if spec.tag_ids:
        known = set(
            session.execute(
                select(Tag.id).where(Tag.workspace_id == workspace_id, in_ids(Tag.id, spec.tag_ids))
            ).scalars()
        )
        errors.extend(
            FieldError(f"{field}.tag_ids[{i}]", f"tag {tag_id} not found", "not_found")
            for i, tag_id in _listed(spec.tag_ids, _not_in(known))
        )
    if isinstance(spec, AudienceSpec):
        for name in ("contact_ids", "exclude_contact_ids"):
            ids: list[int] = getattr(spec, name)
            if not ids:
                continue
            existing = _existing_contacts(session, workspace_id, ids)
            errors.extend(
                FieldError(f"{field}.{name}[{i}]", f"contact {cid} not found", "not_found")
                for i, cid in _listed(ids, _not_in(existing))
            )
        if spec.selection == "manual" and not errors:
            inside = set(
                session.execute(
                    audience_query(
                        workspace_id, channel_id, spec, reachable=None
                    ).with_only_columns(Contact.id)
                ).scalars()
            )
            errors.extend(
                FieldError(
                    f"{field}.contact_ids[{i}]",
                    f"contact {cid} is not in the filtered audience (another channel or "
                    "account, missing tags, or opted out)",
                    "outside_audience",
                )
                for i, cid in _listed(spec.contact_ids, _not_in(inside))
            )
    if isinstance(spec, AudienceSpec) and spec.failed_in is not None:
        errors.extend(_source_errors(session, workspace_id, channel_id, spec.failed_in, field))
    if errors:
        raise ValidationFailed(errors)
    found = breakdown(session, workspace_id, channel_id, spec)
    if found.sendable == 0:
        held = [
            f"{n} {what}"
            for n, what in (
                (found.opted_out, "opted out"),
                (found.unreachable, "marked unreachable"),
            )
            if n
        ]
        because = f" (of the matching contacts, {' and '.join(held)})" if held else ""
        raise ValidationFailed.one(
            field,
            f"matches no contacts that can be sent to{because}: widen the accounts, tags or "
            "selection",
            "empty_audience",
        )
    return found.everyone


def _source_errors(
    session: Session, workspace_id: int, channel_id: int, source_id: int, field: str
) -> list[FieldError]:
    """What is wrong with ``failed_in``: a broadcast of the workspace, on the same channel,
    whose recipient rows are still kept.
    """
    where = f"{field}.failed_in"
    source = session.execute(
        select(Broadcast).where(Broadcast.id == source_id, Broadcast.workspace_id == workspace_id)
    ).scalar_one_or_none()
    if source is None:
        return [FieldError(where, f"broadcast {source_id} not found", "not_found")]
    if source.channel_id != channel_id:
        return [
            FieldError(
                where,
                f"broadcast {source_id} went out on channel {source.channel_id}, not on the "
                f"broadcast's channel {channel_id}",
                "wrong_channel",
            )
        ]
    if source.recipients_removed_at is not None:
        return [
            FieldError(
                where,
                f"the recipient rows of broadcast {source_id} were removed by retention: who "
                "failed is no longer known",
                "recipients_removed",
            )
        ]
    return []


def _existing_contacts(session: Session, workspace_id: int, ids: Sequence[int]) -> set[int]:
    return set(
        session.execute(
            select(Contact.id).where(Contact.workspace_id == workspace_id, in_ids(Contact.id, ids))
        ).scalars()
    )


def _not_in(known: set[int]) -> Callable[[int], bool]:
    return lambda value: value not in known


def _listed(ids: Sequence[int], wrong: Callable[[int], bool]) -> list[tuple[int, int]]:
    """(index, id) pairs of the ids that are wrong, at most ``MAX_LISTED_ERRORS`` of them."""
    out: list[tuple[int, int]] = []
    for i, value in enumerate(ids):
        if wrong(value):
            out.append((i, value))
            if len(out) == MAX_LISTED_ERRORS:
                break
    return out
