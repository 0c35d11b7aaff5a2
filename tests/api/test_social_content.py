"""LINE, Messenger and Instagram channels; WhatsApp templates; the conversation window.

Through the HTTP API: channel configs and contact addresses of the new kinds are checked,
``content.template`` is checked field by field, free-form content is refused at create (and
at a change) for recipients who will be outside the provider's window at the send time
unless a template (WhatsApp) or a suitable message tag (Messenger, Instagram) is given, and
a template's header image cannot be deleted while a pending broadcast carries it.
"""

from __future__ import annotations

import copy
import io
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from PIL import Image

from tests.conftest import Api

LINE_USER = "U" + "0123456789abcdef" * 2


def ahead(**delta: float) -> str:
    return (datetime.now(UTC) + timedelta(**delta)).isoformat()


def upload_png(api: Api) -> int:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buf, "PNG")
    media: dict[str, Any] = api.ok(
        "post", "/v1/media", 201, files={"file": ("a.png", buf.getvalue(), "image/png")}
    )
    return int(media["id"])


def channel(api: Api, kind: str, config: dict[str, Any]) -> dict[str, Any]:
    body = {"name": f"{kind}-{secrets.token_hex(3)}", "kind": kind, "config": config}
    created: dict[str, Any] = api.ok("post", "/v1/channels", 201, json=body)
    return created


def wrote_in(api: Api, contact_id: int, ago: timedelta = timedelta(0)) -> None:
    """The contact's last message came ``ago`` before now."""
    at = (datetime.now(UTC) - ago).isoformat()
    api.ok("post", f"/v1/contacts/{contact_id}/inbound", json={"at": at})


def broadcast_body(channel_id: int, content: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"name": "social", "channel_id": channel_id, "audience": {}, "content": content, **kw}


def only_error(response: Any) -> dict[str, Any]:
    """The one broken rule of a 422."""
    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert error == response.json()["detail"][0]
    return dict(error)


def broadcast_ids(api: Api) -> list[int]:
    return [b["id"] for b in api.ok("get", "/v1/broadcasts")["items"]]


# --- channels of kinds line, messenger and instagram ---------------------------------------

SOCIAL_CHANNELS: list[tuple[str, dict[str, Any], dict[str, Any], float]] = [
    (
        "line",
        {"channel_access_token": "line-access-token-0001/xyz="},
        {"channel_access_token": "********", "api_base_url": "https://api.line.me/"},
        200,
    ),
    (
        "messenger",
        {"page_access_token": "EAAB-page-token-0001"},
        {
            "page_access_token": "********",
            "api_version": "v21.0",
            "api_base_url": "https://graph.facebook.com/",
        },
        100,
    ),
    (
        "instagram",
        {"page_access_token": "EAAB-ig-token-0001", "ig_user_id": "17841400000000001"},
        {
            "page_access_token": "********",
            "api_version": "v21.0",
            "api_base_url": "https://graph.facebook.com/",
            "ig_user_id": "17841400000000001",
        },
        100,
    ),
]


@pytest.mark.parametrize(
    ("kind", "config", "shown", "rate"), SOCIAL_CHANNELS, ids=[c[0] for c in SOCIAL_CHANNELS]
)
def test_social_channels_are_created_with_defaults_and_their_token_hidden(
    api: Api, kind: str, config: dict[str, Any], shown: dict[str, Any], rate: float
) -> None:
    created = channel(api, kind, config)
    assert created["kind"] == kind
    assert created["config"] == shown
    assert created["rate_limit_per_second"] == rate
    read = api.get(f"/v1/channels/{created['id']}")
    assert read.json()["config"] == shown
    token = next(v for k, v in config.items() if k.endswith("access_token"))
    for text in (str(created), read.text, api.get("/v1/channels").text):
        assert token not in text


def test_a_social_channel_keeps_a_version_and_base_url_given(api: Api) -> None:
    created = channel(
        api,
        "messenger",
        {
            "page_access_token": "EAAB-page-token-0001",
            "api_version": "v19.0",
            "api_base_url": "http://127.0.0.1:8081",
        },
    )
    assert created["config"] == {
        "page_access_token": "********",
        "api_version": "v19.0",
        "api_base_url": "http://127.0.0.1:8081/",
    }


BAD_CONFIGS: list[tuple[str, str, dict[str, Any], str, str]] = [
    (
        "line unknown key",
        "line",
        {"channel_access_token": "tok", "channel_secret": "x"},
        "config.channel_secret",
        "unknown key for a line channel; allowed keys: channel_access_token, api_base_url",
    ),
    (
        "messenger unknown key",
        "messenger",
        {"page_access_token": "tok", "page_id": "1"},
        "config.page_id",
        "allowed keys: page_access_token, api_version, api_base_url",
    ),
    (
        "instagram unknown key",
        "instagram",
        {"page_access_token": "tok", "ig_user_id": "1", "app_secret": "x"},
        "config.app_secret",
        "allowed keys: page_access_token, api_version, api_base_url, ig_user_id",
    ),
    (
        "ig_user_id not digits",
        "instagram",
        {"page_access_token": "tok", "ig_user_id": "ig-17841"},
        "config.ig_user_id",
        "pattern",
    ),
    (
        "ig_user_id missing",
        "instagram",
        {"page_access_token": "tok"},
        "config.ig_user_id",
        "is required",
    ),
    (
        "line token with a space",
        "line",
        {"channel_access_token": "line token"},
        "config.channel_access_token",
        "visible ASCII characters only (no spaces",
    ),
    (
        "messenger token with a space",
        "messenger",
        {"page_access_token": "EAAB page"},
        "config.page_access_token",
        "visible ASCII characters only (no spaces",
    ),
    (
        "instagram token with a line break",
        "instagram",
        {"page_access_token": "EAAB\npage", "ig_user_id": "1"},
        "config.page_access_token",
        "no spaces, line breaks",
    ),
    (
        "line token missing",
        "line",
        {},
        "config.channel_access_token",
        "is required",
    ),
    (
        "messenger bad api_version",
        "messenger",
        {"page_access_token": "tok", "api_version": "21.0"},
        "config.api_version",
        "pattern",
    ),
    (
        "line base url not a URL",
        "line",
        {"channel_access_token": "tok", "api_base_url": "api.line.me"},
        "config.api_base_url",
        "URL",
    ),
]


@pytest.mark.parametrize(
    ("case", "kind", "config", "field", "words"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS]
)
def test_a_bad_social_config_names_the_field_and_writes_nothing(
    api: Api, case: str, kind: str, config: dict[str, Any], field: str, words: str
) -> None:
    response = api.post("/v1/channels", json={"name": "c", "kind": kind, "config": config})
    error = only_error(response)
    assert error["field"] == field
    assert words in error["msg"]
    assert api.ok("get", "/v1/channels")["items"] == []


SOCIAL_TARGETS: dict[str, Callable[[str], dict[str, str]]] = {
    "line": lambda url: {"channel_access_token": "tok", "api_base_url": url},
    "messenger": lambda url: {"page_access_token": "tok", "api_base_url": url},
    "instagram": lambda url: {"page_access_token": "tok", "ig_user_id": "1", "api_base_url": url},
}


@pytest.mark.parametrize("kind", list(SOCIAL_TARGETS))
@pytest.mark.usefixtures("egress_rule_on")
def test_a_social_channel_aimed_at_a_private_address_is_refused(api: Api, kind: str) -> None:
    for url in ("http://127.0.0.1:8081", "https://localhost/", "http://169.254.169.254"):
        response = api.post(
            "/v1/channels", json={"name": "c", "kind": kind, "config": SOCIAL_TARGETS[kind](url)}
        )
        error = only_error(response)
        assert (error["field"], error["type"]) == ("config.api_base_url", "egress_refused")
        assert "public internet addresses" in error["msg"]
    assert api.ok("get", "/v1/channels")["items"] == []
    # Its real service is fine.
    channel(api, kind, SOCIAL_TARGETS[kind]("https://api.example.com"))


ADDRESSES: list[tuple[str, dict[str, Any], str, list[str], str]] = [
    (
        "line",
        {"channel_access_token": "tok"},
        LINE_USER,
        [
            "u" + "0123456789abcdef" * 2,  # a lowercase u
            "U" + "0123456789ABCDEF" * 2,  # uppercase hex
            "U" + "0123456789abcdef" * 2 + "0",  # 33 digits
            "U" + "0123456789abcde",  # too short
            "U" + "0123456789abcdeg" * 2,  # not hex
            "1234567890",
        ],
        "a LINE user id: U and 32 hex digits",
    ),
    (
        "messenger",
        {"page_access_token": "tok"},
        "6123456789012345",
        ["psid-61234", "+4915112345678", "61234 56789", "1" * 33, "U" + "0" * 32],
        "a page-scoped user id (PSID, digits)",
    ),
    (
        "instagram",
        {"page_access_token": "tok", "ig_user_id": "1"},
        "17841412345678901",
        ["@someone", "17841.4", "-17841", "1" * 33],
        "an Instagram-scoped user id (IGSID, digits)",
    ),
]


@pytest.mark.parametrize(
    ("kind", "config", "good", "bad", "described"), ADDRESSES, ids=[a[0] for a in ADDRESSES]
)
def test_contact_addresses_are_checked_per_kind(
    api: Api, kind: str, config: dict[str, Any], good: str, bad: list[str], described: str
) -> None:
    account = api.account(channel(api, kind, config)["id"])
    assert api.contact(account["id"], f"  {good} ")["address"] == good
    for address in bad:
        response = api.post("/v1/contacts", json={"account_id": account["id"], "address": address})
        error = only_error(response)
        assert error["field"] == "address"
        assert error["msg"] == (
            f"{address!r} is not a valid {kind} address: expected {described}"
        ), address
    listed = api.ok("get", f"/v1/contacts?account_id={account['id']}")["items"]
    assert [c["address"] for c in listed] == [good]


# --- WhatsApp templates ---------------------------------------------------------------------

TEMPLATE: dict[str, Any] = {
    "name": "spring_sale_2025",
    "language": "en_US",
    "components": [
        {"type": "header", "parameters": [{"type": "text", "text": "Hello {{name | there}}"}]},
        {
            "type": "body",
            "parameters": [
                {"type": "text", "text": "{{name | friend}}"},
                # Four spaces in a row are still allowed.
                {"type": "text", "text": "20%    off"},
            ],
        },
        {
            "type": "button",
            "sub_type": "quick_reply",
            "index": 0,
            "parameters": [{"type": "payload", "payload": "STOP_PROMOS"}],
        },
        {
            "type": "button",
            "sub_type": "url",
            "index": 1,
            "parameters": [{"type": "text", "text": "spring?c={{address}}"}],
        },
    ],
}


@pytest.fixture
def whatsapp(api: Api) -> dict[str, Any]:
    """A WhatsApp channel with three contacts, none of whom wrote in."""
    created = api.channel("whatsapp")
    account = api.account(created["id"])
    contacts = [api.contact(account["id"], f"+4915112345{i:03d}") for i in range(3)]
    return {"channel": created, "account": account, "contacts": contacts}


def template(**changes: Any) -> dict[str, Any]:
    t = copy.deepcopy(TEMPLATE)
    t.update(changes)
    return t


def test_a_valid_template_is_accepted_and_answered_back(api: Api, whatsapp: dict[str, Any]) -> None:
    b = api.ok(
        "post",
        "/v1/broadcasts",
        201,
        json=broadcast_body(
            whatsapp["channel"]["id"], {"template": TEMPLATE}, send_at=ahead(hours=1)
        ),
    )
    assert b["content"] == {
        "text": None,
        "media_ids": [],
        "template": TEMPLATE,
        "message_tag": None,
    }
    assert api.ok("get", f"/v1/broadcasts/{b['id']}")["content"]["template"] == TEMPLATE


def test_a_template_with_a_header_image_is_accepted(api: Api, whatsapp: dict[str, Any]) -> None:
    media_id = upload_png(api)
    t = template()
    t["components"][0] = {"type": "header", "parameters": [{"type": "image", "media_id": media_id}]}
    b = api.ok(
        "post",
        "/v1/broadcasts",
        201,
        json=broadcast_body(whatsapp["channel"]["id"], {"template": t}, send_at=ahead(hours=1)),
    )
    assert b["content"]["template"] == t
    assert b["content"]["template"]["components"][0]["parameters"] == [
        {"type": "image", "media_id": media_id}
    ]


def test_a_header_text_of_60_characters_and_a_bare_template_are_accepted(
    api: Api, whatsapp: dict[str, Any]
) -> None:
    t = template()
    t["components"][0]["parameters"][0]["text"] = "x" * 60
    for given in (t, {"name": "hello_world", "language": "en"}):
        b = api.ok(
            "post",
            "/v1/broadcasts",
            201,
            json=broadcast_body(whatsapp["channel"]["id"], {"template": given}),
        )
        assert b["content"]["template"] == {"components": [], **given}


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(t: dict[str, Any]) -> None:
        place: Any = t
        for key in path[:-1]:
            place = place[key]
        place[path[-1]] = value

    return change


def _add(component: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    return lambda t: t["components"].append(component)


BODY_TEXT = ("components", 1, "parameters", 0, "text")
QUICK_REPLY = {
    "type": "button",
    "sub_type": "quick_reply",
    "index": 0,
    "parameters": [{"type": "payload", "payload": "AGAIN"}],
}

BAD_TEMPLATES: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    (
        "uppercase in name",
        _set(("name",), "Spring_sale"),
        "content.template.name",
        "lowercase letters, digits and underscores only",
    ),
    (
        "space in name",
        _set(("name",), "spring sale"),
        "content.template.name",
        "lowercase letters, digits and underscores only",
    ),
    ("empty name", _set(("name",), ""), "content.template.name", "at least 1 character"),
    (
        "language in words",
        _set(("language",), "english"),
        "content.template.language",
        "language code such as en, en_US",
    ),
    (
        "language with a dash",
        _set(("language",), "en-US"),
        "content.template.language",
        "language code such as en, en_US",
    ),
    (
        "language region lowercase",
        _set(("language",), "en_us"),
        "content.template.language",
        "language code such as en, en_US",
    ),
    (
        "newline in a body parameter",
        _set(BODY_TEXT, "line one\nline two"),
        "content.template.components[1].parameters[0].text",
        "must not hold a line break, a tab or more than four spaces in a row",
    ),
    (
        "tab in a body parameter",
        _set(BODY_TEXT, "one\ttwo"),
        "content.template.components[1].parameters[0].text",
        "must not hold a line break, a tab or more than four spaces in a row",
    ),
    (
        "five spaces in a body parameter",
        _set(("components", 1, "parameters", 1, "text"), "20%     off"),
        "content.template.components[1].parameters[1].text",
        "must not hold a line break, a tab or more than four spaces in a row",
    ),
    (
        "blank body parameter",
        _set(BODY_TEXT, "   "),
        "content.template.components[1].parameters[0].text",
        "must not be blank",
    ),
    (
        "body without parameters",
        _set(("components", 1, "parameters"), []),
        "content.template.components[1].parameters",
        "at least 1 item",
    ),
    (
        "tab in the header text",
        _set(("components", 0, "parameters", 0, "text"), "one\ttwo"),
        "content.template.components[0].parameters[0].text",
        "must not hold a line break",
    ),
    (
        "header text over 60 characters",
        _set(("components", 0, "parameters", 0, "text"), "x" * 61),
        "content.template.components[0].parameters[0].text",
        "a header's text is at most 60 characters",
    ),
    (
        "header image without media_id",
        _set(("components", 0, "parameters", 0), {"type": "image"}),
        "content.template.components[0].parameters[0].media_id",
        "is required",
    ),
    (
        "header parameter of an unknown type",
        _set(("components", 0, "parameters", 0), {"type": "video", "media_id": 1}),
        "content.template.components[0].parameters[0]",
        "'text', 'image'",
    ),
    (
        "two bodies",
        _add({"type": "body", "parameters": [{"type": "text", "text": "again"}]}),
        "content.template.components[4]",
        "more than one body",
    ),
    (
        "two headers",
        _add({"type": "header", "parameters": [{"type": "text", "text": "again"}]}),
        "content.template.components[4]",
        "more than one header",
    ),
    (
        "same button index twice",
        _add(QUICK_REPLY),
        "content.template.components[4].index",
        "button index 0 is given twice",
    ),
    (
        "quick_reply with a text parameter",
        _set(("components", 2, "parameters", 0), {"type": "text", "text": "STOP"}),
        "content.template.components[2].parameters[0].type",
        "a quick_reply button takes one parameter of type 'payload'",
    ),
    (
        "url button with a payload parameter",
        _set(("components", 3, "parameters", 0), {"type": "payload", "payload": "x"}),
        "content.template.components[3].parameters[0].type",
        "a url button takes one parameter of type 'text'",
    ),
    (
        "button index 10",
        _set(("components", 3, "index"), 10),
        "content.template.components[3].index",
        "less than 10",
    ),
    (
        "button of an unknown sub_type",
        _set(("components", 3, "sub_type"), "call"),
        "content.template.components[3].sub_type",
        "'quick_reply' or 'url'",
    ),
    (
        "component of an unknown type",
        _add({"type": "footer", "parameters": []}),
        "content.template.components[4]",
        "'header', 'body', 'button'",
    ),
    (
        "unknown custom field in a body parameter",
        _set(BODY_TEXT, "Hi {{nosuchfield}}"),
        "content.template.components[1].parameters[0].text",
        "{{nosuchfield}}: no contact has a field 'nosuchfield'",
    ),
    (
        "unknown custom field in a url button",
        _set(("components", 3, "parameters", 0, "text"), "p?x={{nosuchfield}}"),
        "content.template.components[3].parameters[0].text",
        "no contact has a field 'nosuchfield'",
    ),
    (
        "unclosed placeholder in a payload",
        _set(("components", 2, "parameters", 0, "payload"), "{{name"),
        "content.template.components[2].parameters[0].payload",
        "is not closed with }}",
    ),
    (
        "extra key on the template",
        _set(("namespace",), "abc_123"),
        "content.template.namespace",
        "not a known field",
    ),
    (
        "extra key on a component",
        _set(("components", 1, "format"), "TEXT"),
        "content.template.components[1].format",
        "not a known field",
    ),
    (
        "extra key on a body parameter",
        _set(("components", 1, "parameters", 0, "lang"), "en"),
        "content.template.components[1].parameters[0].lang",
        "not a known field",
    ),
    (
        "extra key on a header parameter",
        _set(("components", 0, "parameters", 0, "link"), "https://x.test/a.png"),
        "content.template.components[0].parameters[0].link",
        "not a known field",
    ),
    (
        "extra key on a button parameter",
        _set(("components", 2, "parameters", 0, "text"), "x"),
        "content.template.components[2].parameters[0].text",
        "not a known field",
    ),
]


@pytest.mark.parametrize(
    ("case", "change", "field", "words"), BAD_TEMPLATES, ids=[c[0] for c in BAD_TEMPLATES]
)
def test_a_bad_template_names_the_precise_field_and_writes_nothing(
    api: Api,
    whatsapp: dict[str, Any],
    case: str,
    change: Callable[[dict[str, Any]], None],
    field: str,
    words: str,
) -> None:
    t = template()
    change(t)
    response = api.post(
        "/v1/broadcasts", json=broadcast_body(whatsapp["channel"]["id"], {"template": t})
    )
    error = only_error(response)
    assert error["field"] == field, error
    assert words in error["msg"], error
    assert broadcast_ids(api) == []


def test_an_unknown_header_image_is_named_where_it_is_given(
    api: Api, whatsapp: dict[str, Any]
) -> None:
    t = template()
    t["components"][0] = {
        "type": "header",
        "parameters": [{"type": "image", "media_id": 987654321}],
    }
    response = api.post(
        "/v1/broadcasts", json=broadcast_body(whatsapp["channel"]["id"], {"template": t})
    )
    error = only_error(response)
    assert error == {
        "field": "content.template.components[0].parameters[0].media_id",
        "msg": "media 987654321 not found",
        "type": "not_found",
    }
    assert broadcast_ids(api) == []


def test_another_workspaces_header_image_is_not_found(
    api: Api, other_api: Api, whatsapp: dict[str, Any]
) -> None:
    theirs = upload_png(other_api)
    t = template()
    t["components"][0] = {"type": "header", "parameters": [{"type": "image", "media_id": theirs}]}
    response = api.post(
        "/v1/broadcasts", json=broadcast_body(whatsapp["channel"]["id"], {"template": t})
    )
    error = only_error(response)
    assert error["field"] == "content.template.components[0].parameters[0].media_id"
    assert error["msg"] == f"media {theirs} not found"


@pytest.mark.parametrize("kind", ["telegram", "webhook"])
def test_a_template_on_another_kind_of_channel_is_refused(api: Api, kind: str) -> None:
    other = api.channel(kind)
    api.contact(api.account(other["id"])["id"], "12345" if kind == "telegram" else "hook-1")
    response = api.post(
        "/v1/broadcasts", json=broadcast_body(other["id"], {"text": "hi", "template": TEMPLATE})
    )
    error = only_error(response)
    assert (error["field"], error["type"]) == ("content.template", "template_not_supported")
    assert (
        f"only a WhatsApp channel sends templates; channel {other['id']} is {kind}"
        == (error["msg"])
    )
    assert broadcast_ids(api) == []


@pytest.mark.parametrize(
    "content",
    [{}, {"text": None, "media_ids": []}, {"text": "  \n "}, {"message_tag": "HUMAN_AGENT"}],
    ids=["nothing", "nulls", "blank text", "tag only"],
)
def test_an_empty_content_is_refused(
    api: Api, whatsapp: dict[str, Any], content: dict[str, Any]
) -> None:
    response = api.post("/v1/broadcasts", json=broadcast_body(whatsapp["channel"]["id"], content))
    error = only_error(response)
    assert error["field"] == "content"
    assert "is empty: give text, media_ids, or both (or a WhatsApp template)" in error["msg"]
    assert broadcast_ids(api) == []


# --- the conversation window at create --------------------------------------------------


def test_free_form_to_contacts_outside_the_window_is_refused_and_nothing_written(
    api: Api, whatsapp: dict[str, Any]
) -> None:
    earlier = api.broadcast(whatsapp["channel"]["id"], content={"template": TEMPLATE})
    wrote_in(api, whatsapp["contacts"][0]["id"])
    response = api.post(
        "/v1/broadcasts", json=broadcast_body(whatsapp["channel"]["id"], {"text": "hi"})
    )
    error = only_error(response)
    assert (error["field"], error["type"]) == ("content", "outside_window")
    assert error["msg"].startswith(
        "2 of 3 recipients will not have written in within 24 hours of the send time: "
        "whatsapp takes free-form messages only inside that window; give content.template"
    )
    # Images are free-form too.
    images = api.post(
        "/v1/broadcasts",
        json=broadcast_body(whatsapp["channel"]["id"], {"media_ids": [upload_png(api)]}),
    )
    assert only_error(images)["type"] == "outside_window"
    assert broadcast_ids(api) == [earlier["id"]]


def test_free_form_to_contacts_all_inside_the_window_is_accepted(
    api: Api, whatsapp: dict[str, Any]
) -> None:
    for i, c in enumerate(whatsapp["contacts"]):
        wrote_in(api, c["id"], timedelta(hours=7 * i))  # now, 7 h and 14 h ago
    b = api.ok(
        "post",
        "/v1/broadcasts",
        201,
        json=broadcast_body(whatsapp["channel"]["id"], {"text": "hi {{name | there}}"}),
    )
    assert b["content"]["text"] == "hi {{name | there}}"
    assert b["audience_size"] == 3


def test_one_contact_wrote_25_hours_ago_is_outside(api: Api, whatsapp: dict[str, Any]) -> None:
    wrote_in(api, whatsapp["contacts"][0]["id"])
    wrote_in(api, whatsapp["contacts"][1]["id"], timedelta(hours=23))
    wrote_in(api, whatsapp["contacts"][2]["id"], timedelta(hours=25))
    response = api.post(
        "/v1/broadcasts", json=broadcast_body(whatsapp["channel"]["id"], {"text": "hi"})
    )
    assert "1 of 3 recipients" in only_error(response)["msg"]


def test_free_form_with_a_template_is_accepted_though_some_are_outside(
    api: Api, whatsapp: dict[str, Any]
) -> None:
    wrote_in(api, whatsapp["contacts"][0]["id"])
    content = {"text": "hi", "template": TEMPLATE}
    b = api.ok(
        "post", "/v1/broadcasts", 201, json=broadcast_body(whatsapp["channel"]["id"], content)
    )
    assert (b["content"]["text"], b["content"]["template"]) == ("hi", TEMPLATE)


def test_a_template_only_is_accepted_though_nobody_wrote_in(
    api: Api, whatsapp: dict[str, Any]
) -> None:
    b = api.ok(
        "post",
        "/v1/broadcasts",
        201,
        json=broadcast_body(whatsapp["channel"]["id"], {"template": TEMPLATE}),
    )
    assert b["content"]["text"] is None
    assert b["audience_size"] == 3


def test_the_window_is_judged_at_the_send_time(api: Api, whatsapp: dict[str, Any]) -> None:
    for c in whatsapp["contacts"]:
        wrote_in(api, c["id"], timedelta(hours=1))
    later = api.post(
        "/v1/broadcasts",
        json=broadcast_body(whatsapp["channel"]["id"], {"text": "hi"}, send_at=ahead(days=2)),
    )
    error = only_error(later)
    assert error["type"] == "outside_window"
    assert error["msg"].startswith(
        "3 of 3 recipients will not have written in within 24 hours of the send time"
    )
    assert broadcast_ids(api) == []
    # Still inside two hours from now.
    api.ok(
        "post",
        "/v1/broadcasts",
        201,
        json=broadcast_body(whatsapp["channel"]["id"], {"text": "hi"}, send_at=ahead(hours=2)),
    )


@pytest.fixture
def messenger(api: Api) -> dict[str, Any]:
    created = channel(api, "messenger", {"page_access_token": "EAAB-page-token-0001"})
    account = api.account(created["id"])
    contacts = [api.contact(account["id"], f"61234567890{i:03d}") for i in range(3)]
    return {"channel": created, "contacts": contacts}


def to(contact: dict[str, Any]) -> dict[str, Any]:
    return {"selection": "manual", "contact_ids": [contact["id"]]}


def test_messenger_outside_the_window_without_a_tag_is_refused(
    api: Api, messenger: dict[str, Any]
) -> None:
    wrote_in(api, messenger["contacts"][0]["id"], timedelta(hours=2))
    response = api.post(
        "/v1/broadcasts", json=broadcast_body(messenger["channel"]["id"], {"text": "hi"})
    )
    error = only_error(response)
    assert (error["field"], error["type"]) == ("content", "outside_window")
    assert error["msg"] == (
        "2 of 3 recipients will not have written in within 24 hours of the send time: "
        "messenger takes free-form messages only inside that window; give content.message_tag "
        "(HUMAN_AGENT reaches those who wrote within 7 days)"
    )
    assert broadcast_ids(api) == []
    # Inside it, no tag is needed.
    api.ok(
        "post",
        "/v1/broadcasts",
        201,
        json=broadcast_body(
            messenger["channel"]["id"], {"text": "hi"}, audience=to(messenger["contacts"][0])
        ),
    )


def test_human_agent_reaches_those_who_wrote_within_7_days(
    api: Api, messenger: dict[str, Any]
) -> None:
    recent, old, _ = messenger["contacts"]
    wrote_in(api, recent["id"], timedelta(days=3))
    wrote_in(api, old["id"], timedelta(days=10))
    content = {"text": "Your agent replied", "message_tag": "HUMAN_AGENT"}
    b = api.ok(
        "post",
        "/v1/broadcasts",
        201,
        json=broadcast_body(messenger["channel"]["id"], content, audience=to(recent)),
    )
    assert b["content"]["message_tag"] == "HUMAN_AGENT"
    response = api.post(
        "/v1/broadcasts",
        json=broadcast_body(messenger["channel"]["id"], content, audience=to(old)),
    )
    error = only_error(response)
    assert (error["field"], error["type"]) == ("content", "outside_window")
    assert error["msg"].startswith(
        "1 of 1 recipients will not have written in within 7 days of the send time"
    )
    assert "narrow the audience to those who wrote in since" in error["msg"]
    assert broadcast_ids(api) == [b["id"]]


def test_human_agent_to_someone_who_wrote_3_days_ago_but_sent_in_5_days_is_refused(
    api: Api, messenger: dict[str, Any]
) -> None:
    recent = messenger["contacts"][0]
    wrote_in(api, recent["id"], timedelta(days=3))
    content = {"text": "Your agent replied", "message_tag": "HUMAN_AGENT"}
    response = api.post(
        "/v1/broadcasts",
        json=broadcast_body(
            messenger["channel"]["id"], content, audience=to(recent), send_at=ahead(days=5)
        ),
    )
    assert "within 7 days of the send time" in only_error(response)["msg"]


def test_account_update_goes_to_those_who_never_wrote(api: Api, messenger: dict[str, Any]) -> None:
    b = api.ok(
        "post",
        "/v1/broadcasts",
        201,
        json=broadcast_body(
            messenger["channel"]["id"],
            {"text": "Your account changed", "message_tag": "ACCOUNT_UPDATE"},
            send_at=ahead(days=30),
        ),
    )
    assert b["content"]["message_tag"] == "ACCOUNT_UPDATE"
    assert b["audience_size"] == 3


@pytest.mark.parametrize("tag", ["ACCOUNT_UPDATE", "CONFIRMED_EVENT_UPDATE", "human_agent", ""])
def test_instagram_takes_only_human_agent(api: Api, tag: str) -> None:
    ig = channel(api, "instagram", {"page_access_token": "EAAB-ig", "ig_user_id": "1784"})
    contact = api.contact(api.account(ig["id"])["id"], "17841412345678901")
    response = api.post(
        "/v1/broadcasts", json=broadcast_body(ig["id"], {"text": "hi", "message_tag": tag})
    )
    error = only_error(response)
    assert (error["field"], error["type"]) == ("content.message_tag", "invalid_tag")
    assert error["msg"] == (
        f"{tag!r} is not a message tag of a instagram channel; allowed: one of HUMAN_AGENT"
    )
    assert broadcast_ids(api) == []
    wrote_in(api, contact["id"], timedelta(days=2))
    api.ok(
        "post",
        "/v1/broadcasts",
        201,
        json=broadcast_body(ig["id"], {"text": "hi", "message_tag": "HUMAN_AGENT"}),
    )


def test_a_messenger_tag_not_in_the_list_is_refused_listing_them(
    api: Api, messenger: dict[str, Any]
) -> None:
    response = api.post(
        "/v1/broadcasts",
        json=broadcast_body(messenger["channel"]["id"], {"text": "hi", "message_tag": "PROMO"}),
    )
    error = only_error(response)
    assert error["field"] == "content.message_tag"
    assert error["msg"].endswith(
        "allowed: one of HUMAN_AGENT, ACCOUNT_UPDATE, CONFIRMED_EVENT_UPDATE, POST_PURCHASE_UPDATE"
    )


def test_a_message_tag_on_whatsapp_is_refused(api: Api, whatsapp: dict[str, Any]) -> None:
    response = api.post(
        "/v1/broadcasts",
        json=broadcast_body(
            whatsapp["channel"]["id"], {"template": TEMPLATE, "message_tag": "HUMAN_AGENT"}
        ),
    )
    error = only_error(response)
    assert (error["field"], error["type"]) == ("content.message_tag", "invalid_tag")
    assert error["msg"] == (
        "'HUMAN_AGENT' is not a message tag of a whatsapp channel; allowed: none: only "
        "Messenger and Instagram channels take message tags"
    )
    assert broadcast_ids(api) == []


def test_a_change_to_free_form_for_contacts_outside_is_refused_and_nothing_changed(
    api: Api, whatsapp: dict[str, Any]
) -> None:
    b = api.ok(
        "post",
        "/v1/broadcasts",
        201,
        json=broadcast_body(
            whatsapp["channel"]["id"], {"template": TEMPLATE}, send_at=ahead(hours=1)
        ),
    )
    assert b["status"] == "pending"
    response = api.patch(f"/v1/broadcasts/{b['id']}", json={"content": {"text": "hi"}})
    error = only_error(response)
    assert (error["field"], error["type"]) == ("content", "outside_window")
    assert "3 of 3 recipients" in error["msg"]
    stored = api.ok("get", f"/v1/broadcasts/{b['id']}")
    assert stored["content"] == b["content"]
    assert stored["updated_at"] == b["updated_at"]
    # Once they wrote in, the same change goes through.
    for c in whatsapp["contacts"]:
        wrote_in(api, c["id"])
    changed = api.ok("patch", f"/v1/broadcasts/{b['id']}", json={"content": {"text": "hi"}})
    assert (changed["content"]["text"], changed["content"]["template"]) == ("hi", None)


def test_a_later_send_time_is_checked_against_the_window(
    api: Api, whatsapp: dict[str, Any]
) -> None:
    for c in whatsapp["contacts"]:
        wrote_in(api, c["id"])
    b = api.ok(
        "post",
        "/v1/broadcasts",
        201,
        json=broadcast_body(whatsapp["channel"]["id"], {"text": "hi"}, send_at=ahead(hours=1)),
    )
    response = api.patch(f"/v1/broadcasts/{b['id']}", json={"send_at": ahead(days=2)})
    assert only_error(response)["type"] == "outside_window"
    assert api.ok("get", f"/v1/broadcasts/{b['id']}")["send_at"] == b["send_at"]


# --- a header image in use ------------------------------------------------------------------


def test_a_template_header_image_of_a_pending_broadcast_cannot_be_deleted(
    api: Api, whatsapp: dict[str, Any]
) -> None:
    media_id = upload_png(api)
    t = template()
    t["components"][0] = {"type": "header", "parameters": [{"type": "image", "media_id": media_id}]}
    b = api.ok(
        "post",
        "/v1/broadcasts",
        201,
        json=broadcast_body(whatsapp["channel"]["id"], {"template": t}, send_at=ahead(hours=1)),
    )
    response = api.delete(f"/v1/media/{media_id}")
    assert response.status_code == 409, response.text
    assert response.json()["detail"] == (
        f"media {media_id} is used by broadcasts not yet final: {b['id']} (pending); change "
        "their content, cancel them or let them finish, then delete it"
    )
    assert api.ok("get", f"/v1/media/{media_id}")["id"] == media_id
    # Canceled, it no longer holds the image.
    api.ok("post", f"/v1/broadcasts/{b['id']}/cancel")
    assert api.delete(f"/v1/media/{media_id}").status_code == 204
