"""canceled reasons: a recipient canceled with its broadcast says so in ``last_error``

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-27 10:00:00.000000

The recipients not reached are read from the partial index ``ix_delivery_not_reached``
(``last_error IS NOT NULL``), which only holds when every such row carries a reason. Failed,
partly sent and skipped rows always did (migration 0011); canceled ones now do too ("canceled
before it was sent", with the last attempt's error when it had one), so an operator's list of
everyone not reached, canceled ones included, reads only those rows rather than all of a
large broadcast's. Canceled rows from before get the plain text, and the CHECK takes them in.

Unlike the others, this migration is not wholly usable by the release before it: once it has
run, a process of that release that cancels rows writes them without a reason, which the CHECK
refuses. During a rollout an API pod of the old release answers a cancel with an error (asked
again, a new pod does it), and an old dispatcher's run of a canceled broadcast keeps its rows
until its lease runs out and a new scheduler's sweep gives them back, canceled with a reason.
Nothing is lost or sent twice; the rollout should be short.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from shared.db import online_ddl

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _reason(statuses: str) -> str:
    return f"status NOT IN {statuses} OR last_error IS NOT NULL"


def upgrade() -> None:
    with op.get_context().autocommit_block():
        online_ddl.check(
            op.get_bind(),
            "ck_delivery_reason",
            _reason("('failed', 'partial', 'skipped', 'canceled')"),
            fix=(
                "last_error = 'canceled before it was sent'",
                "status = 'canceled' AND last_error IS NULL",
            ),
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        online_ddl.check(
            op.get_bind(),
            "ck_delivery_reason",
            _reason("('failed', 'partial', 'skipped')"),
            fix=("last_error = last_error", "false"),
        )
