"""The audience a started broadcast copies: the preview's query, as it stood at the start, for
one broadcast or for many small ones at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from typing import Any

import psycopg
import pytest

from services.dispatcher import snapshot
from services.dispatcher.engine import Taken
from services.dispatcher.runtime import Runtime
from services.dispatcher.snapshot import Starting, audience_source, recipients_source
from shared import delivery_partitions as partitions
from shared import delivery_store as store
from shared.db.engine import libpq_url
from shared.domain.audience import AudienceSpec
from shared.settings import Settings
from tests.conftest import Api
from tests.factories import start_with_deliveries


@pytest.fixture
def conn(database_url: str) -> Any:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as c:
        yield c


def test_the_copy_takes_the_filtered_audience_as_it_stood_when_sending_started(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    channel = api.channel()
    account = api.account(channel["id"])
    vip = api.contact(account["id"], "vip-1", tags=["vip"])
    plain = api.contact(account["id"], "plain-1")
    gone = api.contact(account["id"], "vip-2", tags=["vip"], opted_out=True)
    blocked = api.contact(account["id"], "vip-3", tags=["vip"])
    conn.execute(
        "UPDATE contact SET unreachable_at = now(), unreachable_reason = 'blocked' WHERE id = %s",
        (blocked["id"],),
    )
    spec = AudienceSpec(tag_ids=[api.tag_id("vip")])
    b = api.broadcast(channel["id"], spec.model_dump())
    started = datetime.now(UTC)
    api.contact(account["id"], "vip-late", tags=["vip"])  # after the start: not a recipient
    conn.execute(
        "UPDATE broadcast SET status = 'in_progress', started_at = %s WHERE id = %s",
        (started, b["id"]),
    )
    source = audience_source(api.workspace_id, channel["id"], spec, started)
    assert b["audience_size"] == 3
    assert store.run(conn, store.snapshot(b["id"], source, batch_size=10)) == 3
    copied = {
        r[0]: r[1:]
        for r in conn.execute(
            "SELECT contact_id, status, last_error FROM delivery WHERE broadcast_id = %s",
            (b["id"],),
        ).fetchall()
    }
    # The one who opted out and the unreachable one each get a row, skipped with the reason.
    assert copied == {
        vip["id"]: ("queued", None),
        gone["id"]: ("skipped", "skipped: contact opted out"),
        blocked["id"]: ("skipped", "skipped: contact unreachable: blocked"),
    }
    assert plain["id"] not in copied
    # audience_size becomes what was copied: counts.total.
    after = api.ok("get", f"/v1/broadcasts/{b['id']}")
    assert after["audience_size"] == after["counts"]["total"] == 3
    assert (after["counts"]["skipped"], after["counts"]["queued"]) == (2, 1)


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    rt = Runtime(settings)
    rt.open()
    yield rt
    rt.close()


def _started(api: Api, conn: psycopg.Connection[Any], contacts: int) -> int:
    channel = api.channel()
    account = api.account(channel["id"])
    for i in range(contacts):
        api.contact(account["id"], f"r-{i}")
    b = api.broadcast(channel["id"])
    conn.execute(
        "UPDATE broadcast SET status = 'in_progress', started_at = now() WHERE id = %s",
        (b["id"],),
    )
    return int(b["id"])


def _partitions_of(conn: psycopg.Connection[Any], broadcast_id: int) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT DISTINCT tableoid::regclass::text, part_day FROM delivery WHERE broadcast_id = %s",
        (broadcast_id,),
    ).fetchall()


def test_a_start_files_the_copy_under_today_in_todays_partition(
    api: Api, conn: psycopg.Connection[Any], runtime: Runtime
) -> None:
    b = _started(api, conn, 3)
    assert runtime.call(snapshot.start(runtime, b)) == 3
    today = conn.execute(f"SELECT {store.TODAY}").fetchone()
    ((table, day),) = _partitions_of(conn, b)
    assert (day,) == today
    assert conn.execute("SELECT part_day FROM broadcast WHERE id = %s", (b,)).fetchone() == today
    assert conn.execute(
        "SELECT DISTINCT part_day FROM delivery_batch WHERE broadcast_id = %s", (b,)
    ).fetchall() == [today]
    assert table.startswith("delivery_p")


def test_a_start_makes_the_partition_of_its_day_when_missing(
    api: Api, conn: psycopg.Connection[Any], runtime: Runtime
) -> None:
    # Its day was fixed by an earlier attempt, long enough ago that no partition holds it.
    b = _started(api, conn, 2)
    day = date(1999, 4, 7)
    conn.execute("UPDATE broadcast SET part_day = %s WHERE id = %s", (day, b))
    assert not [
        p
        for p in store.run(conn, partitions.listing())
        if p.state == partitions.State.ATTACHED and p.first_day <= day < p.end_day
    ]
    assert runtime.call(snapshot.start(runtime, b)) == 2
    ((table, filed),) = _partitions_of(conn, b)
    assert filed == day
    made = [p for p in store.run(conn, partitions.listing()) if p.name == table]
    assert [(p.state, p.first_day <= day < p.end_day) for p in made] == [
        (partitions.State.ATTACHED, True)
    ]


def recipients(conn: psycopg.Connection[Any], source: store.Query) -> set[tuple[Any, ...]]:
    return {tuple(r) for r in conn.execute(source.sql, source.params).fetchall()}


def test_many_audiences_in_one_query_are_each_as_its_own_copy_would_take_it(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    channel, other_channel = api.channel(), api.channel()
    account, other_account = api.account(channel["id"]), api.account(other_channel["id"])
    ann = api.contact(account["id"], "ann", tags=["vip"])
    bob = api.contact(account["id"], "bob")
    cyd = api.contact(account["id"], "cyd", tags=["vip"])
    gone = api.contact(account["id"], "gone", tags=["vip"], opted_out=True)
    elsewhere = api.contact(other_account["id"], "eve")
    conn.execute(
        "UPDATE contact SET unreachable_at = now(), unreachable_reason = 'blocked' WHERE id = %s",
        (cyd["id"],),
    )
    early = datetime.now(UTC)
    late_one = api.contact(account["id"], "dan", tags=["vip"])
    later = datetime.now(UTC)
    vip = api.tag_id("vip")
    # A broadcast in which ann and cyd failed and bob was sent to (cyd is unreachable now).
    source = api.broadcast(channel["id"])["id"]
    start_with_deliveries(source, ["failed", "sent", "failed"])
    picks = [
        # Hand-picked, same workspace, channel and filter: one audience query between them.
        (AudienceSpec(selection="manual", contact_ids=[ann["id"]]), channel, early),
        (AudienceSpec(selection="manual", contact_ids=[ann["id"], bob["id"]]), channel, later),
        (AudienceSpec(selection="manual", contact_ids=[late_one["id"]]), channel, early),
        (AudienceSpec(selection="manual", contact_ids=[late_one["id"], cyd["id"]]), channel, later),
        # The same picks under a filter, and a pick of another channel's contact.
        (
            AudienceSpec(tag_ids=[vip], selection="manual", contact_ids=[ann["id"], bob["id"]]),
            channel,
            later,
        ),
        (AudienceSpec(selection="manual", contact_ids=[gone["id"]]), channel, later),
        (AudienceSpec(selection="manual", contact_ids=[elsewhere["id"]]), other_channel, later),
        # Whole audiences.
        (AudienceSpec(tag_ids=[vip]), channel, later),
        (AudienceSpec(exclude_contact_ids=[bob["id"]]), channel, early),
        # Those that failed in a broadcast: hand-picked among them (not grouped with the
        # same picks drawn from everyone), and all of them.
        (
            AudienceSpec(selection="manual", contact_ids=[ann["id"], bob["id"]], failed_in=source),
            channel,
            later,
        ),
        (AudienceSpec(failed_in=source), channel, later),
    ]
    tasks = [
        Starting(1000 + i, api.workspace_id, ch["id"], spec, at)
        for i, (spec, ch, at) in enumerate(picks)
    ]
    together = recipients(conn, recipients_source(tasks))
    alone = {
        (task.broadcast_id, *row)
        for task in tasks
        for row in recipients(
            conn,
            audience_source(task.workspace_id, task.channel_id, task.spec, task.started_at),
        )
    }
    assert together == alone
    by_task: dict[int, set[int]] = {}
    for broadcast_id, contact_id, *_ in together:
        by_task.setdefault(broadcast_id, set()).add(contact_id)
    # The one who opted out is matched (to be skipped with the reason) wherever the audience
    # names it, except in the retries of the failed.
    assert by_task == {
        1000: {ann["id"]},
        1001: {ann["id"], bob["id"]},
        1003: {late_one["id"], cyd["id"]},
        1004: {ann["id"]},
        1005: {gone["id"]},
        1006: {elsewhere["id"]},
        1007: {ann["id"], cyd["id"], gone["id"], late_one["id"]},
        1008: {ann["id"], cyd["id"], gone["id"]},
        1009: {ann["id"]},
        1010: {ann["id"]},
    }
    reasons = {(b, c): r for b, c, _, r in together}
    assert reasons[(1005, gone["id"])] == "skipped: contact opted out"
    assert reasons[(1008, cyd["id"])] == "skipped: contact unreachable: blocked"
    assert reasons[(1008, ann["id"])] is None


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_a_long_copy_does_not_hold_up_a_group_of_small_ones(
    api: Api, conn: psycopg.Connection[Any], runtime: Runtime, database_url: str
) -> None:
    channel = api.channel()
    account = api.account(channel["id"])
    contacts = [api.contact(account["id"], f"c-{i}")["id"] for i in range(4)]
    big = api.broadcast(channel["id"])
    small = [
        api.broadcast(channel["id"], {"selection": "manual", "contact_ids": [c]})["id"]
        for c in contacts[:3]
    ]
    conn.execute(
        "UPDATE broadcast SET status = 'in_progress', started_at = now() WHERE id = ANY(%s)",
        ([big["id"], *small],),
    )

    def copied(ids: list[int]) -> bool:
        row = conn.execute(
            "SELECT count(*) FROM broadcast WHERE id = ANY(%s) AND snapshot_at IS NOT NULL",
            (ids,),
        ).fetchone()
        return row == (len(ids),)

    with psycopg.connect(libpq_url(database_url)) as blocker:
        # Another transaction holds one of the big audience's rows: its copy waits for it.
        blocker.execute(
            "INSERT INTO delivery (workspace_id, broadcast_id, contact_id, address, part_day) "
            f"VALUES (%s, %s, %s, 'c-3', {store.TODAY})",
            (api.workspace_id, big["id"], contacts[3]),
        )
        assert runtime.call(runtime.engine.start_copy(big["id"])) is Taken.TAKEN
        assert runtime.call(runtime.engine.start_copies(small)) is Taken.TAKEN
        wait_for("the small audiences to be copied", lambda: copied(small))
        assert not copied([big["id"]])
        blocker.rollback()
    wait_for("the large audience to be copied", lambda: copied([big["id"]]))
    counts = dict(
        conn.execute(
            "SELECT broadcast_id, count(*) FROM delivery WHERE broadcast_id = ANY(%s) "
            "GROUP BY broadcast_id",
            ([big["id"], *small],),
        ).fetchall()
    )
    assert counts == {big["id"]: 4, **dict.fromkeys(small, 1)}
    wait_for("the copies to end", lambda: not runtime.engine.copies)


def test_a_group_start_files_each_copy_under_its_own_day(
    api: Api, conn: psycopg.Connection[Any], runtime: Runtime
) -> None:
    fixed, fresh = _started(api, conn, 1), _started(api, conn, 2)
    # One had its day fixed by an earlier attempt, long enough ago that no partition holds it
    # (a day no other test files anything under): the group's copy makes its partition.
    day = date(1998, 7, 20)
    conn.execute("UPDATE broadcast SET part_day = %s WHERE id = %s", (day, fixed))
    assert not [
        p
        for p in store.run(conn, partitions.listing())
        if p.state == partitions.State.ATTACHED and p.first_day <= day < p.end_day
    ]
    assert runtime.call(snapshot.start_group(runtime, [fixed, fresh])) == {fixed: 1, fresh: 2}
    today = conn.execute(f"SELECT {store.TODAY}").fetchone()
    assert today is not None
    for b, filed in ((fixed, day), (fresh, today[0])):
        ((table, row_day),) = _partitions_of(conn, b)
        assert row_day == filed
        assert table.startswith("delivery_p")
        assert conn.execute(
            "SELECT part_day, snapshot_at IS NOT NULL FROM broadcast WHERE id = %s", (b,)
        ).fetchone() == (filed, True)
        assert conn.execute(
            "SELECT DISTINCT part_day FROM delivery_batch WHERE broadcast_id = %s", (b,)
        ).fetchall() == [(filed,)]
