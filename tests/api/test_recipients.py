"""Who a broadcast reached and who not, and why: JSON pages and the CSV export."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest

from tests.conftest import Api
from tests.factories import start_with_deliveries


@pytest.fixture
def started(api: Api) -> dict[str, Any]:
    account = api.account(api.channel()["id"])
    contacts = [api.contact(account["id"], f"user-{i}", name=f"Name {i}") for i in range(5)]
    contacts.append(api.contact(account["id"], "user-formula", name="=HYPERLINK(1)"))
    b = api.broadcast(account["channel_id"])
    ids = start_with_deliveries(
        b["id"],
        ["sent", "failed", "queued", "failed", "canceled", "failed"],
        errors=[None, "404: no such recipient", None, "403: bot was blocked", None, "-1 bad"],
    )
    return {"broadcast": b, "contacts": contacts, "delivery_ids": ids}


def test_failed_recipients_are_listed_with_reasons(api: Api, started: dict[str, Any]) -> None:
    page = api.ok("get", f"/v1/broadcasts/{started['broadcast']['id']}/recipients?status=failed")
    rows = page["items"]
    assert [r["address"] for r in rows] == ["user-1", "user-3", "user-formula"]
    assert [r["last_error"] for r in rows] == [
        "404: no such recipient",
        "403: bot was blocked",
        "-1 bad",
    ]
    assert rows[0] | {"updated_at": None} == {
        "delivery_id": started["delivery_ids"][1],
        "contact_id": started["contacts"][1]["id"],
        "name": "Name 1",
        "address": "user-1",
        "status": "failed",
        "attempts": 1,
        "last_error": "404: no such recipient",
        "provider_message_id": None,
        "sent_at": None,
        "updated_at": None,
    }


def test_several_statuses_and_pages(api: Api, started: dict[str, Any]) -> None:
    url = f"/v1/broadcasts/{started['broadcast']['id']}/recipients?status=sent,queued&limit=1"
    first = api.ok("get", url)
    second = api.ok("get", url + f"&cursor={first['next_cursor']}")
    assert [r["status"] for r in first["items"] + second["items"]] == ["sent", "queued"]
    assert second["next_cursor"] is None


def test_csv_export_by_accept_header(api: Api, started: dict[str, Any]) -> None:
    response = api.get(
        f"/v1/broadcasts/{started['broadcast']['id']}/recipients?status=failed",
        headers={"Accept": "text/csv"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [(r["address"], r["status"], r["last_error"]) for r in rows] == [
        ("user-1", "failed", "404: no such recipient"),
        ("user-3", "failed", "403: bot was blocked"),
        ("user-formula", "failed", "'-1 bad"),
    ]
    assert rows[2]["name"] == "'=HYPERLINK(1)"  # never run as a spreadsheet formula
    assert set(rows[0]) == {
        "contact_id",
        "name",
        "address",
        "status",
        "attempts",
        "last_error",
        "provider_message_id",
        "sent_at",
    }


def test_csv_export_of_everyone_by_format_parameter(api: Api, started: dict[str, Any]) -> None:
    response = api.get(f"/v1/broadcasts/{started['broadcast']['id']}/recipients?format=csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert len(rows) == 6
    assert rows[0]["provider_message_id"] == "pm-0"


def test_recipients_of_an_unknown_broadcast_are_404(api: Api) -> None:
    assert api.get("/v1/broadcasts/987654321/recipients").status_code == 404
    assert (
        api.get("/v1/broadcasts/987654321/recipients", headers={"Accept": "text/csv"}).status_code
        == 404
    )


def test_unknown_recipient_status_is_422(api: Api, started: dict[str, Any]) -> None:
    response = api.get(f"/v1/broadcasts/{started['broadcast']['id']}/recipients?status=lost")
    assert response.status_code == 422
    assert "skipped" in response.json()["detail"][0]["msg"]
