"""Schema changes to ``delivery`` that do not stop sends while they run (for migrations).

``delivery`` is partitioned and large, and sends write it all the time. A plain
``CREATE INDEX`` on it, an ``UPDATE`` of all its rows or an ``ADD CONSTRAINT`` that checks
them all would hold a lock that blocks every send for as long as the table takes to read.
Instead, each step here either reads the table under a lock that lets writes go on, or takes
a strong lock for a moment only (and gives up after ``LOCK_TIMEOUT``, trying again, rather
than queueing every send behind a long transaction):

* an index is made on the parent alone (``ON ONLY``, invalid and empty), then built on each
  partition ``CONCURRENTLY`` and attached; the parent index is valid once every partition has
  its own (a partition made meanwhile gets its index when it is made);
* rows are rewritten one partition and one range of ids at a time, each in its own
  transaction;
* a CHECK is added ``NOT VALID`` (new rows are checked from then on), the rows written in
  between are rewritten once more, and it is validated under a lock that lets writes go on.

Every function takes a connection in autocommit mode (in a migration:
``with op.get_context().autocommit_block(): bind = op.get_bind()``) and may be run again after
an interruption.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import sqlalchemy as sa

TABLE = "delivery"
#: How long a statement that needs a strong lock waits for it before it gives up and tries
#: again: sends queue behind a statement waiting for such a lock.
LOCK_TIMEOUT = "2s"
#: Tries of such a statement before the migration fails (it may simply be run again).
LOCK_TRIES = 30
#: Ids per statement when rows are rewritten.
ROWS_PER_STEP = 50_000


def _run(bind: sa.Connection, statement: str) -> sa.CursorResult[Any]:
    """Run a statement as written: no parameters, so a ``%`` in it is just a ``%``."""
    return bind.exec_driver_sql(statement, execution_options={"no_parameters": True})


def _one(bind: sa.Connection, statement: str) -> Any:
    return _run(bind, statement).scalar()


def _gave_way(error: sa.exc.OperationalError) -> bool:
    """A lock not granted in time, or a deadlock this statement lost: worth another try."""
    return isinstance(error.orig, psycopg.errors.LockNotAvailable | psycopg.errors.DeadlockDetected)


def partitions(bind: sa.Connection) -> list[str]:
    """The partitions of ``delivery`` (the attached ones and any being detached)."""
    rows = _run(
        bind,
        "SELECT c.oid::regclass::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        f"WHERE i.inhparent = '{TABLE}'::regclass ORDER BY 1",
    )
    return [str(r[0]) for r in rows]


def briefly(bind: sa.Connection, statement: str) -> None:
    """Run a statement that takes a strong lock for a moment, waiting at most
    ``LOCK_TIMEOUT`` for it each time.
    """
    for attempt in range(LOCK_TRIES):
        _run(bind, f"SET lock_timeout = '{LOCK_TIMEOUT}'")
        try:
            _run(bind, statement)
            return
        except sa.exc.OperationalError as error:
            if not _gave_way(error) or attempt == LOCK_TRIES - 1:
                raise
            time.sleep(0.5)
        finally:
            _run(bind, "RESET lock_timeout")


def create_index(bind: sa.Connection, name: str, columns: str, *, where: str = "") -> None:
    """``CREATE INDEX name ON delivery (columns) [WHERE where]``, one partition at a time."""
    predicate = f" WHERE {where}" if where else ""
    briefly(bind, f"CREATE INDEX IF NOT EXISTS {name} ON ONLY {TABLE} ({columns}){predicate}")
    for part in partitions(bind):
        attached = _one(
            bind,
            "SELECT count(*) FROM pg_inherits i JOIN pg_index x ON x.indexrelid = i.inhrelid "
            f"WHERE i.inhparent = '{name}'::regclass AND x.indrelid = '{part}'::regclass",
        )
        if attached:
            continue
        child = f"{part}_{name.removeprefix('ix_' + TABLE + '_')}"[:63]
        for attempt in range(LOCK_TRIES):
            # An earlier try that failed or was cut short leaves an invalid index behind.
            _run(bind, f"DROP INDEX CONCURRENTLY IF EXISTS {child}")
            try:
                _run(bind, f"CREATE INDEX CONCURRENTLY {child} ON {part} ({columns}){predicate}")
                break
            except sa.exc.OperationalError as error:
                # A build waits for every transaction writing the partition; one of them may
                # wait for the build in turn (a deadlock it loses): build it again.
                if not _gave_way(error) or attempt == LOCK_TRIES - 1:
                    raise
                time.sleep(0.5)
        briefly(bind, f"ALTER INDEX {name} ATTACH PARTITION {child}")


def drop_index(bind: sa.Connection, name: str) -> None:
    """Drop an index of ``delivery`` (a moment's lock: nothing is read)."""
    briefly(bind, f"DROP INDEX IF EXISTS {name}")


def rewrite(bind: sa.Connection, assignments: str, where: str) -> int:
    """``UPDATE delivery SET assignments WHERE where``, a partition and a range of ids per
    transaction. Returns how many rows it rewrote.
    """
    done = 0
    for part in partitions(bind):
        bounds: Any = _run(bind, f"SELECT min(id), max(id) FROM {part}").one()
        low, high = bounds[0], bounds[1]
        if low is None:
            continue
        for start in range(int(low), int(high) + 1, ROWS_PER_STEP):
            done += _run(
                bind,
                f"UPDATE {part} SET {assignments} WHERE id >= {start} "
                f"AND id < {start + ROWS_PER_STEP} AND ({where})",
            ).rowcount
    return done


def check(bind: sa.Connection, name: str, condition: str, *, fix: tuple[str, str]) -> None:
    """Make ``delivery`` hold ``CHECK (condition)`` as ``name`` (replacing a constraint of
    that name in the same statement), first rewriting the rows that break it with ``fix``:
    the assignments, and the condition of the rows to rewrite.
    """
    assignments, broken = fix
    rewrite(bind, assignments, broken)
    briefly(
        bind,
        f"ALTER TABLE {TABLE} DROP CONSTRAINT IF EXISTS {name}, "
        f"ADD CONSTRAINT {name} CHECK ({condition}) NOT VALID",
    )
    # Rows written between the rewrite and the constraint.
    rewrite(bind, assignments, broken)
    _run(bind, f"ALTER TABLE {TABLE} VALIDATE CONSTRAINT {name}")


def set_fillfactor(bind: sa.Connection, value: int | None) -> None:
    """Set (or reset) every partition's fillfactor: the pages they fill from now on keep that
    much room for later versions of their rows.
    """
    setting = f"SET (fillfactor = {value})" if value else "RESET (fillfactor)"
    for part in partitions(bind):
        briefly(bind, f"ALTER TABLE {part} {setting}")
