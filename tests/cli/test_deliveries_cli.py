"""``bcast deliveries``: the partitions of the delivery rows listed, and pruned by hand."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from shared.db.engine import libpq_url
from tests.cli.test_cli import run
from tests.conftest import Api
from tests.delivery_store.test_partitions import filed_task, partition_of, today


@pytest.fixture
def conn(database_url: str) -> Any:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as c:
        yield c


def env(database_url: str, **settings: str) -> dict[str, str]:
    return {**os.environ, "BCAST_DATABASE_URL": database_url, **settings}


def line_of(output: str, name: str) -> list[str]:
    found = [line.split() for line in output.splitlines() if line.startswith(name + " ")]
    assert len(found) == 1, output
    return found[0]


def exists(conn: psycopg.Connection[Any], name: str) -> bool:
    return conn.execute("SELECT to_regclass(%s)", (name,)).fetchone() != (None,)


def test_partitions_are_listed_and_pruned_by_hand(
    api: Api, conn: psycopg.Connection[Any], database_url: str
) -> None:
    done = filed_task(api, conn, today(conn) - timedelta(days=6000), 3, status="completed")
    busy = filed_task(api, conn, today(conn) - timedelta(days=6100), 2, status="in_progress")
    gone, kept = partition_of(conn, done), partition_of(conn, busy)
    settings = env(database_url, BCAST_DELIVERY_RETENTION_DAYS="60")

    listed = run("deliveries", "partitions", env=settings)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0].split()[:4] == ["NAME", "FIRST", "DAY", "LAST"]
    # name, first day, last day, state, broadcasts, unfinished, rows, removable on
    assert line_of(listed.stdout, gone)[3:7] == ["attached", "1", "0", "3"]
    assert line_of(listed.stdout, kept)[3:7] == ["attached", "1", "1", "2"]

    dry = run("deliveries", "prune", "--dry-run", env=settings)
    assert dry.returncode == 0, dry.stderr
    assert f"would drop {gone} " in dry.stdout
    assert f"kept {kept} " in dry.stdout
    assert "1 of its 1 broadcasts are not yet completed or canceled" in dry.stdout
    assert exists(conn, gone)

    pruned = run("deliveries", "prune", env=settings)
    assert pruned.returncode == 0, pruned.stderr
    assert f"dropped {gone} " in pruned.stdout
    assert ": 3 rows of 1 broadcasts" in pruned.stdout
    assert not exists(conn, gone)
    assert exists(conn, kept)


def test_archive_mode_by_hand(api: Api, conn: psycopg.Connection[Any], database_url: str) -> None:
    done = filed_task(api, conn, today(conn) - timedelta(days=6200), 2, status="canceled")
    name = partition_of(conn, done)
    settings = env(database_url, BCAST_DELIVERY_RETENTION_DAYS="60", BCAST_DELIVERY_ARCHIVE="true")
    pruned = run("deliveries", "prune", env=settings)
    assert pruned.returncode == 0, pruned.stderr
    assert f"archived {name} " in pruned.stdout
    archive = name.replace("delivery_p", "delivery_archived_p")
    listed = run("deliveries", "partitions", env=settings)
    assert line_of(listed.stdout, archive)[3] == "archived"
    assert not exists(conn, name)


def test_without_retention_nothing_is_pruned(
    api: Api, conn: psycopg.Connection[Any], database_url: str
) -> None:
    done = filed_task(api, conn, today(conn) - timedelta(days=6300), 1, status="completed")
    name = partition_of(conn, done)
    pruned = run("deliveries", "prune", env=env(database_url, BCAST_DELIVERY_RETENTION_DAYS="0"))
    assert pruned.returncode == 0, pruned.stderr
    assert "kept forever" in pruned.stdout
    assert name not in pruned.stdout
    assert exists(conn, name)
