"""console sessions: an operator signed in to the web console with an API token

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-12 10:00:00.000000

The console at /console keeps no token in the browser: signing in with an API token makes a
session whose random id travels in an HttpOnly cookie; only its SHA-256 digest is stored, with
the token it was opened with (revoking the token ends its sessions), the workspace, the form
token every form must carry back (CSRF), and its expiry.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "console_session",
        sa.Column("id_hash", sa.Text(), primary_key=True),
        sa.Column(
            "api_token_id",
            sa.BigInteger(),
            sa.ForeignKey("api_token.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "workspace_id",
            sa.BigInteger(),
            sa.ForeignKey("workspace.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("csrf_token", sa.Text(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_console_session_api_token_id", "console_session", ["api_token_id"])
    op.create_index("ix_console_session_expires_at", "console_session", ["expires_at"])


def downgrade() -> None:
    op.drop_table("console_session")
