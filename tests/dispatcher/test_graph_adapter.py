"""Messenger and Instagram adapters: the Send API calls a message makes, how every kind of
answer is judged, and the adapters against the simulator's Graph endpoints on loopback.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest
from aiohttp import web

from services.dispatcher.channels import make_adapter
from services.dispatcher.channels.base import (
    MediaRef,
    OutboundMessage,
    Outcome,
    Permanent,
    Sent,
    Transient,
)
from services.dispatcher.channels.client import Answer, HttpClient
from services.dispatcher.channels.graph import GraphAdapter, InstagramAdapter, MessengerAdapter
from services.dispatcher.channels.http import UNREACHABLE_PROVIDER
from services.simulator.app import SIMULATOR, HookConfig, Simulator, make_app
from shared.egress import Egress

TOKEN = "EAABsecretPageToken123"
IG_USER = "17841400000000001"
IMG = tuple(
    MediaRef(i, f"https://api.test/media/{i}?signature=s{i}", "image/jpeg", f"k{i}")
    for i in range(3)
)


def ok(mid: str = "m_1") -> Answer:
    return Answer(200, {}, json.dumps({"recipient_id": "1", "message_id": mid}).encode())


def graph_error(
    status: int,
    code: int,
    message: str = "something",
    subcode: int | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    error: dict[str, Any] = {"message": message, "type": "OAuthException", "code": code}
    if subcode is not None:
        error["error_subcode"] = subcode
    error["fbtrace_id"] = "AbCdEf"
    return Answer(status, headers or {}, json.dumps({"error": error}).encode())


class FakeHttp:
    """The HTTP client's ``post``: keeps each call, answers from ``answer`` (or raises it)."""

    def __init__(self, answer: Callable[[int], Answer | BaseException] | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        self.answer = answer or (lambda i: ok(f"m_{i}"))

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Answer:
        self.calls.append((url, json.loads(body), dict(headers)))
        got = self.answer(len(self.calls) - 1)
        if isinstance(got, BaseException):
            raise got
        return got


def config(base: str = "https://graph.test", **more: Any) -> dict[str, Any]:
    return {"page_access_token": TOKEN, "api_version": "v21.0", "api_base_url": base, **more}


def messenger(http: Any = None, base: str = "https://graph.test/") -> MessengerAdapter:
    return MessengerAdapter(config(base), cast(HttpClient, http or FakeHttp()))


def instagram(http: Any = None, base: str = "https://graph.test") -> InstagramAdapter:
    return InstagramAdapter(config(base, ig_user_id=IG_USER), cast(HttpClient, http or FakeHttp()))


def run(coro: Awaitable[Outcome]) -> Outcome:
    async def wrapped() -> Outcome:
        return await coro

    return asyncio.run(wrapped())


# --- the calls a message makes --------------------------------------------------------------


def test_each_adapter_posts_to_its_send_api_url_with_no_token_in_it() -> None:
    assert messenger().url == "https://graph.test/v21.0/me/messages"
    assert instagram().url == f"https://graph.test/v21.0/{IG_USER}/messages"
    for adapter in (messenger(), instagram()):
        assert TOKEN not in adapter.url
    assert isinstance(make_adapter("messenger", config(), None, None), MessengerAdapter)  # type: ignore[arg-type]
    made = make_adapter("instagram", config(ig_user_id=IG_USER), None, None)  # type: ignore[arg-type]
    assert isinstance(made, InstagramAdapter)


@pytest.mark.parametrize("make", [messenger, instagram])
def test_text_goes_first_then_one_call_per_image_inside_the_window(
    make: Callable[[FakeHttp], GraphAdapter],
) -> None:
    http = FakeHttp()
    adapter = make(http)
    outcome = run(adapter.send(OutboundMessage(1, "hello", IMG), "4242", "77"))
    assert outcome == Sent("m_0,m_1,m_2,m_3")
    assert [body for _, body, _ in http.calls] == [
        {"recipient": {"id": "4242"}, "messaging_type": "UPDATE", "message": {"text": "hello"}},
        *(
            {
                "recipient": {"id": "4242"},
                "messaging_type": "UPDATE",
                "message": {
                    "attachment": {"type": "image", "payload": {"url": m.url, "is_reusable": True}}
                },
            }
            for m in IMG
        ),
    ]
    for i, (url, _, headers) in enumerate(http.calls):
        assert url == adapter.url
        assert TOKEN not in url
        assert headers == {
            "Authorization": f"Bearer {TOKEN}",
            "Content-Type": "application/json",
            "Idempotency-Key": f"77-{i}",
        }


def test_a_message_of_one_call_carries_the_delivery_key_itself() -> None:
    http = FakeHttp()
    assert run(messenger(http).send(OutboundMessage(1, "hi"), "1", "77")) == Sent("m_0")
    assert http.calls[0][2]["Idempotency-Key"] == "77"
    http = FakeHttp()
    run(instagram(http).send(OutboundMessage(1, None, IMG[:1]), "1", "78"))
    assert [body["message"]["attachment"]["type"] for _, body, _ in http.calls] == ["image"]
    assert http.calls[0][2]["Idempotency-Key"] == "78"


@pytest.mark.parametrize("make", [messenger, instagram])
def test_a_tagged_message_goes_as_message_tag_with_its_tag(
    make: Callable[[FakeHttp], GraphAdapter],
) -> None:
    http = FakeHttp()
    run(make(http).send(OutboundMessage(1, "we replied", IMG[:1], tag="HUMAN_AGENT"), "9", "5"))
    for _, body, _ in http.calls:
        assert (body["messaging_type"], body["tag"]) == ("MESSAGE_TAG", "HUMAN_AGENT")
    untagged = FakeHttp()
    run(make(untagged).send(OutboundMessage(1, "inside"), "9", "6"))
    assert "tag" not in untagged.calls[0][1]


def test_messenger_splits_long_text_at_whitespace_into_messages_of_at_most_2000() -> None:
    words = [f"word{i}" for i in range(900)]  # about 6000 characters
    text = " ".join(words)
    parts = messenger().texts(text)
    assert len(parts) == 4
    assert all(len(p) <= 2000 for p in parts)
    assert " ".join(parts) == text, "no word is cut, nothing is lost"
    assert all(p == p.strip() for p in parts)
    http = FakeHttp()
    outcome = run(messenger(http).send(OutboundMessage(1, text, IMG[:1]), "1", "k"))
    assert isinstance(outcome, Sent)
    sent = [body["message"] for _, body, _ in http.calls]
    assert [m.get("text") for m in sent[:-1]] == parts
    assert "attachment" in sent[-1], "the image after the whole text"
    assert messenger().texts("short one") == ["short one"]
    assert messenger().texts("") == []


def test_a_split_prefers_a_line_break_and_cuts_mid_word_only_when_it_must() -> None:
    first = "a" * 1500
    text = f"{first}\n{'b ' * 400}"
    assert messenger().texts(text)[0] == first
    unbroken = "x" * 4500
    assert messenger().texts(unbroken) == ["x" * 2000, "x" * 2000, "x" * 500]


def test_instagram_measures_text_in_bytes_of_utf8_up_to_1000() -> None:
    ascii_text = " ".join(["abcdefghi"] * 250)  # 2499 characters
    parts = instagram().texts(ascii_text)
    assert all(len(p.encode()) <= 1000 for p in parts)
    assert " ".join(parts) == ascii_text
    accented = "é" * 1500  # 3000 bytes, no whitespace
    parts = instagram().texts(accented)
    assert parts == ["é" * 500, "é" * 500, "é" * 500]
    emoji = "🙂" * 300  # 4 bytes each: never cut inside one
    assert instagram().texts(emoji) == ["🙂" * 250, "🙂" * 50]
    # The same text fits one Messenger message.
    assert messenger().texts(accented) == [accented]


def test_a_retry_skips_parts_already_accepted() -> None:
    http = FakeHttp()
    outcome = run(
        messenger(http).send(OutboundMessage(1, "hello", IMG), "4242", "77", parts_done=2)
    )
    assert outcome == Sent("m_0,m_1")
    assert [h["Idempotency-Key"] for _, _, h in http.calls] == ["77-2", "77-3"]
    assert [b["message"]["attachment"]["payload"]["url"] for _, b, _ in http.calls] == [
        IMG[1].url,
        IMG[2].url,
    ]


def test_a_pause_stops_the_message_between_its_parts() -> None:
    http = FakeHttp()
    allowed = iter([False])
    outcome = run(
        instagram(http).send(
            OutboundMessage(1, "hello", IMG), "1", "77", may_go_on=lambda: next(allowed)
        )
    )
    assert outcome == Transient(
        "held back before part 2 of 4", parts_done=1, provider_message_id="m_0", held_back=True
    )
    assert len(http.calls) == 1


def test_a_part_refused_after_others_were_accepted_reports_them() -> None:
    http = FakeHttp(lambda i: ok(f"m_{i}") if i < 2 else graph_error(400, 100, "(#100) Bad url"))
    outcome = run(messenger(http).send(OutboundMessage(1, "hello", IMG), "1", "77"))
    assert outcome == Permanent(
        "Messenger 100: (#100) Bad url", parts_done=2, provider_message_id="m_0,m_1"
    )


# --- how answers are judged -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (ok("m_abc"), Sent("m_abc")),
        (Answer(200, {}, b"{}"), Sent(None)),
        (Answer(200, {}, b"not json"), Sent(None)),
        (
            graph_error(400, 613, "Calls to this api have exceeded the rate limit."),
            Transient(
                "Messenger 613: Calls to this api have exceeded the rate limit.",
                1.0,
                throttled=True,
            ),
        ),
        (
            graph_error(400, 613, "slow", headers={"retry-after": "7"}),
            Transient("Messenger 613: slow", 7.0, throttled=True),
        ),
        (
            graph_error(400, 4, "app limit"),
            Transient("Messenger 4: app limit", 1.0, throttled=True),
        ),
        (
            graph_error(400, 17, "user limit"),
            Transient("Messenger 17: user limit", 1.0, throttled=True),
        ),
        (
            graph_error(400, 32, "page limit"),
            Transient("Messenger 32: page limit", 1.0, throttled=True),
        ),
        (
            graph_error(400, 80006, "messenger limit"),
            Transient("Messenger 80006: messenger limit", 1.0, throttled=True),
        ),
        (
            Answer(429, {"retry-after": "3"}, b""),
            Transient("Messenger HTTP 429", 3.0, throttled=True),
        ),
        (
            graph_error(500, 2, "Service temporarily unavailable"),
            Transient("Messenger 2: Service temporarily unavailable"),
        ),
        (
            graph_error(400, 1, "An unknown error occurred."),
            Transient("Messenger 1: An unknown error occurred."),
        ),
        (Answer(503, {}, b"<html>down</html>"), Transient("Messenger HTTP 503")),
        (
            graph_error(400, 551, "This person isn't available right now.", 1545041),
            Permanent(
                "Messenger 551/1545041: This person isn't available right now.", unreachable=True
            ),
        ),
        (
            graph_error(400, 100, "No matching user found", 2018001),
            Permanent("Messenger 100/2018001: No matching user found", unreachable=True),
        ),
        (
            graph_error(400, 10, "(#10) This message is sent outside of allowed window.", 2018278),
            Permanent(
                "Messenger 10/2018278: (#10) This message is sent outside of allowed window."
            ),
        ),
        (
            graph_error(403, 200, "(#200) This message is sent outside of allowed window."),
            Permanent("Messenger 200: (#200) This message is sent outside of allowed window."),
        ),
        (
            graph_error(400, 190, "Error validating access token: Session has expired"),
            Transient(
                "Messenger 190: Error validating access token: Session has expired",
                refused=True,
                by_provider=True,
            ),
        ),
        (
            graph_error(403, 10, "(#10) Application does not have permission for this action"),
            Transient(
                "Messenger 10: (#10) Application does not have permission for this action",
                refused=True,
                by_provider=True,
            ),
        ),
        (
            graph_error(403, 230, "(#230) Requires pages_messaging permission"),
            Transient(
                "Messenger 230: (#230) Requires pages_messaging permission",
                refused=True,
                by_provider=True,
            ),
        ),
        (
            graph_error(
                400, 10, "(#10) This person isn't receiving messages from you right now.", 2018108
            ),
            Permanent(
                "Messenger 10/2018108: (#10) This person isn't receiving messages from you right "
                "now."
            ),
        ),
        (
            graph_error(
                403, 200, "(#200) This person isn't receiving messages from you right now."
            ),
            Permanent(
                "Messenger 200: (#200) This person isn't receiving messages from you right now."
            ),
        ),
        (
            graph_error(400, 100, "(#100) Invalid parameter", 2018047),
            Permanent("Messenger 100/2018047: (#100) Invalid parameter"),
        ),
        (Answer(404, {}, b"no"), Permanent("Messenger HTTP 404")),
        (Answer(302, {"location": "http://10.0.0.1/"}, b""), Permanent("Messenger HTTP 302")),
        (
            graph_error(302, 2, "redirected"),
            Permanent("Messenger 2: redirected"),
        ),
    ],
)
def test_answers_are_judged_by_their_graph_code(answer: Answer, expected: Outcome) -> None:
    http = FakeHttp(lambda _: answer)
    assert run(messenger(http).send(OutboundMessage(1, "hi"), "1", "k")) == expected


def test_instagram_reasons_name_instagram() -> None:
    http = FakeHttp(lambda _: graph_error(400, 551, "This person isn't available right now."))
    assert run(instagram(http).send(OutboundMessage(1, "hi"), "1", "k")) == Permanent(
        "Instagram 551: This person isn't available right now.", unreachable=True
    )


def test_the_token_never_reaches_a_reason() -> None:
    quoted = f"Malformed access token {TOKEN}"
    for code in (190, 100, 2, 613):
        http = FakeHttp(lambda _, c=code: graph_error(400, c, quoted))  # type: ignore[misc]
        outcome = run(messenger(http).send(OutboundMessage(1, "hi"), "1", "k"))
        assert isinstance(outcome, Transient | Permanent)
        assert TOKEN not in outcome.reason
        assert "Malformed access token <access token>" in outcome.reason


def test_no_answer_is_transient_and_a_token_http_cannot_carry_pauses() -> None:
    http = FakeHttp(lambda _: TimeoutError())
    assert run(messenger(http).send(OutboundMessage(1, "hi"), "1", "k")) == Transient(
        UNREACHABLE_PROVIDER
    )
    http = FakeHttp(lambda _: ValueError("header Authorization holds a line break or NUL"))
    outcome = run(instagram(http).send(OutboundMessage(1, "hi"), "1", "k"))
    assert isinstance(outcome, Transient)
    assert outcome.refused
    assert TOKEN not in outcome.reason


def test_an_odd_error_body_is_still_judged_and_fit_to_store() -> None:
    for body in (
        b'{"error": "not an object"}',
        b'{"error": {"code": "613", "message": 5}}',
        b'{"error": {"code": true, "error_subcode": [1]}}',
        b"[1, 2]",
    ):
        http = FakeHttp(lambda _, b=body: Answer(400, {}, b))  # type: ignore[misc]
        assert run(messenger(http).send(OutboundMessage(1, "hi"), "1", "k")) == Permanent(
            "Messenger HTTP 400"
        )
    http = FakeHttp(lambda _: graph_error(400, 551, "line\nbreak\x00 " + "z" * 400))
    outcome = run(messenger(http).send(OutboundMessage(1, "hi"), "1", "k"))
    assert isinstance(outcome, Permanent)
    assert "\n" not in outcome.reason
    assert "\x00" not in outcome.reason
    assert len(outcome.reason) < 300


# --- against the simulator ------------------------------------------------------------------


@asynccontextmanager
async def simulator() -> AsyncIterator[tuple[str, Simulator, HttpClient]]:
    """The simulator on a loopback port of this loop, and an HTTP client allowed to reach it."""
    app = make_app()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    http = HttpClient(Egress(allow_private=True), max_in_flight=4, timeout_seconds=10)
    try:
        yield f"http://{host}:{port}", app[SIMULATOR], http
    finally:
        await http.close()
        await runner.cleanup()


def against_simulator(
    check: Callable[[str, Simulator, HttpClient], Awaitable[None]],
) -> None:
    async def go() -> None:
        async with simulator() as (url, sim, http):
            await check(url, sim, http)

    asyncio.run(go())


def test_the_simulator_takes_what_the_adapters_send_and_records_it() -> None:
    async def check(url: str, sim: Simulator, http: HttpClient) -> None:
        fb = MessengerAdapter(config(f"{url}/messenger/fb"), http)
        ig = InstagramAdapter(config(f"{url}/instagram/ig", ig_user_id=IG_USER), http)
        long = " ".join(["palabra"] * 400)  # 3199 characters: two Messenger messages
        for adapter, name in ((fb, "fb"), (ig, "ig")):
            outcome = await adapter.send(OutboundMessage(1, long, IMG[:2]), "555", "9")
            assert isinstance(outcome, Sent)
            records = sim.hook(name).records
            assert {r["status"] for r in records} == {200}, "no part over the provider's limit"
            ids = (outcome.provider_message_id or "").split(",")
            assert len(ids) == len(records)
            assert all(i.startswith("m_sim-") for i in ids)
            assert " ".join(r["text"] for r in records if r["text"]) == long
            assert [r["url"] for r in records if r["url"]] == [m.url for m in IMG[:2]]
            assert {(r["to"], r["messaging_type"], r["tag"]) for r in records} == {
                ("555", "UPDATE", None)
            }
            assert {r["authorization"] for r in records} == {f"Bearer {TOKEN}"}
            assert not any(TOKEN in r["path"] + r["query"] for r in records)
        assert len(sim.hook("fb").records) == 2 + 2
        assert len(sim.hook("ig").records) == 4 + 2
        assert {r["ig_user_id"] for r in sim.hook("ig").records} == {IG_USER}
        assert {r["version"] for r in sim.hook("fb").records} == {"v21.0"}

    against_simulator(check)


def test_the_simulator_refuses_outside_the_window_unless_tagged() -> None:
    async def check(url: str, sim: Simulator, http: HttpClient) -> None:
        sim.configure("fb", HookConfig(outside_window=["7"]))
        sim.configure("ig", HookConfig(outside_window=["7"]))
        fb = MessengerAdapter(config(f"{url}/messenger/fb"), http)
        ig = InstagramAdapter(config(f"{url}/instagram/ig", ig_user_id=IG_USER), http)
        assert await fb.send(OutboundMessage(1, "hi"), "7", "1") == Permanent(
            "Messenger 10/2018278: (#10) This message is sent outside of allowed window."
        )
        assert isinstance(await fb.send(OutboundMessage(1, "hi"), "8", "2"), Sent)
        tagged = OutboundMessage(1, "hi", tag="POST_PURCHASE_UPDATE")
        assert isinstance(await fb.send(tagged, "7", "3"), Sent)
        assert await ig.send(OutboundMessage(1, "hi"), "7", "4") == Permanent(
            "Instagram 10/2018278: (#10) This message is sent outside of allowed window."
        )
        refused = await ig.send(tagged, "7", "5")
        assert isinstance(refused, Permanent)
        assert refused.reason.startswith("Instagram 100:")
        assert not refused.unreachable
        human = OutboundMessage(1, "hi", tag="HUMAN_AGENT")
        assert isinstance(await ig.send(human, "7", "6"), Sent)

    against_simulator(check)


def test_the_simulator_answers_graph_errors_the_adapters_judge_as_meant() -> None:
    async def check(url: str, sim: Simulator, http: HttpClient) -> None:
        sim.configure("gone", HookConfig(fail_addresses=["3"]))
        sim.configure("busy", HookConfig(throttle_ratio=1.0, retry_after=2.5))
        sim.configure("down", HookConfig(error_ratio=1.0))
        sim.configure("token", HookConfig(error_code=190))

        def fb(name: str) -> MessengerAdapter:
            return MessengerAdapter(config(f"{url}/messenger/{name}"), http)

        message = OutboundMessage(1, "hi")
        assert await fb("gone").send(message, "3", "1") == Permanent(
            "Messenger 551/1545041: This person isn't available right now.", unreachable=True
        )
        assert await fb("busy").send(message, "3", "2") == Transient(
            "Messenger 613: Calls to this api have exceeded the rate limit.", 2.5, throttled=True
        )
        assert await fb("down").send(message, "3", "3") == Transient(
            "Messenger 2: Service temporarily unavailable"
        )
        assert await fb("token").send(message, "3", "4") == Transient(
            "Messenger 190: (#190) Simulated error", refused=True, by_provider=True
        )
        # No token at all: what Graph answers an unauthenticated call.
        got = await http.post(
            f"{url}/messenger/bare/v21.0/me/messages",
            b'{"recipient": {"id": "1"}, "messaging_type": "UPDATE", "message": {"text": "x"}}',
            {"Content-Type": "application/json"},
        )
        assert got.status == 400
        assert json.loads(got.body)["error"]["code"] == 190

    against_simulator(check)
