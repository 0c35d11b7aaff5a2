"""Each provider adapter against the simulator speaking that provider's API shape."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from tests.e2e.conftest import Api
from tests.smtp_box import Mailbox
from tests.smtp_box import start as start_smtp

pytestmark = pytest.mark.e2e


def images(api: Api, n: int) -> list[int]:
    ids = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), (i * 40, 0, 0)).save(buf, "JPEG")
        ids.append(
            api.ok(
                "POST", "/v1/media", 201, files={"file": (f"{i}.jpg", buf.getvalue(), "image/jpeg")}
            )["id"]
        )
    return ids


def send(
    api: Api, channel: dict[str, Any], addresses: list[str], content: dict[str, Any]
) -> dict[str, Any]:
    account = api.account(channel["id"])
    api.import_contacts(account["id"], addresses, wrote_in=channel["kind"] == "whatsapp")
    b = api.broadcast(channel["id"], {"account_ids": [account["id"]]}, content=content)
    return api.wait_status(b["id"], "completed")


def recipients(api: Api, broadcast_id: int) -> list[dict[str, Any]]:
    return list(
        api.ok("GET", f"/v1/broadcasts/{broadcast_id}/recipients", params={"limit": 500})["items"]
    )


# --- Telegram -------------------------------------------------------------------------------


def test_telegram_text_one_image_and_several_images(api: Api) -> None:
    channel, name = api.channel("telegram")
    media = images(api, 3)
    send(api, channel, ["1001"], {"text": "plain text"})
    send(api, channel, ["1002"], {"text": "one photo", "media_ids": media[:1]})
    album = send(api, channel, ["1003"], {"text": "an album", "media_ids": media})
    calls = {r["to"]: r for r in api.sim_requests(name)}
    assert (calls["1001"]["method"], calls["1001"]["text"]) == ("sendMessage", "plain text")
    assert (calls["1002"]["method"], calls["1002"]["text"]) == ("sendPhoto", "one photo")
    assert "/media/" in calls["1002"]["photo"]
    assert "signature=" in calls["1002"]["photo"]
    group = calls["1003"]["media"]
    assert calls["1003"]["method"] == "sendMediaGroup"
    assert [m["type"] for m in group] == ["photo"] * 3
    assert group[0]["caption"] == "an album"
    assert "caption" not in group[1]
    assert {r["token"] for r in api.sim_requests(name)} == {channel["secret"]}
    [row] = recipients(api, album["id"])
    assert len(row["provider_message_id"].split(",")) == 3


def test_telegram_keeps_the_calls_of_one_message_apart_per_chat(api: Api) -> None:
    channel, name = api.channel("telegram", chat_limit=True)
    media = images(api, 2)
    long = "x" * 1500  # too long for a caption: the album, then the text, to the same chat
    done = send(api, channel, ["2001", "-1002001"], {"text": long, "media_ids": media})
    assert done["counts"]["sent"] == 2
    calls = api.sim_requests(name)
    assert [r["status"] for r in calls] == [200] * 4, "no call was refused as too soon"
    by_chat: dict[str, list[float]] = {}
    for r in calls:
        by_chat.setdefault(str(r["to"]), []).append(r["t"])
    private, group = sorted(by_chat["2001"]), sorted(by_chat["-1002001"])
    assert private[1] - private[0] >= 1.0
    assert group[1] - group[0] >= 3.0


def test_telegram_429_retry_after_is_honoured_then_sent(api: Api) -> None:
    channel, name = api.channel("telegram", throttle_ratio=0.5, retry_after=1, seed=7)
    done = send(api, channel, [str(2000 + i) for i in range(10)], {"text": "hi"})
    assert done["counts"]["sent"] == 10
    stats = api.sim_stats(name)
    assert stats["throttled"] > 0
    assert stats["accepted"] == 10
    assert stats["duplicates"] == 0


def test_telegram_transient_then_success(api: Api) -> None:
    channel, name = api.channel("telegram", transient_first=1)
    done = send(api, channel, ["3001", "3002"], {"text": "retry me"})
    assert done["counts"]["sent"] == 2
    assert {r["attempts"] for r in recipients(api, done["id"])} == {2}
    assert api.sim_stats(name)["transient_errors"] == 2


def test_telegram_blocked_bot_is_permanent_marks_unreachable_and_is_skipped_later(api: Api) -> None:
    channel, name = api.channel("telegram", fail_addresses=["4002"])
    account = api.account(channel["id"])
    api.import_contacts(account["id"], ["4001", "4002"])
    first = api.broadcast(channel["id"], {})
    done = api.wait_status(first["id"], "completed")
    assert (done["counts"]["sent"], done["counts"]["failed"]) == (1, 1)
    [failed] = [r for r in recipients(api, first["id"]) if r["status"] == "failed"]
    assert failed["last_error"] == "Telegram 403: Forbidden: bot was blocked by the user"
    contact = api.ok("GET", f"/v1/contacts/{failed['contact_id']}")
    assert contact["unreachable"] is True
    assert contact["unreachable_reason"] == failed["last_error"]

    preview = api.ok("POST", "/v1/audiences/preview", json={"channel_id": channel["id"]})
    assert (preview["count"], preview["unreachable"]) == (1, 1)
    second = api.broadcast(channel["id"], {})
    later = api.wait_status(second["id"], "completed")
    assert later["counts"] == {
        "total": 2,
        "queued": 0,
        "sent": 1,
        "failed": 0,
        "canceled": 0,
        "skipped": 1,
        "partial": 0,
    }
    [skipped] = api.ok(
        "GET", f"/v1/broadcasts/{second['id']}/recipients", params={"status": "skipped"}
    )["items"]
    assert skipped["address"] == "4002"
    assert (
        skipped["last_error"]
        == "skipped: contact unreachable: Telegram 403: Forbidden: bot was blocked by the user"
    )
    assert [r["to"] for r in api.sim_requests(name)].count("4002") == 1, "never called again"
    cleared = api.ok("PATCH", f"/v1/contacts/{failed['contact_id']}", json={"unreachable": False})
    assert cleared["unreachable"] is False


def test_telegram_token_never_appears_in_answers_or_reasons(api: Api) -> None:
    channel, _ = api.channel("telegram")
    listed = api.http.get("/v1/channels").text
    assert channel["secret"] not in listed
    assert channel["config"]["bot_token"] == "********"


# --- WhatsApp -------------------------------------------------------------------------------


def test_whatsapp_text_one_image_and_several_images(api: Api) -> None:
    channel, name = api.channel("whatsapp")
    media = images(api, 3)
    send(api, channel, ["+4915100000001"], {"text": "plain text"})
    send(api, channel, ["+4915100000002"], {"text": "one photo", "media_ids": media[:1]})
    album = send(api, channel, ["+4915100000003"], {"text": "three photos", "media_ids": media})
    calls = api.sim_requests(name)
    by_to: dict[str, list[dict[str, Any]]] = {}
    for r in calls:
        by_to.setdefault(r["to"], []).append(r)
    assert [(r["type"], r["text"]) for r in by_to["+4915100000001"]] == [("text", "plain text")]
    assert [(r["type"], r["text"]) for r in by_to["+4915100000002"]] == [("image", "one photo")]
    three = by_to["+4915100000003"]
    assert [(r["type"], r["text"]) for r in three] == [
        ("image", "three photos"),
        ("image", None),
        ("image", None),
    ]
    assert all("signature=" in r["link"] for r in three)
    assert {r["authorization"] for r in calls} == {f"Bearer {channel['secret']}"}
    assert {(r["version"], r["phone_number_id"]) for r in calls} == {("v21.0", "106540352242922")}
    [row] = recipients(api, album["id"])
    assert row["provider_message_id"].count("wamid.") == 3


def test_whatsapp_several_images_retry_never_repeats_an_accepted_image(api: Api) -> None:
    channel, name = api.channel("whatsapp", transient_first=1)
    done = send(api, channel, ["+4915100000004"], {"text": "album", "media_ids": images(api, 3)})
    assert done["counts"]["sent"] == 1
    stats = api.sim_stats(name)
    assert (stats["accepted"], stats["duplicates"], stats["transient_errors"]) == (3, 0, 3)
    [row] = recipients(api, done["id"])
    assert row["attempts"] == 4


def test_whatsapp_images_refused_after_the_first_was_accepted_count_as_partial(api: Api) -> None:
    channel, name = api.channel("whatsapp", refuse_parts_from=1)
    done = send(api, channel, ["+4915100000005"], {"text": "album", "media_ids": images(api, 3)})
    counts = done["counts"]
    assert (counts["partial"], counts["sent"], counts["failed"], counts["queued"]) == (1, 0, 0, 0)
    [row] = recipients(api, done["id"])
    assert row["status"] == "partial"
    assert row["last_error"] == "1 part(s) delivered, then: WhatsApp 131053: Media upload error"
    assert row["provider_message_id"].count("wamid.") == 1, "the part they got is on record"
    listed = api.ok("GET", f"/v1/broadcasts/{done['id']}/recipients", params={"status": "partial"})[
        "items"
    ]
    assert [r["delivery_id"] for r in listed] == [row["delivery_id"]]
    # A refused part is no reason to think the recipient unreachable.
    assert api.ok("GET", f"/v1/contacts/{row['contact_id']}")["unreachable"] is False
    stats = api.sim_stats(name)
    assert (stats["accepted"], stats["permanent_errors"]) == (1, 1), "no part was repeated"


def test_whatsapp_throughput_error_is_transient_and_undeliverable_is_permanent(api: Api) -> None:
    channel, name = api.channel(
        "whatsapp", throttle_ratio=0.3, retry_after=0.5, seed=3, fail_addresses=["+4915100000009"]
    )
    done = send(
        api,
        channel,
        [f"+49151000001{i:02d}" for i in range(10)] + ["+4915100000009"],
        {"text": "hi"},
    )
    assert (done["counts"]["sent"], done["counts"]["failed"]) == (10, 1)
    assert api.sim_stats(name)["throttled"] > 0
    [failed] = [r for r in recipients(api, done["id"]) if r["status"] == "failed"]
    assert failed["last_error"] == "WhatsApp 131026: Message undeliverable"
    assert api.ok("GET", f"/v1/contacts/{failed['contact_id']}")["unreachable"] is True


def test_whatsapp_outside_the_window_or_over_the_cap_fails_with_the_reason_and_no_retry(
    api: Api,
) -> None:
    channel, _ = api.channel(
        "whatsapp",
        outside_window=["+4915100000021"],
        frequency_capped=["+4915100000022"],
    )
    done = send(
        api,
        channel,
        ["+4915100000020", "+4915100000021", "+4915100000022"],
        {"text": "news"},
    )
    assert (done["counts"]["sent"], done["counts"]["failed"]) == (1, 2)
    failed = {r["address"]: r for r in recipients(api, done["id"]) if r["status"] == "failed"}
    outside = failed["+4915100000021"]
    assert outside["last_error"].startswith("WhatsApp 131047: Re-engagement message")
    assert "24 hours" in outside["last_error"]
    assert failed["+4915100000022"]["last_error"].startswith("WhatsApp 131049")
    assert {r["attempts"] for r in failed.values()} == {1}, "not tried again"
    # Neither is a reason to think the contact unreachable.
    assert api.ok("GET", f"/v1/contacts/{outside['contact_id']}")["unreachable"] is False


def test_whatsapp_template_problem_pauses_the_broadcast_with_the_reason(api: Api) -> None:
    channel, name = api.channel("whatsapp", error_code=132001)
    account = api.account(channel["id"])
    api.import_contacts(
        account["id"], [f"+49151000000{i:02d}" for i in range(30, 40)], wrote_in=True
    )
    b = api.broadcast(channel["id"], {"account_ids": [account["id"]]}, content={"text": "x"})
    paused = api.wait_status(b["id"], "paused")
    assert "WhatsApp 132001" in paused["status_reason"]
    assert paused["counts"]["failed"] == 0, "nobody is failed for the template's fault"
    assert api.sim_stats(name)["requests"] <= 10


# --- SMTP -----------------------------------------------------------------------------------


@pytest.fixture
def mailbox() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    controller = start_smtp(box)
    yield box, controller.port
    controller.stop()


def smtp_channel(api: Api, port: int) -> dict[str, Any]:
    config = {
        "host": "127.0.0.1",
        "port": port,
        "starttls": False,
        "from_address": "news@shop.test",
    }
    return dict(
        api.ok(
            "POST",
            "/v1/channels",
            201,
            json={
                "name": f"mail-{port}",
                "kind": "smtp",
                "config": config,
                "rate_limit_per_second": 200,
            },
        )
    )


def test_smtp_text_and_inline_images_through_the_pipeline(
    api: Api, mailbox: tuple[Mailbox, int]
) -> None:
    box, port = mailbox
    channel = smtp_channel(api, port)
    media = images(api, 2)
    account = api.account(channel["id"])
    api.import_contacts(account["id"], ["ann@x.test", "bob@x.test"])
    text_only = api.broadcast(channel["id"], {}, name="Plain news", content={"text": "just text"})
    api.wait_status(text_only["id"], "completed")
    pictures = api.broadcast(
        channel["id"], {}, name="Photo news", content={"text": "two photos", "media_ids": media}
    )
    api.wait_status(pictures["id"], "completed")
    by_subject: dict[str, list[Any]] = {}
    for msg in box.messages:
        by_subject.setdefault(str(msg["Subject"]), []).append(msg)
    assert sorted(m["To"] for m in by_subject["Plain news"]) == ["ann@x.test", "bob@x.test"]
    assert sorted(m["To"] for m in by_subject["Photo news"]) == ["ann@x.test", "bob@x.test"]
    photo = by_subject["Photo news"][0]
    assert len([p for p in photo.walk() if p.get_content_type() == "image/jpeg"]) == 2
    assert all(m["Message-ID"].startswith("<bcast-") for m in box.messages)
    rows = recipients(api, pictures["id"])
    assert {r["provider_message_id"] for r in rows} == {
        m["Message-ID"] for m in by_subject["Photo news"]
    }


def test_smtp_transient_then_success_and_refused_mailbox_listed(
    api: Api, mailbox: tuple[Mailbox, int]
) -> None:
    box, port = mailbox
    box.transient_first = 1
    box.refuse = {"gone@x.test"}
    channel = smtp_channel(api, port)
    done = send(api, channel, ["ann@x.test", "gone@x.test"], {"text": "hello"})
    assert (done["counts"]["sent"], done["counts"]["failed"]) == (1, 1)
    rows = {r["address"]: r for r in recipients(api, done["id"])}
    assert rows["ann@x.test"]["attempts"] == 2
    assert rows["gone@x.test"]["last_error"] == "SMTP 550: 5.1.1 No such user here"
    assert api.ok("GET", f"/v1/contacts/{rows['gone@x.test']['contact_id']}")["unreachable"] is True
    assert [m["To"] for m in box.messages] == ["ann@x.test"]
