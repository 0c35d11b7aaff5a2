"""Channel secrets and signing keys in a database of their own (the ``secret_rows``
fixture), for rotation tests: a rotation walks every row, so it must not touch the rows of
the run's shared database.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db.models import Channel, Workspace
from shared.domain.channels import SECRET_KEYS, open_config, seal_config
from shared.domain.lifecycle import ChannelKind
from shared.domain.tokens import ensure_workspace
from shared.secrets_box import SecretsBox

PLAIN_CONFIGS: dict[ChannelKind, dict[str, Any]] = {
    ChannelKind.WEBHOOK: {"url": "http://x.test/h", "secret": "webhook-secret-0001"},
    ChannelKind.TELEGRAM: {"bot_token": "123:telegram-token", "api_base_url": "http://t.test"},
    ChannelKind.WHATSAPP: {"access_token": "whatsapp-token-01", "phone_number_id": "1"},
    ChannelKind.SMTP: {"host": "h", "password": "smtp-password-01", "from_address": "a@b.cd"},
}


@dataclass
class SecretRows:
    """A migrated database and the plain secrets its rows hold, to check them against."""

    url: str
    transaction: Callable[[], AbstractContextManager[Session]]
    #: channel id -> (kind, plain config)
    channels: dict[int, tuple[ChannelKind, dict[str, Any]]] = field(default_factory=dict)
    #: workspace id -> plain signing key
    signing_keys: dict[int, str] = field(default_factory=dict)

    def add(self, box: SecretsBox, *, workspaces: int = 1, plain: bool = False) -> None:
        """Workspaces with one channel of each kind, sealed by ``box`` (or stored plain, as
        rows written before encryption are).
        """
        stored_by = SecretsBox([]) if plain else box
        for _ in range(workspaces):
            with self.transaction() as session:
                ws = ensure_workspace(session, f"ws-{secrets.token_hex(4)}", stored_by)
                stored = session.execute(
                    select(Workspace.signing_key).where(Workspace.id == ws)
                ).scalar_one()
                self.signing_keys[ws] = stored_by.open(stored)
                for kind, config in PLAIN_CONFIGS.items():
                    channel = Channel(
                        workspace_id=ws,
                        name=kind.value,
                        kind=kind.value,
                        config=seal_config(kind, config, stored_by),
                        rate_limit_per_second=10,
                    )
                    session.add(channel)
                    session.flush()
                    self.channels[channel.id] = (kind, config)

    def stored(self) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
        """Channel configs and signing keys as they are stored."""
        with self.transaction() as session:
            configs = {r.id: r.config for r in session.execute(select(Channel.id, Channel.config))}
            keys = {
                r.id: r.signing_key
                for r in session.execute(select(Workspace.id, Workspace.signing_key))
            }
        return configs, keys

    def assert_readable_with(self, box: SecretsBox) -> None:
        """Every stored secret is encrypted and opens with ``box`` to its plain value."""
        configs, keys = self.stored()
        assert set(configs) == set(self.channels)
        for channel_id, (kind, plain) in self.channels.items():
            for name in SECRET_KEYS[kind]:
                assert configs[channel_id][name].startswith("enc:v1:")
            assert open_config(kind, configs[channel_id], box) == plain
        for ws, plain_key in self.signing_keys.items():
            assert keys[ws].startswith("enc:v1:")
            assert box.open(keys[ws]) == plain_key
