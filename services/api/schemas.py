"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)
from pydantic.json_schema import SkipJsonSchema

from shared.domain.audience import AudienceSpec
from shared.domain.broadcasts import AutoPause, Content
from shared.domain.channels import MAX_RATE_PER_SECOND
from shared.domain.contacts import FieldChanges, TagName
from shared.domain.lifecycle import BroadcastStatus, ChannelKind, DeliveryStatus, Origin
from shared.domain.types import Id, IsoDatetime, Text, check_one_line, one_line_schema
from shared.domain.zones import SendAt, SendingWindow, Zone

Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
    AfterValidator(check_one_line),
    one_line_schema(),
]
T = TypeVar("T")


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class Page(BaseModel, Generic[T]):
    """One page of a list; pass ``next_cursor`` back as ``cursor`` for the next (null: the end)."""

    items: list[T]
    next_cursor: str | None


# --- channels, accounts, tags ------------------------------------------------------------


class ChannelCreate(_In):
    name: Name
    kind: ChannelKind
    config: dict[str, Any] = Field(
        description="Per kind: webhook {url, secret}; telegram {bot_token, api_base_url}; "
        "whatsapp {access_token, phone_number_id, api_version, api_base_url}; "
        "smtp {host, port, username, password, starttls, from_address}."
    )
    rate_limit_per_second: float | None = Field(
        default=None,
        gt=0,
        le=MAX_RATE_PER_SECOND,
        description="Sends per second across all dispatchers, at most 100,000; default: the "
        "provider's own limit.",
    )
    auto_pause: AutoPause | None = Field(
        default=None,
        description="Its broadcasts' default auto-pause, e.g. "
        '{"failure_ratio": 0.5, "last": 100}: a broadcast pauses itself when at least that '
        "share of its last sends failed. null: off.",
    )


class ChannelPatch(_In):
    name: Name | None = None
    config: dict[str, Any] | None = Field(
        default=None,
        description="Keys to change (rotate a bot token or secret, fix a URL); keys left out "
        "keep their value, and a value sent back as shown (******** for a secret) keeps the "
        "stored one.",
    )
    rate_limit_per_second: float | None = Field(default=None, gt=0, le=MAX_RATE_PER_SECOND)
    auto_pause: AutoPause | None = Field(
        default=None, description="Its broadcasts' default auto-pause; null turns it off."
    )


class NamePatch(_In):
    name: Name


class ChannelOut(BaseModel):
    id: int
    name: str
    kind: ChannelKind
    config: dict[str, Any] = Field(description="Secret values are shown as ********.")
    rate_limit_per_second: float
    auto_pause: AutoPause | None = None
    created_at: datetime


class AccountCreate(_In):
    channel_id: Id
    name: Name


class AccountOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    channel_id: int
    name: str
    created_at: datetime


class TagCreate(_In):
    name: TagName


class TagPatch(_In):
    name: TagName


class TagOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    created_at: datetime


# --- contacts -------------------------------------------------------------------------------


class ContactOut(BaseModel):
    id: int
    account_id: int
    address: str
    name: str
    tags: list[str]
    opted_out: bool
    unreachable: bool
    unreachable_reason: str | None
    time_zone: str | None = None
    fields: dict[str, str] = Field(default_factory=dict)
    last_inbound_at: datetime | None = Field(
        default=None, description="When it last wrote in: its conversation window's start."
    )
    created_at: datetime


class ContactPatch(_In):
    name: (
        Annotated[
            str,
            StringConstraints(strip_whitespace=True, max_length=200),
            AfterValidator(check_one_line),
            one_line_schema(),
        ]
        | None
    ) = None
    tags: list[TagName] | None = Field(
        default=None, max_length=50, description="Replaces the contact's tags."
    )
    opted_out: bool | None = None
    unreachable: Literal[False] | None = Field(
        default=None,
        description="false clears an unreachable mark (e.g. the user unblocked the bot).",
    )
    time_zone: Zone | None = Field(default=None, description="IANA zone; null clears it.")
    fields: FieldChanges | None = Field(
        default=None,
        description="Custom fields to set; a key given null is removed, keys not given stay.",
    )
    last_inbound_at: IsoDatetime | None = Field(
        default=None,
        description="When it last wrote in (an earlier time than the one known is ignored).",
    )


class InboundIn(_In):
    at: IsoDatetime | None = Field(
        default=None, description="When the contact wrote (with offset); default: now."
    )


class ErasureOut(BaseModel):
    contact_id: int
    erased_deliveries: int = Field(
        description="Its rows in delivery history: kept with their outcome (the counts stay "
        "true), the address in them replaced by (erased)."
    )
    unlisted_from: list[int] = Field(
        description="Broadcasts not yet started that hand-picked or excluded it: it was taken "
        "out of their lists (one it was the whole list of is canceled)."
    )


class ImportOut(BaseModel):
    received: int
    created: int
    updated: int


class AudiencePreviewIn(AudienceSpec):
    channel_id: Id
    text: Text | None = Field(
        default=None,
        max_length=4096,
        description="Message text with placeholders ({{name}}, {{city | there}}): each "
        "contact on the page comes with it rendered for them.",
    )
    limit: int = Field(default=50, ge=1, le=500, description="Contacts on this page.")
    cursor: str | None = Field(
        default=None, max_length=40, description="next_cursor of the page before."
    )


class PreviewContact(ContactOut):
    text: str | None = Field(
        default=None, description="The message text as this contact would get it."
    )


class ReasonCount(BaseModel):
    reason: str
    contacts: int


class AudiencePreviewOut(BaseModel):
    count: int = Field(description="Contacts the broadcast would be sent to, exactly.")
    opted_out: int = Field(
        description="Matching contacts who opted out: each is recorded as skipped, with the "
        "reason, when it starts."
    )
    unreachable: int = Field(
        description="Matching contacts a provider called unreachable (and not opted out): "
        "recorded as skipped likewise."
    )
    total: int = Field(
        description="Every matching contact: count + opted_out + unreachable; the "
        "broadcast's audience_size and, once it starts, its counts.total."
    )
    inside_window: int | None = Field(
        default=None,
        description="On a channel whose provider takes free-form messages only within a "
        "window after the contact last wrote in (WhatsApp: 24 hours): how many of count are "
        "inside it now. null on other channels.",
    )
    unreachable_reasons: list[ReasonCount] = Field(
        description="Why the unreachable ones are, most common first (at most 10)."
    )
    contacts: list[PreviewContact] = Field(
        description="A page of the contacts it would be sent to."
    )
    next_cursor: str | None = Field(description="Pass back as cursor for the next page.")


# --- broadcasts -----------------------------------------------------------------------------

SEND_AT = (
    "null sends immediately; otherwise at least 5 minutes ahead, as an ISO-8601 time with "
    'offset (2026-12-01T09:00:00+01:00) or as {"local": "2026-12-01T09:00", "zone": '
    '"Europe/Berlin"} (a time the clocks skip is refused; one they repeat needs "fold": 0 or 1).'
)
AUTO_PAUSE = (
    'Pause by itself when too many of the last sends failed: {"failure_ratio": 0.5, '
    '"last": 100}; {"failure_ratio": null} turns it off; null or left out: the channel\'s.'
)
WINDOW = (
    "Hours of each recipient's local day it may be sent in, e.g. "
    '{"start": "09:00", "end": "20:00"}: the contact\'s time_zone, else the window\'s zone '
    "(default: send_at's zone, or UTC). Recipients outside it wait until it opens."
)


def _one_channel(value: Any) -> Any:
    if isinstance(value, list):
        raise ValueError(
            f"a broadcast goes out on exactly one channel; got a list of {len(value)}: "
            "give one channel id"
        )
    return value


class BroadcastCreate(_In):
    name: Name
    channel_id: Id
    audience: AudienceSpec
    content: Content
    send_at: SendAt | None = Field(default=None, description=SEND_AT)
    sending_window: SendingWindow | None = Field(default=None, description=WINDOW)
    auto_pause: AutoPause | None = Field(default=None, description=AUTO_PAUSE)
    channel_ids: SkipJsonSchema[list[int] | None] = Field(default=None, exclude=True)

    _single_channel = field_validator("channel_id", mode="before")(_one_channel)

    @field_validator("channel_ids")
    @classmethod
    def _no_channel_list(cls, value: list[int] | None) -> None:
        raise ValueError(
            "a broadcast goes out on exactly one channel: give channel_id, not channel_ids"
        )


class ResumeIn(_In):
    confirm_late_start: bool = Field(
        default=False,
        description="Needed to resume a broadcast the scheduler paused for being found too "
        "late: it goes out now, that late.",
    )


class RetryFailedIn(_In):
    name: Name | None = Field(
        default=None, description='Default: the original\'s name and " (retry of failed)".'
    )
    send_at: SendAt | None = Field(default=None, description=SEND_AT)


class CloneIn(_In):
    """What the copy changes; every field is optional (the original's is kept)."""

    name: Name | None = Field(default=None, description='Default: the original\'s and " (copy)".')
    channel_id: Id | None = None
    audience: AudienceSpec | None = None
    content: Content | None = None
    send_at: SendAt | None = Field(default=None, description=SEND_AT)
    sending_window: SendingWindow | None = Field(
        default=None, description="Default: the original's; null in the body removes it."
    )
    auto_pause: AutoPause | None = Field(
        default=None, description="Default: the original's; null: its channel's."
    )

    _single_channel = field_validator("channel_id", mode="before")(_one_channel)


class TestSendIn(_In):
    contact_ids: list[Id] = Field(
        min_length=1,
        max_length=10,
        description="1 to 10 contacts of the broadcast's channel, neither opted out nor "
        "unreachable.",
    )


class BroadcastPatch(_In):
    name: Name | None = None
    channel_id: Id | None = None
    audience: AudienceSpec | None = None
    content: Content | None = None
    send_at: SendAt | None = Field(
        default=None,
        description="null means immediately (once the broadcast is pending). "
        + SEND_AT.split(";", 1)[1].strip(),
    )
    sending_window: SendingWindow | None = Field(
        default=None, description=WINDOW + " null removes it."
    )
    auto_pause: AutoPause | None = Field(default=None, description=AUTO_PAUSE)

    _single_channel = field_validator("channel_id", mode="before")(_one_channel)


class Counts(BaseModel):
    total: int = Field(
        description="Recipients snapshotted when sending started (a large audience is copied "
        "in parts, its first batches sent meanwhile: until the last part, the recipients "
        "copied so far)."
    )
    queued: int = Field(description="Not yet final: waiting, being sent, or to be retried.")
    sent: int
    failed: int
    canceled: int
    skipped: int
    partial: int = Field(
        description="Several-part messages cut short after some parts were accepted: the "
        "recipient got part of the message."
    )


class WindowOut(BaseModel):
    start: str = Field(description="HH:MM")
    end: str = Field(description="HH:MM")
    zone: str = Field(description="For recipients whose contact has no time_zone.")
    waiting: int | None = Field(
        default=None,
        description="Recipients waiting now for their window to open (null in lists, and "
        "before the broadcast starts).",
    )
    until: datetime | None = Field(
        default=None, description="When the first of those waiting may go."
    )


class BroadcastOut(BaseModel):
    id: int
    name: str
    channel_id: int
    origin: Origin
    conversation_id: int | None
    audience: AudienceSpec
    content: Content
    send_at: datetime = Field(description="The moment it is due, in UTC.")
    send_at_local: str | None = Field(
        default=None,
        description="The wall-clock time send_at was given as (null: given as a moment).",
    )
    send_at_zone: str | None = Field(default=None, description="Its IANA zone.")
    sending_window: WindowOut | None = None
    auto_pause: AutoPause | None = Field(
        default=None, description="As given for this broadcast; null: its channel's."
    )
    inside_window: int | None = Field(
        default=None,
        description="On a WhatsApp channel (free-form messages only within 24 hours of the "
        "contact's last message): how many of its recipients still to send to are inside "
        "that window now. Only in a broadcast's own answer; null elsewhere.",
    )
    auto_paused_at: datetime | None = Field(
        default=None,
        description="When it paused itself for its failures (status_reason says why); null "
        "once resumed.",
    )
    status: BroadcastStatus
    status_reason: str | None
    audience_size: int = Field(description="Contacts the audience matched when last written.")
    counts: Counts
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    retry_of: int | None = Field(
        default=None,
        description="The broadcast whose failed recipients this one retries "
        "(POST /v1/broadcasts/{id}/retry-failed).",
    )
    retries: list[int] = Field(
        default_factory=list, description="The broadcasts made to retry its failed recipients."
    )
    test_of: int | None = Field(
        default=None,
        description="For a test send (origin test): the broadcast whose content it tries out "
        "(POST /v1/broadcasts/{id}/test-send).",
    )
    recipients_removed_at: datetime | None = Field(
        description="When retention removed its per-recipient rows "
        "(BCAST_DELIVERY_RETENTION_DAYS): the counts stay, the recipient list is empty from "
        "then on. Null while they are kept."
    )


class AudienceSummary(BaseModel):
    """An audience as a list shows it: its filter, how many contacts it lists, in words."""

    account_ids: list[int]
    tag_ids: list[int]
    tag_match: Literal["any", "all"]
    selection: Literal["all", "manual"]
    failed_in: int | None
    contact_count: int = Field(description="Hand-picked contacts (selection manual).")
    excluded_count: int = Field(description="Contacts left out (selection all).")
    description: str = Field(description="The audience in a few words.")


class BroadcastListItem(BroadcastOut):
    """A broadcast in a list: its audience summed up (``GET /v1/broadcasts/{id}`` has all of
    it, every listed contact id included).
    """

    audience: AudienceSummary  # type: ignore[assignment]


class RecipientOut(BaseModel):
    delivery_id: int
    contact_id: int
    name: str
    address: str
    status: DeliveryStatus
    attempts: int
    last_error: str | None
    provider_message_id: str | None
    sent_at: datetime | None
    updated_at: datetime


class RecipientPage(Page[RecipientOut]):
    """One page of a broadcast's recipients."""

    recipients_removed_at: datetime | None = Field(
        default=None,
        description="Set when retention removed the broadcast's recipient rows: the list is "
        "empty, and the broadcast's counts still say how many were reached.",
    )
    message: str | None = Field(
        default=None, description="Why the list is empty when that is not for want of matches."
    )


# --- conversations, media -------------------------------------------------------------------


class ConversationCreate(_In):
    account_id: Id
    contact_id: Id


class ConversationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    account_id: int
    contact_id: int
    created_at: datetime


class TimedSendCreate(_In):
    name: Name | None = Field(
        default=None, description='Default: "Timed send to" and the contact\'s name.'
    )
    content: Content
    send_at: SendAt | None = Field(default=None, description=SEND_AT)


class MediaOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    content_type: str
    size_bytes: int
    width: int
    height: int
    sha256: str
    filename: str
    created_at: datetime


# --- tokens ---------------------------------------------------------------------------------


class TokenIn(_In):
    name: Name = Field(description="A label to tell tokens apart (who or what uses it).")
    expires_at: IsoDatetime | None = Field(
        default=None,
        description="ISO-8601 with offset, in the future; null: until revoked.",
    )


class TokenPatch(_In):
    name: Name | None = None
    expires_at: IsoDatetime | None = Field(
        default=None, description="A new expiry (in the future), or null: until revoked."
    )


class TokenOut(BaseModel):
    """What may be shown about a token: never the token itself or its digest."""

    id: int
    name: str
    prefix: str = Field(description="Its first characters, to tell tokens apart.")
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None
    current: bool = Field(description="The token this request was made with.")


class NewTokenOut(TokenOut):
    token: str = Field(description="The token: shown this once, stored only as a digest.")
