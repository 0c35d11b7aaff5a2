"""Contacts: addresses checked per channel kind, tags by name, opt-out, bulk import."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import func, select

from shared.db.engine import transaction
from shared.db.models import Contact, ContactTag
from tests.conftest import Api


@pytest.fixture
def account(api: Api) -> dict[str, Any]:
    return api.account(api.channel("whatsapp")["id"])


def contact_count(workspace_id: int) -> int:
    with transaction() as session:
        return int(
            session.execute(
                select(func.count())
                .select_from(Contact)
                .where(Contact.workspace_id == workspace_id)
            ).scalar_one()
        )


def test_create_contact_with_tags_created_by_name(api: Api, account: dict[str, Any]) -> None:
    contact = api.contact(account["id"], "+49 151 1234-5678", tags=["vip", "Berlin"], name="Ann")
    assert contact["address"] == "+4915112345678"
    assert contact["tags"] == ["Berlin", "vip"]
    assert not contact["opted_out"]
    assert {t["name"] for t in api.ok("get", "/v1/tags")["items"]} == {"vip", "Berlin"}
    again = api.contact(account["id"], "+4915100000000", tags=["VIP"])
    assert again["tags"] == ["vip"]


@pytest.mark.parametrize(
    ("kind", "address", "expected"),
    [
        ("whatsapp", "hello", "E.164"),
        ("smtp", "not-an-email", "email address"),
        ("telegram", "@ab", "chat id"),
        ("webhook", "   ", "at least 1 character"),
    ],
)
def test_bad_addresses_say_what_is_allowed(
    api: Api, kind: str, address: str, expected: str
) -> None:
    account = api.account(api.channel(kind)["id"])
    response = api.post("/v1/contacts", json={"account_id": account["id"], "address": address})
    assert response.status_code == 422
    error = response.json()["detail"][0]
    assert error["field"] == "address"
    assert expected in error["msg"]
    assert contact_count(api.workspace_id) == 0


def test_duplicate_contact_is_a_conflict(api: Api, account: dict[str, Any]) -> None:
    first = api.contact(account["id"], "+4915112345678")
    response = api.post(
        "/v1/contacts", json={"account_id": account["id"], "address": "4915112345678"}
    )
    assert response.status_code == 409
    assert str(first["id"]) in response.json()["detail"]


def test_unknown_account_is_named(api: Api) -> None:
    response = api.post("/v1/contacts", json={"account_id": 99999999, "address": "x"})
    assert response.status_code == 422
    assert response.json()["detail"][0] == {
        "field": "account_id",
        "msg": "account 99999999 not found",
        "type": "not_found",
    }


def test_patch_opts_out_retags_and_renames(api: Api, account: dict[str, Any]) -> None:
    contact = api.contact(account["id"], "+4915112345678", tags=["a", "b"])
    patched = api.ok(
        "patch",
        f"/v1/contacts/{contact['id']}",
        json={"opted_out": True, "tags": ["c"], "name": "Bo"},
    )
    assert patched["opted_out"] is True
    assert patched["tags"] == ["c"]
    assert patched["name"] == "Bo"
    assert api.ok("get", "/v1/contacts?opted_out=true")["items"][0]["id"] == contact["id"]
    assert api.ok("get", "/v1/contacts?opted_out=false")["items"] == []
    back = api.ok("patch", f"/v1/contacts/{contact['id']}", json={"opted_out": False})
    assert back["opted_out"] is False
    assert back["tags"] == ["c"]


def test_list_filters_by_account_and_tag(api: Api, account: dict[str, Any]) -> None:
    other = api.account(account["channel_id"])
    a = api.contact(account["id"], "+4915100000001", tags=["x"])
    api.contact(account["id"], "+4915100000002")
    c = api.contact(other["id"], "+4915100000003", tags=["x"])
    by_tag = api.ok("get", f"/v1/contacts?tag_id={api.tag_id('x')}")["items"]
    assert [r["id"] for r in by_tag] == [c["id"], a["id"]]
    by_account = api.ok("get", f"/v1/contacts?account_id={other['id']}")["items"]
    assert [r["id"] for r in by_account] == [c["id"]]


# --- import ---------------------------------------------------------------------------------


def test_import_100k_rows_in_one_call(api: Api, account: dict[str, Any]) -> None:
    rows = [
        {
            "account_id": account["id"],
            "address": f"+49151{i:07d}",
            "name": f"n{i}",
            "tags": ["bulk", f"g{i % 3}"],
        }
        for i in range(100_000)
    ]
    result = api.ok("post", "/v1/contacts/import", json=rows)
    assert result == {"received": 100_000, "created": 100_000, "updated": 0}
    assert contact_count(api.workspace_id) == 100_000
    with transaction() as session:
        links = session.execute(
            select(func.count())
            .select_from(ContactTag)
            .where(ContactTag.workspace_id == api.workspace_id)
        ).scalar_one()
    assert links == 200_000
    preview = api.ok(
        "post",
        "/v1/audiences/preview",
        json={"channel_id": account["channel_id"], "tag_ids": [api.tag_id("g1")]},
    )
    assert preview["count"] == 33_333


def test_import_is_all_or_nothing(api: Api, account: dict[str, Any]) -> None:
    rows = [{"account_id": account["id"], "address": f"+49151{i:07d}"} for i in range(1000)]
    rows[500]["address"] = "not a phone"
    rows[700]["account_id"] = 99999999
    rows[900] = {"account_id": account["id"], "address": f"+49151{3:07d}"}  # repeats row 3
    response = api.post("/v1/contacts/import", json=rows)
    assert response.status_code == 422
    fields = [e["field"] for e in response.json()["detail"]]
    assert fields == ["rows[500].address", "rows[700].account_id", "rows[900].address"]
    assert "repeats rows[3]" in response.json()["detail"][2]["msg"]
    assert contact_count(api.workspace_id) == 0
    assert api.ok("get", "/v1/tags")["items"] == []


def test_import_schema_errors_name_the_row_and_field(api: Api, account: dict[str, Any]) -> None:
    rows: list[dict[str, Any]] = [
        {"account_id": account["id"], "address": "+4915100000001"},
        {"address": "x", "colour": "red"},
    ]
    response = api.post("/v1/contacts/import", json=rows)
    assert response.status_code == 422
    errors = {e["field"]: e["msg"] for e in response.json()["detail"]}
    assert errors["rows[1].account_id"] == "is required"
    assert "rows[1].colour" in errors
    assert contact_count(api.workspace_id) == 0


def test_import_csv_with_tags_and_opt_out(api: Api, account: dict[str, Any]) -> None:
    body = (
        "account_id,address,name,tags,opted_out\n"
        f"{account['id']},+4915100000001,Ann,vip;berlin,false\n"
        f'{account["id"]},+4915100000002,"Smith, Bo",vip,true\n'
        f"{account['id']},+4915100000003,,,\n"
    )
    result = api.ok(
        "post", "/v1/contacts/import", content=body.encode(), headers={"Content-Type": "text/csv"}
    )
    assert result == {"received": 3, "created": 3, "updated": 0}
    contacts = {c["address"]: c for c in api.ok("get", "/v1/contacts")["items"]}
    assert contacts["+4915100000001"]["tags"] == ["berlin", "vip"]
    assert contacts["+4915100000002"]["name"] == "Smith, Bo"
    assert contacts["+4915100000002"]["opted_out"] is True
    assert contacts["+4915100000003"]["tags"] == []


def test_import_updates_known_contacts_and_never_clears_an_opt_out(
    api: Api, account: dict[str, Any]
) -> None:
    known = api.contact(account["id"], "+4915100000001", tags=["old"], name="Old", opted_out=True)
    rows = [
        {"account_id": account["id"], "address": "+4915100000001", "name": "New", "tags": ["new"]},
        {"account_id": account["id"], "address": "+4915100000002"},
    ]
    assert api.ok("post", "/v1/contacts/import", json=rows) == {
        "received": 2,
        "created": 1,
        "updated": 1,
    }
    after = api.ok("get", f"/v1/contacts/{known['id']}")
    assert after["name"] == "New"
    assert after["tags"] == ["new", "old"]
    assert after["opted_out"] is True


@pytest.mark.parametrize(
    ("body", "content_type", "words"),
    [
        (b"account_id,phone\n1,2\n", "text/csv", "unknown: phone"),
        (b"account_id,address\n1,x,extra\n", "text/csv", "more cells"),
        (b"{not json", "application/json", "not valid JSON"),
        (b'{"account_id": 1}', "application/json", "JSON array"),
        (b"[]", "application/json", "no contacts"),
        (b"<xml/>", "application/xml", "text/csv"),
    ],
)
def test_import_refuses_malformed_bodies(
    api: Api, body: bytes, content_type: str, words: str
) -> None:
    response = api.post("/v1/contacts/import", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 422
    assert words in response.json()["message"]


def test_import_over_the_row_limit_is_refused(api: Api, account: dict[str, Any]) -> None:
    rows = [{"account_id": account["id"], "address": f"+49151{i:07d}"} for i in range(100_001)]
    response = api.post(
        "/v1/contacts/import",
        content=json.dumps(rows).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert "at most 100,000" in response.json()["message"]
    assert contact_count(api.workspace_id) == 0


def test_two_imports_in_one_transaction_both_land(api: Api, account: dict[str, Any]) -> None:
    from shared.domain.contacts import ContactIn, import_contacts

    with transaction() as session:
        first = import_contacts(
            session,
            api.workspace_id,
            [ContactIn(account_id=account["id"], address="+4915100000001")],
        )
        second = import_contacts(
            session,
            api.workspace_id,
            [ContactIn(account_id=account["id"], address="+4915100000002")],
        )
    assert (first.created, second.created) == (1, 1)
    assert contact_count(api.workspace_id) == 2
