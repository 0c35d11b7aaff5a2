"""Time zones: a send time given as a wall-clock time in a zone (clock changes refused or
resolved explicitly), contacts' zones and custom fields, sending windows.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from shared.db.engine import transaction
from shared.domain.errors import ValidationFailed
from shared.domain.zones import check_known
from tests.conftest import Api


@pytest.fixture
def channel(api: Api) -> dict[str, Any]:
    channel = api.channel()
    api.contact(api.account(channel["id"])["id"], "tz-1")
    return channel


def test_a_wall_clock_time_in_a_zone_is_stored_as_its_moment_and_as_given(
    api: Api, channel: dict[str, Any]
) -> None:
    day = (datetime.now(UTC) + timedelta(days=40)).date()
    b = api.broadcast(channel["id"], send_at={"local": f"{day}T09:00", "zone": "America/New_York"})
    expected = datetime(day.year, day.month, day.day, 9, tzinfo=ZoneInfo("America/New_York"))
    assert datetime.fromisoformat(b["send_at"]) == expected
    assert b["send_at"].endswith("Z")
    assert (b["send_at_local"], b["send_at_zone"]) == (f"{day}T09:00:00", "America/New_York")
    # Given as a moment: no wall-clock time or zone to show.
    plain = api.broadcast(
        channel["id"], send_at=(datetime.now(UTC) + timedelta(hours=1)).isoformat()
    )
    assert (plain["send_at_local"], plain["send_at_zone"]) == (None, None)
    # A patch may move it to another zone.
    moved = api.ok(
        "patch",
        f"/v1/broadcasts/{plain['id']}",
        json={"send_at": {"local": f"{day}T18:30", "zone": "Asia/Kolkata"}},
    )
    assert moved["send_at_zone"] == "Asia/Kolkata"
    assert datetime.fromisoformat(moved["send_at"]) == datetime(
        day.year, day.month, day.day, 13, 0, tzinfo=UTC
    )


def test_a_time_the_clocks_skip_is_refused_and_one_they_repeat_needs_fold(
    api: Api, channel: dict[str, Any]
) -> None:
    # Europe/Berlin, next year: clocks jump 02:00 -> 03:00 on the last Sunday of March and go
    # back 03:00 -> 02:00 on the last Sunday of October.
    year = datetime.now(UTC).year + 1
    march = max(d for d in range(25, 32) if datetime(year, 3, d).weekday() == 6)
    october = max(d for d in range(25, 32) if datetime(year, 10, d).weekday() == 6)
    body = {"name": "x", "channel_id": channel["id"], "audience": {}, "content": {"text": "x"}}
    gap = api.post(
        "/v1/broadcasts",
        json={
            **body,
            "send_at": {"local": f"{year}-03-{march:02d}T02:30", "zone": "Europe/Berlin"},
        },
    )
    # Over a year ahead is refused too; the gap is judged first.
    assert gap.status_code == 422
    [error] = gap.json()["errors"]
    assert (error["field"], error["type"]) == ("send_at", "nonexistent_local_time")
    assert "UTC+01:00 to UTC+02:00" in error["msg"]
    overlap = {"local": f"{year}-10-{october:02d}T02:30", "zone": "Europe/Berlin"}
    twice = api.post("/v1/broadcasts", json={**body, "send_at": overlap})
    [error] = twice.json()["errors"]
    assert (error["field"], error["type"]) == ("send_at", "ambiguous_local_time")
    assert '"fold": 0' in error["msg"]
    # With fold the moment is chosen: an hour apart.
    first = api.post("/v1/broadcasts", json={**body, "send_at": {**overlap, "fold": 0}})
    second = api.post("/v1/broadcasts", json={**body, "send_at": {**overlap, "fold": 1}})
    if first.status_code == 201:  # within a year from now
        gap_s = datetime.fromisoformat(second.json()["send_at"]) - datetime.fromisoformat(
            first.json()["send_at"]
        )
        assert gap_s == timedelta(hours=1)
    else:
        assert [e["type"] for e in first.json()["errors"]] == ["too_late"]


@pytest.mark.parametrize(
    ("send_at", "words"),
    [
        ({"local": "2027-01-01T09:00", "zone": "Mars/Olympus"}, "not a time zone name"),
        ({"local": "2027-01-01 09:00", "zone": "UTC"}, "wall-clock time without offset"),
        ({"local": "2027-02-30T09:00", "zone": "UTC"}, "day is out of range"),
        ({"local": "2027-01-01T09:00+01:00", "zone": "UTC"}, "wall-clock time without offset"),
        ({"zone": "UTC"}, "local"),
        ({"local": "2027-01-01T09:00", "zone": "UTC", "when": 1}, "when"),
        ({"local": "2027-01-01T09:00", "zone": "UTC", "fold": 2}, "fold"),
    ],
)
def test_a_bad_local_send_time_is_refused_on_send_at_saying_why(
    api: Api, channel: dict[str, Any], send_at: dict[str, Any], words: str
) -> None:
    response = api.post(
        "/v1/broadcasts",
        json={
            "name": "x",
            "channel_id": channel["id"],
            "audience": {},
            "content": {"text": "x"},
            "send_at": send_at,
        },
    )
    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert error["field"] == "send_at"
    assert words in error["msg"]


def test_a_local_time_less_than_five_minutes_ahead_is_refused(
    api: Api, channel: dict[str, Any]
) -> None:
    soon = (datetime.now(ZoneInfo("Asia/Tokyo")) + timedelta(minutes=2)).strftime("%Y-%m-%dT%H:%M")
    response = api.post(
        "/v1/broadcasts",
        json={
            "name": "x",
            "channel_id": channel["id"],
            "audience": {},
            "content": {"text": "x"},
            "send_at": {"local": soon, "zone": "Asia/Tokyo"},
        },
    )
    assert [e["type"] for e in response.json()["errors"]] == ["too_soon"]


def test_a_sending_window_is_kept_with_its_zone_and_can_be_removed(
    api: Api, channel: dict[str, Any]
) -> None:
    day = (datetime.now(UTC) + timedelta(days=3)).date()
    b = api.broadcast(
        channel["id"],
        send_at={"local": f"{day}T08:00", "zone": "Europe/Lisbon"},
        sending_window={"start": "09:00", "end": "20:00"},
    )
    assert b["sending_window"] == {
        "start": "09:00",
        "end": "20:00",
        "zone": "Europe/Lisbon",
        "waiting": None,
        "until": None,
    }
    night = api.broadcast(
        channel["id"], sending_window={"start": "22:00", "end": "06:00", "zone": "Asia/Tokyo"}
    )
    assert (night["sending_window"]["start"], night["sending_window"]["zone"]) == (
        "22:00",
        "Asia/Tokyo",
    )
    utc = api.broadcast(channel["id"], sending_window={"start": "09:00", "end": "17:30"})
    assert utc["sending_window"]["zone"] == "UTC"
    listed = {x["id"]: x for x in api.ok("get", "/v1/broadcasts")["items"]}
    assert listed[b["id"]]["sending_window"]["end"] == "20:00"
    removed = api.ok("patch", f"/v1/broadcasts/{b['id']}", json={"sending_window": None})
    assert removed["sending_window"] is None
    # A clone keeps the original's window unless the body says otherwise.
    copy = api.ok("post", f"/v1/broadcasts/{night['id']}/clone", 201, json={"send_at": None})
    assert copy["sending_window"]["start"] == "22:00"
    bare = api.ok("post", f"/v1/broadcasts/{night['id']}/clone", 201, json={"sending_window": None})
    assert bare["sending_window"] is None


@pytest.mark.parametrize(
    ("window", "field_words"),
    [
        ({"start": "09:00", "end": "09:00"}, "never open"),
        ({"start": "9:00", "end": "20:00"}, "HH:MM"),
        ({"start": "09:00", "end": "24:00"}, "HH:MM"),
        ({"start": "09:00", "end": "20:00", "zone": "Nowhere/Land"}, "not a time zone"),
        ({"start": "09:00"}, "end"),
    ],
)
def test_a_bad_window_names_its_field(
    api: Api, channel: dict[str, Any], window: dict[str, Any], field_words: str
) -> None:
    response = api.post(
        "/v1/broadcasts",
        json={
            "name": "x",
            "channel_id": channel["id"],
            "audience": {},
            "content": {"text": "x"},
            "sending_window": window,
        },
    )
    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert error["field"].startswith("sending_window")
    assert field_words in error["msg"] or field_words in error["field"]


def test_contacts_carry_a_zone_and_custom_fields(api: Api, channel: dict[str, Any]) -> None:
    account = api.ok("get", f"/v1/accounts?channel_id={channel['id']}")["items"][0]
    c = api.contact(
        account["id"], "tz-2", time_zone="Asia/Tokyo", fields={"city": "Osaka", "plan": "gold"}
    )
    assert (c["time_zone"], c["fields"]) == ("Asia/Tokyo", {"city": "Osaka", "plan": "gold"})
    changed = api.ok(
        "patch",
        f"/v1/contacts/{c['id']}",
        json={"time_zone": None, "fields": {"plan": None, "team": "blue"}},
    )
    assert (changed["time_zone"], changed["fields"]) == (None, {"city": "Osaka", "team": "blue"})
    for body, field in (
        ({"time_zone": "Moon/Base"}, "time_zone"),
        ({"fields": {"City": "x"}}, "fields"),
        ({"fields": {"name": "x"}}, "fields"),
    ):
        refused = api.patch(f"/v1/contacts/{c['id']}", json=body)
        assert refused.status_code == 422, body
        assert refused.json()["errors"][0]["field"].startswith(field)
    csv = (
        "account_id,address,name,time_zone,field.city,field.plan\n"
        f"{account['id']},tz-3,Tia,America/Sao_Paulo,Recife,\n"
        f"{account['id']},tz-2,,Europe/Oslo,,silver\n"
    )
    api.ok("post", "/v1/contacts/import", content=csv, headers={"content-type": "text/csv"})
    by_address = {
        x["address"]: x for x in api.ok("get", f"/v1/contacts?account_id={account['id']}")["items"]
    }
    assert (by_address["tz-3"]["time_zone"], by_address["tz-3"]["fields"]) == (
        "America/Sao_Paulo",
        {"city": "Recife"},
    )
    # A known contact's fields are merged, its zone replaced.
    assert (by_address["tz-2"]["time_zone"], by_address["tz-2"]["fields"]) == (
        "Europe/Oslo",
        {"city": "Osaka", "team": "blue", "plan": "silver"},
    )
    bad = api.post(
        "/v1/contacts/import",
        content=f"account_id,address,time_zone\n{account['id']},tz-4,Mars/Base\n",
        headers={"content-type": "text/csv"},
    )
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "rows[0].time_zone"


def test_a_zone_the_database_does_not_know_is_refused_naming_the_field(api: Api) -> None:
    with transaction() as session:
        check_known(session, ["Europe/Berlin", None, "UTC"], "time_zone")
        with pytest.raises(ValidationFailed) as caught:
            check_known(session, ["Europe/Berlin", "Atlantis/Capital"], "time_zone")
    [error] = caught.value.errors
    assert (error.field, error.type) == ("time_zone", "zone_unknown")
    assert "'Atlantis/Capital'" in error.message
