"""Deleting what a workspace owns: channels, accounts, tags, media, broadcasts, and contacts
(erasure, for data-protection requests).

Nothing is deleted from under a broadcast that may still send: each delete first looks for the
broadcasts not yet final (pending, in progress or paused) that use the row, and refuses with a
409 naming them. What a delete takes along:

* a channel: its accounts and their contacts (erased, as below), and its broadcasts (their
  recipient rows go in small steps afterwards: ``delivery_purge``);
* an account: its contacts (erased);
* a tag: its place on contacts; a media: its stored file;
* a broadcast (final only): its batches, its test sends, its recipient rows (in steps);
* a contact: the contact row, its tags and conversations. Its delivery rows stay, so every
  broadcast's counts stay true, but its address in them becomes ``(erased)`` (in their
  reasons too); its name was only ever read from the contact row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session

from shared import delivery_store
from shared.db.engine import raw_connection
from shared.db.models import Account, Broadcast, Channel, Contact, Conversation, Media, Tag
from shared.domain.audience import AudienceSpec, breakdown
from shared.domain.errors import NotFound, StateConflict
from shared.domain.lifecycle import (
    ERASED_ADDRESS,
    FINAL_BROADCAST_STATUSES,
    BroadcastStatus,
)

#: Statuses of a broadcast that may still send.
NOT_FINAL = tuple(s.value for s in BroadcastStatus if s not in FINAL_BROADCAST_STATUSES)
#: How many of the broadcasts in the way a refusal names.
NAMED = 5


def _refuse_if_used(session: Session, what: str, where: ColumnElement[bool], hint: str) -> None:
    """A 409 naming the broadcasts not yet final that ``where`` picks, if any."""
    rows = session.execute(
        select(Broadcast.id, Broadcast.status)
        .where(where, Broadcast.status.in_(NOT_FINAL))
        .order_by(Broadcast.id)
        .limit(NAMED + 1)
    ).all()
    if not rows:
        return
    named = ", ".join(f"{r.id} ({r.status})" for r in rows[:NAMED])
    more = " and more" if len(rows) > NAMED else ""
    raise StateConflict(f"{what} is used by broadcasts not yet final: {named}{more}; {hint}")


M = TypeVar("M", Account, Broadcast, Channel, Contact, Media, Tag)


def _locked(session: Session, model: type[M], row_id: int, workspace_id: int, kind: str) -> M:
    row = session.execute(
        select(model)
        .where(model.id == row_id, model.workspace_id == workspace_id)
        .with_for_update()
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(kind, row_id)
    return row


_WAIT_OR_CANCEL = "cancel them or let them finish, then delete it"


def _names(column: Any, key: str, value: int) -> ColumnElement[bool]:
    """The JSON list ``column[key]`` (``audience -> 'tag_ids'``, say) holds ``value``."""
    return column[key].contains([value])  # type: ignore[no-any-return]


def delete_channel(session: Session, workspace_id: int, channel_id: int) -> Channel:
    """Delete a channel with its accounts, contacts and final broadcasts."""
    channel = _locked(session, Channel, channel_id, workspace_id, "channel")
    _refuse_if_used(
        session, f"channel {channel_id}", Broadcast.channel_id == channel_id, _WAIT_OR_CANCEL
    )
    session.delete(channel)
    session.flush()
    return channel


def delete_account(session: Session, workspace_id: int, account_id: int) -> Account:
    """Delete an account and its contacts (erased from delivery history). Refused while a
    broadcast not yet final on its channel may reach its contacts: one whose audience names
    the account, or names no account (all of the channel's).
    """
    account = _locked(session, Account, account_id, workspace_id, "account")
    _refuse_if_used(
        session,
        f"account {account_id}",
        (Broadcast.channel_id == account.channel_id)
        & (
            (func.jsonb_array_length(Broadcast.audience["account_ids"]) == 0)
            | _names(Broadcast.audience, "account_ids", account_id)
        ),
        _WAIT_OR_CANCEL,
    )
    session.delete(account)
    session.flush()
    return account


def delete_tag(session: Session, workspace_id: int, tag_id: int) -> Tag:
    """Delete a tag (its contacts keep everything else). Refused while a broadcast not yet
    final picks its audience by it.
    """
    tag = _locked(session, Tag, tag_id, workspace_id, "tag")
    _refuse_if_used(
        session,
        f"tag {tag_id}",
        (Broadcast.workspace_id == workspace_id) & _names(Broadcast.audience, "tag_ids", tag_id),
        "change their audience, cancel them or let them finish, then delete it",
    )
    session.delete(tag)
    session.flush()
    return tag


def delete_media(session: Session, workspace_id: int, media_id: int) -> Media:
    """Delete an image's row (the caller removes its stored file once this commits). Refused
    while a broadcast not yet final carries it.
    """
    media = _locked(session, Media, media_id, workspace_id, "media")
    _refuse_if_used(
        session,
        f"media {media_id}",
        (Broadcast.workspace_id == workspace_id)
        & (
            _names(Broadcast.content, "media_ids", media_id)
            # A WhatsApp template's header image.
            | Broadcast.content["template"]["components"].contains(
                [{"parameters": [{"type": "image", "media_id": media_id}]}]
            )
        ),
        "change their content, cancel them or let them finish, then delete it",
    )
    session.delete(media)
    session.flush()
    return media


def delete_broadcast(session: Session, workspace_id: int, broadcast_id: int) -> Broadcast:
    """Delete a completed or canceled broadcast, its test sends and (in steps) its recipient
    rows. Refused while a retry of it, or a test of it, is not yet final: each reads it.
    """
    broadcast = _locked(session, Broadcast, broadcast_id, workspace_id, "broadcast")
    if broadcast.status in NOT_FINAL:
        raise StateConflict(
            f"broadcast {broadcast_id} is {broadcast.status}; only a completed or canceled "
            "broadcast can be deleted: cancel it first"
        )
    _refuse_if_used(
        session,
        f"broadcast {broadcast_id}",
        (Broadcast.retry_of_id == broadcast_id) | (Broadcast.test_of_id == broadcast_id),
        "its retries and tests read it: cancel them or let them finish, then delete it",
    )
    session.delete(broadcast)
    session.flush()
    return broadcast


@dataclass(frozen=True)
class Erased:
    """What erasing a contact did."""

    contact_id: int
    channel_id: int
    #: Its delivery rows, kept with the address erased.
    rows: int
    #: Broadcasts not yet started whose hand-picked audience named it (it was taken out).
    unlisted: list[int]


def erase_contact(session: Session, workspace_id: int, contact_id: int) -> Erased:
    """Delete a contact and erase it from delivery history (a data-protection request): its
    rows keep their outcome, the address in them becomes ``(erased)``, and so does its name
    in the names of its conversations' timed sends. Its queued rows in broadcasts being sent
    are skipped (``skipped: contact erased``); a send to it under way this moment is a 409
    (ask again in a few seconds). Broadcasts not yet started that hand-picked it lose it from
    their list; a list it was all of is canceled. Rows this cannot reach now (held by another
    transaction, or written by an audience copy under way) are erased by the scheduler's
    sweep (``delivery_store.settle_erasures``), from the note the delete leaves.
    """
    found = session.execute(
        select(Account.channel_id)
        .join(Contact, Contact.account_id == Account.id)
        .where(Contact.id == contact_id, Contact.workspace_id == workspace_id)
    ).scalar_one_or_none()
    if found is None:
        raise NotFound("contact", contact_id)
    channel_id = int(found)
    conn = raw_connection(session)
    # The store's order: the tasks sending to it, then its rows in them (then the tasks not
    # yet started that list it), then the contact.
    _hold(conn, contact_id)
    unlisted = _unlist(session, workspace_id, channel_id, contact_id)
    contact = _locked(session, Contact, contact_id, workspace_id, "contact")
    _rename_timed_sends(session, contact)
    session.delete(contact)
    session.flush()
    # Once more: an audience copy may have committed rows of it meanwhile (and a claim from
    # them started a send); from the contact's delete on, no claim takes its rows.
    _hold(conn, contact_id)
    for b in session.execute(
        select(Broadcast).where(
            Broadcast.id.in_(unlisted), Broadcast.status != BroadcastStatus.CANCELED
        )
    ).scalars():
        b.audience_size = breakdown(
            session, workspace_id, channel_id, AudienceSpec.model_validate(b.audience)
        ).everyone
    rows = delivery_store.run(conn, delivery_store.erase([contact_id]))
    return Erased(contact_id, channel_id, rows, unlisted)


def _hold(conn: psycopg.Connection[Any], contact_id: int) -> None:
    """``hold_for_erasure``, or a 409 when a send to the contact is under way."""
    sending = delivery_store.run(conn, delivery_store.hold_for_erasure(contact_id))
    if sending is not None:
        raise StateConflict(
            f"a send to contact {contact_id} is under way in broadcast {sending}; ask again "
            "in a few seconds"
        )


def _rename_timed_sends(session: Session, contact: Contact) -> None:
    """The contact's name and address out of the names of its conversations' timed sends
    ("Timed send to Ann").
    """
    ids = select(Conversation.id).where(Conversation.contact_id == contact.id)
    for said in {contact.name, contact.address} - {""}:
        session.execute(
            update(Broadcast)
            .where(
                Broadcast.conversation_id.in_(ids), Broadcast.name.contains(said, autoescape=True)
            )
            .values(name=func.replace(Broadcast.name, said, ERASED_ADDRESS))
        )


def _unlist(session: Session, workspace_id: int, channel_id: int, contact_id: int) -> list[int]:
    """Take the contact out of the lists of broadcasts not yet started (hand-picked ones and
    exclusions); a hand-picked list it was all of is canceled, with the reason.
    """
    changed: list[int] = []
    rows = (
        session.execute(
            select(Broadcast)
            .where(
                Broadcast.workspace_id == workspace_id,
                Broadcast.channel_id == channel_id,
                Broadcast.status.in_([BroadcastStatus.PENDING, BroadcastStatus.PAUSED]),
                # Its audience not fixed yet (``broadcasts.audience_fixed``): a copy in parts,
                # paused, may have begun.
                Broadcast.snapshot_at.is_(None),
                Broadcast.total_count == 0,
                _names(Broadcast.audience, "contact_ids", contact_id)
                | _names(Broadcast.audience, "exclude_contact_ids", contact_id),
            )
            .order_by(Broadcast.id)
            .with_for_update()
        )
        .scalars()
        .all()
    )
    for b in rows:
        audience = dict(b.audience)
        for key in ("contact_ids", "exclude_contact_ids"):
            audience[key] = [c for c in audience.get(key) or [] if c != contact_id]
        if audience.get("selection") == "manual" and not audience["contact_ids"]:
            # Its list stays as it was (a hand-picked audience is never empty); the id names
            # no one any more.
            b.status = BroadcastStatus.CANCELED.value
            b.status_reason = f"every contact it was to go to was erased (last: {contact_id})"
            b.finished_at = func.now()
        else:
            b.audience = audience
        b.updated_at = func.now()
        changed.append(b.id)
    return changed
