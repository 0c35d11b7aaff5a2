"""The partitions of the ``delivery`` table: made ahead of need, removed past retention.

Every delivery row carries ``part_day``, the UTC day its broadcast's audience was copied (the
broadcast and its batches carry it too), and ``delivery`` is partitioned by range of that day:
one partition per ``BCAST_DELIVERY_PARTITION_DAYS`` days, aligned on Mondays (after the width
changes, the next partition starts where the last one ends). All rows of a broadcast sit in one
partition and every statement of the delivery store names the day, so each touches that one
partition, however much history the table holds.

* ``ensure``: the partition that holds a day exists. A missing one is created as a table of its
  own and then attached: attaching locks ``delivery`` only in SHARE UPDATE EXCLUSIVE mode,
  which no reader or writer of delivery rows waits for (``CREATE TABLE ... PARTITION OF`` would
  lock them all out). One maker at a time (an advisory lock); the others find its partition.
* ``prune``: a partition all of whose days lie ``BCAST_DELIVERY_RETENTION_DAYS`` or more back,
  and whose broadcasts are all completed or canceled, is detached ``CONCURRENTLY`` (it waits
  for the transactions that may still use it; nobody waits for it) and then dropped or, with
  ``BCAST_DELIVERY_ARCHIVE``, kept as a table of its own, ``delivery_archived_p<first day>``.
  Its broadcasts keep their counts and record when their rows went (``recipients_removed_at``).

The scheduler does both periodically (``services.scheduler.partitions``), the dispatcher makes
sure of the partition of each audience it copies, and ``bcast deliveries`` shows and prunes
them by hand.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from enum import StrEnum
from typing import Any, NamedTuple

import psycopg

from shared.delivery_store import TODAY, Op, Query, run
from shared.domain.lifecycle import FINAL_BROADCAST_STATUSES

log = logging.getLogger(__name__)

#: Advisory lock namespaces: one maker of partitions at a time, one pruner at a time.
MAKE_LOCK = 0x6263_0004
PRUNE_LOCK = 0x6263_0005
#: Partitions start on multiples of the width counted from this Monday.
ANCHOR = date(1970, 1, 5)
#: Partitions the scheduler keeps made after the one that holds today.
PARTITIONS_AHEAD = 2
#: Longest a maker waits for a lock on ``delivery`` (only other DDL holds a conflicting one).
MAKE_LOCK_TIMEOUT = "10s"
#: Room left on each page for the later versions of its rows: a send's claim and answer are
#: heap-only updates only when the new version fits on the row's page (migration 0011).
FILLFACTOR = 45

_NAME = re.compile(r"^delivery_(archived_)?p[0-9]{8}$")
_DAY = re.compile(r"'(\d{4}-\d{2}-\d{2})'")
_FINAL = "(" + ", ".join(sorted(f"'{s.value}'" for s in FINAL_BROADCAST_STATUSES)) + ")"


class State(StrEnum):
    """Where a partition stands."""

    #: A partition of ``delivery``.
    ATTACHED = "attached"
    #: Being detached, or a detach was cut short (the next prune finishes those it started).
    DETACHING = "detaching"
    #: No longer a partition, under a partition's name: a prune cut short before dropping or
    #: renaming it (the next one finishes it), or one detached by hand (left alone).
    DETACHED = "detached"
    #: Detached and kept by retention in archive mode.
    ARCHIVED = "archived"


class Action(StrEnum):
    """What a prune did (or, in a dry run, would do) with a partition past retention."""

    DROPPED = "dropped"
    ARCHIVED = "archived"
    #: Kept: a broadcast with rows in it is not yet completed or canceled.
    HELD = "held"


@dataclass(frozen=True, slots=True)
class Partition:
    name: str
    #: The first day it holds.
    first_day: date
    #: The day after the last one it holds.
    end_day: date
    state: State


@dataclass(frozen=True, slots=True)
class Removal:
    """A partition past retention, and what became of it."""

    partition: Partition
    action: Action
    #: Broadcasts whose rows it holds, and how many of them are not final.
    broadcasts: int
    unfinished: int
    #: Delivery rows in it (from its broadcasts' counts).
    rows: int


@dataclass(frozen=True, slots=True)
class Described:
    """A partition, what it holds, and when retention may remove it."""

    partition: Partition
    broadcasts: int
    unfinished: int
    rows: int
    #: The first day retention may remove it (None: kept forever, or already detached).
    removable_on: date | None


def partition_name(first_day: date) -> str:
    return f"delivery_p{first_day:%Y%m%d}"


def archive_name(first_day: date) -> str:
    return f"delivery_archived_p{first_day:%Y%m%d}"


def is_partition_table(name: str) -> bool:
    """A table of ``delivery``'s partitions or archives (not in the models, by design)."""
    return _NAME.match(name) is not None


def fit(day: date, width: int, taken: Sequence[tuple[date, date]]) -> tuple[date, date]:
    """The range ``[first, end)`` of a new partition that holds ``day``: the aligned period of
    ``width`` days around it, cut short where it would overlap a partition in ``taken`` (none
    of which holds ``day``).
    """
    first = ANCHOR + timedelta(days=(day - ANCHOR).days // width * width)
    end = first + timedelta(days=width)
    for low, high in taken:
        if high <= day:
            first = max(first, high)
        elif low > day:
            end = min(end, low)
    return first, end


# --- reading the catalog ---------------------------------------------------------------------

_LIST = r"""
SELECT c.relname,
       CASE WHEN c.relispartition THEN pg_get_expr(c.relpartbound, c.oid)
            ELSE (SELECT pg_get_constraintdef(k.oid) FROM pg_constraint k
                  WHERE k.conrelid = c.oid AND k.contype = 'c' AND k.conname ~ '_range$'
                  ORDER BY k.conname LIMIT 1) END,
       c.relispartition, coalesce(i.inhdetachpending, false)
FROM pg_class c LEFT JOIN pg_inherits i ON i.inhrelid = c.oid
WHERE pg_table_is_visible(c.oid) AND c.relkind = 'r'
  AND (i.inhparent = 'delivery'::regclass
       OR (NOT c.relispartition AND c.relname ~ '^delivery_(archived_)?p[0-9]{8}$'))
"""


def _read(rows: Sequence[tuple[Any, ...]]) -> list[Partition]:
    found = []
    for name, bounds, attached, pending in rows:
        days = _DAY.findall(bounds or "")
        if len(days) < 2:
            continue  # a table of that name that is none of ours
        if attached:
            state = State.DETACHING if pending else State.ATTACHED
        else:
            state = State.ARCHIVED if name.startswith("delivery_archived_") else State.DETACHED
        found.append(
            Partition(name, date.fromisoformat(days[0]), date.fromisoformat(days[1]), state)
        )
    return sorted(found, key=lambda p: (p.first_day, p.name))


def listing() -> Op[list[Partition]]:
    """Every partition of ``delivery`` and every table retention detached, by first day."""
    # Bounds are read back as text, which follows the session's date style.
    yield Query("SET LOCAL datestyle = 'ISO, YMD'")
    return _read((yield Query(_LIST)).rows)


def _holding(day: date, partitions: Sequence[Partition]) -> Partition | None:
    for p in partitions:
        if p.state == State.ATTACHED and p.first_day <= day < p.end_day:
            return p
    return None


# --- making --------------------------------------------------------------------------------


def ensure(day: date, width: int) -> Op[Partition]:
    """The partition that holds ``day``, made and attached if there is none. Safe to call
    from any number of processes at once: one makes it, the others find it.
    """
    found = _holding(day, (yield from listing()))
    if found is not None:
        return found
    yield Query("SELECT pg_advisory_xact_lock(%(k)s)", {"k": MAKE_LOCK})
    partitions = yield from listing()
    found = _holding(day, partitions)
    if found is not None:
        return found
    first, end = fit(
        day, width, [(p.first_day, p.end_day) for p in partitions if p.state != State.ARCHIVED]
    )
    name = partition_name(first)
    low, high = f"'{first.isoformat()}'::date", f"'{end.isoformat()}'::date"
    yield Query(f"SET LOCAL lock_timeout = '{MAKE_LOCK_TIMEOUT}'")
    yield Query(
        f"CREATE TABLE {name} (LIKE delivery INCLUDING DEFAULTS INCLUDING CONSTRAINTS) "
        f"WITH (fillfactor = {FILLFACTOR})"
    )
    # The CHECK spares ATTACH its scan, and tells the range of the table once detached.
    yield Query(
        f"ALTER TABLE {name} ADD CONSTRAINT {name}_range "
        f"CHECK (part_day >= {low} AND part_day < {high})"
    )
    yield Query(f"ALTER TABLE delivery ATTACH PARTITION {name} FOR VALUES FROM ({low}) TO ({high})")
    log.info(
        "delivery partition %s made for %s to %s",
        name,
        first,
        end - timedelta(days=1),
        extra={"partition": name},
    )
    return Partition(name, first, end, State.ATTACHED)


def today() -> Op[date]:
    """Today in UTC, by the database's clock."""
    day: date = (yield Query(f"SELECT {TODAY}")).scalar()
    return day


def ensure_ahead(width: int, *, ahead: int = PARTITIONS_AHEAD) -> Op[list[Partition]]:
    """The partition that holds today and the ``ahead`` ones after it, made where missing."""
    day = yield from today()
    made = []
    for _ in range(ahead + 1):
        partition = yield from ensure(day, width)
        made.append(partition)
        day = partition.end_day
    return made


# --- removing ------------------------------------------------------------------------------


class Filed(NamedTuple):
    """The broadcasts filed under a partition's days."""

    broadcasts: int
    #: Of which not completed or canceled, and broadcasts not yet started whose audience is
    #: the failed recipients of one of them (a retry reads them when it starts).
    unfinished: int
    #: Of which not yet told their rows go (``recipients_removed_at``).
    unretired: int
    #: Their delivery rows, from their counts.
    rows: int


def _filed(partition: Partition) -> Op[Filed]:
    row = (
        yield Query(
            f"""
            SELECT count(*),
                   count(*) FILTER (WHERE status NOT IN {_FINAL})
                   + (SELECT count(*) FROM broadcast r
                      WHERE r.snapshot_at IS NULL AND r.status NOT IN {_FINAL}
                        AND (r.audience ->> 'failed_in')::bigint IN (
                            SELECT id FROM broadcast
                            WHERE part_day >= %(first)s AND part_day < %(end)s)),
                   count(*) FILTER (WHERE recipients_removed_at IS NULL),
                   coalesce(sum(total_count), 0)::bigint
            FROM broadcast WHERE part_day >= %(first)s AND part_day < %(end)s
            """,
            {"first": partition.first_day, "end": partition.end_day},
        )
    ).first()
    assert row is not None
    return Filed(*(int(v) for v in row))


def _retire(partition: Partition) -> Op[Filed]:
    """Record on its broadcasts that their rows go, unless one of them is not final."""
    filed = yield from _filed(partition)
    if not filed.unfinished:
        yield Query(
            """
            UPDATE broadcast SET recipients_removed_at = now()
            WHERE part_day >= %(first)s AND part_day < %(end)s AND recipients_removed_at IS NULL
            """,
            {"first": partition.first_day, "end": partition.end_day},
        )
    return filed


def _past(partition: Partition, today: date, retention_days: int) -> bool:
    return partition.end_day + timedelta(days=retention_days) <= today


def prune(
    conn: psycopg.Connection[Any],
    *,
    retention_days: int,
    archive: bool,
    dry_run: bool = False,
) -> list[Removal]:
    """Remove (or archive) the partitions past retention whose broadcasts are all final, and
    finish any removal that was cut short. Returns each partition past retention with what
    became of it (a dry run only says what would). ``conn`` must be in autocommit mode
    (a partition is detached concurrently, outside any transaction). Does nothing while
    another prune runs.
    """
    if not conn.autocommit:
        raise ValueError("prune needs a connection in autocommit mode")
    if not dry_run:
        locked = conn.execute("SELECT pg_try_advisory_lock(%s)", (PRUNE_LOCK,)).fetchone()
        if not locked or not locked[0]:
            return []
    try:
        partitions = run(conn, listing())
        day = run(conn, today())
        done = []
        for p in partitions:
            if p.state == State.ARCHIVED:
                continue
            if p.state == State.ATTACHED and (
                not retention_days or not _past(p, day, retention_days)
            ):
                continue
            removal = _remove(conn, p, archive=archive, dry_run=dry_run)
            if removal is not None:
                done.append(removal)
        return done
    finally:
        if not dry_run:
            conn.execute("SELECT pg_advisory_unlock(%s)", (PRUNE_LOCK,))


def _remove(
    conn: psycopg.Connection[Any], p: Partition, *, archive: bool, dry_run: bool
) -> Removal | None:
    action = Action.ARCHIVED if archive else Action.DROPPED
    if p.state == State.ATTACHED:
        filed = run(conn, (_filed if dry_run else _retire)(p))
        if filed.unfinished:
            return Removal(p, Action.HELD, filed.broadcasts, filed.unfinished, filed.rows)
    else:
        filed = run(conn, _filed(p))
        if filed.unretired:
            # Detached, but not by a prune (which retires its broadcasts first): not ours.
            return None
    if dry_run:
        return Removal(p, action, filed.broadcasts, filed.unfinished, filed.rows)
    if p.state == State.ATTACHED:
        conn.execute(f"ALTER TABLE delivery DETACH PARTITION {p.name} CONCURRENTLY")
    elif p.state == State.DETACHING:
        conn.execute(f"ALTER TABLE delivery DETACH PARTITION {p.name} FINALIZE")
    if archive:
        conn.execute(f"ALTER TABLE {p.name} RENAME TO {archive_name(p.first_day)}")
    else:
        conn.execute(f"DROP TABLE {p.name}")
    log.info(
        "delivery partition %s (%s to %s) %s: %s rows of %s broadcasts",
        p.name,
        p.first_day,
        p.end_day - timedelta(days=1),
        action,
        filed.rows,
        filed.broadcasts,
        extra={"partition": p.name, "action": action.value, "rows": filed.rows},
    )
    return Removal(p, action, filed.broadcasts, filed.unfinished, filed.rows)


def describe(conn: psycopg.Connection[Any], *, retention_days: int) -> list[Described]:
    """Every partition and archive, with its broadcasts, rows, and when it may go."""
    partitions = run(conn, listing())
    described = []
    for p in partitions:
        filed = run(conn, _filed(p))
        removable = (
            p.end_day + timedelta(days=retention_days)
            if retention_days and p.state == State.ATTACHED
            else None
        )
        described.append(Described(p, filed.broadcasts, filed.unfinished, filed.rows, removable))
    return described
