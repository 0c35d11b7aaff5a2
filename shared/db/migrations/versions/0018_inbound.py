"""inbound: when each contact last wrote in, for the providers' conversation windows

Revision ID: 0018
Revises: 0017
Create Date: 2027-01-18 10:00:00.000000

WhatsApp (and Messenger and Instagram) take free-form messages only within 24 hours of the
contact's last message to the business. ``contact.last_inbound_at`` records it (a contact is
one person on one account, so this is per contact and account), fed by the inbox with
``POST /v1/contacts/{id}/inbound``, a PATCH, or an import column.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from shared.db import online_ddl

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        online_ddl.briefly(
            op.get_bind(),
            "ALTER TABLE contact ADD COLUMN IF NOT EXISTS last_inbound_at timestamptz",
        )


def downgrade() -> None:
    op.drop_column("contact", "last_inbound_at")
