"""LINE through the whole pipeline: multicast of up to 500 users a call, push for one, the
retry key that makes a repeated call harmless, even after a dispatcher is killed mid-call.
"""

from __future__ import annotations

import signal
import uuid
from collections import Counter
from typing import Any

import pytest

from tests.e2e.conftest import Api, System, wait_for
from tests.e2e.test_channels import images, recipients

pytestmark = pytest.mark.e2e


def users(n: int, seed: int = 0) -> list[str]:
    return [f"U{uuid.UUID(int=seed * 10**6 + i + 1).hex}" for i in range(n)]


def audience(api: Api, channel: dict[str, Any], addresses: list[str]) -> dict[str, Any]:
    account = api.account(channel["id"])
    api.import_contacts(account["id"], addresses)
    return {"account_ids": [account["id"]]}


def reached(api: Api, hook: str) -> Counter[str]:
    """How many accepted calls reached each user."""
    return Counter(u for r in api.sim_requests(hook) if r["status"] == 200 for u in r["to"])


def test_multicast_carries_up_to_500_users_a_call_and_reaches_each_once(api: Api) -> None:
    channel, hook = api.channel("line")
    addresses = users(1234)
    media = images(api, 1)
    b = api.broadcast(
        channel["id"],
        audience(api, channel, addresses),
        content={"text": "Sale today", "media_ids": media},
    )
    done = api.wait_status(b["id"], "completed", timeout=60)
    assert done["counts"]["sent"] == 1234
    calls = api.sim_requests(hook)
    assert {r["endpoint"] for r in calls} == {"multicast"}
    assert all(1 <= len(r["to"]) <= 500 for r in calls)
    assert len(calls) < 1234 / 100, "users go many to a call, not one by one"
    assert reached(api, hook) == Counter(addresses), "every user once, no one twice"
    for r in calls:
        uuid.UUID(r["key"])  # X-Line-Retry-Key is a UUID
        assert r["authorization"] == f"Bearer {channel['secret']}"
        assert [m["type"] for m in r["messages"]] == ["text", "image"]
        assert r["messages"][0]["text"] == "Sale today"
        image = r["messages"][1]
        assert "signature=" in image["originalContentUrl"]
        assert image["previewImageUrl"] == image["originalContentUrl"]
    assert len({r["key"] for r in calls}) == len(calls), "each call its own key"


def test_more_than_five_message_objects_go_in_several_requests_each_to_the_same_users(
    api: Api,
) -> None:
    channel, hook = api.channel("line")
    addresses = users(3, seed=1)
    media = images(api, 6)  # text and six images: seven objects, five at most a request
    b = api.broadcast(
        channel["id"],
        audience(api, channel, addresses),
        content={"text": "Catalogue", "media_ids": media},
    )
    api.wait_status(b["id"], "completed", timeout=60)
    calls = api.sim_requests(hook)
    assert [len(r["messages"]) for r in calls] == [5, 2]
    assert [sorted(r["to"]) for r in calls] == [sorted(addresses)] * 2
    assert calls[0]["key"] != calls[1]["key"]


def test_personalised_text_goes_to_each_user_by_push(api: Api) -> None:
    channel, hook = api.channel("line")
    addresses = users(3, seed=2)
    b = api.broadcast(
        channel["id"], audience(api, channel, addresses), content={"text": "Hi {{name}}!"}
    )
    api.wait_status(b["id"], "completed", timeout=60)
    calls = api.sim_requests(hook)
    assert {r["endpoint"] for r in calls} == {"push"}
    assert sorted((r["to"][0], r["messages"][0]["text"]) for r in calls) == sorted(
        (a, f"Hi N {a}!") for a in addresses
    )
    [row, *_] = recipients(api, b["id"])
    assert row["provider_message_id"], "a push answers its message ids"


def test_a_failed_call_is_repeated_under_its_key_and_a_throttle_is_waited_out(api: Api) -> None:
    channel, hook = api.channel("line", transient_first=1, throttle_ratio=0.3, seed=7)
    addresses = users(700, seed=3)
    b = api.broadcast(channel["id"], audience(api, channel, addresses), content={"text": "x"})
    done = api.wait_status(b["id"], "completed", timeout=90)
    assert done["counts"]["sent"] == 700
    calls = api.sim_requests(hook)
    statuses = Counter(r["status"] for r in calls)
    assert statuses[500] >= 1, statuses
    assert statuses[429] >= 1, statuses
    by_key: dict[str, list[int]] = {}
    for r in calls:
        by_key.setdefault(r["key"], []).append(r["status"])
    # A call answered 500 is repeated under its key until accepted: the retry is that call.
    # (A call throttled with 429 was not taken: its rows may go in a new call.)
    failed = [s for s in by_key.values() if 500 in s]
    assert failed
    assert all(s[-1] == 200 for s in failed), by_key
    assert reached(api, hook) == Counter(addresses)


def test_a_refused_token_pauses_the_broadcast_with_the_reason(api: Api) -> None:
    channel, _ = api.channel("line", error_code=401)
    b = api.broadcast(
        channel["id"], audience(api, channel, users(3, seed=4)), content={"text": "x"}
    )
    paused = api.wait_status(b["id"], "paused", timeout=60)
    assert "LINE HTTP 401" in paused["status_reason"]
    assert channel["secret"] not in str(paused)


def test_a_dispatcher_killed_mid_multicast_reaches_no_one_twice(api: Api, system: System) -> None:
    """The call is made, LINE carries it out, the dispatcher dies before the answer: the rows
    come back once the lease runs out and the call goes again under the same key, which LINE
    answers 409: counted as sent, delivered once.
    """
    procs = system.procs
    procs.stop("dispatcher")
    procs.start("victim", "dispatcher", "--processes", "1", "--threads", "4")
    try:
        channel, hook = api.channel("line", latency_ms=3000)
        addresses = users(900, seed=5)
        b = api.broadcast(channel["id"], audience(api, channel, addresses), content={"text": "x"})
        wait_for("a multicast under way", lambda: api.sim_stats(hook)["requests"] >= 1)
        procs.stop("victim", sig=signal.SIGKILL)
        system.sim.put(f"/_sim/hooks/{hook}", json={})  # answers fast from now on
    finally:
        procs.start("dispatcher", "dispatcher", "--processes", "1", "--threads", "4")
    done = api.wait_status(b["id"], "completed", timeout=120)
    assert done["counts"]["sent"] == 900
    calls = api.sim_requests(hook)
    repeats = [r for r in calls if r["status"] == 409]
    assert repeats, "a call was repeated after the kill"
    assert all(r["same_as_first"] for r in repeats), "each repeat carried the same users"
    assert reached(api, hook) == Counter(addresses), "every user once, no one twice"
