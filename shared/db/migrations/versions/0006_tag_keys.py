"""tag keys: one Unicode case folding for tag names, computed by the application

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 10:00:00.000000

Tags were unique by ``lower(name)`` in SQL while the application folded names with Python's
``str.lower``; the two disagree for some letters (``İ``, ``ß``), so a name could be created by
one rule and looked up by the other, and missed. Now ``tag.name_key`` holds the name's
NFKC_Casefold (``shared.domain.types.tag_key``), written by the application, and tags are
unique by it. Names that the new rule makes equal (``Straße`` and ``STRASSE``) are merged
into the oldest tag, their contacts kept.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _key(name: str) -> str:
    # The rule of shared.domain.types.tag_key, frozen here as it was when this ran.
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold()).strip()


def upgrade() -> None:
    op.add_column("tag", sa.Column("name_key", sa.Text(), nullable=True))
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT id, workspace_id, name FROM tag ORDER BY id")).all()
    keep: dict[tuple[int, str], int] = {}
    for tag_id, workspace_id, name in rows:
        key = _key(name)
        first = keep.setdefault((workspace_id, key), tag_id)
        if first == tag_id:
            conn.execute(
                sa.text("UPDATE tag SET name_key = :k WHERE id = :id"), {"k": key, "id": tag_id}
            )
            continue
        # The same tag under the new rule: its contacts move to the oldest one.
        conn.execute(
            sa.text(
                "INSERT INTO contact_tag (contact_id, tag_id, workspace_id) "
                "SELECT contact_id, :keep, workspace_id FROM contact_tag WHERE tag_id = :gone "
                "ON CONFLICT DO NOTHING"
            ),
            {"keep": first, "gone": tag_id},
        )
        conn.execute(
            sa.text(
                "UPDATE broadcast SET audience = jsonb_set(audience, '{tag_ids}', ("
                "  SELECT jsonb_agg(DISTINCT CASE WHEN v::bigint = :gone THEN :keep"
                "  ELSE v::bigint END) FROM jsonb_array_elements_text(audience->'tag_ids') v"
                ")) WHERE audience->'tag_ids' @> to_jsonb(CAST(:gone AS bigint))"
            ),
            {"keep": first, "gone": tag_id},
        )
        conn.execute(sa.text("DELETE FROM tag WHERE id = :gone"), {"gone": tag_id})
    op.alter_column("tag", "name_key", nullable=False)
    op.drop_index("uq_tag_workspace_id_lower_name", table_name="tag")
    op.create_index(
        "uq_tag_workspace_id_name_key", "tag", ["workspace_id", "name_key"], unique=True
    )


def downgrade() -> None:
    op.drop_index("uq_tag_workspace_id_name_key", table_name="tag")
    op.create_index(
        "uq_tag_workspace_id_lower_name",
        "tag",
        ["workspace_id", sa.literal_column("lower(name)")],
        unique=True,
    )
    op.drop_column("tag", "name_key")
