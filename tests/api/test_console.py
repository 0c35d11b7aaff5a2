"""The console's sign-in, session and broadcast list over HTTP (the browser tests walk the
same pages in Chromium): a session cookie instead of the token, CSRF on every form, one
workspace's data only.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import text

from shared.db.engine import transaction
from shared.domain.tokens import revoke_token
from tests.conftest import Api
from tests.factories import set_status, start_with_deliveries


@pytest.fixture
def browser(app: FastAPI) -> Iterator[TestClient]:
    """A client of its own: its cookies are one browser's."""
    with TestClient(app, base_url="http://testserver", follow_redirects=False) as c:
        yield c


def form_token(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "the form carries a CSRF token"
    return found.group(1)


def sign_in(browser: TestClient, token: str) -> str:
    """Sign in; returns the CSRF token of the session's pages."""
    form = browser.get("/console/login")
    answer = browser.post(
        "/console/login", data={"token": token, "csrf_token": form_token(form.text)}
    )
    assert answer.status_code == 303, answer.text
    listing = browser.get("/console/broadcasts")
    assert listing.status_code == 200
    return form_token(listing.text)


def test_pages_need_a_session_and_send_the_browser_to_sign_in(browser: TestClient) -> None:
    answer = browser.get("/console/broadcasts?status=paused")
    assert answer.status_code == 303
    assert (
        answer.headers["location"]
        == "/console/login?next=%2Fconsole%2Fbroadcasts%3Fstatus%3Dpaused"
    )
    assert browser.get("/console/broadcasts/progress?id=1").status_code == 303


def test_signing_in_gives_an_httponly_samesite_cookie_not_the_token(
    browser: TestClient, api: Api
) -> None:
    form = browser.get("/console/login")
    assert form.headers["content-security-policy"].startswith("default-src 'self'")
    assert form.headers["x-frame-options"] == "DENY"
    answer = browser.post(
        "/console/login",
        data={
            "token": api.token,
            "csrf_token": form_token(form.text),
            "next": "/console/broadcasts",
        },
    )
    assert answer.status_code == 303
    assert answer.headers["location"] == "/console/broadcasts"
    cookie = next(
        c for c in answer.headers.get_list("set-cookie") if c.startswith("bcast_console=")
    )
    assert "HttpOnly" in cookie
    assert "SameSite=lax" in cookie
    assert "Path=/console" in cookie
    assert api.token not in cookie
    page = browser.get("/console/broadcasts")
    assert api.token not in page.text


def test_a_wrong_token_says_so_and_a_forged_sign_in_form_is_refused(
    browser: TestClient, api: Api
) -> None:
    form = browser.get("/console/login")
    wrong = browser.post(
        "/console/login", data={"token": "bcast_nope", "csrf_token": form_token(form.text)}
    )
    assert wrong.status_code == 401
    assert "That token is unknown, revoked or expired." in wrong.text
    # A form posted from elsewhere does not carry the value of this browser's cookie.
    forged = browser.post("/console/login", data={"token": api.token, "csrf_token": "guess"})
    assert forged.status_code == 403
    assert "bcast_console=" not in "".join(forged.headers.get_list("set-cookie"))


def test_sign_in_goes_back_to_a_console_page_only(browser: TestClient, api: Api) -> None:
    for target, lands in (
        ("/console/broadcasts?status=paused", "/console/broadcasts?status=paused"),
        ("https://evil.example/", "/console/broadcasts"),
        ("//evil.example/console", "/console/broadcasts"),
    ):
        form = browser.get("/console/login")
        answer = browser.post(
            "/console/login",
            data={"token": api.token, "csrf_token": form_token(form.text), "next": target},
        )
        assert answer.headers["location"] == lands


def test_the_list_shows_this_workspace_only_and_filters(
    browser: TestClient, api: Api, other_api: Api
) -> None:
    def reachable(client: Api, name: str) -> dict[str, Any]:
        made = client.channel(name=name)
        client.contact(client.account(made["id"])["id"], "https://hooks.example/1")
        return made

    channel = reachable(api, "north")
    other_channel = reachable(api, "south")
    later = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    spring = api.broadcast(channel["id"], name="spring 100% sale", send_at=later)
    summer = api.broadcast(other_channel["id"], name="summer news", send_at=later)
    api.ok("post", f"/v1/broadcasts/{summer['id']}/pause")
    theirs = other_api.broadcast(
        reachable(other_api, "west")["id"], name="their secret plan", send_at=later
    )
    sign_in(browser, api.token)

    def names(url: str) -> set[str]:
        html = browser.get(url).text
        found = r'<td data-label="Name"><a href="/console/broadcasts/\d+">([^<]+)</a></td>'
        return set(re.findall(found, html))

    everything = names("/console/broadcasts")
    assert {"spring 100% sale", "summer news"} <= everything
    assert "their secret plan" not in everything
    assert names("/console/broadcasts?status=paused") == {"summer news"}
    assert names("/console/broadcasts?status=paused&status=pending") == everything
    assert names(f"/console/broadcasts?channel={channel['id']}") == {"spring 100% sale"}
    assert names("/console/broadcasts?q=100%25") == {"spring 100% sale"}  # % is a letter
    assert names("/console/broadcasts?q=100_") == set()  # and _ is not a wildcard
    assert names("/console/broadcasts?origin=conversation") == set()
    # The filter form's "Any" sends empty values: no filter.
    assert names("/console/broadcasts?status=paused&origin=&channel=&q=") == {"summer news"}
    progress = browser.get(
        f"/console/broadcasts/progress?id={spring['id']}&id={theirs['id']}"
    ).json()
    assert [item["id"] for item in progress["items"]] == [spring["id"]]


def test_signing_out_needs_the_form_token_and_ends_the_session(
    browser: TestClient, api: Api
) -> None:
    csrf = sign_in(browser, api.token)
    assert browser.post("/console/logout", data={"csrf_token": "forged"}).status_code == 403
    assert browser.get("/console/broadcasts").status_code == 200
    out = browser.post("/console/logout", data={"csrf_token": csrf})
    assert out.status_code == 303
    assert browser.get("/console/broadcasts").status_code == 303


def test_revoking_the_token_ends_its_console_sessions(browser: TestClient, api: Api) -> None:
    sign_in(browser, api.token)
    with transaction() as session:
        revoke_token(session, api.token[:12])
    assert browser.get("/console/broadcasts").status_code == 303


def made_broadcast(api: Api, contacts: int = 4, **kw: Any) -> dict[str, Any]:
    channel = api.channel(name=f"ch-{contacts}")
    account = api.account(channel["id"])
    for i in range(contacts):
        api.contact(account["id"], f"https://hooks.example/{i}", name=f"person {i}")
    later = (datetime.now(UTC) + timedelta(days=3)).isoformat()
    return api.broadcast(channel["id"], name="the detail", send_at=later, **kw)


def test_the_detail_offers_only_the_actions_its_status_allows(
    browser: TestClient, api: Api
) -> None:
    b = made_broadcast(api)
    csrf = sign_in(browser, api.token)
    page = browser.get(f"/console/broadcasts/{b['id']}").text
    actions = set(re.findall(rf'action="/console/broadcasts/{b["id"]}/(\w+)"', page))
    # Pause and cancel by its status; a copy whatever it is.
    assert actions == {"pause", "cancel", "copy"}
    # A forged form is refused and changes nothing.
    forged = browser.post(f"/console/broadcasts/{b['id']}/pause", data={"csrf_token": "x"})
    assert forged.status_code == 403
    assert api.ok("get", f"/v1/broadcasts/{b['id']}")["status"] == "pending"
    done = browser.post(f"/console/broadcasts/{b['id']}/pause", data={"csrf_token": csrf})
    assert done.status_code == 303
    assert api.ok("get", f"/v1/broadcasts/{b['id']}")["status"] == "paused"
    page = browser.get(f"/console/broadcasts/{b['id']}").text
    assert set(re.findall(rf'action="/console/broadcasts/{b["id"]}/(\w+)"', page)) == {
        "resume",
        "cancel",
        "copy",
    }
    # An action its status does not allow says why, with the API's words.
    again = browser.post(f"/console/broadcasts/{b['id']}/pause", data={"csrf_token": csrf})
    assert again.status_code == 409
    assert 'role="alert"' in again.text
    assert "is paused; pause is allowed only while in_progress or pending" in again.text
    # A link cannot put words in the page: notices come from what was done, not the URL.
    crafted = browser.get(f"/console/broadcasts/{b['id']}?notice=sign+in+at+evil.example").text
    assert "evil.example" not in crafted
    browser.post(f"/console/broadcasts/{b['id']}/cancel", data={"csrf_token": csrf})
    assert api.ok("get", f"/v1/broadcasts/{b['id']}")["status"] == "canceled"


def test_another_workspace_s_broadcast_is_not_found(
    browser: TestClient, api: Api, other_api: Api
) -> None:
    theirs = made_broadcast(other_api)
    csrf = sign_in(browser, api.token)
    assert browser.get(f"/console/broadcasts/{theirs['id']}").status_code == 404
    acted = browser.post(f"/console/broadcasts/{theirs['id']}/cancel", data={"csrf_token": csrf})
    assert acted.status_code == 404
    assert browser.get(f"/console/broadcasts/{theirs['id']}/recipients.csv").status_code == 404
    assert other_api.ok("get", f"/v1/broadcasts/{theirs['id']}")["status"] == "pending"


def test_the_recipients_not_reached_are_listed_with_reasons_and_downloadable(
    browser: TestClient, api: Api
) -> None:
    b = made_broadcast(api, contacts=4)
    start_with_deliveries(
        b["id"],
        ["sent", "failed", "failed", "skipped"],
        errors=[None, "HTTP 404: no such recipient", "HTTP 404: no such recipient", "opted out"],
    )
    sign_in(browser, api.token)
    page = browser.get(f"/console/broadcasts/{b['id']}").text
    reasons = re.findall(
        r'<td data-label="Reason">([^<]*)</td><td data-label="Recipients">(\d+)', page
    )
    assert reasons == [("HTTP 404: no such recipient", "2")]
    listed = re.findall(r'<td data-label="Address">([^<]+)</td>', page)
    assert sorted(listed) == [f"https://hooks.example/{i}" for i in (1, 2, 3)]
    only_failed = browser.get(f"/console/broadcasts/{b['id']}?who=failed").text
    assert len(re.findall(r'<td data-label="Address">', only_failed)) == 2
    csv_file = browser.get(f"/console/broadcasts/{b['id']}/recipients.csv?who=failed")
    assert csv_file.status_code == 200
    assert csv_file.headers["content-type"].startswith("text/csv")
    lines = csv_file.text.strip().splitlines()
    assert lines[0].startswith("contact_id,name,address,status")
    assert len(lines) == 3
    assert all(",failed," in line for line in lines[1:])


def test_the_failed_recipients_are_retried_from_the_detail_in_a_linked_broadcast(
    browser: TestClient, api: Api
) -> None:
    b = made_broadcast(api, contacts=3)
    start_with_deliveries(b["id"], ["sent", "failed", "failed"], errors=[None, "HTTP 500", "x"])
    csrf = sign_in(browser, api.token)
    page = browser.get(f"/console/broadcasts/{b['id']}").text
    assert f'action="/console/broadcasts/{b["id"]}/retry-failed"' in page
    assert "Retry the 2 failed now" in page
    path = f"/console/broadcasts/{b['id']}/retry-failed"
    assert browser.post(path, data={"csrf_token": "forged"}).status_code == 403
    done = browser.post(path, data={"csrf_token": csrf})
    assert done.status_code == 303
    retry_id = int(done.headers["location"].rsplit("/", 1)[1])
    retry = api.ok("get", f"/v1/broadcasts/{retry_id}")
    assert (retry["retry_of"], retry["audience_size"]) == (b["id"], 2)
    assert f'href="/console/broadcasts/{b["id"]}"' in browser.get(done.headers["location"]).text
    assert (
        f'href="/console/broadcasts/{retry_id}"'
        in browser.get(f"/console/broadcasts/{b['id']}").text
    )
    # Its page to edit offers no audience to change: a change there would send it to others.
    edit = browser.get(f"/console/broadcasts/{retry_id}/edit").text
    assert "It goes to the recipients that failed in" in edit
    assert 'name="account"' not in edit
    assert 'name="selection"' not in edit
    shown = re.search(r'name="shown_at" value="([^"]+)"', edit)
    assert shown
    renamed = browser.post(
        f"/console/broadcasts/{retry_id}/edit",
        data={
            "csrf_token": csrf,
            "name": "second try",
            "text": "hello again",
            "when": "later",
            "at": shown.group(1),
            "shown_at": shown.group(1),
            "tz": "UTC",
            "channel": "",
        },
    )
    assert renamed.status_code == 303, renamed.text
    after = api.ok("get", f"/v1/broadcasts/{retry_id}")
    assert (after["name"], after["audience"]["failed_in"], after["retry_of"]) == (
        "second try",
        b["id"],
        b["id"],
    )
    # A second click makes no second retry.
    twice = browser.post(path, data={"csrf_token": csrf})
    assert twice.status_code == 409
    assert f"already retried by broadcast {retry_id}" in twice.text
    # Nobody failed: no such button, and a forged post says why.
    clean = made_broadcast(api, contacts=1)
    start_with_deliveries(clean["id"], ["sent"])
    assert "retry-failed" not in browser.get(f"/console/broadcasts/{clean['id']}").text
    refused = browser.post(
        f"/console/broadcasts/{clean['id']}/retry-failed", data={"csrf_token": csrf}
    )
    assert refused.status_code == 409
    assert "no failed recipients" in refused.text


def test_a_test_send_goes_to_contacts_named_by_address_or_id_and_is_listed_apart(
    browser: TestClient, api: Api
) -> None:
    b = made_broadcast(api, contacts=3)
    csrf = sign_in(browser, api.token)
    path = f"/console/broadcasts/{b['id']}/test-send"
    assert f'action="{path}"' in browser.get(f"/console/broadcasts/{b['id']}").text
    assert browser.post(path, data={"csrf_token": "forged", "to": "x"}).status_code == 403
    ids = {c["address"]: c["id"] for c in api.ok("get", "/v1/contacts?limit=500")["items"]}
    # An address no contact of the channel has: refused, the typed text kept, nothing written.
    refused = browser.post(
        path, data={"csrf_token": csrf, "to": "https://hooks.example/0, nobody@example.com"}
    )
    assert refused.status_code == 422
    assert "no contact of this channel has the address &#39;nobody@example.com&#39;" in (
        refused.text
    )
    assert 'value="https://hooks.example/0, nobody@example.com"' in refused.text
    assert api.ok("get", "/v1/broadcasts?origin=test")["items"] == []
    done = browser.post(
        path,
        data={
            "csrf_token": csrf,
            "to": f"https://hooks.example/0\n#{ids['https://hooks.example/2']}",
        },
    )
    assert done.status_code == 303, done.text
    test_id = int(done.headers["location"].rsplit("/", 1)[1])
    test = api.ok("get", f"/v1/broadcasts/{test_id}")
    assert (test["origin"], test["test_of"]) == ("test", b["id"])
    assert test["audience"]["contact_ids"] == [
        ids["https://hooks.example/0"],
        ids["https://hooks.example/2"],
    ]
    assert "Test send" in browser.get(done.headers["location"]).text
    detail = browser.get(f"/console/broadcasts/{b['id']}").text
    assert f'href="/console/broadcasts/{test_id}"' in detail
    assert f'href="/console/broadcasts/{test_id}"' not in browser.get("/console/broadcasts").text


def test_a_copy_is_due_in_an_hour_and_only_a_final_broadcast_is_deleted_box_ticked(
    browser: TestClient, api: Api
) -> None:
    b = made_broadcast(api, contacts=2, sending_window={"start": "08:00", "end": "18:00"})
    csrf = sign_in(browser, api.token)
    page = browser.get(f"/console/broadcasts/{b['id']}").text
    assert "08:00-18:00" in page
    assert f'action="/console/broadcasts/{b["id"]}/delete"' not in page
    copied = browser.post(f"/console/broadcasts/{b['id']}/copy", data={"csrf_token": csrf})
    assert copied.status_code == 303
    copy_id = int(copied.headers["location"].split("/")[-2])
    assert copied.headers["location"].endswith("/edit")
    copy = api.ok("get", f"/v1/broadcasts/{copy_id}")
    assert (copy["status"], copy["name"], copy["sending_window"]["start"]) == (
        "pending",
        "the detail (copy)",
        "08:00",
    )
    ahead = datetime.fromisoformat(copy["send_at"]) - datetime.now(UTC)
    assert timedelta(minutes=55) < ahead <= timedelta(hours=1)
    # Not final: no delete, and a forged one is refused.
    refused = browser.post(
        f"/console/broadcasts/{b['id']}/delete", data={"csrf_token": csrf, "confirm": "yes"}
    )
    assert refused.status_code == 409
    api.ok("post", f"/v1/broadcasts/{b['id']}/cancel")
    assert (
        f'action="/console/broadcasts/{b["id"]}/delete"'
        in browser.get(f"/console/broadcasts/{b['id']}").text
    )
    unticked = browser.post(f"/console/broadcasts/{b['id']}/delete", data={"csrf_token": csrf})
    assert unticked.status_code == 422
    done = browser.post(
        f"/console/broadcasts/{b['id']}/delete", data={"csrf_token": csrf, "confirm": "yes"}
    )
    assert (done.status_code, done.headers["location"]) == (303, "/console/broadcasts")
    assert api.get(f"/v1/broadcasts/{b['id']}").status_code == 404


def test_a_contact_is_erased_from_the_contacts_page_box_ticked(
    browser: TestClient, api: Api
) -> None:
    b = made_broadcast(api, contacts=2)
    start_with_deliveries(b["id"], ["sent", "sent"])
    set_status(b["id"], "completed")
    csrf = sign_in(browser, api.token)
    ids = {c["address"]: c["id"] for c in api.ok("get", "/v1/contacts?limit=500")["items"]}
    gone = ids["https://hooks.example/0"]
    page = browser.get("/console/contacts").text
    assert f'action="/console/contacts/{gone}/erase"' in page
    path = f"/console/contacts/{gone}/erase"
    assert browser.post(path, data={"csrf_token": "forged", "confirm": "yes"}).status_code == 403
    assert browser.post(path, data={"csrf_token": csrf}).status_code == 422
    done = browser.post(path, data={"csrf_token": csrf, "confirm": "yes"})
    assert done.status_code == 303
    assert "was erased" in browser.get(done.headers["location"]).text
    assert api.get(f"/v1/contacts/{gone}").status_code == 404
    rows = api.ok("get", f"/v1/broadcasts/{b['id']}/recipients")["items"]
    assert sorted(r["address"] for r in rows) == ["(erased)", "https://hooks.example/1"]
    # Erased already: not found.
    assert browser.post(path, data={"csrf_token": csrf, "confirm": "yes"}).status_code == 404


def test_a_personalised_broadcast_s_page_shows_its_text_as_recipients_will_get_it(
    browser: TestClient, api: Api
) -> None:
    b = made_broadcast(api, contacts=2, content={"text": "Hi {{name | friend}} <b>!</b>"})
    sign_in(browser, api.token)
    page = browser.get(f"/console/broadcasts/{b['id']}").text
    assert "As its first recipients will get it" in page
    assert "Hi person 0 &lt;b&gt;!&lt;/b&gt;" in page
    plain = made_broadcast(api, contacts=1)
    assert "As its first recipients" not in browser.get(f"/console/broadcasts/{plain['id']}").text


def test_a_tag_is_deleted_from_the_contacts_page_unless_an_audience_picks_by_it(
    browser: TestClient, api: Api
) -> None:
    channel = api.channel()
    api.contact(api.account(channel["id"])["id"], "t-1", tags=["doomed", "kept"])
    doomed = api.tag_id("doomed")
    csrf = sign_in(browser, api.token)
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    b = api.broadcast(channel["id"], {"tag_ids": [doomed]}, send_at=later)
    path = f"/console/tags/{doomed}/delete"
    assert f'action="{path}"' in browser.get("/console/contacts").text
    refused = browser.post(path, data={"csrf_token": csrf})
    assert refused.status_code == 409
    assert f"{b['id']} (pending)" in refused.text
    api.ok("post", f"/v1/broadcasts/{b['id']}/cancel")
    done = browser.post(path, data={"csrf_token": csrf})
    assert done.status_code == 303
    assert "The tag was deleted" in browser.get(done.headers["location"]).text
    assert api.get(f"/v1/tags/{doomed}").status_code == 404


def test_resuming_a_broadcast_paused_as_overdue_asks_for_a_ticked_box(
    browser: TestClient, api: Api
) -> None:
    b = made_broadcast(api)
    with transaction() as session:
        session.execute(
            text(
                "UPDATE broadcast SET status = 'paused', send_at = now() - interval '2 hours', "
                "status_reason = 'overdue: it was due at ...' WHERE id = :id"
            ),
            {"id": b["id"]},
        )
    csrf = sign_in(browser, api.token)
    page = browser.get(f"/console/broadcasts/{b['id']}").text
    assert 'name="confirm_late_start"' in page
    path = f"/console/broadcasts/{b['id']}/resume"
    refused = browser.post(path, data={"csrf_token": csrf})
    assert refused.status_code == 409
    assert "paused as overdue" in refused.text
    done = browser.post(path, data={"csrf_token": csrf, "confirm_late_start": "yes"})
    assert done.status_code == 303
    assert api.ok("get", f"/v1/broadcasts/{b['id']}")["status"] == "pending"
    # One an operator paused shows no such box.
    other = made_broadcast(api, contacts=2)
    browser.post(f"/console/broadcasts/{other['id']}/pause", data={"csrf_token": csrf})
    assert 'name="confirm_late_start"' not in browser.get(f"/console/broadcasts/{other['id']}").text


def conversation_of(api: Api) -> int:
    channel = api.channel(name="inbox")
    account = api.account(channel["id"])
    contact = api.contact(account["id"], "https://hooks.example/ana", name="Ana")
    made = api.ok(
        "post",
        "/v1/conversations",
        201,
        json={"account_id": account["id"], "contact_id": contact["id"]},
    )
    return int(made["id"])


def test_a_timed_send_is_typed_in_the_operator_s_time_zone_and_refused_as_the_api_refuses(
    browser: TestClient, api: Api
) -> None:
    conversation = conversation_of(api)
    csrf = sign_in(browser, api.token)
    tokyo = ZoneInfo("Asia/Tokyo")
    url = f"/console/conversations/{conversation}/timed-send"

    def local(minutes: int) -> str:
        return (datetime.now(tokyo) + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M")

    soon = browser.post(
        url,
        data={
            "csrf_token": csrf,
            "text": "see you",
            "when": "later",
            "at": local(4),
            "tz": "Asia/Tokyo",
        },
    )
    assert soon.status_code == 422
    # The API's own words for the same mistake.
    assert "a scheduled send must be at least 5 minutes ahead" in soon.text
    assert "see you" in soon.text, "what was typed is kept"
    at = local(30)
    made = browser.post(
        url,
        data={"csrf_token": csrf, "text": "see you", "when": "later", "at": at, "tz": "Asia/Tokyo"},
    )
    assert made.status_code == 303
    sends = api.ok("get", f"/v1/conversations/{conversation}/timed-sends")["items"]
    assert len(sends) == 1
    expected = datetime.fromisoformat(at).replace(tzinfo=tokyo).astimezone(UTC)
    assert datetime.fromisoformat(sends[0]["send_at"]) == expected
    # It is in the broadcast list with its origin.
    listed = browser.get("/console/broadcasts?origin=conversation").text
    assert "Timed send to Ana" in listed
    assert "Timed send</td>" in listed
    bad_zone = browser.post(
        url, data={"csrf_token": csrf, "text": "x", "when": "later", "at": at, "tz": "Mars/Base"}
    )
    assert bad_zone.status_code == 422
    assert "is not a time zone" in bad_zone.text
    forged = browser.post(url, data={"csrf_token": "no", "text": "x", "when": "now"})
    assert forged.status_code == 403
    assert len(api.ok("get", f"/v1/conversations/{conversation}/timed-sends")["items"]) == 1


def test_another_workspace_s_conversation_is_not_found(
    browser: TestClient, api: Api, other_api: Api
) -> None:
    theirs = conversation_of(other_api)
    csrf = sign_in(browser, api.token)
    assert browser.get(f"/console/conversations/{theirs}").status_code == 404
    sent = browser.post(
        f"/console/conversations/{theirs}/timed-send",
        data={"csrf_token": csrf, "text": "hi", "when": "now"},
    )
    assert sent.status_code == 404
    assert other_api.ok("get", f"/v1/conversations/{theirs}/timed-sends")["items"] == []


def picker_world(api: Api) -> dict[str, Any]:
    channel = api.channel(name="shop")
    account = api.account(channel["id"], name="main number")
    people = [
        api.contact(account["id"], f"https://hooks.example/p{i}", name=f"P{i}", tags=tags)
        for i, tags in enumerate([["vip"], ["vip", "new"], ["new"], []])
    ]
    return {"channel": channel, "account": account, "people": people}


def test_the_picker_counts_and_lists_who_a_filter_reaches(browser: TestClient, api: Api) -> None:
    world = picker_world(api)
    sign_in(browser, api.token)
    channel = world["channel"]["id"]
    page = browser.get(f"/console/broadcasts/new?channel={channel}").text
    assert re.search(r"<strong data-count>4</strong> contacts match", page)
    vip, new = api.tag_id("vip"), api.tag_id("new")
    anyof = browser.get(f"/console/broadcasts/new?channel={channel}&tag={vip}&tag={new}").text
    assert re.search(r"<strong data-count>3</strong>", anyof)
    both = browser.get(
        f"/console/broadcasts/new?channel={channel}&tag={vip}&tag={new}&tag_match=all"
    ).text
    assert re.search(r"<strong data-count>1</strong>", both)
    live = browser.get(f"/console/audience/count?channel={channel}&tag={vip}&tag={new}")
    assert live.json() == {"count": 3, "unreachable": 0}
    ticked = re.findall(r'name="contact" value="(\d+)" checked', both)
    assert ticked == [str(world["people"][1]["id"])]


def test_creating_takes_everyone_less_the_unticked_or_only_the_ticked(
    browser: TestClient, api: Api
) -> None:
    world = picker_world(api)
    csrf = sign_in(browser, api.token)
    ids = [p["id"] for p in world["people"]]
    base = {
        "csrf_token": csrf,
        "channel": str(world["channel"]["id"]),
        "shown": ",".join(map(str, ids)),
        "text": "hello all",
        "when": "later",
        "at": (datetime.now(UTC) + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M"),
        "tz": "UTC",
    }
    everyone_but = browser.post(
        "/console/broadcasts/new",
        data={**base, "name": "all but one", "selection": "all", "contact": ids[:3]},
    )
    assert everyone_but.status_code == 303, everyone_but.text
    made = api.ok("get", "/v1/broadcasts/" + everyone_but.headers["location"].rsplit("/", 1)[1])
    assert made["audience_size"] == 3
    assert made["audience"]["exclude_contact_ids"] == [ids[3]]
    picked = browser.post(
        "/console/broadcasts/new",
        data={**base, "name": "two", "selection": "manual", "contact": [ids[0], ids[2]]},
    )
    made = api.ok("get", "/v1/broadcasts/" + picked.headers["location"].rsplit("/", 1)[1])
    assert made["audience"]["contact_ids"] == [ids[0], ids[2]]
    assert made["audience_size"] == 2


def test_a_sending_window_and_auto_pause_are_set_changed_and_cleared_in_the_form(
    browser: TestClient, api: Api
) -> None:
    world = picker_world(api)
    csrf = sign_in(browser, api.token)
    ids = [p["id"] for p in world["people"]]
    base = {
        "csrf_token": csrf,
        "channel": str(world["channel"]["id"]),
        "shown": ",".join(map(str, ids)),
        "text": "hello",
        "when": "later",
        "at": (datetime.now(UTC) + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M"),
        "tz": "Europe/Lisbon",
        "name": "windowed",
        "selection": "all",
        "contact": ids,
    }
    bad = browser.post(
        "/console/broadcasts/new", data={**base, "window_start": "09:00", "pause_percent": "x"}
    )
    assert bad.status_code == 422
    assert "sending_window.end" in bad.text
    assert "auto_pause.failure_ratio" in bad.text
    made = browser.post(
        "/console/broadcasts/new",
        data={
            **base,
            "window_start": "09:00",
            "window_end": "20:00",
            "pause_percent": "25",
            "pause_last": "50",
        },
    )
    assert made.status_code == 303, made.text
    b_id = made.headers["location"].rsplit("/", 1)[1]
    b = api.ok("get", f"/v1/broadcasts/{b_id}")
    assert (b["sending_window"]["start"], b["sending_window"]["zone"]) == (
        "09:00",
        "Europe/Lisbon",
    )
    assert b["auto_pause"] == {"failure_ratio": 0.25, "last": 50}
    edit = browser.get(f"/console/broadcasts/{b_id}/edit").text
    assert 'name="window_start" type="time" value="09:00"' in edit
    assert 'value="25"' in edit
    shown = re.search(r'name="shown_at" value="([^"]+)"', edit)
    assert shown
    cleared = browser.post(
        f"/console/broadcasts/{b_id}/edit",
        data={
            **base,
            "at": shown.group(1),
            "shown_at": shown.group(1),
            "tz": "UTC",
            "media_listed": "1",
        },
    )
    assert cleared.status_code == 303, cleared.text
    after = api.ok("get", f"/v1/broadcasts/{b_id}")
    assert (after["sending_window"], after["auto_pause"]) == (None, None)


def test_a_create_the_api_would_refuse_is_refused_with_its_words_and_nothing_written(
    browser: TestClient, api: Api
) -> None:
    world = picker_world(api)
    csrf = sign_in(browser, api.token)
    before = len(api.ok("get", "/v1/broadcasts")["items"])
    soon = (datetime.now(UTC) + timedelta(minutes=4)).strftime("%Y-%m-%dT%H:%M")
    base = {"csrf_token": csrf, "channel": str(world["channel"]["id"]), "selection": "all"}
    cases = [
        (
            {"name": "x", "text": "hi", "when": "later", "at": soon, "tz": "UTC"},
            "a scheduled send must be at least 5 minutes ahead",
        ),
        ({"name": "", "text": "hi"}, "name:"),
        ({"name": "x", "text": "  "}, "content: is empty"),
        (
            {"name": "x", "text": "hi", "selection": "manual"},
            "selection &#39;manual&#39; needs contact_ids",
        ),
    ]
    for fields, words in cases:
        answer = browser.post("/console/broadcasts/new", data={**base, **fields})
        assert answer.status_code == 422, fields
        assert words in answer.text, (fields, answer.text[:2000])
    assert len(api.ok("get", "/v1/broadcasts")["items"]) == before


def test_the_progress_chart_counts_sends_per_time_bucket(browser: TestClient, api: Api) -> None:
    b = made_broadcast(api, contacts=4)
    ids = start_with_deliveries(b["id"], ["sent", "sent", "failed", "sent"])
    # Ended at 0 s, 1 s, 100 s and 100 s after the first: 100 s in at most 60 bars of 2 s.
    # (Exactly 60 s would need 61 bars of 1 s: it gets bars of 2 s too.)
    with transaction() as session:
        for delivery_id, after in zip(ids, (0, 1, 100, 100), strict=True):
            session.execute(
                text(
                    "UPDATE delivery SET sent_at = CASE WHEN status = 'sent' THEN t END, "
                    "updated_at = t FROM (SELECT timestamptz '2026-01-01 00:00:00+00' "
                    "+ make_interval(secs => :after) AS t) AS x WHERE id = :id"
                ),
                {"after": after, "id": delivery_id},
            )
    sign_in(browser, api.token)
    page = browser.get(f"/console/broadcasts/{b['id']}").text
    labels = re.findall(r"<rect [^>]*><title>([^<]+)</title></rect>", page)
    assert len(labels) == 51
    assert labels[0] == "0-2 s: 2 sends (1.0/s)"
    assert labels[-1] == "100-102 s: 2 sends (1.0/s)"
    assert all(": 0 sends" in label for label in labels[1:-1])
    assert "Sends ended per 2 s, from 00:00:00 UTC over 100 s" in page


def test_a_csv_import_reports_what_it_took_or_everything_it_refused(
    browser: TestClient, api: Api
) -> None:
    channel = api.channel(name="imports")
    account = api.account(channel["id"])["id"]
    csrf = sign_in(browser, api.token)
    good = (
        "account_id,address,name,tags,opted_out\n"
        f"{account},https://hooks.example/a,Ann,vip;new,false\n"
        f"{account},https://hooks.example/b,Bob,,false\n"
    )
    done = browser.post(
        "/console/contacts/import",
        data={"csrf_token": csrf},
        files={"file": ("people.csv", good.encode(), "text/csv")},
    )
    assert done.status_code == 200
    page = done.text
    assert "Imported 2 rows: 2 new contacts, 0 updated." in page
    assert '<td data-label="Tag">vip</td><td data-label="Contacts">1</td>' in page
    bad = (
        "account_id,address,name,tags,opted_out\n"
        f"{account},https://hooks.example/c,Cy,,false\n"
        "999999,https://hooks.example/d,Di,,false\n"
        f"{account},,Ed,,maybe\n"
    )
    refused = browser.post(
        "/console/contacts/import",
        data={"csrf_token": csrf},
        files={"file": ("people.csv", bad.encode(), "text/csv")},
    )
    assert refused.status_code == 422
    assert "Nothing was imported" in refused.text
    problems = re.findall(r"<li><code>([^<]+)</code>: ([^<]+)</li>", refused.text)
    assert len(problems) >= 2, problems
    assert all(field.startswith("rows[") for field, _ in problems), problems
    listed = api.ok("get", "/v1/contacts", params={"account_id": account})["items"]
    assert sorted(c["name"] for c in listed) == ["Ann", "Bob"], "a refused file writes nothing"
    forged = browser.post(
        "/console/contacts/import",
        data={"csrf_token": "no"},
        files={"file": ("people.csv", good.encode(), "text/csv")},
    )
    assert forged.status_code == 403


def test_the_channels_page_lists_channels_never_their_secrets(
    browser: TestClient, api: Api
) -> None:
    secret = "s3cret-webhook-key-0001"
    channel = api.channel(name="quiet one")
    api.account(channel["id"])
    sign_in(browser, api.token)
    page = browser.get("/console/channels").text
    assert "quiet one" in page
    assert "webhook" in page
    assert secret not in page


def test_the_live_count_is_of_this_workspace_s_channels_only(
    browser: TestClient, api: Api, other_api: Api
) -> None:
    theirs = other_api.channel(name="theirs")
    sign_in(browser, api.token)
    assert browser.get(f"/console/audience/count?channel={theirs['id']}").status_code == 404


def test_editing_changes_what_the_api_would_and_only_before_the_first_send(
    browser: TestClient, api: Api
) -> None:
    b = made_broadcast(api)
    csrf = sign_in(browser, api.token)
    detail = browser.get(f"/console/broadcasts/{b['id']}").text
    assert f'href="/console/broadcasts/{b["id"]}/edit"' in detail
    form = browser.get(f"/console/broadcasts/{b['id']}/edit").text
    assert 'value="the detail"' in form
    later = datetime.now(UTC) + timedelta(hours=5)
    saved = browser.post(
        f"/console/broadcasts/{b['id']}/edit",
        data={
            "csrf_token": csrf,
            "name": "renamed",
            "text": "new words",
            "when": "later",
            "at": later.strftime("%Y-%m-%dT%H:%M"),
            "tz": "UTC",
        },
    )
    assert saved.status_code == 303, saved.text
    now = api.ok("get", f"/v1/broadcasts/{b['id']}")
    assert (now["name"], now["content"]["text"]) == ("renamed", "new words")
    assert datetime.fromisoformat(now["send_at"]) == later.replace(second=0, microsecond=0)
    soon = browser.post(
        f"/console/broadcasts/{b['id']}/edit",
        data={
            "csrf_token": csrf,
            "name": "renamed again",
            "text": "x",
            "when": "later",
            "at": (datetime.now(UTC) + timedelta(minutes=3)).strftime("%Y-%m-%dT%H:%M"),
            "tz": "UTC",
        },
    )
    assert soon.status_code == 422
    assert "a scheduled send must be at least 5 minutes ahead" in soon.text
    assert api.ok("get", f"/v1/broadcasts/{b['id']}")["name"] == "renamed"
    # Once sending started it cannot be edited: no link, and the form says why.
    started = made_broadcast(api, contacts=2)
    start_with_deliveries(started["id"], ["sent", "queued"])
    assert "/edit" not in browser.get(f"/console/broadcasts/{started['id']}").text
    refused = browser.post(
        f"/console/broadcasts/{started['id']}/edit",
        data={"csrf_token": csrf, "name": "late", "text": "x", "when": "now"},
    )
    assert refused.status_code == 422
    assert "is in_progress; modify is allowed only while paused or pending" in refused.text


def png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, "PNG")
    return buf.getvalue()


def test_images_go_out_in_the_order_chosen_and_a_refused_form_keeps_none(
    browser: TestClient, api: Api, media_dir: Path
) -> None:
    world = picker_world(api)
    csrf = sign_in(browser, api.token)
    page = browser.get(f"/console/broadcasts/new?channel={world['channel']['id']}").text
    assert "Up to 10 images" in page
    base = {
        "csrf_token": csrf,
        "channel": str(world["channel"]["id"]),
        "selection": "all",
        "name": "pictures",
        "text": "look",
    }
    files = [
        ("images", ("second.png", png("blue"), "image/png")),
        ("images", ("first.png", png("red"), "image/png")),
    ]
    made = browser.post("/console/broadcasts/new", data=base, files=files)
    assert made.status_code == 303, made.text
    b = api.ok("get", "/v1/broadcasts/" + made.headers["location"].rsplit("/", 1)[1])
    names = [api.ok("get", f"/v1/media/{m}")["filename"] for m in b["content"]["media_ids"]]
    assert names == ["second.png", "first.png"]
    stored_before = sorted(p.name for p in media_dir.rglob("*") if p.is_file())
    refused = browser.post(
        "/console/broadcasts/new",
        data={**base, "name": ""},
        files=[
            ("images", ("ok.png", png("green"), "image/png")),
            ("images", ("not-an-image.png", b"plain text", "image/png")),
        ],
    )
    assert refused.status_code == 422
    assert sorted(p.name for p in media_dir.rglob("*") if p.is_file()) == stored_before
    refused_late = browser.post(
        "/console/broadcasts/new",
        data={**base, "name": ""},
        files=[("images", ("ok.png", png("green"), "image/png"))],
    )
    assert refused_late.status_code == 422, "the name is missing"
    assert "name:" in refused_late.text
    assert sorted(p.name for p in media_dir.rglob("*") if p.is_file()) == stored_before


def test_the_list_pages_newest_first_keeping_its_filter(browser: TestClient, api: Api) -> None:
    channel = api.channel(name="many")
    api.contact(api.account(channel["id"])["id"], "https://hooks.example/m")
    later = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    made = [api.broadcast(channel["id"], name=f"b{i:02d}", send_at=later)["id"] for i in range(53)]
    sign_in(browser, api.token)
    first = browser.get("/console/broadcasts?status=pending").text
    shown = re.findall(r'<tr data-broadcast="(\d+)"', first)
    assert [int(x) for x in shown] == sorted(made, reverse=True)[:50]
    older = re.search(r'<a href="([^"]+)" rel="next">', first)
    assert older
    url = older.group(1).replace("&amp;", "&")
    assert "status=pending" in url
    second = browser.get(url).text
    rest = [int(x) for x in re.findall(r'<tr data-broadcast="(\d+)"', second)]
    assert rest == sorted(made, reverse=True)[50:]
    assert 'rel="next"' not in second


def test_local_times_that_do_not_exist_or_happen_twice_are_refused() -> None:
    from services.api.console.routes import local_send_time
    from shared.domain.errors import ValidationFailed

    # New York: 2026-03-08 02:30 does not exist; 2026-11-01 01:30 happens twice.
    with pytest.raises(ValidationFailed, match="does not exist in America/New_York"):
        local_send_time("2026-03-08T02:30", "America/New_York")
    with pytest.raises(ValidationFailed, match="happens twice in America/New_York"):
        local_send_time("2026-11-01T01:30", "America/New_York")
    plain = local_send_time("2026-07-01T09:00", "America/New_York")
    assert plain.astimezone(UTC) == datetime(2026, 7, 1, 13, 0, tzinfo=UTC)


def test_the_session_cookie_is_secure_over_https(app: FastAPI, api: Api) -> None:
    with TestClient(app, base_url="https://testserver", follow_redirects=False) as c:
        form = c.get("/console/login")
        answer = c.post(
            "/console/login", data={"token": api.token, "csrf_token": form_token(form.text)}
        )
        cookie = next(
            x for x in answer.headers.get_list("set-cookie") if x.startswith("bcast_console=")
        )
        assert "Secure" in cookie


def test_ids_that_are_not_plain_digits_are_ignored_not_a_crash(
    browser: TestClient, api: Api
) -> None:
    csrf = sign_in(browser, api.token)
    for value in ("²", "9" * 20, "-1", "0x10"):
        assert browser.get("/console/broadcasts", params={"channel": value}).status_code == 200
        assert browser.get("/console/broadcasts/new", params={"channel": value}).status_code == 200
    # Past its length a value is refused, plainly.
    assert browser.get("/console/broadcasts", params={"channel": "1" * 5000}).status_code == 422
    listed = browser.post(
        "/console/broadcasts/new",
        data={"csrf_token": csrf, "shown": "²," + "1" * 5000, "contact": ["²"], "name": "n"},
    )
    assert listed.status_code == 422, "refused with a reason (no channel), not a crash on its ids"


def test_a_form_sent_twice_makes_one_broadcast(browser: TestClient, api: Api) -> None:
    world = picker_world(api)
    sign_in(browser, api.token)
    page = browser.get(f"/console/broadcasts/new?channel={world['channel']['id']}").text
    key = re.search(r'name="form_key" value="([^"]+)"', page)
    assert key
    data = {
        "csrf_token": form_token(page),
        "form_key": key.group(1),
        "channel": str(world["channel"]["id"]),
        "selection": "all",
        "name": "once",
        "text": "only once",
        "when": "later",
        "at": (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M"),
        "tz": "UTC",
    }
    first = browser.post("/console/broadcasts/new", data=data)
    second = browser.post("/console/broadcasts/new", data=data)
    assert first.headers["location"] == second.headers["location"]
    names = [b["name"] for b in api.ok("get", "/v1/broadcasts")["items"]]
    assert names.count("once") == 1


def test_renaming_keeps_a_send_time_it_did_not_change(browser: TestClient, api: Api) -> None:
    b = made_broadcast(api)
    csrf = sign_in(browser, api.token)
    form = browser.get(f"/console/broadcasts/{b['id']}/edit").text
    shown = re.search(r'name="shown_at" value="([^"]+)"', form)
    assert shown
    # Due in 3 days: move the stored time to 2 minutes from now, as if it were nearly due.
    with transaction() as session:
        session.execute(
            text("UPDATE broadcast SET send_at = now() + interval '2 minutes' WHERE id = :id"),
            {"id": b["id"]},
        )
    form = browser.get(f"/console/broadcasts/{b['id']}/edit").text
    shown = re.search(r'name="shown_at" value="([^"]+)"', form)
    assert shown
    renamed = browser.post(
        f"/console/broadcasts/{b['id']}/edit",
        data={
            "csrf_token": csrf,
            "name": "just renamed",
            "text": "hello",
            "when": "later",
            "at": shown.group(1),
            "shown_at": shown.group(1),
            "tz": "UTC",
        },
    )
    assert renamed.status_code == 303, renamed.text
    after = api.ok("get", f"/v1/broadcasts/{b['id']}")
    assert after["name"] == "just renamed"


def test_no_action_reaches_another_workspace_s_broadcast(
    browser: TestClient, api: Api, other_api: Api
) -> None:
    theirs = made_broadcast(other_api)
    csrf = sign_in(browser, api.token)
    for action in ("pause", "resume", "cancel", "edit"):
        answer = browser.post(
            f"/console/broadcasts/{theirs['id']}/{action}",
            data={"csrf_token": csrf, "name": "x", "text": "x", "when": "now"},
        )
        assert answer.status_code == 404, action
    assert browser.get(f"/console/broadcasts/{theirs['id']}/edit").status_code == 404
    assert browser.get(f"/console/broadcasts/progress?id={theirs['id']}").json() == {"items": []}
    assert other_api.ok("get", f"/v1/broadcasts/{theirs['id']}")["status"] == "pending"


def test_a_sign_in_after_a_form_was_posted_lands_on_a_page(browser: TestClient, api: Api) -> None:
    answer = browser.post("/console/broadcasts/1/pause", data={"csrf_token": "x"})
    assert answer.status_code == 303
    assert answer.headers["location"] == "/console/login?next=%2Fconsole%2Fbroadcasts"


def many_people(browser: TestClient, csrf: str, api: Api, n: int) -> dict[str, Any]:
    """A channel whose one account holds ``n`` contacts (P000, P001, ...), imported at once."""
    channel = api.channel(name="crowd")
    account = api.account(channel["id"])["id"]
    rows = "".join(f"{account},https://hooks.example/p{i:03},P{i:03},,false\n" for i in range(n))
    done = browser.post(
        "/console/contacts/import",
        data={"csrf_token": csrf},
        files={
            "file": (
                "people.csv",
                b"account_id,address,name,tags,opted_out\n" + rows.encode(),
                "text/csv",
            )
        },
    )
    assert done.status_code == 200, done.text[:500]
    listed = api.ok("get", "/v1/contacts", params={"account_id": account, "limit": 500})["items"]
    ids = sorted(c["id"] for c in listed)
    assert len(ids) == n
    return {"channel": channel["id"], "ids": ids}


def picker_post(browser: TestClient, data: dict[str, Any]) -> str:
    answer = browser.post("/console/broadcasts/new", data=data)
    assert answer.status_code == 200, answer.text[:500]
    return answer.text


def hidden(html: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert found, name
    return found.group(1)


def listed_people(html: str) -> list[int]:
    return [int(x) for x in re.findall(r'name="contact" value="(\d+)"', html)]


def ticked_people(html: str) -> list[int]:
    return [int(x) for x in re.findall(r'name="contact" value="(\d+)" checked', html)]


def test_the_picker_pages_and_searches_everyone_and_keeps_ticks_across_pages(
    browser: TestClient, api: Api
) -> None:
    csrf = sign_in(browser, api.token)
    world = many_people(browser, csrf, api, 230)
    ids = world["ids"]
    first = browser.get(f"/console/broadcasts/new?channel={world['channel']}").text
    assert listed_people(first) == ids[:100]
    assert "page 1 of 3" in first
    base = {
        "csrf_token": csrf,
        "channel": str(world["channel"]),
        "name": "everyone but three",
        "text": "hello",
        "selection": "all",
        "when": "later",
        "at": (datetime.now(UTC) + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M"),
        "tz": "UTC",
        "form_key": hidden(first, "form_key"),
    }
    before = len(api.ok("get", "/v1/broadcasts")["items"])
    # Page 1: untick the first one; on to page 3.
    third = picker_post(
        browser,
        {**base, "shown": hidden(first, "shown"), "contact": ids[1:100], "go": "page-3"},
    )
    assert listed_people(third) == ids[200:]
    assert "page 3 of 3" in third
    assert hidden(third, "left_out") == str(ids[0])
    # Page 3: untick the last one; search for P150 (page 2's), untick it there.
    found = picker_post(
        browser,
        {
            **base,
            "shown": hidden(third, "shown"),
            "left_out": hidden(third, "left_out"),
            "contact": ids[200:229],
            "q": "p150",
            "go": "search",
        },
    )
    assert listed_people(found) == [ids[150]]
    assert ticked_people(found) == [ids[150]]
    # Back to page 1 of everyone, P150 unticked on the way: the first stays unticked.
    back = picker_post(
        browser,
        {
            **base,
            "shown": hidden(found, "shown"),
            "left_out": hidden(found, "left_out"),
            "q": "",
            "go": "page-1",
        },
    )
    assert ids[0] not in ticked_people(back)
    assert ticked_people(back) == ids[1:100]
    assert len(api.ok("get", "/v1/broadcasts")["items"]) == before, "paging creates nothing"
    made = browser.post(
        "/console/broadcasts/new",
        data={
            **base,
            "shown": hidden(back, "shown"),
            "left_out": hidden(back, "left_out"),
            "contact": ids[1:100],
            "go": "create",
        },
    )
    assert made.status_code == 303, made.text[:1000]
    broadcast = api.ok("get", "/v1/broadcasts/" + made.headers["location"].rsplit("/", 1)[1])
    assert broadcast["audience"]["exclude_contact_ids"] == [ids[0], ids[150], ids[229]]
    assert broadcast["audience_size"] == 227


def test_people_picked_by_hand_on_several_pages_all_get_it(browser: TestClient, api: Api) -> None:
    csrf = sign_in(browser, api.token)
    world = many_people(browser, csrf, api, 150)
    ids = world["ids"]
    first = browser.get(f"/console/broadcasts/new?channel={world['channel']}").text
    base = {
        "csrf_token": csrf,
        "channel": str(world["channel"]),
        "name": "picked",
        "text": "hello",
        "selection": "manual",
        "form_key": hidden(first, "form_key"),
    }
    second = picker_post(
        browser, {**base, "shown": hidden(first, "shown"), "contact": [ids[5]], "go": "page-2"}
    )
    assert ticked_people(second) == [], "by hand, nobody on a new page is ticked yet"
    made = browser.post(
        "/console/broadcasts/new",
        data={
            **base,
            "shown": hidden(second, "shown"),
            "picked": hidden(second, "picked"),
            "contact": [ids[120], ids[149]],
        },
    )
    assert made.status_code == 303, made.text[:1000]
    broadcast = api.ok("get", "/v1/broadcasts/" + made.headers["location"].rsplit("/", 1)[1])
    assert broadcast["audience"]["contact_ids"] == [ids[5], ids[120], ids[149]]


def test_contacts_can_be_searched_and_paged(browser: TestClient, api: Api) -> None:
    csrf = sign_in(browser, api.token)
    many_people(browser, csrf, api, 120)
    first = browser.get("/console/contacts").text
    names = re.findall(r'<td data-label="Name">(P\d+)</td>', first)
    assert names[:2] == ["P119", "P118"]
    assert len(names) == 50
    older = re.search(r'<a href="([^"]+)" rel="next">Older contacts</a>', first)
    assert older
    second = browser.get(older.group(1).replace("&amp;", "&")).text
    assert re.findall(r'<td data-label="Name">(P\d+)</td>', second)[0] == "P069"
    found = browser.get("/console/contacts", params={"q": "p07"}).text
    assert re.findall(r'<td data-label="Name">(P\d+)</td>', found) == [
        f"P07{i}" for i in range(9, -1, -1)
    ]
    assert (
        "No contact matches “nobody-like-this”"
        in browser.get("/console/contacts", params={"q": "nobody-like-this"}).text
    )
    percent = browser.get("/console/contacts", params={"q": "%"}).text
    assert "No contact matches" in percent, "a % is searched for, not a wildcard"


def test_tags_are_created_and_renamed_with_the_api_s_rules(
    browser: TestClient, api: Api, other_api: Api
) -> None:
    csrf = sign_in(browser, api.token)
    made = browser.post("/console/tags", data={"csrf_token": csrf, "name": "  VIP "})
    assert made.status_code == 303
    assert made.headers["location"] == "/console/contacts?report=tag-created"
    assert "The tag was created." in browser.get(made.headers["location"]).text
    vip = api.tag_id("VIP")
    again = browser.post("/console/tags", data={"csrf_token": csrf, "name": "vip"})
    assert again.status_code == 422
    assert "already exists" in again.text
    empty = browser.post("/console/tags", data={"csrf_token": csrf, "name": " "})
    assert empty.status_code == 422
    assert 'id="tag-error"' in empty.text
    api.ok("post", "/v1/tags", json={"name": "new"}, expect=201)
    renamed = browser.post(f"/console/tags/{vip}/rename", data={"csrf_token": csrf, "name": "Gold"})
    assert renamed.status_code == 303
    assert api.ok("get", f"/v1/tags/{vip}")["name"] == "Gold"
    clash = browser.post(f"/console/tags/{vip}/rename", data={"csrf_token": csrf, "name": "NEW"})
    assert clash.status_code == 422
    assert "already exists" in clash.text
    assert api.ok("get", f"/v1/tags/{vip}")["name"] == "Gold"
    forged = browser.post(f"/console/tags/{vip}/rename", data={"csrf_token": "x", "name": "Y"})
    assert forged.status_code == 403
    theirs = other_api.ok("post", "/v1/tags", json={"name": "theirs"}, expect=201)["id"]
    foreign = browser.post(
        f"/console/tags/{theirs}/rename", data={"csrf_token": csrf, "name": "mine now"}
    )
    assert foreign.status_code == 404
    assert other_api.ok("get", f"/v1/tags/{theirs}")["name"] == "theirs"
    assert (
        browser.get("/console/contacts?report=Your+account+is+locked").text.count(
            "Your account is locked"
        )
        == 0
    ), "a notice comes from what was done, never from the link"


def test_the_edit_form_changes_channel_audience_and_images_through_the_api_s_rules(
    browser: TestClient, api: Api, media_dir: Path
) -> None:
    world = picker_world(api)
    ids = [p["id"] for p in world["people"]]
    other = api.channel(name="other shop")
    other_account = api.account(other["id"])
    theirs = [
        api.contact(other_account["id"], f"https://hooks.example/o{i}", name=f"O{i}")["id"]
        for i in range(2)
    ]
    csrf = sign_in(browser, api.token)
    later = (datetime.now(UTC) + timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M")
    made = browser.post(
        "/console/broadcasts/new",
        data={
            "csrf_token": csrf,
            "channel": str(world["channel"]["id"]),
            "selection": "manual",
            "shown": ",".join(map(str, ids)),
            "contact": [ids[0], ids[2]],
            "name": "to edit",
            "text": "look",
            "when": "later",
            "at": later,
            "tz": "UTC",
        },
        files=[
            ("images", ("one.png", png("red"), "image/png")),
            ("images", ("two.png", png("blue"), "image/png")),
        ],
    )
    assert made.status_code == 303, made.text[:1000]
    b = api.ok("get", "/v1/broadcasts/" + made.headers["location"].rsplit("/", 1)[1])
    one, two = b["content"]["media_ids"]
    # The form as it stands: channel, the hand-picked people ticked, both images carried.
    form = browser.get(f"/console/broadcasts/{b['id']}/edit").text
    assert re.search(rf'<option value="{world["channel"]["id"]}" selected>', form)
    assert ticked_people(form) == [ids[0], ids[2]]
    assert re.findall(r'name="keep_media" value="(\d+)" checked', form) == [str(one), str(two)]
    assert hidden(form, "media_listed") == "1"
    # Another channel chosen in the picker: its people, everyone ticked.
    moved = browser.get(f"/console/broadcasts/{b['id']}/edit?channel={other['id']}").text
    assert listed_people(moved) == theirs
    assert 'value="to edit"' in moved, "what the broadcast says stays"
    stored_before = sorted(p.name for p in media_dir.rglob("*") if p.is_file())
    base = {
        "csrf_token": csrf,
        "channel": str(other["id"]),
        "name": "edited",
        "text": "look again",
        "when": "later",
        "at": later,
        "shown_at": later,
        "tz": "UTC",
        "media_listed": "1",
        "keep_media": [str(two)],
        "shown": ",".join(map(str, theirs)),
    }
    # Hand-picked people of the old channel are refused on the new one, with the API's
    # words; nothing changes and the added image is not kept.
    refused = browser.post(
        f"/console/broadcasts/{b['id']}/edit",
        data={**base, "selection": "manual", "picked": str(ids[0]), "contact": []},
        files=[("images", ("three.png", png("green"), "image/png"))],
    )
    assert refused.status_code == 422
    assert "audience.contact_ids" in refused.text
    assert sorted(p.name for p in media_dir.rglob("*") if p.is_file()) == stored_before
    assert api.ok("get", f"/v1/broadcasts/{b['id']}")["name"] == "to edit"
    saved = browser.post(
        f"/console/broadcasts/{b['id']}/edit",
        data={**base, "selection": "all", "contact": theirs},
        files=[("images", ("three.png", png("green"), "image/png"))],
    )
    assert saved.status_code == 303, saved.text[:1000]
    now = api.ok("get", f"/v1/broadcasts/{b['id']}")
    assert now["channel_id"] == other["id"]
    assert now["audience_size"] == 2
    assert now["audience"]["selection"] == "all"
    names = [api.ok("get", f"/v1/media/{m}")["filename"] for m in now["content"]["media_ids"]]
    assert names == ["two.png", "three.png"], "kept images first, in their order, then added"
    assert datetime.fromisoformat(now["send_at"]).strftime("%Y-%m-%dT%H:%M") == later


def test_a_timed_send_s_edit_page_keeps_its_recipient_and_channel(
    browser: TestClient, api: Api
) -> None:
    conversation = conversation_of(api)
    csrf = sign_in(browser, api.token)
    at = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    sent = browser.post(
        f"/console/conversations/{conversation}/timed-send",
        data={"csrf_token": csrf, "text": "see you", "when": "later", "at": at, "tz": "UTC"},
    )
    assert sent.status_code == 303, sent.text[:500]
    timed = api.ok("get", f"/v1/conversations/{conversation}/timed-sends")["items"][0]
    form = browser.get(f"/console/broadcasts/{timed['id']}/edit").text
    assert 'id="picker"' not in form
    saved = browser.post(
        f"/console/broadcasts/{timed['id']}/edit",
        data={
            "csrf_token": csrf,
            "name": timed["name"],
            "text": "see you soon",
            "when": "later",
            "at": at,
            "shown_at": at,
            "tz": "UTC",
            "channel": "999",
        },
    )
    assert saved.status_code == 303, saved.text[:500]
    now = api.ok("get", f"/v1/broadcasts/{timed['id']}")
    assert now["content"]["text"] == "see you soon"
    assert now["channel_id"] == timed["channel_id"]


def test_switching_between_everyone_and_by_hand_counts_only_the_page_in_view(
    browser: TestClient, api: Api
) -> None:
    csrf = sign_in(browser, api.token)
    world = many_people(browser, csrf, api, 250)
    ids = world["ids"]
    first = browser.get(f"/console/broadcasts/new?channel={world['channel']}").text
    base = {"csrf_token": csrf, "channel": str(world["channel"]), "name": "n", "text": "t"}
    # By hand: one ticked on page 1, then page 2 is drawn.
    second = picker_post(
        browser,
        {
            **base,
            "selection": "manual",
            "mode_was": "manual",
            "shown": hidden(first, "shown"),
            "contact": [ids[3]],
            "go": "page-3",
        },
    )
    assert hidden(second, "picked") == str(ids[3])
    # Switched to everyone matching on page 3, all of it ticked: nobody is left out.
    made = browser.post(
        "/console/broadcasts/new",
        data={
            **base,
            "selection": "all",
            "mode_was": hidden(second, "mode_was"),
            "shown": hidden(second, "shown"),
            "picked": hidden(second, "picked"),
            "left_out": hidden(second, "left_out"),
            "contact": ids[200:],
        },
    )
    assert made.status_code == 303, made.text[:800]
    b = api.ok("get", "/v1/broadcasts/" + made.headers["location"].rsplit("/", 1)[1])
    assert b["audience"]["exclude_contact_ids"] == []
    assert b["audience_size"] == 250


def test_an_edit_that_keeps_the_audience_is_not_refused_for_who_opted_out_since(
    browser: TestClient, api: Api
) -> None:
    world = picker_world(api)
    ids = [p["id"] for p in world["people"]]
    later = (datetime.now(UTC) + timedelta(hours=3)).isoformat()
    b = api.broadcast(
        world["channel"]["id"],
        name="picked",
        send_at=later,
        audience={"selection": "manual", "contact_ids": [ids[0], ids[1]]},
    )
    api.ok("patch", f"/v1/contacts/{ids[1]}", json={"opted_out": True})
    csrf = sign_in(browser, api.token)
    form = browser.get(f"/console/broadcasts/{b['id']}/edit").text
    data = {
        "csrf_token": csrf,
        "channel": hidden(form, "channel"),
        "selection": "manual",
        "mode_was": "manual",
        "picked": hidden(form, "picked"),
        "shown": hidden(form, "shown"),
        "contact": ticked_people(form),
        "media_listed": "1",
        "name": "renamed",
        "text": "hello",
        "when": "later",
        "at": hidden(form, "shown_at"),
        "shown_at": hidden(form, "shown_at"),
        "tz": "UTC",
    }
    saved = browser.post(f"/console/broadcasts/{b['id']}/edit", data=data)
    assert saved.status_code == 303, saved.text[:800]
    assert api.ok("get", f"/v1/broadcasts/{b['id']}")["name"] == "renamed"
    # A channel in the address that is not the workspace's is ignored, not swapped in.
    odd = browser.get(f"/console/broadcasts/{b['id']}/edit?channel=abc").text
    assert re.search(rf'<option value="{world["channel"]["id"]}" selected>', odd)
