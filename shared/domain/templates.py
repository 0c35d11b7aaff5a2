"""Personalised text: ``Hello {{name}}, see you in {{city | your town}}!``.

A placeholder is ``{{ key }}`` or ``{{ key | default }}``. ``key`` is ``name`` or ``address``
(the contact's own) or one of its custom ``fields`` (``city``); the default is used when the
contact has no such value (or an empty one), and without a default that is the empty text.
Nothing else is understood: no expressions, no filters, no code; a value is put in as it is,
never read as a template itself. ``{{`` always opens a placeholder.

Text is checked when a broadcast is written: a placeholder left open, or one that is not a
key, is refused with where it is; a custom key no contact of the workspace has, given without
a default, is refused too (it is most likely misspelt).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db.models import Contact
from shared.domain.errors import FieldError, ValidationFailed

#: The contact's own values a placeholder may name.
BUILTIN = ("name", "address")
_KEY = re.compile(r"[a-z][a-z0-9_]{0,39}")
_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
#: Longest default a placeholder may carry.
MAX_DEFAULT = 200


@dataclass(frozen=True, slots=True)
class Placeholder:
    key: str
    default: str


@dataclass(frozen=True, slots=True)
class Template:
    """Text cut into literal parts and placeholders, in order."""

    parts: tuple[str | Placeholder, ...]

    @property
    def keys(self) -> set[str]:
        return {p.key for p in self.parts if isinstance(p, Placeholder)}

    def render(self, address: str, contact: dict[str, Any] | None) -> str:
        """The text for one recipient: ``contact`` holds its ``name`` and ``fields`` (None
        for a contact erased since: every placeholder takes its default).
        """
        contact = contact or {}
        fields = contact.get("fields") or {}
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            if part.key == "address":
                value = address if contact else ""
            elif part.key == "name":
                value = contact.get("name") or ""
            else:
                value = fields.get(part.key) or ""
            out.append(str(value) if value else part.default)
        return "".join(out)


def parse(source: str, *, field: str = "content.text") -> Template | None:
    """The template in ``source``, or None when it has no placeholder (sent as it is).
    Raises ``ValidationFailed`` on ``field`` saying where a placeholder is wrong.
    """
    if "{{" not in source:
        return None
    parts: list[str | Placeholder] = []
    at = 0
    for found in _PLACEHOLDER.finditer(source):
        literal = source[at : found.start()]
        if "{{" in literal:
            _open_at(source, at + literal.index("{{"), field)
        parts.append(literal)
        inner = found.group(1)
        key, bar, default = inner.partition("|")
        key = key.strip()
        if not _KEY.fullmatch(key):
            raise ValidationFailed.one(
                field,
                f"placeholder {found.group(0)[:60]!r} at character {found.start() + 1} names "
                f"no field: use {{{{name}}}}, {{{{address}}}} or a custom field such as "
                "{{city}}, optionally with a default: {{city | your town}}",
                "template_key",
            )
        default = default.strip() if bar else ""
        if len(default) > MAX_DEFAULT or "{{" in default or "}}" in default:
            raise ValidationFailed.one(
                field,
                f"the default of {{{{{key}}}}} at character {found.start() + 1} must be plain "
                f"text of at most {MAX_DEFAULT} characters",
                "template_default",
            )
        parts.append(Placeholder(key, default))
        at = found.end()
    rest = source[at:]
    if "{{" in rest:
        _open_at(source, at + rest.index("{{"), field)
    parts.append(rest)
    return Template(tuple(p for p in parts if p != ""))


def stored(source: str | None) -> Template | None:
    """The template of a broadcast's stored text, for sending or showing it: None when the
    text has no placeholder, or was written before placeholders were checked and is not one
    (it is sent as it is).
    """
    if not source:
        return None
    try:
        return parse(source)
    except ValidationFailed:
        return None


def _open_at(source: str, at: int, field: str) -> None:
    raise ValidationFailed.one(
        field,
        f"a placeholder opened at character {at + 1} ({source[at : at + 20]!r}) is not "
        "closed with }}",
        "template_unclosed",
    )


def check(session: Session, workspace_id: int, source: str | None, field: str) -> None:
    """Refuse text whose placeholders are malformed, or that names a custom field no contact
    of the workspace has without giving a default.
    """
    if source is None:
        return
    template = parse(source, field=field)
    if template is None:
        return
    errors: list[FieldError] = []
    bare = sorted(
        {
            p.key
            for p in template.parts
            if isinstance(p, Placeholder) and p.key not in BUILTIN and not p.default
        }
    )
    for key in bare:
        known = session.execute(
            select(Contact.id)
            .where(Contact.workspace_id == workspace_id, Contact.fields.has_key(key))
            .limit(1)
        ).first()
        if known is None:
            errors.append(
                FieldError(
                    field,
                    f"{{{{{key}}}}}: no contact has a field {key!r}; check the spelling, or "
                    f"give a default for contacts without it: {{{{{key} | ...}}}}",
                    "template_unknown_field",
                )
            )
    if errors:
        raise ValidationFailed(errors)
