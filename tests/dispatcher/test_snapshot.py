"""The audience a started broadcast copies: the preview's query, as it stood at the start."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from services.dispatcher.snapshot import audience_source
from shared import delivery_store as store
from shared.db.engine import libpq_url
from shared.domain.audience import AudienceSpec
from tests.conftest import Api


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
    assert store.run(conn, store.snapshot(b["id"], source, batch_size=10)) == 2
    copied = dict(
        conn.execute(
            "SELECT contact_id, status FROM delivery WHERE broadcast_id = %s", (b["id"],)
        ).fetchall()
    )
    assert copied == {vip["id"]: "queued", blocked["id"]: "skipped"}
    assert plain["id"] not in copied
    assert gone["id"] not in copied
