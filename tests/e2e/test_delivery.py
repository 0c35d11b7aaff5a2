"""A broadcast created through the API reaches every chosen recipient exactly once."""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import time
from datetime import UTC, datetime, timedelta

import httpx2 as httpx
import pytest
from PIL import Image

from services.dispatcher.snapshot import FIRST_PART, PART
from tests.e2e.conftest import Api, System

pytestmark = pytest.mark.e2e


def png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (3, 3), color).save(buf, "PNG")
    return buf.getvalue()


def test_immediate_broadcast_to_5000_tagged_contacts_reaches_each_exactly_once(
    api: Api, system: System
) -> None:
    channel, hook = api.webhook_channel(rate=5000)
    account = api.account(channel["id"])
    targets = [f"t-{i}" for i in range(5000)]
    api.import_contacts(account["id"], targets, tags=["target"])
    api.import_contacts(account["id"], [f"other-{i}" for i in range(500)], tags=["other"])
    images = [png("red"), png("green")]
    media = [
        api.ok("POST", "/v1/media", 201, files={"file": (f"{i}.png", data, "image/png")})
        for i, data in enumerate(images)
    ]
    text = "Grand opening — 20% off, today only ✨"
    b = api.broadcast(
        channel["id"],
        {"tag_ids": [api.tag_id("target")]},
        content={"text": text, "media_ids": [m["id"] for m in media]},
        send_at=None,
    )
    done = api.wait_status(b["id"], "completed")
    assert done["counts"] == {
        "total": 5000,
        "queued": 0,
        "sent": 5000,
        "failed": 0,
        "canceled": 0,
        "skipped": 0,
        "partial": 0,
    }

    stats = api.sim_stats(hook)
    assert (stats["requests"], stats["accepted"], stats["duplicates"], stats["bad_signatures"]) == (
        5000,
        5000,
        0,
        0,
    )
    requests = api.sim_requests(hook)
    assert sorted(r["to"] for r in requests) == sorted(targets)
    assert len({r["key"] for r in requests}) == 5000
    assert all(r["idempotency_header"] == r["key"] for r in requests)
    assert {r["text"] for r in requests} == {text}
    assert {r["broadcast_id"] for r in requests} == {b["id"]}
    first = requests[0]["media"]
    assert [m["content_type"] for m in first] == ["image/png", "image/png"]
    for m, data in zip(first, images, strict=True):
        assert httpx.get(m["url"]).content == data, "the signed media URL serves the upload"
    tampered = first[0]["url"].replace("signature=", "signature=0")
    assert httpx.get(tampered).status_code == 403


def test_an_audience_copied_in_parts_is_sent_while_copied_and_reaches_each_once(
    api: Api, system: System
) -> None:
    # More recipients than the copy's first part: its batches go out as soon as that part
    # commits, before the rest is copied.
    channel, hook = api.webhook_channel(rate=10_000)
    account = api.account(channel["id"])
    targets = [f"p-{i}" for i in range(FIRST_PART + PART // 10)]
    api.import_contacts(account["id"], targets, tags=["target"])
    api.import_contacts(account["id"], [f"no-{i}" for i in range(300)], tags=["other"])
    b = api.broadcast(channel["id"], {"tag_ids": [api.tag_id("target")]}, send_at=None)
    done = api.wait_status(b["id"], "completed", timeout=120)
    assert done["counts"]["total"] == done["counts"]["sent"] == len(targets)
    stats = api.sim_stats(hook)
    assert (stats["accepted"], stats["duplicates"]) == (len(targets), 0)
    assert sorted(r["to"] for r in api.sim_requests(hook)) == sorted(targets)
    # Two parts, each its own transaction: the first part's rows (and their batches) were
    # committed, for the scheduler to hand out, before the copy ended.
    [(first_rows, last_rows, copied)] = system.sql(
        "SELECT min(d.created_at), max(d.created_at), b.snapshot_at "
        "FROM broadcast b JOIN delivery d ON d.broadcast_id = b.id "
        "WHERE b.id = %s GROUP BY b.snapshot_at",
        (b["id"],),
    )
    assert first_rows < last_rows <= copied


def test_webhook_signature_is_hmac_sha256_of_the_body(api: Api, system: System) -> None:
    # The simulator checks every signature with the channel secret; a wrong secret shows up
    # as a permanent failure listed with the provider's answer.
    channel, hook = api.webhook_channel()
    account = api.account(channel["id"])
    api.import_contacts(account["id"], ["sig-1"])
    system.sim.put(f"/_sim/hooks/{hook}", json={"secret": "not-the-channel-secret"})
    b = api.broadcast(channel["id"], {})
    api.wait_status(b["id"], "completed")
    [row] = api.ok("GET", f"/v1/broadcasts/{b['id']}/recipients", params={"status": "failed"})[
        "items"
    ]
    assert row["last_error"] == "webhook HTTP 401: bad signature"
    body = b'{"x":1}'
    expected = "sha256=" + hmac.new(b"k", body, hashlib.sha256).hexdigest()
    from services.dispatcher.channels.webhook import sign

    assert sign(b"k", body) == expected


def test_scheduled_broadcast_starts_at_its_time_not_before(api: Api, system: System) -> None:
    channel, hook = api.webhook_channel()
    account = api.account(channel["id"])
    api.import_contacts(account["id"], ["s-1", "s-2"])
    later = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
    b = api.broadcast(channel["id"], {}, send_at=later)
    # Time passes: bring the send time to 3 s from now, as if the 10 minutes had gone by.
    system.sql(
        "UPDATE broadcast SET send_at = now() + interval '3 seconds' WHERE id = %s", (b["id"],)
    )
    send_at = datetime.fromisoformat(api.get(b["id"])["send_at"])
    while datetime.now(UTC) < send_at - timedelta(seconds=0.5):
        assert api.get(b["id"])["status"] == "pending"
        assert api.sim_stats(hook)["requests"] == 0
        time.sleep(0.2)
    done = api.wait_status(b["id"], "completed")
    assert datetime.fromisoformat(done["started_at"]) >= send_at
    first_request = min(r["t"] for r in api.sim_requests(hook))
    assert first_request >= send_at.timestamp()
    assert api.sim_stats(hook)["accepted"] == 2


def test_select_all_with_exclusions_and_manual_selection_reach_exactly_the_chosen(api: Api) -> None:
    channel, hook = api.webhook_channel()
    account = api.account(channel["id"])
    api.import_contacts(account["id"], [f"c-{i}" for i in range(20)], tags=["club"])
    ids = api.contacts(account["id"])
    excluded = [ids["c-3"], ids["c-4"], ids["c-15"]]
    all_but = api.broadcast(
        channel["id"], {"tag_ids": [api.tag_id("club")], "exclude_contact_ids": excluded}
    )
    picked = api.broadcast(
        channel["id"], {"selection": "manual", "contact_ids": [ids["c-1"], ids["c-9"]]}
    )
    api.wait_status(all_but["id"], "completed")
    api.wait_status(picked["id"], "completed")
    by_broadcast: dict[int, list[str]] = {}
    for r in api.sim_requests(hook):
        by_broadcast.setdefault(r["broadcast_id"], []).append(r["to"])
    assert sorted(by_broadcast[all_but["id"]]) == sorted(
        f"c-{i}" for i in range(20) if i not in (3, 4, 15)
    )
    assert sorted(by_broadcast[picked["id"]]) == ["c-1", "c-9"]
    assert api.sim_stats(hook)["duplicates"] == 0


def test_a_contact_added_after_the_start_does_not_receive_it(api: Api) -> None:
    channel, hook = api.webhook_channel(rate=20)
    account = api.account(channel["id"])
    api.import_contacts(account["id"], [f"early-{i}" for i in range(30)], tags=["news"])
    b = api.broadcast(channel["id"], {"tag_ids": [api.tag_id("news")]})
    api.wait_status(b["id"], "in_progress", "completed")
    api.import_contacts(account["id"], ["late-1"], tags=["news"])
    done = api.wait_status(b["id"], "completed")
    assert done["counts"]["total"] == 30
    assert "late-1" not in {r["to"] for r in api.sim_requests(hook)}


def test_permanent_failures_are_listed_with_reasons_and_in_the_csv(api: Api) -> None:
    channel, _hook = api.webhook_channel(fail_addresses=["bad-1", "bad-2"])
    account = api.account(channel["id"])
    api.import_contacts(account["id"], ["ok-1", "bad-1", "ok-2", "bad-2"])
    b = api.broadcast(channel["id"], {})
    done = api.wait_status(b["id"], "completed")
    assert done["counts"]["sent"] == 2
    assert done["counts"]["failed"] == 2
    failed = api.ok("GET", f"/v1/broadcasts/{b['id']}/recipients", params={"status": "failed"})[
        "items"
    ]
    assert {r["address"]: r["last_error"] for r in failed} == {
        "bad-1": "webhook HTTP 404: no such recipient: bad-1",
        "bad-2": "webhook HTTP 404: no such recipient: bad-2",
    }
    assert all(r["attempts"] == 1 for r in failed)
    exported = api.http.get(
        f"/v1/broadcasts/{b['id']}/recipients",
        params={"status": "failed"},
        headers={"Accept": "text/csv"},
    )
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert sorted(r["address"] for r in rows) == ["bad-1", "bad-2"]
    assert all("no such recipient" in r["last_error"] for r in rows)


def test_transient_failures_are_retried_and_end_sent(api: Api) -> None:
    channel, hook = api.webhook_channel(transient_first=2)
    account = api.account(channel["id"])
    api.import_contacts(account["id"], [f"r-{i}" for i in range(50)])
    b = api.broadcast(channel["id"], {})
    done = api.wait_status(b["id"], "completed")
    assert done["counts"]["sent"] == 50
    assert done["counts"]["failed"] == 0
    stats = api.sim_stats(hook)
    assert (
        stats["requests"],
        stats["transient_errors"],
        stats["accepted"],
        stats["duplicates"],
    ) == (150, 100, 50, 0)
    rows = api.ok("GET", f"/v1/broadcasts/{b['id']}/recipients", params={"limit": 100})["items"]
    assert {r["attempts"] for r in rows} == {3}
    assert {r["status"] for r in rows} == {"sent"}
    assert all(r["provider_message_id"].startswith("sim-") for r in rows)


def test_a_recipient_that_keeps_failing_transiently_fails_after_the_last_attempt(api: Api) -> None:
    channel, _hook = api.webhook_channel(transient_first=99)
    account = api.account(channel["id"])
    api.import_contacts(account["id"], ["flaky"])
    b = api.broadcast(channel["id"], {})
    done = api.wait_status(b["id"], "completed")
    assert done["counts"]["failed"] == 1
    [row] = api.ok("GET", f"/v1/broadcasts/{b['id']}/recipients")["items"]
    assert row["attempts"] == 5
    assert row["last_error"].startswith("gave up after 5 attempts: webhook HTTP 503")


def test_conversation_timed_send_reaches_its_contact_and_is_listed(api: Api) -> None:
    channel, hook = api.webhook_channel()
    account = api.account(channel["id"])
    api.import_contacts(account["id"], ["ann", "bob"])
    ids = api.contacts(account["id"])
    conversation = api.ok(
        "POST",
        "/v1/conversations",
        201,
        json={"account_id": account["id"], "contact_id": ids["ann"]},
    )
    b = api.ok(
        "POST",
        f"/v1/conversations/{conversation['id']}/timed-sends",
        201,
        json={"content": {"text": "your order shipped"}},
    )
    api.wait_status(b["id"], "completed")
    assert [(r["to"], r["text"]) for r in api.sim_requests(hook)] == [("ann", "your order shipped")]
    listed = api.ok("GET", "/v1/broadcasts", params={"origin": "conversation"})["items"]
    assert [(x["id"], x["status"]) for x in listed] == [(b["id"], "completed")]
