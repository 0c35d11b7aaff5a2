"""Creating, listing, modifying and steering broadcasts through the API."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import func, select, text, update

from shared.db.engine import transaction
from shared.db.models import Broadcast, Delivery
from tests.conftest import Api
from tests.factories import delivery_statuses, set_status, start_with_deliveries


@pytest.fixture
def setup(api: Api) -> dict[str, Any]:
    channel = api.channel("webhook")
    account = api.account(channel["id"])
    contacts = [
        api.contact(account["id"], f"user-{i}", tags=["vip"] if i < 3 else []) for i in range(5)
    ]
    return {"channel": channel, "account": account, "contacts": contacts}


def ahead(**delta: float) -> str:
    return (datetime.now(UTC) + timedelta(**delta)).isoformat()


def broadcast_rows(workspace_id: int) -> int:
    with transaction() as session:
        return int(
            session.execute(
                select(func.count())
                .select_from(Broadcast)
                .where(Broadcast.workspace_id == workspace_id)
            ).scalar_one()
        )


def upload_png(api: Api) -> int:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buf, "PNG")
    media: dict[str, Any] = api.ok(
        "post", "/v1/media", 201, files={"file": ("a.png", buf.getvalue(), "image/png")}
    )
    return int(media["id"])


# --- create ---------------------------------------------------------------------------------


def test_immediate_broadcast_is_pending_and_due_now(api: Api, setup: dict[str, Any]) -> None:
    before = datetime.now(UTC)
    b = api.broadcast(setup["channel"]["id"], {"tag_ids": [api.tag_id("vip")]}, send_at=None)
    assert b["status"] == "pending"
    assert b["origin"] == "broadcast"
    assert b["audience_size"] == 3
    assert (
        before - timedelta(seconds=1) <= datetime.fromisoformat(b["send_at"]) <= datetime.now(UTC)
    )
    assert b["counts"] == {
        "total": 0,
        "queued": 0,
        "sent": 0,
        "failed": 0,
        "canceled": 0,
        "skipped": 0,
        "partial": 0,
    }
    assert api.ok("get", f"/v1/broadcasts/{b['id']}") == b


def test_scheduled_broadcast_keeps_its_time(api: Api, setup: dict[str, Any]) -> None:
    when = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=6)
    b = api.broadcast(setup["channel"]["id"], send_at=when.isoformat())
    assert datetime.fromisoformat(b["send_at"]) == when


def test_send_at_with_another_offset_is_kept_as_the_same_instant(
    api: Api, setup: dict[str, Any]
) -> None:
    when = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=2)
    local = when.astimezone(__import__("datetime").timezone(timedelta(hours=5, minutes=30)))
    b = api.broadcast(setup["channel"]["id"], send_at=local.isoformat())
    assert datetime.fromisoformat(b["send_at"]) == when


def test_a_list_sums_each_audience_up_and_the_detail_has_all_of_it(
    api: Api, setup: dict[str, Any]
) -> None:
    ids = [c["id"] for c in setup["contacts"]]
    vip = api.tag_id("vip")
    account = setup["account"]["id"]
    picked = api.broadcast(setup["channel"]["id"], {"selection": "manual", "contact_ids": ids[:4]})
    tagged = api.broadcast(
        setup["channel"]["id"],
        {"account_ids": [account], "tag_ids": [vip], "exclude_contact_ids": ids[:1]},
    )
    items = {b["id"]: b for b in api.ok("get", "/v1/broadcasts")["items"]}
    assert items[picked["id"]]["audience"] == {
        "account_ids": [],
        "tag_ids": [],
        "tag_match": "any",
        "selection": "manual",
        "failed_in": None,
        "contact_count": 4,
        "excluded_count": 0,
        "description": "4 hand-picked contacts on the channel",
    }
    summary = items[tagged["id"]]["audience"]
    assert "contact_ids" not in summary
    assert "exclude_contact_ids" not in summary
    assert (summary["excluded_count"], summary["description"]) == (
        1,
        f"everyone on account {account} tagged {vip}, less 1 excluded",
    )
    assert api.ok("get", f"/v1/broadcasts/{picked['id']}")["audience"]["contact_ids"] == ids[:4]
    assert api.ok("get", f"/v1/broadcasts/{tagged['id']}")["audience"]["exclude_contact_ids"] == [
        ids[0]
    ]


def test_manual_selection_and_exclusions_are_stored(api: Api, setup: dict[str, Any]) -> None:
    ids = [c["id"] for c in setup["contacts"]]
    manual = api.broadcast(setup["channel"]["id"], {"selection": "manual", "contact_ids": ids[:2]})
    assert manual["audience_size"] == 2
    assert manual["audience"]["contact_ids"] == ids[:2]
    excluded = api.broadcast(setup["channel"]["id"], {"exclude_contact_ids": ids[:2]})
    assert excluded["audience_size"] == 3


def test_content_with_images(api: Api, setup: dict[str, Any]) -> None:
    media_ids = [upload_png(api) for _ in range(2)]
    b = api.broadcast(setup["channel"]["id"], content={"media_ids": media_ids})
    assert b["content"] == {
        "text": None,
        "media_ids": media_ids,
        "template": None,
        "message_tag": None,
    }


BAD_CREATES: list[tuple[str, dict[str, Any], str, str]] = [
    ("scheduled 4 minutes ahead", {"send_at": "+4m"}, "send_at", "at least 5 minutes"),
    ("in the past", {"send_at": "-1m"}, "send_at", "at least 5 minutes"),
    ("no UTC offset", {"send_at": "naive"}, "send_at", "UTC offset"),
    ("empty content", {"content": {"text": "   "}}, "content", "empty"),
    ("no content", {"content": {}}, "content", "empty"),
    (
        "11 images",
        {"content": {"media_ids": list(range(1, 12))}},
        "content.media_ids",
        "at most 10",
    ),
    ("unknown image", {"content": {"media_ids": [987654321]}}, "content.media_ids[0]", "not found"),
    ("two channels", {"channel_id": [1, 2]}, "channel_id", "exactly one channel"),
    ("channel list", {"channel_ids": [1, 2]}, "channel_ids", "exactly one channel"),
    ("unknown channel", {"channel_id": 987654321}, "channel_id", "not found"),
    ("unknown tag", {"audience": {"tag_ids": [987654321]}}, "audience.tag_ids[0]", "not found"),
    (
        "unknown account",
        {"audience": {"account_ids": [987654321]}},
        "audience.account_ids[0]",
        "not found",
    ),
    ("manual without ids", {"audience": {"selection": "manual"}}, "audience", "contact_ids"),
    (
        "contact_ids with all",
        {"audience": {"contact_ids": [1]}},
        "audience",
        "selection 'manual' only",
    ),
    ("bad tag_match", {"audience": {"tag_match": "most"}}, "audience.tag_match", "'any' or 'all'"),
    (
        "unknown excluded",
        {"audience": {"exclude_contact_ids": [987654321]}},
        "audience.exclude_contact_ids[0]",
        "not found",
    ),
    ("unknown field", {"colour": "red"}, "colour", "not a known field"),
    ("blank name", {"name": ""}, "name", "at least 1 character"),
]


@pytest.mark.parametrize(
    ("case", "change", "field", "words"), BAD_CREATES, ids=[c[0] for c in BAD_CREATES]
)
def test_bad_create_names_field_and_rule_and_writes_nothing(
    api: Api, setup: dict[str, Any], case: str, change: dict[str, Any], field: str, words: str
) -> None:
    body: dict[str, Any] = {
        "name": "b",
        "channel_id": setup["channel"]["id"],
        "audience": {},
        "content": {"text": "hi"},
    }
    body.update(change)
    send_at = body.get("send_at")
    if send_at == "naive":
        body["send_at"] = (datetime.now() + timedelta(hours=1)).replace(tzinfo=None).isoformat()
    elif isinstance(send_at, str):
        body["send_at"] = ahead(minutes=float(send_at[:-1]))
    response = api.post("/v1/broadcasts", json=body)
    assert response.status_code == 422, response.text
    errors = {e["field"]: e["msg"] for e in response.json()["detail"]}
    assert field in errors, errors
    assert words in errors[field]
    assert broadcast_rows(api.workspace_id) == 0


def test_manual_pick_outside_the_filtered_audience_is_named(
    api: Api, setup: dict[str, Any]
) -> None:
    plain = setup["contacts"][4]["id"]  # not tagged vip
    response = api.post(
        "/v1/broadcasts",
        json={
            "name": "b",
            "channel_id": setup["channel"]["id"],
            "audience": {
                "tag_ids": [api.tag_id("vip")],
                "selection": "manual",
                "contact_ids": [setup["contacts"][0]["id"], plain],
            },
            "content": {"text": "hi"},
        },
    )
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["field"] == "audience.contact_ids[1]"
    assert f"contact {plain} is not in the filtered audience" in error["msg"]


def test_empty_audience_is_refused(api: Api, setup: dict[str, Any]) -> None:
    everyone = [c["id"] for c in setup["contacts"]]
    response = api.post(
        "/v1/broadcasts",
        json={
            "name": "b",
            "channel_id": setup["channel"]["id"],
            "audience": {"exclude_contact_ids": everyone},
            "content": {"text": "x"},
        },
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "audience"
    assert "matches no contacts" in response.json()["detail"][0]["msg"]


def test_oversize_body_is_refused_with_413(api: Api, setup: dict[str, Any]) -> None:
    body = {
        "name": "b",
        "channel_id": setup["channel"]["id"],
        "audience": {},
        "content": {"text": "x" * (5 * 1024 * 1024)},
    }
    response = api.post("/v1/broadcasts", json=body)
    assert response.status_code == 413
    assert "larger than" in response.json()["detail"]
    assert broadcast_rows(api.workspace_id) == 0


def test_text_over_4096_characters_is_refused(api: Api, setup: dict[str, Any]) -> None:
    response = api.post(
        "/v1/broadcasts",
        json={
            "name": "b",
            "channel_id": setup["channel"]["id"],
            "audience": {},
            "content": {"text": "x" * 4097},
        },
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "content.text"


# --- idempotency ----------------------------------------------------------------------------


def test_same_idempotency_key_and_body_returns_the_same_broadcast(
    api: Api, setup: dict[str, Any]
) -> None:
    body = {
        "name": "b",
        "channel_id": setup["channel"]["id"],
        "audience": {},
        "content": {"text": "hi"},
    }
    first = api.post("/v1/broadcasts", json=body, headers={"Idempotency-Key": "order-1"})
    again = api.post("/v1/broadcasts", json=body, headers={"Idempotency-Key": "order-1"})
    assert first.status_code == again.status_code == 201
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert broadcast_rows(api.workspace_id) == 1


def test_same_idempotency_key_with_another_body_is_refused(api: Api, setup: dict[str, Any]) -> None:
    body = {
        "name": "b",
        "channel_id": setup["channel"]["id"],
        "audience": {},
        "content": {"text": "hi"},
    }
    api.post("/v1/broadcasts", json=body, headers={"Idempotency-Key": "order-2"})
    response = api.post(
        "/v1/broadcasts", json={**body, "name": "other"}, headers={"Idempotency-Key": "order-2"}
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "Idempotency-Key"
    assert broadcast_rows(api.workspace_id) == 1


def test_idempotency_keys_are_per_workspace(
    api: Api, other_api: Api, setup: dict[str, Any]
) -> None:
    body = {
        "name": "b",
        "channel_id": setup["channel"]["id"],
        "audience": {},
        "content": {"text": "hi"},
    }
    ours = api.post("/v1/broadcasts", json=body, headers={"Idempotency-Key": "shared-key"})
    channel = other_api.channel()
    other_api.contact(other_api.account(channel["id"])["id"], "someone")
    theirs = other_api.post(
        "/v1/broadcasts",
        json={**body, "channel_id": channel["id"]},
        headers={"Idempotency-Key": "shared-key"},
    )
    assert ours.status_code == theirs.status_code == 201
    assert theirs.json()["id"] != ours.json()["id"]


# --- list -----------------------------------------------------------------------------------


def test_list_filters_by_several_statuses_newest_first(api: Api, setup: dict[str, Any]) -> None:
    ids = [api.broadcast(setup["channel"]["id"])["id"] for _ in range(4)]
    set_status(ids[0], "completed")
    set_status(ids[1], "paused")
    set_status(ids[2], "canceled")
    listed = api.ok("get", "/v1/broadcasts?status=paused&status=pending")["items"]
    assert [b["id"] for b in listed] == [ids[3], ids[1]]
    comma = api.ok("get", "/v1/broadcasts?status=completed,canceled")["items"]
    assert [b["id"] for b in comma] == [ids[2], ids[0]]
    assert [b["id"] for b in api.ok("get", "/v1/broadcasts")["items"]] == ids[::-1]
    bad = api.get("/v1/broadcasts?status=done")
    assert bad.status_code == 422
    assert "in_progress" in bad.json()["detail"][0]["msg"]
    for empty in ("status=", "status=paused,", "status=%20"):
        refused = api.get(f"/v1/broadcasts?{empty}")
        assert refused.status_code == 422, empty
        assert refused.json()["detail"][0]["field"] == "status"


def test_list_pages_with_a_cursor(api: Api, setup: dict[str, Any]) -> None:
    ids = [api.broadcast(setup["channel"]["id"])["id"] for _ in range(5)]
    seen: list[int] = []
    cursor = None
    while True:
        page = api.ok("get", "/v1/broadcasts?limit=2" + (f"&cursor={cursor}" if cursor else ""))
        seen += [b["id"] for b in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]


# --- modify ---------------------------------------------------------------------------------


def test_patch_a_pending_broadcast(api: Api, setup: dict[str, Any]) -> None:
    b = api.broadcast(setup["channel"]["id"], send_at=ahead(hours=1))
    when = ahead(hours=3)
    patched = api.ok(
        "patch",
        f"/v1/broadcasts/{b['id']}",
        json={
            "name": "renamed",
            "send_at": when,
            "content": {"text": "new"},
            "audience": {"tag_ids": [api.tag_id("vip")]},
        },
    )
    assert patched["name"] == "renamed"
    assert patched["content"]["text"] == "new"
    assert patched["audience_size"] == 3
    assert datetime.fromisoformat(patched["send_at"]) == datetime.fromisoformat(when)


def test_patch_applies_the_five_minute_rule(api: Api, setup: dict[str, Any]) -> None:
    b = api.broadcast(setup["channel"]["id"], send_at=ahead(hours=1))
    response = api.patch(f"/v1/broadcasts/{b['id']}", json={"send_at": ahead(minutes=2)})
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "send_at"
    assert api.ok("get", f"/v1/broadcasts/{b['id']}")["send_at"] == b["send_at"]


def test_patch_with_bad_audience_changes_nothing(api: Api, setup: dict[str, Any]) -> None:
    b = api.broadcast(setup["channel"]["id"], send_at=ahead(hours=1))
    response = api.patch(
        f"/v1/broadcasts/{b['id']}", json={"name": "x", "audience": {"tag_ids": [987654321]}}
    )
    assert response.status_code == 422
    assert api.ok("get", f"/v1/broadcasts/{b['id']}")["name"] == b["name"]


def test_patch_needs_a_field(api: Api, setup: dict[str, Any]) -> None:
    b = api.broadcast(setup["channel"]["id"])
    assert api.patch(f"/v1/broadcasts/{b['id']}", json={}).status_code == 422
    null_name = api.patch(f"/v1/broadcasts/{b['id']}", json={"name": None})
    assert null_name.status_code == 422
    assert null_name.json()["detail"][0]["field"] == "name"


def test_paused_before_start_can_be_modified_but_not_after(api: Api, setup: dict[str, Any]) -> None:
    b = api.broadcast(setup["channel"]["id"], send_at=ahead(hours=1))
    api.ok("post", f"/v1/broadcasts/{b['id']}/pause")
    assert api.ok("patch", f"/v1/broadcasts/{b['id']}", json={"name": "ok"})["name"] == "ok"
    started = api.broadcast(setup["channel"]["id"])
    start_with_deliveries(started["id"], ["sent", "queued"])
    api.ok("post", f"/v1/broadcasts/{started['id']}/pause")
    response = api.patch(f"/v1/broadcasts/{started['id']}", json={"name": "late"})
    assert response.status_code == 409
    assert "before its first send" in response.json()["detail"]


def test_patch_while_in_progress_is_a_conflict_naming_allowed_statuses(
    api: Api, setup: dict[str, Any]
) -> None:
    b = api.broadcast(setup["channel"]["id"])
    start_with_deliveries(b["id"], ["queued"])
    response = api.patch(f"/v1/broadcasts/{b['id']}", json={"name": "x"})
    assert response.status_code == 409
    assert response.json()["detail"] == (
        f"broadcast {b['id']} is in_progress; modify is allowed only while paused or pending"
    )


# --- pause, resume, cancel ------------------------------------------------------------------


def test_pause_and_resume_before_start_returns_to_pending(api: Api, setup: dict[str, Any]) -> None:
    b = api.broadcast(setup["channel"]["id"], send_at=ahead(hours=1))
    assert api.ok("post", f"/v1/broadcasts/{b['id']}/pause")["status"] == "paused"
    assert api.ok("post", f"/v1/broadcasts/{b['id']}/resume")["status"] == "pending"


def test_pause_and_resume_after_start_returns_to_in_progress(
    api: Api, setup: dict[str, Any]
) -> None:
    b = api.broadcast(setup["channel"]["id"])
    start_with_deliveries(b["id"], ["sent", "queued", "queued"])
    assert api.ok("post", f"/v1/broadcasts/{b['id']}/pause")["status"] == "paused"
    resumed = api.ok("post", f"/v1/broadcasts/{b['id']}/resume")
    assert resumed["status"] == "in_progress"
    assert resumed["counts"]["queued"] == 2


def test_resuming_a_broadcast_whose_recipients_all_ended_while_paused_completes_it(
    api: Api, setup: dict[str, Any]
) -> None:
    b = api.broadcast(setup["channel"]["id"])
    start_with_deliveries(b["id"], ["sent", "sending"])
    assert api.ok("post", f"/v1/broadcasts/{b['id']}/pause")["status"] == "paused"
    # The call that was at the provider when the pause came is written afterwards.
    with transaction() as session:
        session.execute(
            update(Delivery).where(Delivery.broadcast_id == b["id"]).values(status="sent")
        )
        session.execute(
            update(Broadcast).where(Broadcast.id == b["id"]).values(snapshot_at=func.now())
        )
    resumed = api.ok("post", f"/v1/broadcasts/{b['id']}/resume")
    assert resumed["status"] == "completed"
    assert resumed["counts"]["sent"] == 2
    assert resumed["finished_at"] is not None


def test_cancel_cancels_unsent_recipients_and_keeps_sent_ones(
    api: Api, setup: dict[str, Any]
) -> None:
    b = api.broadcast(setup["channel"]["id"])
    start_with_deliveries(b["id"], ["sent", "failed", "queued", "queued"])
    canceled = api.ok("post", f"/v1/broadcasts/{b['id']}/cancel")
    assert canceled["status"] == "canceled"
    assert canceled["finished_at"] is not None
    assert canceled["counts"] == {
        "total": 4,
        "queued": 0,
        "sent": 1,
        "failed": 1,
        "canceled": 2,
        "skipped": 0,
        "partial": 0,
    }
    assert delivery_statuses(b["id"]) == ["sent", "failed", "canceled", "canceled"]


@pytest.mark.parametrize(
    ("status", "action", "allowed"),
    [
        ("completed", "pause", "in_progress or pending"),
        ("canceled", "resume", "paused"),
        ("pending", "resume", "paused"),
        ("completed", "cancel", "in_progress, paused or pending"),
        ("canceled", "cancel", "in_progress, paused or pending"),
        ("paused", "pause", "in_progress or pending"),
    ],
)
def test_forbidden_transitions_answer_409_naming_the_allowed_statuses(
    api: Api, setup: dict[str, Any], status: str, action: str, allowed: str
) -> None:
    b = api.broadcast(setup["channel"]["id"])
    set_status(b["id"], status)
    response = api.post(f"/v1/broadcasts/{b['id']}/{action}")
    assert response.status_code == 409
    assert (
        response.json()["detail"]
        == f"broadcast {b['id']} is {status}; {action} is allowed only while {allowed}"
    )
    assert api.ok("get", f"/v1/broadcasts/{b['id']}")["status"] == status


def test_images_a_provider_does_not_take_are_refused_for_that_channel(api: Api) -> None:
    whatsapp = api.channel("whatsapp")
    api.contact(api.account(whatsapp["id"])["id"], "+4915100000001")
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buf, "GIF")
    gif = api.ok("post", "/v1/media", 201, files={"file": ("a.gif", buf.getvalue(), "image/gif")})[
        "id"
    ]
    png = upload_png(api)
    response = api.post(
        "/v1/broadcasts",
        json={
            "name": "b",
            "channel_id": whatsapp["id"],
            "audience": {},
            "content": {"media_ids": [png, gif]},
        },
    )
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["field"] == "content.media_ids[1]"
    assert error["msg"] == f"media {gif} is image/gif; whatsapp takes image/jpeg, image/png"
    webhook = api.channel("webhook")
    api.contact(api.account(webhook["id"])["id"], "anyone")
    b = api.broadcast(webhook["id"], content={"media_ids": [gif]}, send_at=ahead(hours=1))
    moved = api.patch(
        f"/v1/broadcasts/{b['id']}", json={"channel_id": whatsapp["id"], "audience": {}}
    )
    assert moved.status_code == 422
    assert moved.json()["detail"][0]["field"] == "content.media_ids[0]"


def test_the_list_filters_by_channel_name_and_time_ranges(api: Api) -> None:
    first, second = api.channel(), api.channel()
    for channel in (first, second):
        api.contact(api.account(channel["id"])["id"], f"c-{channel['id']}")
    later = datetime.now(UTC) + timedelta(days=2)
    made = [
        api.broadcast(first["id"], name="Spring sale", send_at=later.isoformat()),
        api.broadcast(
            first["id"], name="100% off_", send_at=(later + timedelta(days=1)).isoformat()
        ),
        api.broadcast(second["id"], name="spring news"),
    ]

    def ids(query: str) -> list[int]:
        return sorted(b["id"] for b in api.ok("get", f"/v1/broadcasts?{query}")["items"])

    mine = sorted(b["id"] for b in made)
    assert ids(f"channel_id={first['id']}") == mine[:2]
    assert ids("q=SPRING") == [made[0]["id"], made[2]["id"]]
    # % and _ are matched as typed, not as wildcards.
    assert ids("q=0%25 off_") == [made[1]["id"]]
    assert ids("q=0_") == []
    assert ids("q=%25") == [made[1]["id"]]
    cut = (later + timedelta(hours=12)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert ids(f"send_before={cut}&channel_id={first['id']}") == [made[0]["id"]]
    assert ids(f"send_from={cut}") == [made[1]["id"]]
    created = min(datetime.fromisoformat(b["created_at"]) for b in made)
    stamp = created.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert ids(f"created_from={stamp}") == mine
    assert ids(f"created_before={stamp}") == []
    bad = api.get("/v1/broadcasts?send_from=tomorrow")
    assert bad.status_code == 422
    assert "send_from" in bad.text


def test_a_query_parameter_a_route_does_not_take_is_refused_not_ignored(api: Api) -> None:
    misspelt = api.get("/v1/broadcasts?stauts=failed")
    assert misspelt.status_code == 422, misspelt.text
    [error] = misspelt.json()["errors"]
    assert (error["field"], error["type"]) == ("stauts", "unknown_parameter")
    assert "status" in error["msg"]
    for path in ("/v1/contacts?acount_id=1", "/v1/channels?x=1", "/v1/conversations?y=2"):
        answer = api.get(path)
        assert answer.status_code == 422, (path, answer.text)
    # Unsigned, the answer is 401 first, whatever the parameters.
    assert api.client.get("/v1/broadcasts?stauts=x").status_code == 401
    # Parameters a route takes (its dependencies' too: limit, cursor) are accepted.
    assert api.get("/v1/broadcasts?status=pending&limit=5").status_code == 200
    channel = api.channel()
    api.contact(api.account(channel["id"])["id"], "someone")
    b = api.broadcast(channel["id"])
    listed = api.get(f"/v1/broadcasts/{b['id']}/recipients?status=failed&format=csv&limit=5")
    assert listed.status_code == 200, listed.text
    naive = api.get("/v1/broadcasts?created_from=2026-01-01T00:00:00")
    assert naive.status_code == 422
    assert "UTC offset" in naive.text


def test_resuming_a_broadcast_paused_as_overdue_needs_the_operator_s_word(api: Api) -> None:
    channel = api.channel()
    api.contact(api.account(channel["id"])["id"], "late-one")
    later = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    b = api.broadcast(channel["id"], send_at=later)
    # As the scheduler leaves a broadcast it found two hours late.
    set_status(b["id"], "paused")
    with transaction() as session:
        session.execute(
            text(
                "UPDATE broadcast SET send_at = now() - interval '2 hours', "
                "status_reason = 'overdue: it was due at ... ; resume it confirming' WHERE id = :id"
            ),
            {"id": b["id"]},
        )
    refused = api.post(f"/v1/broadcasts/{b['id']}/resume")
    assert refused.status_code == 409, refused.text
    assert "confirm_late_start" in refused.text
    assert "120 minutes ago" in refused.text
    assert api.ok("get", f"/v1/broadcasts/{b['id']}")["status"] == "paused"
    resumed = api.ok("post", f"/v1/broadcasts/{b['id']}/resume", json={"confirm_late_start": True})
    assert (resumed["status"], resumed["status_reason"]) == ("pending", None)
    # One an operator paused needs no such word.
    other = api.broadcast(channel["id"], send_at=later)
    api.ok("post", f"/v1/broadcasts/{other['id']}/pause")
    assert api.ok("post", f"/v1/broadcasts/{other['id']}/resume")["status"] == "pending"
