"""Channels, accounts and tags: config checked per kind, secrets never shown back."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from shared.settings import get_settings
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
    # A webhook to the customer's own service may take far more than a messaging provider.
    fast = api.channel("webhook", rate_limit_per_second=100_000)
    assert fast["rate_limit_per_second"] == 100_000


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
        (
            {
                "kind": "webhook",
                "config": {"url": "http://x.test/h", "secret": "0123456789abcdef"},
                "rate_limit_per_second": 100_001,
            },
            "rate_limit_per_second",
            "less than or equal to 100000",
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


TARGETS: dict[str, tuple[str, Callable[[str], dict[str, str]]]] = {
    "webhook": ("url", lambda t: {"url": f"http://{t}/h", "secret": "0123456789abcdef"}),
    "telegram": ("api_base_url", lambda t: {"bot_token": "1:a", "api_base_url": f"http://{t}"}),
    "whatsapp": (
        "api_base_url",
        lambda t: {"access_token": "t", "phone_number_id": "1", "api_base_url": f"https://{t}/"},
    ),
    "smtp": ("host", lambda t: {"host": t.strip("[]"), "from_address": "a@b.co"}),
}


@pytest.mark.parametrize("kind", list(TARGETS))
@pytest.mark.parametrize(
    "target",
    ["127.0.0.1", "localhost", "[::1]", "169.254.169.254", "10.0.0.8", "2130706433", "0x7f.1"],
)
@pytest.mark.usefixtures("egress_rule_on")
def test_a_channel_aimed_at_a_private_address_is_refused_when_created(
    api: Api, kind: str, target: str
) -> None:
    key, config = TARGETS[kind]
    response = api.post("/v1/channels", json={"name": "c", "kind": kind, "config": config(target)})
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["field"] == f"config.{key}"
    assert "public internet addresses" in error["msg"]
    assert api.ok("get", "/v1/channels")["items"] == []


@pytest.mark.usefixtures("egress_rule_on")
def test_a_channel_aimed_at_a_public_name_is_accepted(api: Api) -> None:
    config = {"url": "https://hooks.example.com/in", "secret": "0123456789abcdef"}
    created = api.ok(
        "post", "/v1/channels", 201, json={"name": "c", "kind": "webhook", "config": config}
    )
    assert created["config"]["url"] == "https://hooks.example.com/in"


def test_credentials_in_a_url_are_never_shown_back(api: Api) -> None:
    url = "https://alice:pa55word@hooks.example.com/in"
    created = api.channel("webhook", config={"url": url, "secret": "0123456789abcdef"})
    for text in (str(created), api.get(f"/v1/channels/{created['id']}").text):
        assert "pa55word" not in text
        assert "alice" not in text
    assert created["config"]["url"] == "https://********@hooks.example.com/in"


def test_credentials_in_a_url_are_stored_sealed_and_given_back_to_the_sender(
    api: Api, database_url: str
) -> None:
    import psycopg

    from shared.db.engine import libpq_url
    from shared.domain.channels import open_config
    from shared.domain.lifecycle import ChannelKind
    from shared.secrets_box import SecretsBox

    url = "https://alice:pa55word@hooks.example.com/in"
    created = api.channel("webhook", config={"url": url, "secret": "0123456789abcdef"})
    with psycopg.connect(libpq_url(database_url)) as conn:
        [(stored,)] = conn.execute(
            "SELECT config FROM channel WHERE id = %s", (created["id"],)
        ).fetchall()
    assert "pa55word" not in str(stored)
    assert "alice" not in str(stored)
    box = SecretsBox.from_settings(get_settings())
    assert open_config(ChannelKind.WEBHOOK, stored, box)["url"] == url
