"""The LINE adapter: the requests a message makes, its retry keys, and how each answer is
judged (a fake HTTP client; the pipeline against the simulator is in tests/e2e/test_line.py).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, cast

import pytest

from services.dispatcher.channels.base import (
    MediaRef,
    OutboundMessage,
    Outcome,
    Permanent,
    Sent,
    Transient,
)
from services.dispatcher.channels.client import Answer, HttpClient
from services.dispatcher.channels.line import LineAdapter, retry_key
from tests.dispatcher.test_graph_adapter import FakeHttp

TOKEN = "lineSecretChannelToken"
IMG = tuple(
    MediaRef(i, f"https://api.test/media/{i}?s={i}", "image/png", f"k{i}") for i in range(7)
)
KEY = str(uuid.uuid4())
USERS = [f"U{uuid.UUID(int=i + 1).hex}" for i in range(3)]


def line(http: Any = None) -> LineAdapter:
    config = {"channel_access_token": TOKEN, "api_base_url": "https://line.test/"}
    return LineAdapter(config, cast(HttpClient, http or FakeHttp(lambda i: pushed())))


def pushed() -> Answer:
    body = {"sentMessages": [{"id": "461230966842064897", "quoteToken": "q"}]}
    return Answer(200, {"x-line-request-id": "req-1"}, json.dumps(body).encode())


def refused(status: int, message: str, **headers: str) -> Answer:
    return Answer(status, headers, json.dumps({"message": message}).encode())


def judge(answer: Answer) -> Outcome:
    return line().judge(answer)


def test_text_and_images_go_five_objects_a_request_text_first() -> None:
    requests = line().requests(OutboundMessage(1, "hello", IMG))
    assert [len(r) for r in requests] == [5, 3]
    assert requests[0][0] == {"type": "text", "text": "hello"}
    assert requests[0][1] == {
        "type": "image",
        "originalContentUrl": IMG[0].url,
        "previewImageUrl": IMG[0].url,
    }
    assert line().requests(OutboundMessage(1, "just text")) == [
        [{"type": "text", "text": "just text"}]
    ]


def test_the_retry_key_is_the_calls_key_then_one_derived_per_part_and_always_a_uuid() -> None:
    assert retry_key(KEY, 0) == KEY
    later = retry_key(KEY, 1)
    assert later != KEY
    assert retry_key(KEY, 1) == later, "the same part gets the same key every time"
    assert retry_key(KEY, 2) not in (KEY, later)
    uuid.UUID(retry_key("12345", 0))  # a delivery id is made a UUID too


def test_a_multicast_carries_every_user_and_each_part_its_own_key() -> None:
    http = FakeHttp(lambda i: Answer(200, {"x-line-request-id": f"r{i}"}, b"{}"))
    outcome = asyncio.run(
        line(http).send_many(OutboundMessage(1, "hi", IMG[:5]), USERS, KEY, parts_done=0)
    )
    assert outcome == Sent("r0,r1")
    (url0, body0, headers0), (url1, body1, headers1) = http.calls
    assert url0 == url1 == "https://line.test/v2/bot/message/multicast"
    assert body0["to"] == body1["to"] == USERS
    assert (headers0["X-Line-Retry-Key"], headers1["X-Line-Retry-Key"]) == (
        KEY,
        retry_key(KEY, 1),
    )
    assert headers0["Authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in url0


def test_a_retry_skips_the_parts_accepted_and_keeps_their_keys() -> None:
    http = FakeHttp(lambda i: Answer(200, {}, b"{}"))
    asyncio.run(line(http).send_many(OutboundMessage(1, "hi", IMG[:5]), USERS, KEY, parts_done=1))
    [(_, body, headers)] = http.calls
    assert [m["type"] for m in body["messages"]] == ["image"]
    assert headers["X-Line-Retry-Key"] == retry_key(KEY, 1)


def test_one_user_goes_by_push_with_its_message_ids() -> None:
    http = FakeHttp(lambda i: pushed())
    outcome = asyncio.run(line(http).send(OutboundMessage(1, "hi"), USERS[0], KEY))
    assert outcome == Sent("461230966842064897")
    [(url, body, _)] = http.calls
    assert url == "https://line.test/v2/bot/message/push"
    assert body["to"] == USERS[0]


def test_a_repeat_of_an_accepted_key_counts_as_sent_with_the_first_requests_id() -> None:
    answer = refused(
        409, "The retry key is already accepted", **{"x-line-accepted-request-id": "first-req"}
    )
    assert judge(answer) == Sent("first-req")
    # A 409 without the accepted id is not LINE saying the call was made.
    assert isinstance(judge(refused(409, "Conflict")), Permanent)


@pytest.mark.parametrize(
    ("answer", "throttled", "refused_", "wait"),
    [
        (refused(429, "The API rate limit has been exceeded."), True, False, 1.0),
        (refused(429, "slow", **{"retry-after": "7"}), True, False, 7.0),
        (refused(429, "You have reached your monthly limit."), False, True, None),
        (refused(401, "Authentication failed"), False, True, None),
        (refused(403, "Not authorized to use this feature"), False, True, None),
        (refused(500, "An error occurred"), False, False, None),
        (Answer(502, {}, b"<html>bad gateway</html>"), False, False, None),
    ],
)
def test_answers_that_are_not_a_verdict_on_the_users(
    answer: Answer, throttled: bool, refused_: bool, wait: float | None
) -> None:
    outcome = judge(answer)
    assert isinstance(outcome, Transient)
    assert (outcome.throttled, outcome.refused, outcome.retry_after) == (throttled, refused_, wait)
    assert outcome.reason.startswith(f"LINE HTTP {answer.status}")


def test_a_refused_push_fails_its_user_and_a_refused_multicast_pauses_the_broadcast() -> None:
    bad = refused(400, "The request body has 1 error(s)")
    http = FakeHttp(lambda i: bad)
    push = asyncio.run(line(http).send(OutboundMessage(1, "hi"), USERS[0], KEY))
    assert isinstance(push, Permanent)
    assert push.reason == "LINE HTTP 400: The request body has 1 error(s)"
    many = asyncio.run(line(http).send_many(OutboundMessage(1, "hi"), USERS, KEY))
    assert isinstance(many, Transient)
    assert many.refused, "every multicast would be refused alike"


def test_a_detail_of_the_error_is_kept_and_the_token_never_is() -> None:
    body = {
        "message": f"The request body has 1 error(s) for {TOKEN}",
        "details": [{"message": "May not be empty", "property": "messages[0].text"}],
    }
    outcome = judge(Answer(400, {}, json.dumps(body).encode()))
    assert isinstance(outcome, Permanent)
    assert TOKEN not in outcome.reason
    assert "<channel access token>" in outcome.reason
    assert outcome.reason.endswith("(messages[0].text: May not be empty)")


def test_a_multicast_of_more_than_500_users_is_refused_before_any_call() -> None:
    http = FakeHttp()
    too_many = [f"U{uuid.UUID(int=i + 1).hex}" for i in range(501)]
    with pytest.raises(ValueError, match="at most 500"):
        asyncio.run(line(http).send_many(OutboundMessage(1, "hi"), too_many, KEY))
    assert http.calls == []
