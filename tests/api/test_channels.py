"""Channels, accounts and tags: config checked per kind, secrets never shown back."""

from __future__ import annotations

import pytest

from tests.conftest import Api

SECRETS = {
    "webhook": "s3cret-webhook-key-0001",
    "telegram": "123456:ABCdef_ghi-jkl",
    "whatsapp": "EAAG-secret-token",
    "smtp": "smtp-pass-1",
}


@pytest.mark.parametrize("kind", list(SECRETS))
def test_secrets_never_appear_in_any_answer(api: Api, kind: str) -> None:
    created = api.channel(kind)
    listed = api.get("/v1/channels").text
    read = api.get(f"/v1/channels/{created['id']}").text
    for text in (str(created), listed, read):
        assert SECRETS[kind] not in text
    assert "********" in read


def test_default_rate_limits_come_from_the_provider(api: Api) -> None:
    assert api.channel("whatsapp")["rate_limit_per_second"] == 80
    assert api.channel("telegram")["rate_limit_per_second"] == 30
    assert api.channel("webhook", rate_limit_per_second=20)["rate_limit_per_second"] == 20


def test_config_defaults_are_filled_in(api: Api) -> None:
    config = api.channel("whatsapp")["config"]
    assert config["api_version"].startswith("v")
    assert config["api_base_url"] == "https://graph.facebook.com/"


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"kind": "fax", "config": {}}, "kind", "webhook"),
        (
            {"kind": "webhook", "config": {"url": "ftp://x", "secret": "0123456789abcdef"}},
            "config.url",
            "URL",
        ),
        (
            {"kind": "webhook", "config": {"url": "http://x.test/h", "secret": "short"}},
            "config.secret",
            "16",
        ),
        ({"kind": "webhook", "config": {"secret": "0123456789abcdef"}}, "config.url", "required"),
        (
            {
                "kind": "webhook",
                "config": {"url": "http://x.test/h", "secret": "0123456789abcdef", "x": 1},
            },
            "config.x",
            "allowed keys: url, secret",
        ),
        (
            {"kind": "smtp", "config": {"host": "h", "from_address": "nope"}},
            "config.from_address",
            "email",
        ),
        (
            {"kind": "whatsapp", "config": {"access_token": "t", "phone_number_id": "abc"}},
            "config.phone_number_id",
            "pattern",
        ),
        (
            {
                "kind": "webhook",
                "config": {"url": "http://x.test/h", "secret": "0123456789abcdef"},
                "rate_limit_per_second": 0,
            },
            "rate_limit_per_second",
            "greater than 0",
        ),
    ],
)
def test_bad_channel_input_names_the_field(
    api: Api, body: dict[str, object], field: str, words: str
) -> None:
    response = api.post("/v1/channels", json={"name": "c", **body})
    assert response.status_code == 422
    errors = {e["field"]: e["msg"] for e in response.json()["detail"]}
    assert field in errors, errors
    assert words in errors[field]
    assert api.ok("get", "/v1/channels")["items"] == []


def test_channel_names_are_unique_per_workspace(api: Api, other_api: Api) -> None:
    api.channel("webhook", name="main")
    response = api.post(
        "/v1/channels", json={"name": "main", "kind": "telegram", "config": {"bot_token": "1:a"}}
    )
    assert response.status_code == 409
    assert "main" in response.json()["detail"]
    other_api.channel("webhook", name="main")


def test_accounts_belong_to_a_channel_of_the_workspace(api: Api, other_api: Api) -> None:
    channel = api.channel()
    account = api.account(channel["id"], "number one")
    assert account["channel_id"] == channel["id"]
    assert api.ok("get", f"/v1/accounts?channel_id={channel['id']}")["items"] == [account]
    foreign = other_api.post("/v1/accounts", json={"channel_id": channel["id"], "name": "x"})
    assert foreign.status_code == 422
    assert foreign.json()["detail"][0]["field"] == "channel_id"
    assert (
        api.post(
            "/v1/accounts", json={"channel_id": channel["id"], "name": "number one"}
        ).status_code
        == 409
    )


def test_tags_are_unique_ignoring_case(api: Api) -> None:
    tag = api.ok("post", "/v1/tags", 201, json={"name": "VIP"})
    assert api.post("/v1/tags", json={"name": "vip"}).status_code == 409
    assert api.post("/v1/tags", json={"name": "  "}).status_code == 422
    assert api.ok("get", f"/v1/tags/{tag['id']}")["name"] == "VIP"


def test_lists_page_with_cursors_newest_first(api: Api) -> None:
    ids = [api.channel()["id"] for _ in range(5)]
    first = api.ok("get", "/v1/channels?limit=2")
    second = api.ok("get", f"/v1/channels?limit=2&cursor={first['next_cursor']}")
    third = api.ok("get", f"/v1/channels?limit=2&cursor={second['next_cursor']}")
    seen = [c["id"] for page in (first, second, third) for c in page["items"]]
    assert seen == sorted(ids, reverse=True)
    assert third["next_cursor"] is None
    bad = api.get("/v1/channels?cursor=%%%")
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["field"] == "cursor"
