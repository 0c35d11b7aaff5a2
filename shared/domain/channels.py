"""Channel kinds: their config, which config keys are secret, and what an address looks like.

A channel's config is stored with its secret values sealed (``seal_config``) and opened only
where a provider is called (``open_config``); the API shows them redacted.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from shared.domain.errors import ValidationFailed
from shared.domain.lifecycle import ChannelKind
from shared.egress import Egress, EgressRefused, parse_literal
from shared.secrets_box import SEALED_PREFIX, SecretsBox
from shared.settings import get_settings

#: What the API shows in place of a secret config value.
REDACTED = "********"


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class WebhookConfig(_Config):
    url: AnyHttpUrl
    secret: str = Field(min_length=16, description="HMAC-SHA256 key that signs every request body")


class TelegramConfig(_Config):
    bot_token: str = Field(min_length=1, pattern=r"^\d+:[A-Za-z0-9_-]+$")
    api_base_url: AnyHttpUrl = AnyHttpUrl("https://api.telegram.org")


def _visible_ascii(value: str) -> str:
    if not _VISIBLE_ASCII.fullmatch(value):
        raise ValueError(
            "must be visible ASCII characters only (no spaces, line breaks or other "
            "characters an HTTP header cannot carry)"
        )
    return value


def _printable_ascii(value: str | None) -> str | None:
    if value is not None and not _PRINTABLE_ASCII.fullmatch(value):
        raise ValueError(
            "must be printable ASCII (no line breaks or other characters an SMTP login "
            "cannot carry)"
        )
    return value


def _host(value: str) -> str:
    if parse_literal(value) is None and not _HOSTNAME.fullmatch(value):
        raise ValueError("must be a host name such as smtp.example.com, or an IP address")
    return value


_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")
_HOSTNAME = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


class WhatsappConfig(_Config):
    access_token: str = Field(min_length=1, max_length=4096)

    _token = field_validator("access_token")(_visible_ascii)
    phone_number_id: str = Field(min_length=1, pattern=r"^\d+$")
    api_version: str = Field(default="v21.0", pattern=r"^v\d+\.\d+$")
    api_base_url: AnyHttpUrl = AnyHttpUrl("https://graph.facebook.com")


class LineConfig(_Config):
    channel_access_token: str = Field(min_length=1, max_length=4096)
    api_base_url: AnyHttpUrl = AnyHttpUrl("https://api.line.me")

    _token = field_validator("channel_access_token")(_visible_ascii)


class MessengerConfig(_Config):
    page_access_token: str = Field(min_length=1, max_length=4096)
    api_version: str = Field(default="v21.0", pattern=r"^v\d+\.\d+$")
    api_base_url: AnyHttpUrl = AnyHttpUrl("https://graph.facebook.com")

    _token = field_validator("page_access_token")(_visible_ascii)


class InstagramConfig(MessengerConfig):
    ig_user_id: str = Field(min_length=1, max_length=32, pattern=r"^\d+$")


class SmtpConfig(_Config):
    host: str = Field(min_length=1, max_length=255)
    port: int = Field(default=587, ge=1, le=65535)
    username: str | None = Field(default=None, max_length=255)
    password: str | None = Field(default=None, max_length=255)
    starttls: bool = True
    from_address: str = Field(min_length=3, max_length=320)

    _login = field_validator("username", "password")(_printable_ascii)
    _server = field_validator("host")(_host)

    @field_validator("from_address")
    @classmethod
    def _email(cls, value: str) -> str:
        if not EMAIL.fullmatch(value) or not value.isascii():
            raise ValueError("must be an ASCII email address such as news@example.com")
        return value


CONFIG_MODELS: dict[ChannelKind, type[_Config]] = {
    ChannelKind.WEBHOOK: WebhookConfig,
    ChannelKind.TELEGRAM: TelegramConfig,
    ChannelKind.WHATSAPP: WhatsappConfig,
    ChannelKind.SMTP: SmtpConfig,
    ChannelKind.LINE: LineConfig,
    ChannelKind.MESSENGER: MessengerConfig,
    ChannelKind.INSTAGRAM: InstagramConfig,
}

#: Config keys never shown back to anyone, per kind.
SECRET_KEYS: dict[ChannelKind, frozenset[str]] = {
    ChannelKind.WEBHOOK: frozenset({"secret"}),
    ChannelKind.TELEGRAM: frozenset({"bot_token"}),
    ChannelKind.WHATSAPP: frozenset({"access_token"}),
    ChannelKind.SMTP: frozenset({"password"}),
    ChannelKind.LINE: frozenset({"channel_access_token"}),
    ChannelKind.MESSENGER: frozenset({"page_access_token"}),
    ChannelKind.INSTAGRAM: frozenset({"page_access_token"}),
}

#: Config keys that name where a channel connects: a URL, or (SMTP) a host.
TARGET_KEYS: dict[ChannelKind, str] = {
    ChannelKind.WEBHOOK: "url",
    ChannelKind.TELEGRAM: "api_base_url",
    ChannelKind.WHATSAPP: "api_base_url",
    ChannelKind.SMTP: "host",
    ChannelKind.LINE: "api_base_url",
    ChannelKind.MESSENGER: "api_base_url",
    ChannelKind.INSTAGRAM: "api_base_url",
}

#: The highest ``rate_limit_per_second`` a channel takes: a webhook to the customer's own
#: service may take far more than any messaging provider, and slots that close together
#: (10 µs) are still held exactly by the shared GCRA row.
MAX_RATE_PER_SECOND = 100_000

#: The provider's own limit, used when a channel is created without one.
DEFAULT_RATE_LIMIT_PER_SECOND: dict[ChannelKind, float] = {
    ChannelKind.WEBHOOK: 100.0,
    ChannelKind.TELEGRAM: 30.0,
    ChannelKind.WHATSAPP: 80.0,
    ChannelKind.SMTP: 10.0,
    # Requests a second: LINE's multicast limit (each carries up to 500 recipients).
    ChannelKind.LINE: 200.0,
    ChannelKind.MESSENGER: 100.0,
    # Instagram's limit for text and images: 100 calls a second per professional account.
    ChannelKind.INSTAGRAM: 100.0,
}

#: Kinds whose provider takes free-form messages only within a window after the contact last
#: wrote in, and that window.
CONVERSATION_WINDOW: dict[ChannelKind, timedelta] = {
    ChannelKind.WHATSAPP: timedelta(hours=24),
    ChannelKind.MESSENGER: timedelta(hours=24),
    ChannelKind.INSTAGRAM: timedelta(hours=24),
}

#: Messenger and Instagram message tags that let a message go after the window closes, and
#: how long after the contact last wrote each may be used (None: any time). Instagram takes
#: only HUMAN_AGENT.
MESSAGE_TAGS: dict[ChannelKind, dict[str, timedelta | None]] = {
    ChannelKind.MESSENGER: {
        "HUMAN_AGENT": timedelta(days=7),
        "ACCOUNT_UPDATE": None,
        "CONFIRMED_EVENT_UPDATE": None,
        "POST_PURCHASE_UPDATE": None,
    },
    ChannelKind.INSTAGRAM: {"HUMAN_AGENT": timedelta(days=7)},
}

EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_E164 = re.compile(r"\+?[1-9]\d{6,14}")
_TELEGRAM_CHAT = re.compile(r"-?\d{1,20}|@[A-Za-z][A-Za-z0-9_]{4,31}")
_LINE_USER = re.compile(r"U[0-9a-f]{32}")
#: A page-scoped (Messenger) or Instagram-scoped user id.
_SCOPED_ID = re.compile(r"\d{1,32}")

#: Per kind: the address pattern and how it is described to a user who got it wrong.
ADDRESS_RULES: dict[ChannelKind, tuple[re.Pattern[str], str]] = {
    ChannelKind.WEBHOOK: (re.compile(r"\S(.*\S)?", re.DOTALL), "a non-blank string"),
    ChannelKind.TELEGRAM: (_TELEGRAM_CHAT, "a Telegram chat id (digits) or @username"),
    ChannelKind.WHATSAPP: (_E164, "a phone number in E.164 form, e.g. +4915112345678"),
    ChannelKind.SMTP: (EMAIL, "an email address such as ann@example.com"),
    ChannelKind.LINE: (_LINE_USER, "a LINE user id: U and 32 hex digits"),
    ChannelKind.MESSENGER: (_SCOPED_ID, "a page-scoped user id (PSID, digits)"),
    ChannelKind.INSTAGRAM: (_SCOPED_ID, "an Instagram-scoped user id (IGSID, digits)"),
}
MAX_ADDRESS_LENGTH = 320


def validate_config(
    kind: ChannelKind, config: dict[str, Any], field: str = "config"
) -> dict[str, Any]:
    """Check ``config`` against the kind's schema; return it normalised (defaults filled in)."""
    model = CONFIG_MODELS[kind]
    try:
        parsed = model.model_validate(config)
    except ValidationError as exc:
        allowed = ", ".join(model.model_fields)
        raise ValidationFailed.from_pydantic(
            exc,
            prefix=field,
            extra_message=f"unknown key for a {kind.value} channel; allowed keys: {allowed}",
        ) from None
    normalised = parsed.model_dump(mode="json")
    _check_target(kind, normalised, field)
    return normalised


def _check_target(kind: ChannelKind, config: dict[str, Any], field: str) -> None:
    """Refuse a target the egress rule refuses whatever DNS says (a literal private address,
    ``localhost``); names are judged again when a dispatcher connects.
    """
    key = TARGET_KEYS[kind]
    target = str(config[key])
    host = target if kind is ChannelKind.SMTP else (urlsplit(target).hostname or "")
    try:
        Egress(allow_private=get_settings().allow_private_targets).check_host(host)
    except EgressRefused as exc:
        raise ValidationFailed.one(f"{field}.{key}", str(exc), "egress_refused") from None


def _mask_userinfo(url: str) -> str:
    """A URL with any user name and password in it replaced by ``REDACTED``."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=f"{REDACTED}@{parts.netloc.rsplit('@', 1)[1]}"))


#: Where a stored config keeps the sealed user name and password of its URL; the URL itself
#: is stored with ``REDACTED`` in their place.
USERINFO_KEY = "_url_userinfo"


def redact_config(kind: ChannelKind, config: dict[str, Any]) -> dict[str, Any]:
    """The config as it may be shown: every secret value replaced by ``REDACTED``."""
    secrets = SECRET_KEYS[kind]
    shown = {
        k: (REDACTED if k in secrets and v not in (None, "") else v)
        for k, v in config.items()
        if not k.startswith("_")
    }
    key = TARGET_KEYS[kind]
    if kind is not ChannelKind.SMTP and isinstance(shown.get(key), str):
        shown[key] = _mask_userinfo(shown[key])
    return shown


def secret_values(kind: ChannelKind, config: dict[str, Any]) -> list[str]:
    """The config keys of ``kind`` that hold a secret value (set and not empty)."""
    secrets = SECRET_KEYS[kind] | {USERINFO_KEY}
    return [k for k, v in config.items() if k in secrets and isinstance(v, str) and v]


def seal_config(
    kind: ChannelKind, config: dict[str, Any], box: SecretsBox, field: str = "config"
) -> dict[str, Any]:
    """The config as it is stored: every secret value sealed by ``box``."""
    sealed = dict(config)
    target = TARGET_KEYS[kind]
    url = config.get(target)
    if kind is not ChannelKind.SMTP and isinstance(url, str):
        parts = urlsplit(url)
        if "@" in parts.netloc:
            userinfo, host = parts.netloc.rsplit("@", 1)
            sealed[target] = urlunsplit(parts._replace(netloc=f"{REDACTED}@{host}"))
            sealed[USERINFO_KEY] = box.seal(userinfo)
    for key in secret_values(kind, config):
        if not box.enabled and config[key].startswith(SEALED_PREFIX):
            # Stored plain, it would later be taken for an encrypted value.
            raise ValidationFailed.one(
                f"{field}.{key}", f"must not start with {SEALED_PREFIX!r}", "reserved_prefix"
            )
        sealed[key] = box.seal(config[key])
    return sealed


def open_config(kind: ChannelKind, config: dict[str, Any], box: SecretsBox) -> dict[str, Any]:
    """The config as a provider needs it: every secret value opened by ``box`` (legacy plain
    values as they are). Raises ``SecretKeyError`` when a value cannot be decrypted.
    """
    opened = dict(config)
    for key in secret_values(kind, config):
        opened[key] = box.open(config[key])
    # The URL's user name and password, opened above, go back in place of REDACTED.
    userinfo = opened.pop(USERINFO_KEY, None)
    target = TARGET_KEYS[kind]
    if isinstance(userinfo, str) and isinstance(opened.get(target), str):
        parts = urlsplit(opened[target])
        host = parts.netloc.rsplit("@", 1)[-1]
        opened[target] = urlunsplit(parts._replace(netloc=f"{userinfo}@{host}"))
    return opened


def normalize_address(kind: ChannelKind, address: str) -> str:
    """The canonical form of an address for ``kind``; raises ``ValueError`` saying what is allowed."""
    value = address.strip()
    if kind is ChannelKind.SMTP:
        value = value.lower()
    elif kind is ChannelKind.WHATSAPP:
        value = re.sub(r"[\s().-]", "", value)
    pattern, described = ADDRESS_RULES[kind]
    if len(value) > MAX_ADDRESS_LENGTH or not pattern.fullmatch(value):
        raise ValueError(f"{address!r} is not a valid {kind.value} address: expected {described}")
    if kind is ChannelKind.WHATSAPP and not value.startswith("+"):
        value = "+" + value
    return value


def changed_config(
    kind: ChannelKind,
    stored: dict[str, Any],
    given: dict[str, Any],
    box: SecretsBox,
    field: str = "config",
) -> dict[str, Any]:
    """A channel's config with the keys ``given`` replaced, checked and sealed as a new one is.

    Keys not given keep their value, secrets included; a value given back exactly as the API
    shows it (``********`` for a secret, a URL with its user name and password masked) keeps
    the stored one, so a client may send back what it read with one key changed. A stored
    secret never follows the channel to another address: changing where it connects (its URL
    or host) needs every secret it holds given again.
    """
    opened = open_config(kind, stored, box)
    shown = redact_config(kind, opened)
    merged = {k: v for k, v in opened.items() if not k.startswith("_")}
    target = TARGET_KEYS[kind]
    for key, value in given.items():
        if key in shown and value == shown[key] and shown[key] != opened.get(key):
            continue  # echoed back as shown: the stored value stays
        if key == target and isinstance(value, str) and kind is not ChannelKind.SMTP:
            value = _keep_userinfo(value, str(opened.get(target, "")))
        merged[key] = value
    if _place(kind, str(merged.get(target, ""))) != _place(kind, str(opened.get(target, ""))):
        kept = [
            f"{field}.{k}"
            for k in SECRET_KEYS[kind]
            if opened.get(k) not in (None, "") and (k not in given or given[k] == REDACTED)
        ]
        if kind is not ChannelKind.SMTP and f"{REDACTED}@" in str(merged.get(target, "")):
            kept.append(f"{field}.{target} (its user name and password)")
        if kept:
            raise ValidationFailed.one(
                f"{field}.{target}",
                "changes where the channel connects; a stored secret is never sent to a new "
                f"address: give {', '.join(kept)} again with it",
                "secret_required",
            )
    return seal_config(kind, validate_config(kind, merged, field), box, field)


def _place(kind: ChannelKind, target: str) -> tuple[str, ...]:
    """Where a config connects, as far as its secrets are concerned: scheme, host and port
    (the SMTP host as it is); a change of path keeps the same server.
    """
    if kind is ChannelKind.SMTP:
        return (target.strip().lower(),)
    parts = urlsplit(target)
    return (parts.scheme.lower(), (parts.hostname or "").lower(), str(parts.port or ""))


def _keep_userinfo(url: str, stored_url: str) -> str:
    """A URL given back with its user name and password masked (``********@``) gets the
    stored ones again, on the same server; elsewhere it is refused by ``changed_config``.
    """
    parts = urlsplit(url)
    if parts.netloc.rsplit("@", 1)[0] != REDACTED or "@" not in parts.netloc:
        return url
    old = urlsplit(stored_url)
    if "@" not in old.netloc or (old.hostname, old.port) != (parts.hostname, parts.port):
        return url
    userinfo = old.netloc.rsplit("@", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{parts.netloc.rsplit('@', 1)[1]}"))
