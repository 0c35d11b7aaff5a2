"""What a run needs to know about the broadcast it sends: channel, rate, message, adapter."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from psycopg.rows import dict_row

from services.dispatcher.channels import make_adapter
from services.dispatcher.channels.base import ChannelAdapter, MediaRef, OutboundMessage
from services.dispatcher.conversation import Rule, rule_for
from shared import delivery_store as store
from shared.domain import templates
from shared.domain.channels import open_config
from shared.domain.lifecycle import BroadcastStatus, ChannelKind
from shared.domain.media import signed_media_url
from shared.domain.templates import Template
from shared.secrets_box import SETTING, SecretKeyError

if TYPE_CHECKING:
    from services.dispatcher.runtime import Runtime


class ChannelUnusable(Exception):
    """The broadcast's channel cannot be used as configured: no send can succeed until an
    operator fixes it. The message names what is wrong, never a configured value.
    """

    def __init__(self, channel_id: int, kind: str, exc: Exception) -> None:
        if isinstance(exc, SecretKeyError):
            super().__init__(
                f"channel {channel_id} ({kind}) cannot be used: a stored secret cannot be "
                f"decrypted with this dispatcher's {SETTING}; give every dispatcher the key it "
                "was encrypted with, then resume the broadcast"
            )
            return
        what = type(exc).__name__
        if isinstance(exc, KeyError) and exc.args:
            what = f"its config has no {str(exc.args[0])!r}"
        super().__init__(
            f"channel {channel_id} ({kind}) cannot be used as configured: {what}; fix the "
            "channel, then resume the broadcast"
        )


@dataclass(frozen=True)
class Job:
    """Everything about one broadcast a run needs, loaded once per run."""

    broadcast_id: int
    workspace_id: int
    channel_id: int
    kind: str
    rate: float
    message: OutboundMessage
    adapter: ChannelAdapter
    #: The broadcast's sending window, if it has one.
    window: store.Window | None = None
    #: Its text when personalised (``{{name}}``): rendered for each recipient.
    template: Template | None = None
    #: What may go to each recipient, where the provider has a conversation window.
    conversation: Rule | None = None

    @property
    def personal(self) -> bool:
        """Each recipient's message needs its contact's name and fields."""
        return self.template is not None or (
            self.conversation is not None and self.conversation.needs_contact
        )

    @property
    def multicast(self) -> int:
        """Recipients one provider call may carry (1: one call per recipient). A personalised
        message goes to each recipient alone.
        """
        most = getattr(self.adapter, "max_recipients", 1)
        return 1 if self.personal or self.conversation is not None else most

    @property
    def keyed(self) -> bool:
        """The provider takes a retry key per call, stored on the rows before the call."""
        return bool(getattr(self.adapter, "keyed", False))


async def load_job(rt: Runtime, broadcast_id: int) -> Job | None:
    """The broadcast, its channel and its message; None when it is not being sent. Media URLs
    are signed afresh for each run, so a long broadcast never hands out an expired one.
    The channel's secrets and the signing key are decrypted here, and only here.
    Raises ``ChannelUnusable`` when the channel's adapter cannot be made from its config or
    its secrets cannot be decrypted.
    """
    async with rt.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            """
            SELECT b.id, b.workspace_id, b.status, b.content, b.name, c.id AS channel_id, c.kind,
                   c.config, c.rate_limit_per_second, w.signing_key,
                   b.window_start, b.window_end, b.window_zone
            FROM broadcast b
            JOIN channel c ON c.id = b.channel_id
            JOIN workspace w ON w.id = b.workspace_id
            WHERE b.id = %s
            """,
            (broadcast_id,),
        )
        row = await cur.fetchone()
        if row is None or row["status"] != BroadcastStatus.IN_PROGRESS:
            return None
        media_ids = [int(m) for m in row["content"].get("media_ids") or []]
        header_ids = _template_media(row["content"].get("template"))
        media_rows = []
        if media_ids or header_ids:
            await cur.execute(
                "SELECT id, content_type, storage_key FROM media "
                "WHERE id = ANY(%s) AND workspace_id = %s",
                (media_ids + header_ids, row["workspace_id"]),
            )
            media_rows = await cur.fetchall()
    try:
        config = open_config(ChannelKind(row["kind"]), row["config"], rt.secrets)
        signing_key = rt.secrets.open(row["signing_key"]) if media_rows else ""
    except SecretKeyError as exc:
        raise ChannelUnusable(row["channel_id"], row["kind"], exc) from None
    by_id = {m["id"]: m for m in media_rows}
    base = rt.settings.public_base_url()
    now = time.time()
    media = tuple(
        MediaRef(
            media_id=mid,
            url=signed_media_url(base, signing_key, mid, now=now),
            content_type=by_id[mid]["content_type"],
            storage_key=by_id[mid]["storage_key"],
        )
        for mid in media_ids
        if mid in by_id
    )
    header_urls = {
        mid: signed_media_url(base, signing_key, mid, now=now) for mid in header_ids if mid in by_id
    }
    conversation = rule_for(ChannelKind(row["kind"]), row["content"], header_urls)
    message = OutboundMessage(
        broadcast_id=broadcast_id, text=row["content"].get("text"), media=media, subject=row["name"]
    )
    try:
        adapter = rt.adapter(row["channel_id"], row["kind"], config, make_adapter)
    except Exception as exc:
        raise ChannelUnusable(row["channel_id"], row["kind"], exc) from exc
    return Job(
        broadcast_id=broadcast_id,
        workspace_id=row["workspace_id"],
        channel_id=row["channel_id"],
        kind=row["kind"],
        rate=float(row["rate_limit_per_second"]),
        message=message,
        adapter=adapter,
        window=store.Window(row["window_start"], row["window_end"], row["window_zone"])
        if row["window_start"] is not None
        else None,
        template=templates.stored(message.text),
        conversation=conversation,
    )


def _template_media(template: object) -> list[int]:
    """The media ids of a stored WhatsApp template's header images."""
    if not isinstance(template, dict):
        return []
    return [
        int(p["media_id"])
        for c in template.get("components") or []
        for p in c.get("parameters") or []
        if p.get("type") == "image" and isinstance(p.get("media_id"), int)
    ]
