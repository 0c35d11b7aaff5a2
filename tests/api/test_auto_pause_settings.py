"""Auto-pause settings: a channel's default and a broadcast's own, checked and shown."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import Api


def test_a_channel_default_and_a_broadcast_override_are_kept_and_shown(api: Api) -> None:
    channel = api.channel(auto_pause={"failure_ratio": 0.3})
    assert channel["auto_pause"] == {"failure_ratio": 0.3, "last": 100}
    changed = api.ok(
        "patch",
        f"/v1/channels/{channel['id']}",
        json={"auto_pause": {"failure_ratio": 0.6, "last": 50}},
    )
    assert changed["auto_pause"] == {"failure_ratio": 0.6, "last": 50}
    api.contact(api.account(channel["id"])["id"], "ap-1")
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    inherits = api.broadcast(channel["id"], send_at=later)
    assert inherits["auto_pause"] is None
    off = api.broadcast(channel["id"], send_at=later, auto_pause={"failure_ratio": None})
    assert off["auto_pause"] == {"failure_ratio": None, "last": 100}
    patched = api.ok(
        "patch",
        f"/v1/broadcasts/{inherits['id']}",
        json={"auto_pause": {"failure_ratio": 0.9, "last": 10}},
    )
    assert patched["auto_pause"] == {"failure_ratio": 0.9, "last": 10}
    copy = api.ok("post", f"/v1/broadcasts/{patched['id']}/clone", 201)
    assert copy["auto_pause"] == {"failure_ratio": 0.9, "last": 10}
    cleared = api.ok("patch", f"/v1/channels/{channel['id']}", json={"auto_pause": None})
    assert cleared["auto_pause"] is None


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ({"failure_ratio": 0}, "auto_pause.failure_ratio"),
        ({"failure_ratio": 1.5}, "auto_pause.failure_ratio"),
        ({"failure_ratio": 0.5, "last": 5}, "auto_pause.last"),
        ({"failure_ratio": 0.5, "last": 100_000}, "auto_pause.last"),
        ({"last": 50}, "auto_pause.failure_ratio"),
        ({"failure_ratio": 0.5, "window": 3}, "auto_pause.window"),
    ],
)
def test_a_bad_setting_names_its_field(api: Api, setting: dict[str, object], field: str) -> None:
    response = api.post(
        "/v1/channels",
        json={
            "name": "ap",
            "kind": "webhook",
            "config": {"url": "http://127.0.0.1:9/h", "secret": "s3cret-webhook-key-0001"},
            "auto_pause": setting,
        },
    )
    assert response.status_code == 422, response.text
    assert [e["field"] for e in response.json()["errors"]] == [field]
