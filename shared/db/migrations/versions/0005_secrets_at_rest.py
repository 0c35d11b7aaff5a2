"""secrets at rest: signing keys made by the application; API tokens may expire

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 10:00:00.000000

Channel secrets and workspace signing keys are encrypted with ``BCAST_SECRET_KEYS`` by the
application (``shared/secrets_box.py``); the database never sees a key, so this migration
encrypts nothing. Rows written before it stay plain and keep working (a value without the
``enc:v1:`` prefix is read as it is) until ``bcast secrets rotate`` encrypts them.

``workspace.signing_key`` loses its server default: a key generated in SQL would be stored in
plain text, so ``ensure_workspace`` now makes each key and stores it encrypted, and a row
inserted without a key is refused instead of silently getting a plain one.

``api_token.expires_at``: a token is refused after it (NULL: never expires).

Downgrading restores the default and drops ``expires_at`` but decrypts nothing: code older
than this revision would take encrypted values for the secrets themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The default 0002 gave the column: 244 random bits from Postgres' own generator, as hex.
OLD_SIGNING_KEY_DEFAULT = "replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '')"


def upgrade() -> None:
    op.alter_column("workspace", "signing_key", server_default=None)
    op.add_column("api_token", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("api_token", "expires_at")
    op.alter_column("workspace", "signing_key", server_default=sa.text(OLD_SIGNING_KEY_DEFAULT))
