"""What may go to one recipient on a provider with a conversation window, decided at the send.

WhatsApp, Messenger and Instagram take free-form messages (text, images) only within 24 hours
of the contact's last message to the business. Past it, WhatsApp takes an approved template,
and Messenger and Instagram a message with a tag (HUMAN_AGENT: within 7 days). A broadcast's
audience was checked against the window when it was written, but time passes: the window is
judged again for each recipient when its message goes, from ``contact.last_inbound_at``.
A recipient nothing may go to fails with the reason, without a provider call (the provider
would refuse it: WhatsApp 131047, Graph 10/2018278) and without a retry.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from services.dispatcher.channels.base import OutboundMessage, Permanent
from shared.domain.channels import CONVERSATION_WINDOW, MESSAGE_TAGS
from shared.domain.lifecycle import ChannelKind
from shared.domain.wa_templates import NotRenderable, cloud_api_object


@dataclass(frozen=True)
class Rule:
    """A broadcast's content as the conversation window sorts it."""

    kind: ChannelKind
    window: timedelta
    #: The broadcast has text or images (not only a template).
    free_form: bool
    #: WhatsApp: the broadcast's template as stored (``content.template``), or None.
    template: dict[str, Any] | None = None
    #: Signed links of the template's header images, by media id.
    template_media: dict[int, str] | None = None
    #: Messenger and Instagram: the tag for recipients outside the window, or None.
    tag: str | None = None

    @property
    def needs_contact(self) -> bool:
        """The template's parameters are personalised: the contact's name and fields are
        needed to render them.
        """
        return self.template is not None and "{{" in str(self.template)


def rule_for(kind: ChannelKind, content: dict[str, Any], media_urls: dict[int, str]) -> Rule | None:
    """The window rule of a broadcast on ``kind``, or None when its provider has no window."""
    window = CONVERSATION_WINDOW.get(kind)
    if window is None:
        return None
    return Rule(
        kind=kind,
        window=window,
        free_form=bool(content.get("text") or content.get("media_ids")),
        template=content.get("template") if kind is ChannelKind.WHATSAPP else None,
        template_media=media_urls,
        tag=content.get("message_tag") if kind is not ChannelKind.WHATSAPP else None,
    )


def last_inbound(contact: dict[str, Any] | None) -> datetime | None:
    value = (contact or {}).get("last_inbound_at")
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def message_for(
    rule: Rule,
    message: OutboundMessage,
    address: str,
    contact: dict[str, Any] | None,
    now: datetime,
) -> OutboundMessage | Permanent:
    """The message for one recipient (free-form, template, or tagged), or why none may go."""
    last = last_inbound(contact)
    inside = last is not None and last > now - rule.window
    if rule.template is not None and not (inside and rule.free_form):
        try:
            template = cloud_api_object(rule.template, address, contact, rule.template_media or {})
        except NotRenderable as exc:
            return Permanent(str(exc))
        except KeyError:
            return Permanent("the template's header image is gone (deleted since)")
        return replace(message, text=None, media=(), template=template)
    if inside:
        return message
    if rule.tag is not None:
        allowed_for = MESSAGE_TAGS.get(rule.kind, {}).get(rule.tag)
        if allowed_for is None or (last is not None and last > now - allowed_for):
            return replace(message, tag=rule.tag)
    hours = int(rule.window.total_seconds() // 3600)
    when = f"last wrote in at {last:%Y-%m-%d %H:%M} UTC" if last else "has never written in"
    remedy = (
        "a template message"
        if rule.kind is ChannelKind.WHATSAPP
        else f"a message tag{f' other than {rule.tag}' if rule.tag else ''}"
    )
    return Permanent(
        f"outside the {hours}-hour conversation window: the contact {when}; "
        f"{rule.kind.value} takes free-form messages only within it (only {remedy} may go)"
    )
