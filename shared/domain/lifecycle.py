"""The five task statuses and the moves between them (see the architecture page)."""

from __future__ import annotations

from enum import StrEnum


class BroadcastStatus(StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    PAUSED = "paused"
    CANCELED = "canceled"
    COMPLETED = "completed"


class DeliveryStatus(StrEnum):
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    CANCELED = "canceled"
    #: Never attempted because the contact is known to be unreachable or opted out.
    SKIPPED = "skipped"
    #: A several-part message cut short after the provider accepted some of its parts: the
    #: recipient got something, so this is neither sent nor failed.
    PARTIAL = "partial"


class BatchState(StrEnum):
    """Where a batch (a range of one broadcast's deliveries, sent as one unit) stands."""

    #: Waiting for its ``due_at``; the scheduler hands it out when it is due.
    READY = "ready"
    #: A message pointing at it is on its way to a dispatcher.
    QUEUED = "queued"
    #: A dispatcher is sending it, under a lease it keeps renewing.
    RUNNING = "running"
    #: None of its deliveries is left to send.
    DONE = "done"


class Origin(StrEnum):
    BROADCAST = "broadcast"
    CONVERSATION = "conversation"
    #: A broadcast's content sent to a few chosen contacts (``POST .../test-send``).
    TEST = "test"


class ChannelKind(StrEnum):
    WEBHOOK = "webhook"
    TELEGRAM = "telegram"
    WHATSAPP = "whatsapp"
    SMTP = "smtp"
    LINE = "line"
    MESSENGER = "messenger"
    INSTAGRAM = "instagram"


#: Kinds whose provider sends one message to many recipients in one call, and how many.
MULTICAST_RECIPIENTS: dict[ChannelKind, int] = {ChannelKind.LINE: 500}

BROADCAST_STATUSES: tuple[str, ...] = tuple(s.value for s in BroadcastStatus)
DELIVERY_STATUSES: tuple[str, ...] = tuple(s.value for s in DeliveryStatus)
BROADCAST_ORIGINS: tuple[str, ...] = tuple(o.value for o in Origin)
CHANNEL_KINDS: tuple[str, ...] = tuple(k.value for k in ChannelKind)
BATCH_STATES: tuple[str, ...] = tuple(s.value for s in BatchState)

FINAL_BROADCAST_STATUSES = frozenset({BroadcastStatus.CANCELED, BroadcastStatus.COMPLETED})
FINAL_DELIVERY_STATUSES = frozenset(
    {
        DeliveryStatus.SENT,
        DeliveryStatus.FAILED,
        DeliveryStatus.CANCELED,
        DeliveryStatus.SKIPPED,
        DeliveryStatus.PARTIAL,
    }
)
#: Rows in these statuses (the recipients not reached) always carry their reason in
#: ``last_error`` (a CHECK of ``delivery``), so ``ix_delivery_not_reached`` finds them without
#: reading the others.
REASONED_DELIVERY_STATUSES = frozenset(
    {
        DeliveryStatus.FAILED,
        DeliveryStatus.PARTIAL,
        DeliveryStatus.SKIPPED,
        DeliveryStatus.CANCELED,
    }
)
#: The reason a recipient not reached carries when its send's outcome gave none.
NO_REASON = "(no reason given)"
#: The reason of a recipient whose broadcast was canceled before it was sent to (followed by
#: its last attempt's error, if it had one).
CANCELED_REASON = "canceled before it was sent"
#: The reason of a recipient whose broadcast was canceled while a send to it was under way in
#: a run that was lost (a dispatcher that died or stalled): the provider may have it.
CANCELED_UNSURE_REASON = "canceled; a send to it was under way when its run was lost"

#: The reason of a recipient skipped because its contact opted out (by the snapshot, or
#: before its send).
OPTED_OUT_REASON = "skipped: contact opted out"
#: How the reason of a recipient skipped because a provider called its contact unreachable
#: begins (the provider's reason follows).
UNREACHABLE_REASON = "skipped: contact unreachable: "
#: The reason of a recipient whose contact was erased (deleted) before it was sent to.
ERASED_REASON = "skipped: contact erased"
#: What an erased contact's address reads as in delivery history.
ERASED_ADDRESS = "(erased)"

#: How the reason of a task the scheduler paused for being found too late begins: resuming
#: it asks for the operator's explicit word (it would go out that late).
OVERDUE_REASON_PREFIX = "overdue: "

#: Operator actions and the statuses each may start from.
ACTION_ALLOWED_FROM: dict[str, frozenset[BroadcastStatus]] = {
    "pause": frozenset({BroadcastStatus.PENDING, BroadcastStatus.IN_PROGRESS}),
    "resume": frozenset({BroadcastStatus.PAUSED}),
    "cancel": frozenset(
        {BroadcastStatus.PENDING, BroadcastStatus.IN_PROGRESS, BroadcastStatus.PAUSED}
    ),
    "modify": frozenset({BroadcastStatus.PENDING, BroadcastStatus.PAUSED}),
}


def allowed_phrase(action: str) -> str:
    """``'pending or in_progress'``: the statuses from which ``action`` is allowed, in words."""
    names = sorted(s.value for s in ACTION_ALLOWED_FROM[action])
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
