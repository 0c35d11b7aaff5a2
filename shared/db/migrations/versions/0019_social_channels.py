"""social channels: LINE, Messenger and Instagram kinds, and the key of a multicast call

Revision ID: 0019
Revises: 0018
Create Date: 2027-01-25 10:00:00.000000

Channels may be ``line``, ``messenger`` or ``instagram``. ``delivery.call_key`` is written on
the rows one LINE multicast carries before the call is made, so a repeat of the call after a
crash or a timeout goes to the same recipients under the same ``X-Line-Retry-Key`` (LINE
answers a repeat with 409 and delivers nothing twice). No index names it: a send's writes stay
heap-only.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from shared.db import online_ddl

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KINDS = "'webhook', 'telegram', 'whatsapp', 'smtp', 'line', 'messenger', 'instagram'"
_OLD_KINDS = "'webhook', 'telegram', 'whatsapp', 'smtp'"


def _kinds(kinds: str) -> None:
    bind = op.get_bind()
    online_ddl.briefly(
        bind,
        "ALTER TABLE channel DROP CONSTRAINT IF EXISTS ck_channel_kind, "
        f"ADD CONSTRAINT ck_channel_kind CHECK (kind IN ({kinds})) NOT VALID",
    )
    bind.exec_driver_sql("ALTER TABLE channel VALIDATE CONSTRAINT ck_channel_kind")


def upgrade() -> None:
    with op.get_context().autocommit_block():
        _kinds(_KINDS)
        online_ddl.briefly(
            op.get_bind(), "ALTER TABLE delivery ADD COLUMN IF NOT EXISTS call_key uuid"
        )


def downgrade() -> None:
    # Refused (the check fails to validate) while a channel of a new kind exists: its
    # broadcasts and contacts are not dropped behind an operator's back.
    op.drop_column("delivery", "call_key")
    _kinds(_OLD_KINDS)
