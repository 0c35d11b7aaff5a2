"""Who a broadcast reached and who not, and why: JSON pages and the CSV export."""

from __future__ import annotations

import csv
import io
from datetime import date
from typing import Any

import psycopg
import pytest

from shared import delivery_partitions
from shared.db.engine import libpq_url
from tests.conftest import Api
from tests.factories import set_status, start_with_deliveries


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


def test_recipients_removed_by_retention_are_listed_as_removed_and_counted_still(
    api: Api, database_url: str
) -> None:
    account = api.account(api.channel()["id"])
    for i in range(3):
        api.contact(account["id"], f"old-{i}")
    b = api.broadcast(account["channel_id"])
    start_with_deliveries(
        b["id"], ["sent", "failed", "failed"], errors=[None, "404", "403"], day=date(2001, 2, 3)
    )
    set_status(b["id"], "completed")
    url = f"/v1/broadcasts/{b['id']}/recipients"
    assert len(api.ok("get", url + "?status=failed")["items"]) == 2

    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        delivery_partitions.prune(conn, retention_days=90, archive=False)

    page = api.ok("get", url + "?status=failed")
    assert page["items"] == []
    assert page["next_cursor"] is None
    assert page["recipients_removed_at"] is not None
    assert "removed by retention" in page["message"]
    shown = api.ok("get", f"/v1/broadcasts/{b['id']}")
    assert shown["recipients_removed_at"] == page["recipients_removed_at"]
    assert (shown["counts"]["total"], shown["counts"]["sent"], shown["counts"]["failed"]) == (
        3,
        1,
        2,
    )
    exported = api.get(url, headers={"Accept": "text/csv"})
    assert exported.status_code == 410
    assert "removed by retention" in exported.json()["message"]


def test_recipients_kept_say_nothing_of_retention(api: Api, started: dict[str, Any]) -> None:
    page = api.ok("get", f"/v1/broadcasts/{started['broadcast']['id']}/recipients")
    assert len(page["items"]) == 6
    assert (page["recipients_removed_at"], page["message"]) == (None, None)
    shown = api.ok("get", f"/v1/broadcasts/{started['broadcast']['id']}")
    assert shown["recipients_removed_at"] is None


def test_recipients_of_a_broadcast_not_started_are_an_empty_list(api: Api) -> None:
    account = api.account(api.channel()["id"])
    api.contact(account["id"], "later-1")
    b = api.broadcast(account["channel_id"])
    assert api.ok("get", f"/v1/broadcasts/{b['id']}/recipients")["items"] == []
    exported = api.get(f"/v1/broadcasts/{b['id']}/recipients?format=csv")
    assert exported.status_code == 200
    assert exported.text.splitlines() == [
        "contact_id,name,address,status,attempts,last_error,provider_message_id,sent_at"
    ]


def test_csv_export_can_start_with_a_byte_order_mark_for_spreadsheets(
    api: Api, started: dict[str, Any]
) -> None:
    path = f"/v1/broadcasts/{started['broadcast']['id']}/recipients?format=csv"
    plain = api.get(path)
    marked = api.get(path + "&bom=true")
    assert marked.status_code == 200
    assert not plain.content.startswith(b"\xef\xbb\xbf")
    assert marked.content == b"\xef\xbb\xbf" + plain.content
