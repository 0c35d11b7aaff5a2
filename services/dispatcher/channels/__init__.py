"""Channel adapters, one module per provider, all behind ``base.ChannelAdapter``."""

from __future__ import annotations

from typing import Any

from services.dispatcher.channels.base import ChannelAdapter
from services.dispatcher.channels.client import HttpClient
from services.dispatcher.channels.graph import InstagramAdapter, MessengerAdapter
from services.dispatcher.channels.line import LineAdapter
from services.dispatcher.channels.smtp import STRICT, TIMEOUT_SECONDS, SmtpAdapter
from services.dispatcher.channels.telegram import TelegramAdapter
from services.dispatcher.channels.webhook import WebhookAdapter
from services.dispatcher.channels.whatsapp import WhatsappAdapter
from shared.domain.lifecycle import ChannelKind
from shared.egress import Egress
from shared.media_store import MediaStore


class UnsupportedChannel(Exception):
    """No adapter for this channel kind in this build."""


def make_adapter(
    kind: str,
    config: dict[str, Any],
    http: HttpClient,
    store: MediaStore,
    egress: Egress = STRICT,
) -> ChannelAdapter:
    """The adapter for one channel. One send takes at most the HTTP client's timeout (the
    dispatcher's send timeout), an SMTP conversation included.
    """
    if kind == ChannelKind.WEBHOOK:
        return WebhookAdapter(config, http)
    if kind == ChannelKind.TELEGRAM:
        return TelegramAdapter(config, http)
    if kind == ChannelKind.WHATSAPP:
        return WhatsappAdapter(config, http)
    if kind == ChannelKind.MESSENGER:
        return MessengerAdapter(config, http)
    if kind == ChannelKind.INSTAGRAM:
        return InstagramAdapter(config, http)
    if kind == ChannelKind.LINE:
        return LineAdapter(config, http)
    if kind == ChannelKind.SMTP:
        return SmtpAdapter(
            config, store, timeout=http.timeout_seconds or TIMEOUT_SECONDS, egress=egress
        )
    raise UnsupportedChannel(f"no adapter for channel kind {kind!r}")
