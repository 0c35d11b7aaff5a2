"""Retry the failed recipients of a broadcast, and clone a broadcast."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from services.dispatcher.snapshot import audience_source
from shared import delivery_store as store
from shared.db.engine import libpq_url
from shared.domain.audience import MAX_IDS, AudienceSpec
from tests.conftest import Api
from tests.factories import set_status, start_with_deliveries


@pytest.fixture
def conn(database_url: str) -> Any:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as c:
        yield c


@pytest.fixture
def sent(api: Api, conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """A completed broadcast to seven contacts: sent, failed, skipped, failed (opted out
    since), failed (found unreachable since), canceled, partly sent.
    """
    account = api.account(api.channel()["id"])
    contacts = [api.contact(account["id"], f"user-{i}")["id"] for i in range(7)]
    b = api.broadcast(account["channel_id"], content={"text": "hello again"})
    start_with_deliveries(
        b["id"],
        ["sent", "failed", "skipped", "failed", "failed", "canceled", "partial"],
        errors=[None, "HTTP 503", None, "HTTP 500", "timeout", None, "1 of 2 parts"],
    )
    set_status(b["id"], "completed")
    conn.execute("UPDATE contact SET opted_out_at = now() WHERE id = %s", (contacts[3],))
    conn.execute(
        "UPDATE contact SET unreachable_at = now(), unreachable_reason = 'gone' WHERE id = %s",
        (contacts[4],),
    )
    return {"broadcast": b, "contacts": contacts, "channel_id": account["channel_id"]}


def copied(conn: psycopg.Connection[Any], api: Api, broadcast: dict[str, Any]) -> list[int]:
    """Start ``broadcast`` and copy its audience as a dispatcher would; the contacts copied."""
    conn.execute(
        "UPDATE broadcast SET status = 'in_progress', started_at = now() WHERE id = %s",
        (broadcast["id"],),
    )
    source = audience_source(
        api.workspace_id,
        broadcast["channel_id"],
        AudienceSpec.model_validate(broadcast["audience"]),
        datetime.now(UTC),
    )
    store.run(conn, store.snapshot(broadcast["id"], source, batch_size=500))
    return [
        r[0]
        for r in conn.execute(
            "SELECT contact_id FROM delivery WHERE broadcast_id = %s ORDER BY contact_id",
            (broadcast["id"],),
        )
    ]


def test_a_retry_goes_to_exactly_the_recipients_that_failed_and_is_linked_both_ways(
    api: Api, conn: psycopg.Connection[Any], sent: dict[str, Any]
) -> None:
    original = sent["broadcast"]
    retry = api.ok("post", f"/v1/broadcasts/{original['id']}/retry-failed", 201)
    # Failed: 1, 3 and 4; 3 opted out and 4 was found unreachable since: only 1 is retried.
    assert retry["audience_size"] == 1
    assert (retry["status"], retry["channel_id"], retry["content"]["text"]) == (
        "pending",
        sent["channel_id"],
        "hello again",
    )
    assert retry["retry_of"] == original["id"]
    assert retry["audience"]["failed_in"] == original["id"]
    assert retry["name"] == "test broadcast (retry of failed)"
    assert api.ok("get", f"/v1/broadcasts/{original['id']}")["retries"] == [retry["id"]]
    listed = {b["id"]: b for b in api.ok("get", "/v1/broadcasts")["items"]}
    assert listed[original["id"]]["retries"] == [retry["id"]]
    assert listed[retry["id"]]["retry_of"] == original["id"]
    # What is copied when it starts is that same one contact, none as skipped.
    assert copied(conn, api, retry) == [sent["contacts"][1]]
    # A second retry would send again to everyone the first reaches: refused while it
    # stands, and made once it is canceled (named, and due later).
    twice = api.post(f"/v1/broadcasts/{original['id']}/retry-failed")
    assert twice.status_code == 409, twice.text
    assert f"already retried by broadcast {retry['id']}" in twice.text
    api.ok("post", f"/v1/broadcasts/{retry['id']}/cancel")
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    again = api.ok(
        "post",
        f"/v1/broadcasts/{original['id']}/retry-failed",
        201,
        json={"name": "second go", "send_at": later},
    )
    assert again["name"] == "second go"
    assert datetime.fromisoformat(again["send_at"]) == datetime.fromisoformat(later)
    assert api.ok("get", f"/v1/broadcasts/{original['id']}")["retries"] == [
        retry["id"],
        again["id"],
    ]


def test_a_retry_is_refused_when_nobody_failed_or_the_broadcast_is_not_ours(
    api: Api, other_api: Api, sent: dict[str, Any]
) -> None:
    account = api.account(api.channel()["id"])
    api.contact(account["id"], "only")
    clean = api.broadcast(account["channel_id"])
    start_with_deliveries(clean["id"], ["sent"])
    refused = api.post(f"/v1/broadcasts/{clean['id']}/retry-failed")
    assert refused.status_code == 409, refused.text
    assert "no failed recipients" in refused.text
    assert api.post("/v1/broadcasts/999999999/retry-failed").status_code == 404
    theirs = other_api.post(f"/v1/broadcasts/{sent['broadcast']['id']}/retry-failed")
    assert theirs.status_code == 404
    bad = api.post(f"/v1/broadcasts/{sent['broadcast']['id']}/retry-failed", json={"x": 1})
    assert bad.status_code == 422
    assert "x" in bad.text


def test_a_retry_is_replayed_for_the_same_idempotency_key(api: Api, sent: dict[str, Any]) -> None:
    path = f"/v1/broadcasts/{sent['broadcast']['id']}/retry-failed"
    key = {"Idempotency-Key": str(uuid.uuid4())}
    first = api.post(path, headers=key)
    again = api.post(path, headers=key)
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    other = api.post(path, headers=key, json={"name": "other"})
    assert other.status_code == 422
    assert "Idempotency-Key" in other.text
    # The same key on another route (or broadcast) is another request: refused, not replayed.
    clone = api.post(f"/v1/broadcasts/{sent['broadcast']['id']}/clone", headers=key)
    assert clone.status_code == 422
    assert "Idempotency-Key" in clone.text


def test_a_retry_is_refused_when_everyone_that_failed_may_no_longer_be_sent_to(
    api: Api, conn: psycopg.Connection[Any], sent: dict[str, Any]
) -> None:
    conn.execute("UPDATE contact SET opted_out_at = now() WHERE id = %s", (sent["contacts"][1],))
    refused = api.post(f"/v1/broadcasts/{sent['broadcast']['id']}/retry-failed")
    assert refused.status_code == 409, refused.text
    assert "opted out or was found unreachable since" in refused.text


def test_an_audience_of_failed_recipients_names_a_broadcast_of_the_same_channel(
    api: Api, sent: dict[str, Any]
) -> None:
    elsewhere = api.account(api.channel()["id"])
    api.contact(elsewhere["id"], "x")
    for failed_in, kind in ((sent["broadcast"]["id"], "wrong_channel"), (999999, "not_found")):
        answer = api.post(
            "/v1/broadcasts",
            json={
                "name": "n",
                "channel_id": elsewhere["channel_id"],
                "audience": {"failed_in": failed_in},
                "content": {"text": "t"},
            },
        )
        assert answer.status_code == 422, answer.text
        [error] = answer.json()["errors"]
        assert (error["field"], error["type"]) == ("audience.failed_in", kind)


def test_a_retry_has_no_cap_on_its_recipients(api: Api, conn: psycopg.Connection[Any]) -> None:
    n = MAX_IDS + 1  # more than any list of contacts may name
    account = api.account(api.channel()["id"])
    api.contact(account["id"], "first")
    conn.execute(
        "INSERT INTO contact (workspace_id, account_id, address) "
        "SELECT %s, %s, 'bulk-' || g FROM generate_series(2, %s) AS g",
        (api.workspace_id, account["id"], n),
    )
    b = api.broadcast(account["channel_id"])
    start_with_deliveries(b["id"], ["failed"])
    day = conn.execute("SELECT part_day FROM broadcast WHERE id = %s", (b["id"],)).fetchone()
    assert day is not None
    conn.execute(
        "INSERT INTO delivery (workspace_id, broadcast_id, contact_id, address, status, "
        "last_error, part_day) SELECT workspace_id, %s, id, address, 'failed', 'HTTP 500', %s "
        "FROM contact WHERE account_id = %s AND address LIKE 'bulk-%%'",
        (b["id"], day[0], account["id"]),
    )
    retry = api.ok("post", f"/v1/broadcasts/{b['id']}/retry-failed", 201)
    assert retry["audience_size"] == n


def test_a_clone_copies_channel_audience_and_content_and_takes_overrides(
    api: Api, sent: dict[str, Any]
) -> None:
    original = sent["broadcast"]
    account_id = api.ok("get", f"/v1/contacts/{sent['contacts'][0]}")["account_id"]
    api.contact(account_id, "user-added-since")
    copy = api.ok("post", f"/v1/broadcasts/{original['id']}/clone", 201)
    assert copy["id"] != original["id"]
    assert (copy["status"], copy["name"]) == ("pending", "test broadcast (copy)")
    assert (copy["channel_id"], copy["audience"], copy["content"]) == (
        original["channel_id"],
        original["audience"],
        original["content"],
    )
    # Worked out anew: 7 then, 8 now (a contact added since; the one who opted out and the
    # one found unreachable since are still matched, to be skipped with the reason).
    assert (original["audience_size"], copy["audience_size"]) == (7, 8)
    later = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    changed = api.ok(
        "post",
        f"/v1/broadcasts/{original['id']}/clone",
        201,
        json={
            "name": "December",
            "content": {"text": "new text"},
            "audience": {"selection": "manual", "contact_ids": [sent["contacts"][0]]},
            "send_at": later,
        },
    )
    assert (changed["name"], changed["content"]["text"], changed["audience_size"]) == (
        "December",
        "new text",
        1,
    )
    assert datetime.fromisoformat(changed["send_at"]) == datetime.fromisoformat(later)
    assert api.ok("get", f"/v1/broadcasts/{original['id']}")["status"] == "completed"


def test_a_clone_with_a_bad_override_names_the_field_and_writes_nothing(
    api: Api, other_api: Api, sent: dict[str, Any]
) -> None:
    before = len(api.ok("get", "/v1/broadcasts")["items"])
    path = f"/v1/broadcasts/{sent['broadcast']['id']}/clone"
    soon = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    for body, field in (
        ({"content": {"text": ""}}, "content"),
        ({"send_at": soon}, "send_at"),
        ({"channel_id": 999999}, "channel_id"),
    ):
        answer = api.post(path, json=body)
        assert answer.status_code == 422, answer.text
        assert any(e["field"].startswith(field) for e in answer.json()["errors"]), answer.text
    assert len(api.ok("get", "/v1/broadcasts")["items"]) == before
    assert other_api.post(path).status_code == 404
