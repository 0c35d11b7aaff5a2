"""Re-encrypt every secret at rest with the first key of ``BCAST_SECRET_KEYS``.

Channel secrets and workspace signing keys are walked in id order, a batch per transaction
with the batch's rows locked, so a crash loses at most one uncommitted batch and a second
run picks up where the first stopped. Values already encrypted with the first key are left
alone, so running it again changes nothing. Legacy plain values are encrypted. A value no
key can decrypt is left as it is and reported by row id, never by value.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.db.models import Channel, Workspace
from shared.domain.channels import secret_values
from shared.domain.lifecycle import ChannelKind
from shared.secrets_box import SecretKeyError, SecretsBox

#: Rows read, re-encrypted and written per transaction.
BATCH_SIZE = 500


@dataclass
class TableCount:
    """What a rotation did to one table's rows."""

    #: Rows written with at least one value newly encrypted with the first key.
    resealed: int = 0
    #: Rows whose values were all already encrypted with the first key (or that hold none).
    current: int = 0
    #: Ids of rows holding a value no key could decrypt (left unchanged).
    unreadable: list[int] = field(default_factory=list)


@dataclass
class RotationReport:
    """What a rotation did, per table."""

    channels: TableCount = field(default_factory=TableCount)
    workspaces: TableCount = field(default_factory=TableCount)

    @property
    def complete(self) -> bool:
        """True when every secret is now encrypted with the first key."""
        return not (self.channels.unreadable or self.workspaces.unreadable)


def rotate_secrets(
    transaction: Callable[[], AbstractContextManager[Session]],
    box: SecretsBox,
    *,
    batch_size: int = BATCH_SIZE,
) -> RotationReport:
    """Re-encrypt every channel secret and workspace signing key with ``box``'s first key.

    Parameters:
      transaction: opens a session whose block is one committed transaction.
      box: must have keys; its first one encrypts, all are tried to decrypt.
      batch_size: rows per transaction.
    """
    if not box.enabled:
        raise RuntimeError("there is no key to encrypt with")
    report = RotationReport()
    after = 0
    while True:
        with transaction() as session:
            rows = session.execute(
                select(Channel.id, Channel.kind, Channel.config)
                .where(Channel.id > after)
                .order_by(Channel.id)
                .limit(batch_size)
                .with_for_update()
            ).all()
            for row in rows:
                try:
                    config = _resealed_config(box, ChannelKind(row.kind), row.config)
                except SecretKeyError:
                    report.channels.unreadable.append(row.id)
                    continue
                if config is None:
                    report.channels.current += 1
                else:
                    session.execute(
                        update(Channel).where(Channel.id == row.id).values(config=config)
                    )
                    report.channels.resealed += 1
        if len(rows) < batch_size:
            break
        after = rows[-1].id
    after = 0
    while True:
        with transaction() as session:
            keys = session.execute(
                select(Workspace.id, Workspace.signing_key)
                .where(Workspace.id > after)
                .order_by(Workspace.id)
                .limit(batch_size)
                .with_for_update()
            ).all()
            for key in keys:
                try:
                    sealed = box.reseal(key.signing_key)
                except SecretKeyError:
                    report.workspaces.unreadable.append(key.id)
                    continue
                if sealed is None:
                    report.workspaces.current += 1
                else:
                    session.execute(
                        update(Workspace).where(Workspace.id == key.id).values(signing_key=sealed)
                    )
                    report.workspaces.resealed += 1
        if len(keys) < batch_size:
            break
        after = keys[-1].id
    return report


def _resealed_config(
    box: SecretsBox, kind: ChannelKind, config: dict[str, Any]
) -> dict[str, Any] | None:
    """The config with every secret encrypted with the first key, or None when it already is.
    Raises ``SecretKeyError`` when a value cannot be decrypted.
    """
    changed = dict(config)
    for name in secret_values(kind, config):
        sealed = box.reseal(config[name])
        if sealed is not None:
            changed[name] = sealed
    return changed if changed != config else None
