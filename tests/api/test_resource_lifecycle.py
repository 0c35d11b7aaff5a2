"""Every resource can be changed and deleted: channels (rotate a secret, fix a URL, change the
rate), accounts, tags, media, broadcasts (final ones), contacts (erasure) and API tokens; and
nothing is deleted from under a broadcast that may still send.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from PIL import Image
from sqlalchemy import text

from shared import delivery_store as store
from shared.db.engine import libpq_url, transaction
from shared.domain.channels import open_config
from shared.domain.lifecycle import ChannelKind
from shared.secrets_box import get_secrets_box
from tests.conftest import Api, new_workspace
from tests.factories import set_status, start_with_deliveries


@pytest.fixture
def conn(database_url: str) -> Any:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as c:
        yield c


def later() -> str:
    return (datetime.now(UTC) + timedelta(hours=1)).isoformat()


def stored_config(conn: psycopg.Connection[Any], channel_id: int) -> dict[str, Any]:
    row = conn.execute("SELECT kind, config FROM channel WHERE id = %s", (channel_id,)).fetchone()
    assert row is not None
    return open_config(ChannelKind(row[0]), row[1], get_secrets_box())


def count(conn: psycopg.Connection[Any], sql: str, *params: Any) -> int:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return int(row[0])


# --- channels ----------------------------------------------------------------------------


def test_a_channel_s_secret_is_rotated_and_a_value_sent_back_as_shown_keeps_the_stored_one(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    channel = api.channel(rate_limit_per_second=50)
    path = f"/v1/channels/{channel['id']}"
    rotated = api.ok("patch", path, json={"config": {"secret": "a-brand-new-secret-0002"}})
    assert rotated["config"]["secret"] == "********"
    assert "a-brand-new-secret-0002" not in str(rotated)
    assert stored_config(conn, channel["id"]) == {
        "url": "http://127.0.0.1:9/hook",
        "secret": "a-brand-new-secret-0002",
    }
    # The whole config read back, with one key changed: the secret shown as ******** stays.
    shown = api.ok("get", path)["config"]
    fixed = api.ok("patch", path, json={"config": {**shown, "url": "http://127.0.0.1:9/other"}})
    assert fixed["config"]["url"] == "http://127.0.0.1:9/other"
    assert stored_config(conn, channel["id"])["secret"] == "a-brand-new-secret-0002"
    # The secret is stored sealed, never in the clear.
    raw = conn.execute("SELECT config FROM channel WHERE id = %s", (channel["id"],)).fetchone()
    assert raw is not None
    assert "a-brand-new-secret-0002" not in str(raw[0])
    changed = api.ok("patch", path, json={"name": "renamed", "rate_limit_per_second": 12.5})
    assert (changed["name"], changed["rate_limit_per_second"]) == ("renamed", 12.5)


@pytest.mark.parametrize(
    ("body", "field", "code"),
    [
        ({}, "body", 422),
        ({"name": None}, "name", 422),
        ({"config": {"secret": "short"}}, "config.secret", 422),
        ({"config": {"colour": "red"}}, "config.colour", 422),
        ({"config": {"url": "not a url"}}, "config.url", 422),
        ({"rate_limit_per_second": 0}, "rate_limit_per_second", 422),
        ({"kind": "telegram"}, "kind", 422),
    ],
)
def test_a_bad_channel_change_names_its_field_and_changes_nothing(
    api: Api, conn: psycopg.Connection[Any], body: dict[str, Any], field: str, code: int
) -> None:
    channel = api.channel()
    before = conn.execute("SELECT * FROM channel WHERE id = %s", (channel["id"],)).fetchone()
    response = api.patch(f"/v1/channels/{channel['id']}", json=body)
    assert response.status_code == code, response.text
    assert [e["field"] for e in response.json()["errors"]] == [field]
    after = conn.execute("SELECT * FROM channel WHERE id = %s", (channel["id"],)).fetchone()
    assert after == before


def test_a_channel_name_another_channel_has_is_a_conflict(api: Api) -> None:
    first, second = api.channel(), api.channel()
    response = api.patch(f"/v1/channels/{second['id']}", json={"name": first["name"]})
    assert response.status_code == 409
    assert f"(id {first['id']})" in response.json()["detail"]


def test_a_channel_used_by_a_broadcast_not_yet_final_is_not_deleted(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    channel = api.channel()
    account = api.account(channel["id"])
    api.contact(account["id"], "c-1")
    pending = api.broadcast(channel["id"], send_at=later())
    refused = api.delete(f"/v1/channels/{channel['id']}")
    assert refused.status_code == 409
    assert f"{pending['id']} (pending)" in refused.json()["detail"]
    assert api.get(f"/v1/channels/{channel['id']}").status_code == 200
    # Once it is final, the channel goes with its accounts, contacts and broadcasts; the
    # broadcast's recipient rows are noted for removal, then removed in steps.
    start_with_deliveries(pending["id"], ["sent"])
    set_status(pending["id"], "completed")
    assert api.delete(f"/v1/channels/{channel['id']}").status_code == 204
    for path in (
        f"/v1/channels/{channel['id']}",
        f"/v1/accounts/{account['id']}",
        f"/v1/broadcasts/{pending['id']}",
    ):
        assert api.get(path).status_code == 404, path
    assert api.ok("get", f"/v1/contacts?account_id={account['id']}")["items"] == []
    assert count(conn, "SELECT count(*) FROM delivery WHERE broadcast_id = %s", pending["id"]) == 1
    while store.run(conn, store.purge_step(limit=1)) is not None:
        pass
    assert count(conn, "SELECT count(*) FROM delivery WHERE broadcast_id = %s", pending["id"]) == 0
    assert count(conn, "SELECT count(*) FROM delivery_purge") == 0


# --- accounts and tags ---------------------------------------------------------------------


def test_an_account_is_renamed_and_deleted_unless_a_broadcast_may_reach_its_contacts(
    api: Api,
) -> None:
    channel = api.channel()
    mine, other = api.account(channel["id"]), api.account(channel["id"])
    api.contact(mine["id"], "m-1")
    api.contact(other["id"], "o-1")
    renamed = api.ok("patch", f"/v1/accounts/{mine['id']}", json={"name": "main line"})
    assert renamed["name"] == "main line"
    clash = api.patch(f"/v1/accounts/{other['id']}", json={"name": "main line"})
    assert clash.status_code == 409
    # A broadcast to the whole channel (no account named) may reach its contacts.
    everyone = api.broadcast(channel["id"], send_at=later())
    assert api.delete(f"/v1/accounts/{mine['id']}").status_code == 409
    api.ok("post", f"/v1/broadcasts/{everyone['id']}/cancel")
    # One to the other account only does not hold it.
    api.broadcast(channel["id"], {"account_ids": [other["id"]]}, send_at=later())
    assert api.delete(f"/v1/accounts/{mine['id']}").status_code == 204
    assert api.get(f"/v1/accounts/{mine['id']}").status_code == 404
    assert api.ok("get", f"/v1/contacts?account_id={mine['id']}")["items"] == []


def test_a_tag_is_renamed_and_deleted_unless_an_audience_picks_by_it(api: Api) -> None:
    channel = api.channel()
    account = api.account(channel["id"])
    contact = api.contact(account["id"], "t-1", tags=["vip", "berlin"])
    vip = api.tag_id("vip")
    renamed = api.ok("patch", f"/v1/tags/{vip}", json={"name": "VIP gold"})
    assert renamed["name"] == "VIP gold"
    assert api.patch(f"/v1/tags/{vip}", json={"name": "berlin"}).status_code == 409
    b = api.broadcast(channel["id"], {"tag_ids": [vip]}, send_at=later())
    refused = api.delete(f"/v1/tags/{vip}")
    assert refused.status_code == 409
    assert f"{b['id']} (pending)" in refused.json()["detail"]
    api.ok("post", f"/v1/broadcasts/{b['id']}/cancel")
    assert api.delete(f"/v1/tags/{vip}").status_code == 204
    assert api.ok("get", f"/v1/contacts/{contact['id']}")["tags"] == ["berlin"]


# --- media -------------------------------------------------------------------------------


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (3, 3), "red").save(buf, "PNG")
    return buf.getvalue()


def test_media_is_listed_and_deleted_unless_a_broadcast_not_yet_final_carries_it(
    api: Api,
) -> None:
    channel = api.channel()
    api.contact(api.account(channel["id"])["id"], "p-1")
    first = api.ok("post", "/v1/media", 201, files={"file": ("a.png", png(), "image/png")})
    second = api.ok("post", "/v1/media", 201, files={"file": ("b.png", png(), "image/png")})
    listed = api.ok("get", "/v1/media?limit=1")
    assert [m["id"] for m in listed["items"]] == [second["id"]]
    rest = api.ok("get", f"/v1/media?cursor={listed['next_cursor']}")
    assert first["id"] in [m["id"] for m in rest["items"]]
    b = api.broadcast(channel["id"], content={"media_ids": [first["id"]]}, send_at=later())
    refused = api.delete(f"/v1/media/{first['id']}")
    assert refused.status_code == 409
    assert f"{b['id']} (pending)" in refused.json()["detail"]
    assert api.get(f"/v1/media/{first['id']}/content").status_code == 200
    api.ok("post", f"/v1/broadcasts/{b['id']}/cancel")
    assert api.delete(f"/v1/media/{first['id']}").status_code == 204
    assert api.get(f"/v1/media/{first['id']}").status_code == 404
    # A clone of the broadcast that carried it is told the image is gone.
    clone = api.post(f"/v1/broadcasts/{b['id']}/clone", json={"send_at": later()})
    assert clone.status_code == 422
    assert clone.json()["errors"][0]["field"].startswith("content.media_ids")


# --- broadcasts ----------------------------------------------------------------------------


def test_only_a_final_broadcast_is_deleted_with_its_tests_and_never_under_a_retry(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    channel = api.channel()
    account = api.account(channel["id"])
    contacts = [api.contact(account["id"], f"b-{i}")["id"] for i in range(2)]
    b = api.broadcast(channel["id"], send_at=later())
    refused = api.delete(f"/v1/broadcasts/{b['id']}")
    assert refused.status_code == 409
    assert "only a completed or canceled broadcast" in refused.json()["detail"]
    start_with_deliveries(b["id"], ["sent", "failed"], errors=[None, "HTTP 500"])
    set_status(b["id"], "completed")
    test = api.ok(
        "post", f"/v1/broadcasts/{b['id']}/test-send", 201, json={"contact_ids": contacts[:1]}
    )
    retry = api.ok("post", f"/v1/broadcasts/{b['id']}/retry-failed", 201)
    held = api.delete(f"/v1/broadcasts/{b['id']}")
    assert held.status_code == 409
    assert f"{retry['id']} (pending)" in held.json()["detail"]
    api.ok("post", f"/v1/broadcasts/{retry['id']}/cancel")
    api.ok("post", f"/v1/broadcasts/{test['id']}/cancel")
    assert api.delete(f"/v1/broadcasts/{b['id']}").status_code == 204
    assert api.get(f"/v1/broadcasts/{b['id']}").status_code == 404
    assert api.get(f"/v1/broadcasts/{test['id']}").status_code == 404
    assert api.ok("get", f"/v1/broadcasts/{retry['id']}")["retry_of"] is None
    assert count(conn, "SELECT count(*) FROM delivery_purge WHERE broadcast_id = %s", b["id"]) == 1


# --- contacts: erasure ---------------------------------------------------------------------


def test_erasing_a_contact_keeps_every_count_and_removes_its_address_and_name(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    channel = api.channel()
    account = api.account(channel["id"])
    ann = api.contact(account["id"], "ann@example.com", name="Ann Example")
    bob = api.contact(account["id"], "bob@example.com", name="Bob")
    done = api.broadcast(channel["id"], send_at=later())
    start_with_deliveries(
        done["id"], ["failed", "sent"], errors=["rejected: ann@example.com bounced", None]
    )
    set_status(done["id"], "completed")
    only_ann = api.broadcast(
        channel["id"], {"selection": "manual", "contact_ids": [ann["id"]]}, send_at=later()
    )
    both = api.broadcast(
        channel["id"],
        {"selection": "manual", "contact_ids": [ann["id"], bob["id"]]},
        send_at=later(),
    )
    counts_before = api.ok("get", f"/v1/broadcasts/{done['id']}")["counts"]
    erased = api.ok("delete", f"/v1/contacts/{ann['id']}")
    assert erased == {
        "contact_id": ann["id"],
        "erased_deliveries": 1,
        "unlisted_from": [only_ann["id"], both["id"]],
    }
    assert api.get(f"/v1/contacts/{ann['id']}").status_code == 404
    assert api.ok("get", f"/v1/broadcasts/{done['id']}")["counts"] == counts_before
    rows = api.ok("get", f"/v1/broadcasts/{done['id']}/recipients")["items"]
    assert [(r["name"], r["address"], r["status"]) for r in rows] == [
        ("", "(erased)", "failed"),
        ("Bob", "bob@example.com", "sent"),
    ]
    assert rows[0]["last_error"] == "rejected: (erased) bounced"
    everything = conn.execute("SELECT d::text FROM delivery d").fetchall()
    assert not any("ann@example.com" in r[0] for r in everything)
    # Broadcasts not yet started lose it from their lists; one it was all of is canceled.
    gone = api.ok("get", f"/v1/broadcasts/{only_ann['id']}")
    assert gone["status"] == "canceled"
    assert "erased" in gone["status_reason"]
    left = api.ok("get", f"/v1/broadcasts/{both['id']}")
    assert (left["status"], left["audience"]["contact_ids"], left["audience_size"]) == (
        "pending",
        [bob["id"]],
        1,
    )


def test_deleting_an_account_erases_its_contacts_rows_in_steps(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    channel = api.channel()
    account = api.account(channel["id"])
    api.contact(account["id"], "gone-1@example.com")
    b = api.broadcast(channel["id"], send_at=later())
    start_with_deliveries(b["id"], ["sent"])
    set_status(b["id"], "completed")
    assert api.delete(f"/v1/accounts/{account['id']}").status_code == 204
    # The delete itself is one quick statement: the rows are erased by the sweep's steps.
    while store.run(conn, store.settle_erasures(rows=1)).rows:
        pass
    assert conn.execute(
        "SELECT address FROM delivery WHERE broadcast_id = %s", (b["id"],)
    ).fetchall() == [("(erased)",)]
    assert api.ok("get", f"/v1/broadcasts/{b['id']}")["counts"]["sent"] == 1


def test_an_erased_contact_s_name_leaves_its_timed_sends_names(api: Api) -> None:
    channel = api.channel()
    account = api.account(channel["id"])
    ann = api.contact(account["id"], "ann-3@example.com", name="Ann Person")
    conversation = api.ok(
        "post",
        "/v1/conversations",
        201,
        json={"account_id": account["id"], "contact_id": ann["id"]},
    )
    timed = api.ok(
        "post",
        f"/v1/conversations/{conversation['id']}/timed-sends",
        201,
        json={"content": {"text": "hi"}, "send_at": later()},
    )
    assert "Ann Person" in timed["name"]
    api.ok("delete", f"/v1/contacts/{ann['id']}")
    renamed = api.ok("get", f"/v1/broadcasts/{timed['id']}")
    assert "Ann Person" not in renamed["name"]
    assert "(erased)" in renamed["name"]
    assert renamed["status"] == "canceled"


def test_a_contact_being_sent_to_is_not_erased_until_the_send_ends(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    channel = api.channel()
    account = api.account(channel["id"])
    ann = api.contact(account["id"], "ann-2@example.com")
    b = api.broadcast(channel["id"], send_at=later())
    start_with_deliveries(b["id"], ["sending"])
    set_status(b["id"], "in_progress")
    refused = api.delete(f"/v1/contacts/{ann['id']}")
    assert refused.status_code == 409
    assert f"under way in broadcast {b['id']}" in refused.json()["detail"]
    assert api.get(f"/v1/contacts/{ann['id']}").status_code == 200
    address = conn.execute(
        "SELECT address FROM delivery WHERE broadcast_id = %s", (b["id"],)
    ).fetchone()
    assert address == ("ann-2@example.com",)


# --- tokens ------------------------------------------------------------------------------


def test_tokens_are_listed_named_given_an_expiry_and_revoked(api: Api, client: Any) -> None:
    listed = api.ok("get", "/v1/tokens")
    assert [t["current"] for t in listed] == [True]
    assert all("token" not in t for t in listed)
    expiry = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    made = api.ok(
        "post", "/v1/tokens", 201, json={"name": "ci robot", "expires_at": expiry.isoformat()}
    )
    assert made["token"].startswith(made["prefix"])
    assert (made["name"], datetime.fromisoformat(made["expires_at"])) == ("ci robot", expiry)
    robot = {"Authorization": f"Bearer {made['token']}"}
    seen_by_robot = client.get("/v1/tokens", headers=robot).json()
    assert [t["current"] for t in seen_by_robot] == [False, True]
    renamed = api.ok("patch", f"/v1/tokens/{made['id']}", json={"name": "deploy robot"})
    assert renamed["name"] == "deploy robot"
    forever = api.ok("patch", f"/v1/tokens/{made['id']}", json={"expires_at": None})
    assert forever["expires_at"] is None
    past = api.patch(f"/v1/tokens/{made['id']}", json={"expires_at": "2001-01-01T00:00:00Z"})
    assert past.status_code == 422
    assert past.json()["errors"][0]["field"] == "expires_at"
    naive = api.post("/v1/tokens", json={"name": "x", "expires_at": "2099-01-01T00:00:00"})
    assert naive.status_code == 422
    assert api.delete(f"/v1/tokens/{made['id']}").status_code == 204
    assert client.get("/v1/tokens", headers=robot).status_code == 401
    revoked = [t for t in api.ok("get", "/v1/tokens") if t["id"] == made["id"]]
    assert revoked[0]["revoked_at"] is not None
    # Another workspace's token is not found, and left as it was.
    other = new_workspace(client)
    mine = listed[0]["id"]
    assert other.delete(f"/v1/tokens/{mine}").status_code == 404
    assert other.patch(f"/v1/tokens/{mine}", json={"name": "x"}).status_code == 404
    assert api.get("/v1/tokens").status_code == 200


@pytest.mark.parametrize(
    ("kind", "move", "secret"),
    [
        ("telegram", {"api_base_url": "https://evil.example"}, {"bot_token": "42:NEW-token_1"}),
        (
            "whatsapp",
            {"api_base_url": "https://evil.example"},
            {"access_token": "EAAG-new-token"},
        ),
        ("smtp", {"host": "smtp.evil.example"}, {"password": "new-smtp-pass"}),
        ("webhook", {"url": "https://evil.example/hook"}, {"secret": "a-new-webhook-secret-1"}),
    ],
)
def test_a_stored_secret_never_follows_the_channel_to_another_address(
    api: Api,
    conn: psycopg.Connection[Any],
    kind: str,
    move: dict[str, str],
    secret: dict[str, str],
) -> None:
    channel = api.channel(kind)
    path = f"/v1/channels/{channel['id']}"
    before = stored_config(conn, channel["id"])
    refused = api.patch(path, json={"config": move})
    assert refused.status_code == 422, refused.text
    [error] = refused.json()["errors"]
    assert error["type"] == "secret_required"
    assert f"config.{next(iter(secret))}" in error["msg"]
    assert stored_config(conn, channel["id"]) == before
    # Shown as ********, the stored secret still does not follow.
    echoed = api.patch(path, json={"config": {**move, next(iter(secret)): "********"}})
    assert echoed.status_code == 422
    moved = api.ok("patch", path, json={"config": {**move, **secret}})
    after = stored_config(conn, channel["id"])
    assert all(str(after[k]).rstrip("/") == v for k, v in {**move, **secret}.items())
    assert next(iter(secret.values())) not in str(moved)


def test_a_url_with_a_login_keeps_it_on_the_same_server_sent_back_masked(
    api: Api, conn: psycopg.Connection[Any]
) -> None:
    channel = api.channel(
        config={"url": "http://user:pw-1@127.0.0.1:9/v1", "secret": "s3cret-webhook-key-0001"}
    )
    shown = api.ok("get", f"/v1/channels/{channel['id']}")["config"]
    assert shown["url"] == "http://********@127.0.0.1:9/v1"
    path = f"/v1/channels/{channel['id']}"
    api.ok("patch", path, json={"config": {**shown, "url": "http://********@127.0.0.1:9/v2"}})
    assert stored_config(conn, channel["id"])["url"] == "http://user:pw-1@127.0.0.1:9/v2"
    elsewhere = api.patch(
        path,
        json={
            "config": {"url": "http://********@127.0.0.2:9/v2", "secret": "another-secret-00002"}
        },
    )
    assert elsewhere.status_code == 422
    assert "user name and password" in elsewhere.json()["errors"][0]["msg"]


def test_a_token_that_expires_cannot_outlive_itself_through_another(api: Api, client: Any) -> None:
    soon = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    short = api.ok(
        "post", "/v1/tokens", 201, json={"name": "short", "expires_at": soon.isoformat()}
    )
    headers = {"Authorization": f"Bearer {short['token']}"}
    longer = (soon + timedelta(days=1)).isoformat()
    for method, path, body in (
        ("post", "/v1/tokens", {"name": "x", "expires_at": longer}),
        ("post", "/v1/tokens", {"name": "x"}),
        ("patch", f"/v1/tokens/{short['id']}", {"expires_at": None}),
        ("patch", f"/v1/tokens/{short['id']}", {"expires_at": longer}),
    ):
        refused = getattr(client, method)(path, json=body, headers=headers)
        assert refused.status_code == 422, (method, path, body)
        assert refused.json()["errors"][0]["type"] == "beyond_own_expiry"
    ok = client.post(
        "/v1/tokens",
        json={"name": "shorter", "expires_at": (soon - timedelta(hours=1)).isoformat()},
        headers=headers,
    )
    assert ok.status_code == 201
    # An expired token is not revived by another.
    with transaction() as session:
        session.execute(
            text("UPDATE api_token SET expires_at = now() - interval '1 minute' WHERE id = :i"),
            {"i": short["id"]},
        )
    revived = api.patch(f"/v1/tokens/{short['id']}", json={"expires_at": None})
    assert revived.status_code == 409
    assert "expired" in revived.json()["detail"]
