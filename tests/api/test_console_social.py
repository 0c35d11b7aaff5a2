"""The console's broadcast form on channels with a 24-hour conversation window: a WhatsApp
template (name, language, header, body parameters, buttons) and a Messenger or Instagram
message tag, stored as the API stores them, refused with the API's words, kept on an edit and
shown on the broadcast's page; and the newer channel kinds named readably.
"""

from __future__ import annotations

import html
import io
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from tests.api.test_console import sign_in
from tests.conftest import Api


@pytest.fixture
def browser(app: FastAPI) -> Iterator[TestClient]:
    """A client of its own: its cookies are one browser's."""
    with TestClient(app, base_url="http://testserver", follow_redirects=False) as c:
        yield c


CONFIGS: dict[str, dict[str, Any]] = {
    "whatsapp": {"access_token": "EAAG-secret-token", "phone_number_id": "1065"},
    "messenger": {"page_access_token": "EAAB-page-secret"},
    "instagram": {"page_access_token": "EAAB-page-secret", "ig_user_id": "17841400000"},
    "line": {"channel_access_token": "line-secret-token"},
}


def channel(api: Api, kind: str, name: str) -> dict[str, Any]:
    body = {"name": name, "kind": kind, "config": CONFIGS[kind]}
    made: dict[str, Any] = api.ok("post", "/v1/channels", 201, json=body)
    return made


def people(api: Api, channel_id: int, wrote: list[timedelta | None]) -> list[int]:
    """Contacts of one account of the channel, each having last written in that long ago
    (None: never); returns their ids.
    """
    kind = api.ok("get", f"/v1/channels/{channel_id}")["kind"]
    account = api.account(channel_id)["id"]
    ids = []
    for i, ago in enumerate(wrote):
        address = f"+49151100000{i:02d}" if kind == "whatsapp" else f"10000{i:03d}"
        c = api.contact(account, address, name=f"Person {i}")
        if ago is not None:
            at = (datetime.now(UTC) - ago).isoformat()
            api.ok("post", f"/v1/contacts/{c['id']}/inbound", json={"at": at})
        ids.append(c["id"])
    return ids


def png_media(api: Api, filename: str) -> int:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), "green").save(buf, "PNG")
    made = api.ok("post", "/v1/media", 201, files={"file": (filename, buf.getvalue(), "image/png")})
    return int(made["id"])


class _PostForm(HTMLParser):
    """The fields a browser would send from the page's broadcast form (no script run)."""

    def __init__(self, action: str) -> None:
        super().__init__()
        self.action = action
        self.inside = False
        self.fields: list[tuple[str, str]] = []
        self._textarea: str | None = None
        self._select: str | None = None
        self._options: list[str] = []
        self._chosen: list[str] = []
        self._multiple = False
        self._text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.inside = a.get("method") == "post" and a.get("action") == self.action
        if not self.inside or ("name" not in a and tag != "option"):
            return
        if tag == "input" and a.get("type") not in ("file", "submit"):
            if a.get("type") in ("checkbox", "radio") and "checked" not in a:
                return
            self.fields.append((a["name"], a.get("value", "")))
        elif tag == "textarea":
            self._textarea, self._text = a["name"], ""
        elif tag == "select":
            self._select, self._options, self._chosen = a["name"], [], []
            self._multiple = "multiple" in a
        elif tag == "option" and self._select:
            self._options.append(a.get("value", ""))
            if "selected" in a:
                self._chosen.append(a.get("value", ""))

    def handle_data(self, data: str) -> None:
        if self._textarea is not None:
            self._text += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self.inside = False
        elif tag == "textarea" and self._textarea is not None:
            self.fields.append((self._textarea, self._text))
            self._textarea = None
        elif tag == "select" and self._select is not None:
            # A single choice with none selected sends its first option.
            if not self._chosen and not self._multiple and self._options:
                self._chosen = self._options[:1]
            self.fields += [(self._select, value) for value in self._chosen]
            self._select = None


def form_fields(page: str, action: str) -> dict[str, Any]:
    """The broadcast form's fields as the page fills them in (a list where a name repeats)."""
    parser = _PostForm(action)
    parser.feed(page)
    found: dict[str, Any] = {}
    for name, value in parser.fields:
        if name in found:
            found[name] = (
                [*found[name], value]
                if isinstance(found[name], list)
                else [
                    found[name],
                    value,
                ]
            )
        else:
            found[name] = value
    return found


def new_form(browser: TestClient, channel_id: int) -> dict[str, Any]:
    """The new-broadcast form for a channel, as a browser would send it, sent now."""
    page = browser.get(f"/console/broadcasts/new?channel={channel_id}")
    assert page.status_code == 200
    fields = form_fields(page.text, "/console/broadcasts/new")
    return {**fields, "tz": "UTC", "when": "now", "go": "save"}


def made_id(answer: Any) -> int:
    assert answer.status_code == 303, answer.text[:3000]
    return int(answer.headers["location"].rsplit("/", 1)[1])


TEMPLATE_FIELDS = {
    "tpl_name": "spring_sale",
    "tpl_language": "en_US",
    "tpl_body": "{{name}}\n  20% off  \n\n",
    "tpl_quick_replies": "STOP\nMORE\n",
    "tpl_url_suffix": "spring?from=wa",
    "tpl_url_index": "",
}


def test_a_whatsapp_template_from_the_form_is_stored_as_the_api_stores_it(
    browser: TestClient, api: Api
) -> None:
    wa = channel(api, "whatsapp", "wa shop")
    inside, outside = people(api, wa["id"], [timedelta(hours=1), None])
    header = png_media(api, "header.png")
    sign_in(browser, api.token)
    form = new_form(browser, wa["id"])
    page = browser.get(f"/console/broadcasts/new?channel={wa['id']}").text
    assert "WhatsApp template (optional)" in page
    assert (
        f'<option value="{header}" >header.png (media {header}, 8\N{MULTIPLICATION SIGN}6)</option>'
        in page
    )
    assert 'name="message_tag"' not in page, "no message tag on WhatsApp"
    assert form["tpl_listed"] == "1"
    made = browser.post(
        "/console/broadcasts/new",
        data={
            **form,
            "name": "spring",
            "text": "Hi again {{name}}",
            **TEMPLATE_FIELDS,
            "tpl_header_media": str(header),
        },
    )
    b = api.ok("get", f"/v1/broadcasts/{made_id(made)}")
    expected = {
        "name": "spring_sale",
        "language": "en_US",
        "components": [
            {"type": "header", "parameters": [{"type": "image", "media_id": header}]},
            {
                "type": "body",
                "parameters": [
                    {"type": "text", "text": "{{name}}"},
                    {"type": "text", "text": "20% off"},
                ],
            },
            {
                "type": "button",
                "sub_type": "quick_reply",
                "index": 0,
                "parameters": [{"type": "payload", "payload": "STOP"}],
            },
            {
                "type": "button",
                "sub_type": "quick_reply",
                "index": 1,
                "parameters": [{"type": "payload", "payload": "MORE"}],
            },
            {
                "type": "button",
                "sub_type": "url",
                "index": 2,
                "parameters": [{"type": "text", "text": "spring?from=wa"}],
            },
        ],
    }
    assert b["content"]["template"] == expected
    assert b["content"]["text"] == "Hi again {{name}}"
    assert b["audience"]["exclude_contact_ids"] == []
    assert b["audience_size"] == 2, (inside, outside)
    # The API given the same template stores the same content.
    by_api = api.broadcast(wa["id"], content={"text": "Hi again {{name}}", "template": expected})
    assert api.ok("get", f"/v1/broadcasts/{by_api['id']}")["content"] == b["content"]
    # Its page shows the template, parameter by parameter.
    detail = browser.get(f"/console/broadcasts/{b['id']}").text
    assert "wa shop (WhatsApp)" in detail
    assert "<h2>WhatsApp template</h2>" in detail
    assert "<dd>spring_sale</dd>" in detail
    assert "<dd>en_US</dd>" in detail
    assert f"image header.png (media {header})" in detail
    assert "<li>{{name}}</li><li>20% off</li>" in detail
    assert "quick reply at place 1: payload MORE" in detail
    assert "URL at place 2: suffix spring?from=wa" in detail


def test_a_url_button_given_a_place_goes_there_and_the_quick_replies_around_it(
    browser: TestClient, api: Api
) -> None:
    wa = channel(api, "whatsapp", "wa")
    people(api, wa["id"], [None])
    sign_in(browser, api.token)
    made = browser.post(
        "/console/broadcasts/new",
        data={
            **new_form(browser, wa["id"]),
            "name": "only a template",
            "text": "",
            **TEMPLATE_FIELDS,
            "tpl_url_index": "0",
            "tpl_header_text": "Hello {{name | there}}",
        },
    )
    content = api.ok("get", f"/v1/broadcasts/{made_id(made)}")["content"]
    assert content["text"] is None
    buttons = [(c["sub_type"], c["index"]) for c in content["template"]["components"][2:]]
    assert buttons == [("url", 0), ("quick_reply", 1), ("quick_reply", 2)]
    assert content["template"]["components"][0] == {
        "type": "header",
        "parameters": [{"type": "text", "text": "Hello {{name | there}}"}],
    }


def test_a_refusal_shows_the_api_s_words_on_the_form_and_keeps_what_was_typed(
    browser: TestClient, api: Api
) -> None:
    wa = channel(api, "whatsapp", "wa")
    people(api, wa["id"], [timedelta(hours=1), None, timedelta(hours=30)])
    header = png_media(api, "h.png")
    sign_in(browser, api.token)
    form = new_form(browser, wa["id"])
    before = len(api.ok("get", "/v1/broadcasts")["items"])
    # Free-form text to people outside the window, no template: the API's refusal.
    by_api = api.post(
        "/v1/broadcasts",
        json={"name": "x", "channel_id": wa["id"], "audience": {}, "content": {"text": "hi"}},
    )
    assert by_api.status_code == 422
    [error] = by_api.json()["errors"]
    assert error["type"] == "outside_window"
    refused = browser.post("/console/broadcasts/new", data={**form, "name": "x", "text": "hi"})
    assert refused.status_code == 422
    assert html.escape(f"{error['field']}: {error['msg']}") in refused.text
    assert "2 of 3 recipients will not have written in within 24 hours" in refused.text
    cases = [
        (
            {"tpl_name": "Spring Sale"},
            "content.template.name: must be the template&#39;s name as approved",
        ),
        (
            {"tpl_language": "english"},
            "content.template.language: must be a WhatsApp language code",
        ),
        (
            {"tpl_body": "one\ttab"},
            "content.template.components[0].parameters[0].text: must not hold a line break",
        ),
        (
            {"tpl_header_text": "x" * 61},
            "content.template.components[0].parameters[0].text: a header&#39;s text is at most 60",
        ),
        (
            {"tpl_header_text": "hi", "tpl_header_media": str(header)},
            "content.template.header: give a header text or a header image, not both",
        ),
        ({"tpl_url_index": "x"}, "].index: Input should be a valid integer"),
        # A digit Python reads as one but int() does not: a 422 in the API's words, not a 500.
        ({"tpl_url_index": "²"}, "].index: Input should be a valid integer"),
        ({"tpl_url_index": "12"}, "Input should be less than 10"),
        ({"tpl_body": "{{nmae}}"}, "content.template.components[0].parameters[0].text"),
    ]
    for fields, words in cases:
        typed = {**TEMPLATE_FIELDS, **fields}
        answer = browser.post(
            "/console/broadcasts/new", data={**form, "name": "x", "text": "hi", **typed}
        )
        assert answer.status_code == 422, fields
        shown = re.search(r"<p class=\"error\"[^>]*>(.*?)</p>", answer.text, re.S)
        assert shown, answer.text[:3000]
        assert words in shown.group(1), (fields, shown.group(1))
        # What was typed is on the form again.
        again = form_fields(answer.text, "/console/broadcasts/new")
        assert again["tpl_name"] == typed["tpl_name"].strip()
        assert again["tpl_language"] == typed["tpl_language"]
    assert len(api.ok("get", "/v1/broadcasts")["items"]) == before
    # A search in the people picker draws the form again with the template as typed.
    searched = browser.post(
        "/console/broadcasts/new", data={**form, **TEMPLATE_FIELDS, "go": "search", "q": "Person"}
    )
    assert searched.status_code == 200
    assert form_fields(searched.text, "/console/broadcasts/new")["tpl_quick_replies"] == (
        "STOP\nMORE"
    )


def test_editing_keeps_the_template_and_changes_only_what_was_changed(
    browser: TestClient, api: Api
) -> None:
    wa = channel(api, "whatsapp", "wa")
    people(api, wa["id"], [None, timedelta(hours=2)])
    header = png_media(api, "banner.png")
    later = (datetime.now(UTC) + timedelta(days=2)).isoformat()
    # Made through the API, with a button at a place the form would not give it (a static
    # button at 0 takes no parameter).
    template = {
        "name": "restock",
        "language": "de",
        "components": [
            {"type": "header", "parameters": [{"type": "image", "media_id": header}]},
            {"type": "body", "parameters": [{"type": "text", "text": "{{name}}"}]},
            {
                "type": "button",
                "sub_type": "quick_reply",
                "index": 1,
                "parameters": [{"type": "payload", "payload": "STOP"}],
            },
        ],
    }
    b = api.broadcast(
        wa["id"], name="restock", send_at=later, content={"text": "back", "template": template}
    )
    stored = api.ok("get", f"/v1/broadcasts/{b['id']}")["content"]["template"]
    sign_in(browser, api.token)
    action = f"/console/broadcasts/{b['id']}/edit"
    page = browser.get(action).text
    form = form_fields(page, action)
    assert (form["tpl_name"], form["tpl_language"]) == ("restock", "de")
    assert form["tpl_header_media"] == str(header)
    assert (form["tpl_body"], form["tpl_quick_replies"]) == ("{{name}}", "STOP")
    assert "they stay as they are unless you change the button fields" in page
    # Saved as shown, renamed: the template is as it was, its odd button place too.
    renamed = browser.post(action, data={**form, "name": "restock again", "go": "save"})
    assert renamed.status_code == 303, renamed.text[:3000]
    now = api.ok("get", f"/v1/broadcasts/{b['id']}")
    assert now["name"] == "restock again"
    assert now["content"]["template"] == stored
    # The body changed: the header and buttons stay as stored.
    body = browser.post(
        action, data={**form, "tpl_body": "{{name}}\nsoon", "tpl_language": "de_DE"}
    )
    assert body.status_code == 303, body.text[:3000]
    after = api.ok("get", f"/v1/broadcasts/{b['id']}")["content"]["template"]
    assert after["language"] == "de_DE"
    assert after["components"][0] == stored["components"][0]
    assert after["components"][1]["parameters"] == [
        {"type": "text", "text": "{{name}}"},
        {"type": "text", "text": "soon"},
    ]
    assert after["components"][2] == stored["components"][2]
    # The buttons changed: they take the places the form gives.
    buttons = browser.post(action, data={**form, "tpl_quick_replies": "STOP\nMORE"})
    assert buttons.status_code == 303, buttons.text[:3000]
    places = [
        (c["index"], c["parameters"][0]["payload"])
        for c in api.ok("get", f"/v1/broadcasts/{b['id']}")["content"]["template"]["components"]
        if c["type"] == "button"
    ]
    assert places == [(0, "STOP"), (1, "MORE")]
    # The name emptied: no template, and the text alone is refused for who is outside.
    cleared = browser.post(action, data={**form, "tpl_name": ""})
    assert cleared.status_code == 422
    assert "of 2 recipients will not have written in within 24 hours" in cleared.text
    assert api.ok("get", f"/v1/broadcasts/{b['id']}")["content"]["template"]["name"] == "restock"


def test_an_edit_form_posted_without_the_template_fields_keeps_the_template(
    browser: TestClient, api: Api
) -> None:
    wa = channel(api, "whatsapp", "wa")
    people(api, wa["id"], [None])
    later = (datetime.now(UTC) + timedelta(days=2)).isoformat()
    template = {"name": "hello_world", "language": "en_US"}
    b = api.broadcast(wa["id"], send_at=later, content={"template": template})
    csrf = sign_in(browser, api.token)
    shown_at = form_fields(
        browser.get(f"/console/broadcasts/{b['id']}/edit").text,
        f"/console/broadcasts/{b['id']}/edit",
    )["shown_at"]
    saved = browser.post(
        f"/console/broadcasts/{b['id']}/edit",
        data={
            "csrf_token": csrf,
            "name": "renamed",
            "when": "later",
            "at": shown_at,
            "shown_at": shown_at,
            "tz": "UTC",
        },
    )
    assert saved.status_code == 303, saved.text[:3000]
    now = api.ok("get", f"/v1/broadcasts/{b['id']}")
    assert now["name"] == "renamed"
    assert now["content"]["template"] == {**template, "components": []}


def test_a_timed_send_s_edit_page_shows_and_keeps_its_template(
    browser: TestClient, api: Api
) -> None:
    wa = channel(api, "whatsapp", "wa inbox")
    [contact] = people(api, wa["id"], [None])
    account = api.ok("get", f"/v1/contacts/{contact}")["account_id"]
    conversation = api.ok(
        "post", "/v1/conversations", 201, json={"account_id": account, "contact_id": contact}
    )["id"]
    later = (datetime.now(UTC) + timedelta(hours=5)).isoformat()
    template = {
        "name": "follow_up",
        "language": "en",
        "components": [{"type": "body", "parameters": [{"type": "text", "text": "{{name}}"}]}],
    }
    timed = api.ok(
        "post",
        f"/v1/conversations/{conversation}/timed-sends",
        201,
        json={"content": {"template": template}, "send_at": later},
    )
    sign_in(browser, api.token)
    action = f"/console/broadcasts/{timed['id']}/edit"
    page = browser.get(action).text
    assert 'id="picker"' not in page, "its recipient and channel stay"
    form = form_fields(page, action)
    assert (form["tpl_name"], form["tpl_body"]) == ("follow_up", "{{name}}")
    kept = browser.post(action, data={**form, "name": "renamed"})
    assert kept.status_code == 303, kept.text[:3000]
    now = api.ok("get", f"/v1/broadcasts/{timed['id']}")
    assert (now["name"], now["content"]["template"]) == ("renamed", template)
    changed = browser.post(action, data={**form, "tpl_body": "{{name | friend}}"})
    assert changed.status_code == 303, changed.text[:3000]
    body = api.ok("get", f"/v1/broadcasts/{timed['id']}")["content"]["template"]["components"]
    assert body == [{"type": "body", "parameters": [{"type": "text", "text": "{{name | friend}}"}]}]
    refused = browser.post(action, data={**form, "tpl_name": "", "text": "free form"})
    assert refused.status_code == 422
    assert "1 of 1 recipients will not have written in within 24 hours" in refused.text


def test_a_messenger_broadcast_with_human_agent_stores_its_message_tag(
    browser: TestClient, api: Api
) -> None:
    fb = channel(api, "messenger", "fb page")
    people(api, fb["id"], [timedelta(hours=2), timedelta(days=2)])
    sign_in(browser, api.token)
    page = browser.get(f"/console/broadcasts/new?channel={fb['id']}").text
    assert "Messenger message tag" in page
    assert "HUMAN_AGENT: those who wrote within 7 days" in page
    assert 'name="tpl_name"' not in page, "no template on Messenger"
    form = new_form(browser, fb["id"])
    assert (form["tag_listed"], form["message_tag"]) == ("1", "")
    refused = browser.post("/console/broadcasts/new", data={**form, "name": "t", "text": "hi"})
    assert refused.status_code == 422
    assert "give content.message_tag (HUMAN_AGENT reaches those who wrote within 7 days)" in (
        refused.text
    )
    made = browser.post(
        "/console/broadcasts/new",
        data={**form, "name": "support", "text": "hi", "message_tag": "HUMAN_AGENT"},
    )
    b = api.ok("get", f"/v1/broadcasts/{made_id(made)}")
    assert b["content"]["message_tag"] == "HUMAN_AGENT"
    assert b["content"]["template"] is None
    detail = browser.get(f"/console/broadcasts/{b['id']}").text
    assert "<dt>Message tag</dt><dd>HUMAN_AGENT" in detail
    assert "fb page (Messenger)" in detail
    assert "<h2>WhatsApp template</h2>" not in detail
    # The edit form is filled in with it; a tag Messenger does not take is refused.
    action = f"/console/broadcasts/{b['id']}/edit"
    edit = browser.get(action).text
    assert '<option value="HUMAN_AGENT" selected>HUMAN_AGENT</option>' in edit
    wrong = browser.post(action, data={**form_fields(edit, action), "message_tag": "NOPE"})
    assert wrong.status_code == 422
    assert "&#39;NOPE&#39; is not a message tag of a messenger channel" in wrong.text


def test_instagram_offers_human_agent_only_and_a_template_is_refused_off_whatsapp(
    browser: TestClient, api: Api
) -> None:
    ig = channel(api, "instagram", "insta")
    hook = api.channel(name="hook")
    api.contact(api.account(hook["id"])["id"], "https://hooks.example/x")
    people(api, ig["id"], [timedelta(hours=1)])
    csrf = sign_in(browser, api.token)
    page = browser.get(f"/console/broadcasts/new?channel={ig['id']}").text
    assert "Instagram message tag" in page
    assert "ACCOUNT_UPDATE" not in page
    assert '<option value="HUMAN_AGENT" >HUMAN_AGENT</option>' in page
    plain = browser.get(f"/console/broadcasts/new?channel={hook['id']}").text
    assert 'name="message_tag"' not in plain
    assert 'name="tpl_name"' not in plain
    refused = browser.post(
        "/console/broadcasts/new",
        data={
            "csrf_token": csrf,
            "channel": str(hook["id"]),
            "name": "x",
            "text": "hi",
            "tpl_name": "spring_sale",
            "tpl_language": "en",
        },
    )
    assert refused.status_code == 422
    assert "only a WhatsApp channel sends templates" in refused.text


def test_the_new_kinds_are_named_readably(browser: TestClient, api: Api) -> None:
    for kind in ("line", "messenger", "instagram", "whatsapp"):
        channel(api, kind, f"my {kind}")
    sign_in(browser, api.token)
    page = browser.get("/console/channels").text
    for name, label in (
        ("line", "LINE"),
        ("messenger", "Messenger"),
        ("instagram", "Instagram"),
        ("whatsapp", "WhatsApp"),
    ):
        assert f'<td data-label="Kind" data-kind="{name}">{label}</td>' in page
    form = browser.get("/console/broadcasts/new").text
    assert "my line (LINE)</option>" in form
    assert "my instagram (Instagram)</option>" in form
