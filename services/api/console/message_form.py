"""The broadcast form's fields for the conversation window: a WhatsApp template and a
Messenger or Instagram message tag, as the form shows them and as the API takes them.

The template section is kept simple: a name and language, an optional header (a text or one
of the workspace's images), body parameters one a line, and buttons (quick-reply payloads one
a line, taking the button places from 0 in order, and an optional URL button suffix at a
place of its own, after the quick replies unless given). What the API refuses in them is
refused with its words. A part of a stored template the operator did not change (its header,
body or buttons) stays exactly as stored, so one set through the API in a shape this form
cannot show (a button at a place it would not give) survives an edit of another part.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from services.api.deps import plain_id
from shared.domain.channels import CONVERSATION_WINDOW, MESSAGE_TAGS
from shared.domain.errors import ValidationFailed
from shared.domain.lifecycle import ChannelKind
from shared.domain.wa_templates import MAX_BUTTONS

#: Channel kinds as the console names them.
KIND_LABELS: dict[str, str] = {
    ChannelKind.WEBHOOK.value: "Webhook",
    ChannelKind.TELEGRAM.value: "Telegram",
    ChannelKind.WHATSAPP.value: "WhatsApp",
    ChannelKind.SMTP.value: "Email (SMTP)",
    ChannelKind.LINE.value: "LINE",
    ChannelKind.MESSENGER.value: "Messenger",
    ChannelKind.INSTAGRAM.value: "Instagram",
}

#: The template's form fields, by the part of the template each belongs to.
HEADER_FIELDS = ("tpl_header_text", "tpl_header_media")
BODY_FIELDS = ("tpl_body",)
BUTTON_FIELDS = ("tpl_quick_replies", "tpl_url_suffix", "tpl_url_index")
TEMPLATE_FIELDS = ("tpl_name", "tpl_language", *HEADER_FIELDS, *BODY_FIELDS, *BUTTON_FIELDS)
#: Every field of this module's part of the form (what a change of channel keeps).
FIELDS = (*TEMPLATE_FIELDS, "message_tag")


def kind_label(kind: str | None) -> str:
    return KIND_LABELS.get(kind or "", kind or "")


def empty_fields() -> dict[str, Any]:
    """The fields of a form with no template and no tag."""
    return {**dict.fromkeys(TEMPLATE_FIELDS, ""), "tpl_header_media": 0, "message_tag": ""}


def posted_fields(
    *,
    tpl_name: str,
    tpl_language: str,
    tpl_header_text: str,
    tpl_header_media: str,
    tpl_body: str,
    tpl_quick_replies: str,
    tpl_url_suffix: str,
    tpl_url_index: str,
    message_tag: str,
) -> dict[str, Any]:
    """The fields as posted, tidied as the form state keeps them."""
    return {
        "tpl_name": tpl_name.strip(),
        "tpl_language": tpl_language.strip(),
        "tpl_header_text": tpl_header_text.strip(),
        "tpl_header_media": plain_id(tpl_header_media) or 0,
        "tpl_body": "\n".join(lines(tpl_body)),
        "tpl_quick_replies": "\n".join(lines(tpl_quick_replies)),
        "tpl_url_suffix": tpl_url_suffix.strip(),
        "tpl_url_index": tpl_url_index.strip(),
        "message_tag": message_tag.strip(),
    }


def lines(text: str) -> list[str]:
    """The non-blank lines of a text area, each stripped: one parameter a line."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


# --- form -> template ------------------------------------------------------------------------


def _header(form: dict[str, Any]) -> list[dict[str, Any]]:
    text = _text(form.get("tpl_header_text"))
    media = form.get("tpl_header_media") or 0
    if text and media:
        raise ValidationFailed.one(
            "content.template.header",
            "give a header text or a header image, not both",
            "header_text_and_image",
        )
    if text:
        return [{"type": "header", "parameters": [{"type": "text", "text": text}]}]
    if media:
        return [{"type": "header", "parameters": [{"type": "image", "media_id": media}]}]
    return []


def _body(form: dict[str, Any]) -> list[dict[str, Any]]:
    parameters = [{"type": "text", "text": p} for p in lines(form.get("tpl_body") or "")]
    return [{"type": "body", "parameters": parameters}] if parameters else []


def _buttons(form: dict[str, Any]) -> list[dict[str, Any]]:
    replies = lines(form.get("tpl_quick_replies") or "")
    suffix = _text(form.get("tpl_url_suffix"))
    given = _text(form.get("tpl_url_index"))
    url_index: Any = None
    if suffix:
        # Blank: the place after the quick replies. Anything not a number goes to the API's
        # rules as typed (and is refused with its words).
        url_index = (
            (int(given) if given.isascii() and given.isdigit() else given)
            if given
            else len(replies)
        )
    places = [i for i in range(len(replies) + 1) if i != url_index][: len(replies)]
    buttons: list[dict[str, Any]] = [
        {
            "type": "button",
            "sub_type": "quick_reply",
            "index": place,
            "parameters": [{"type": "payload", "payload": payload}],
        }
        for place, payload in zip(places, replies, strict=True)
    ]
    if suffix:
        buttons.append(
            {
                "type": "button",
                "sub_type": "url",
                "index": url_index,
                "parameters": [{"type": "text", "text": suffix}],
            }
        )
    return sorted(buttons, key=lambda b: b["index"] if isinstance(b["index"], int) else MAX_BUTTONS)


_PARTS = (
    ("header", HEADER_FIELDS, _header),
    ("body", BODY_FIELDS, _body),
    ("button", BUTTON_FIELDS, _buttons),
)


def template_from_form(
    form: dict[str, Any], stored: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The ``content.template`` the form gives (None: its name is empty), the parts of the
    ``stored`` template whose fields were not changed kept as stored.
    """
    name = _text(form.get("tpl_name"))
    if not name:
        return None
    shown = form_from_template(stored) if stored else None
    kept = (stored or {}).get("components") or []
    components: list[dict[str, Any]] = []
    for kind, fields, build in _PARTS:
        if shown is not None and all(_same(form.get(k), shown[k]) for k in fields):
            components += [c for c in kept if c.get("type") == kind]
        else:
            components += build(form)
    return {"name": name, "language": _text(form.get("tpl_language")), "components": components}


def _same(posted: Any, shown: Any) -> bool:
    if isinstance(shown, str):
        return lines(posted if isinstance(posted, str) else "") == lines(shown)
    return bool(posted == shown)


# --- template -> form ------------------------------------------------------------------------


def form_from_template(template: dict[str, Any] | None) -> dict[str, Any]:
    """The form's template fields for a stored template (empty ones for none)."""
    fields = empty_fields()
    del fields["message_tag"]
    if not template:
        return fields
    fields["tpl_name"] = str(template.get("name") or "")
    fields["tpl_language"] = str(template.get("language") or "")
    replies: list[tuple[int, str]] = []
    for c in template.get("components") or []:
        parameters = c.get("parameters") or [{}]
        first = parameters[0]
        if c.get("type") == "header":
            if first.get("type") == "image":
                fields["tpl_header_media"] = int(first.get("media_id") or 0)
            else:
                fields["tpl_header_text"] = str(first.get("text") or "")
        elif c.get("type") == "body":
            fields["tpl_body"] = "\n".join(str(p.get("text") or "") for p in parameters)
        elif c.get("type") == "button" and c.get("sub_type") == "quick_reply":
            replies.append((int(c.get("index") or 0), str(first.get("payload") or "")))
        elif c.get("type") == "button" and not fields["tpl_url_suffix"]:
            fields["tpl_url_suffix"] = str(first.get("text") or "")
            fields["tpl_url_index"] = str(c.get("index") or 0)
    fields["tpl_quick_replies"] = "\n".join(p for _, p in sorted(replies))
    return fields


def buttons_shown_in_full(template: dict[str, Any] | None) -> bool:
    """Does the form show the template's buttons as they are (each at its place)?"""
    if not template:
        return True
    stored = [c for c in template.get("components") or [] if c.get("type") == "button"]
    try:
        return _buttons(form_from_template(template)) == sorted(stored, key=lambda b: b["index"])
    except (KeyError, TypeError):
        return False


# --- message tags ----------------------------------------------------------------------------


def tag_choices(kind: str | None) -> list[str]:
    """The message tags a channel of ``kind`` takes (none: it takes no tag)."""
    try:
        return list(MESSAGE_TAGS.get(ChannelKind(kind or ""), {}))
    except ValueError:
        return []


def _span(allowed: timedelta | None) -> str:
    if allowed is None:
        return "any time"
    days = allowed.days
    return f"those who wrote within {days} days" if days else f"within {allowed}"


def tag_help(kind: str | None) -> str:
    """One line on what a tag does for a channel of ``kind``."""
    try:
        tags = MESSAGE_TAGS.get(ChannelKind(kind or ""), {})
        window = CONVERSATION_WINDOW.get(ChannelKind(kind or ""))
    except ValueError:
        return ""
    if not tags or window is None:
        return ""
    hours = int(window.total_seconds() // 3600)
    by_span: dict[str, list[str]] = {}
    for tag, allowed in tags.items():
        by_span.setdefault(_span(allowed), []).append(tag)
    uses = "; ".join(f"{', '.join(names)}: {span}" for span, names in by_span.items())
    return (
        f"A message tag lets the message reach recipients outside the {hours}-hour window "
        f"(only for what the tag is meant for): {uses}. None: only those who wrote within "
        f"{hours} hours."
    )


def tag_meaning(kind: str | None, tag: str | None) -> str:
    """What a stored tag allows, for the broadcast's page."""
    try:
        tags = MESSAGE_TAGS.get(ChannelKind(kind or ""), {})
        window = CONVERSATION_WINDOW.get(ChannelKind(kind or ""))
    except ValueError:
        return ""
    if not tag or tag not in tags or window is None:
        return ""
    hours = int(window.total_seconds() // 3600)
    return f"reaches recipients outside the {hours}-hour window: {_span(tags[tag])}"


# --- the broadcast's page --------------------------------------------------------------------


def header_media_ids(template: dict[str, Any] | None) -> list[int]:
    """The media ids of a stored template's header image (none or one)."""
    return [
        int(p["media_id"])
        for c in (template or {}).get("components") or []
        if c.get("type") == "header"
        for p in c.get("parameters") or []
        if p.get("type") == "image" and isinstance(p.get("media_id"), int)
    ]


def template_view(template: dict[str, Any] | None, media_names: dict[int, str]) -> dict[str, Any]:
    """A stored template as the broadcast's page lists it."""
    if not template:
        return {}
    header = ""
    body: list[str] = []
    buttons: list[str] = []
    for c in template.get("components") or []:
        parameters = c.get("parameters") or []
        if c.get("type") == "header" and parameters:
            p = parameters[0]
            if p.get("type") == "image":
                media_id = int(p.get("media_id") or 0)
                named = media_names.get(media_id)
                header = f"image {named} (media {media_id})" if named else f"image {media_id}"
            else:
                header = f"text: {p.get('text')}"
        elif c.get("type") == "body":
            body = [str(p.get("text")) for p in parameters]
        elif c.get("type") == "button" and parameters:
            p = parameters[0]
            if c.get("sub_type") == "quick_reply":
                buttons.append(f"quick reply at place {c.get('index')}: payload {p.get('payload')}")
            else:
                buttons.append(f"URL at place {c.get('index')}: suffix {p.get('text')}")
    return {
        "name": template.get("name"),
        "language": template.get("language"),
        "header": header,
        "body": body,
        "buttons": buttons,
    }
