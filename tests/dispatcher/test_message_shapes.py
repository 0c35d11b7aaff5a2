"""Pure pieces of the send path: how messages are split into provider calls, Retry-After."""

from __future__ import annotations

import asyncio
import itertools
import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from services.dispatcher.channels.base import (
    MediaRef,
    OutboundMessage,
    Outcome,
    Permanent,
    Sent,
    Transient,
    join_ids,
    message_id,
    parse_retry_after,
    reason,
    send_in_parts,
    wait_asked,
)
from services.dispatcher.channels.client import Answer
from services.dispatcher.channels.http import json_object
from services.dispatcher.channels.telegram import TelegramAdapter, chat_gap
from services.dispatcher.channels.whatsapp import WhatsappAdapter
from services.simulator.app import max_in_window
from shared.domain.channels import normalize_address
from shared.domain.lifecycle import ChannelKind

IMG = tuple(MediaRef(i, f"https://api.test/media/{i}", "image/jpeg", f"k{i}") for i in range(3))


def telegram() -> TelegramAdapter:
    return TelegramAdapter({"bot_token": "1:abc", "api_base_url": "https://tg.test/"}, None)  # type: ignore[arg-type]


def whatsapp() -> WhatsappAdapter:
    config = {
        "access_token": "t",
        "phone_number_id": "1",
        "api_version": "v21.0",
        "api_base_url": "https://wa.test",
    }
    return WhatsappAdapter(config, None)  # type: ignore[arg-type]


def test_telegram_long_text_with_images_goes_after_them_as_its_own_message() -> None:
    long = "x" * 1500
    calls = telegram().calls(OutboundMessage(1, long, IMG), "42")
    assert [m for m, _ in calls] == ["sendMediaGroup", "sendMessage"]
    assert "caption" not in calls[0][1]["media"][0]
    assert calls[1][1] == {"chat_id": "42", "text": long}
    assert telegram().base == "https://tg.test/bot1:abc"


def test_telegram_never_asks_for_markup_so_user_text_is_sent_as_written() -> None:
    text = "<b>50% off</b> *today* [link](https://evil.example) _x_"
    for message in (OutboundMessage(1, text), OutboundMessage(1, text, IMG[:1])):
        for _, params in telegram().calls(message, "42"):
            assert "parse_mode" not in params
            media = params.get("media")
            assert not any("parse_mode" in m for m in media or [])
    assert telegram().calls(OutboundMessage(1, text), "42") == [
        ("sendMessage", {"chat_id": "42", "text": text})
    ]


def test_whatsapp_long_text_with_images_goes_first_then_one_message_per_image() -> None:
    parts = whatsapp().parts(OutboundMessage(1, "y" * 1500, IMG))
    assert [p["type"] for p in parts] == ["text", "image", "image", "image"]
    assert all("caption" not in p["image"] for p in parts[1:])
    short = whatsapp().parts(OutboundMessage(1, "hi", IMG[:2]))
    assert [p["image"].get("caption") for p in short] == ["hi", None]
    assert whatsapp().url == "https://wa.test/v21.0/1/messages"


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.5") == 0.5
    now = datetime(2026, 1, 1, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(later, now=now.timestamp()) == pytest.approx(30.0)
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_join_ids_keeps_earlier_parts() -> None:
    assert join_ids(None, []) is None
    assert join_ids("a,b", ["c"]) == "a,b,c"
    assert join_ids(None, ["c"]) == "c"
    assert join_ids("", ["c"]) == "c"
    assert join_ids(None, ["c", "d"]) == "c,d"
    assert join_ids(None, [""]) is None


@pytest.mark.parametrize(
    ("raw", "read"),
    [
        (b'{"id": "m-1"}', {"id": "m-1"}),
        (b'\xef\xbb\xbf{"id": "m-1"}', {"id": "m-1"}),  # a byte order mark first
        (' {"id": "\u00e9"} '.encode(), {"id": "\u00e9"}),
        (b'["m-1"]', {}),
        (b"\xff\xfe{}", {}),  # a UTF-16 byte order mark, then no JSON
        ('{"id": "x"}'.encode("utf-16"), {"id": "x"}),  # not UTF-8: read as json.loads reads it
        (b'{"id": "\xed\xa0\x80"}', {"id": "\ud800"}),  # a lone surrogate, as json.loads
        (b'{"id": "\xff"}', {}),  # not text in any encoding JSON allows
        (b'{"id": ', {}),
        (b'{"id": 1} trailing', {}),
        (b"", {}),
    ],
)
def test_an_answer_reads_as_its_json_object_or_none(raw: bytes, read: dict[str, str]) -> None:
    assert json_object(raw) == read


def test_most_arrivals_in_any_half_open_second() -> None:
    assert max_in_window([0.0, 0.5, 0.99, 1.0, 1.5], 1.0) == 3
    assert max_in_window([i * 0.05 for i in range(40)], 1.0) == 20
    assert max_in_window([], 1.0) == 0


@pytest.mark.parametrize(
    ("kind", "given", "stored"),
    [
        (ChannelKind.WHATSAPP, "49 (151) 123-45678", "+4915112345678"),
        (ChannelKind.SMTP, " Ann@Example.COM ", "ann@example.com"),
        (ChannelKind.TELEGRAM, "-1001234", "-1001234"),
        (ChannelKind.TELEGRAM, "@some_channel", "@some_channel"),
    ],
)
def test_addresses_are_stored_in_one_form(kind: ChannelKind, given: str, stored: str) -> None:
    assert normalize_address(kind, given) == stored


def test_a_several_part_message_stops_between_parts_when_told_and_goes_on_later() -> None:
    made: list[str] = []
    allowed = [True]

    async def call(index: int, key: str) -> Outcome:
        made.append(key)
        allowed[0] = False  # a pause lands while the first part is at the provider
        return Sent(f"m{index}")

    first = asyncio.run(send_in_parts(3, 0, "42", call, lambda: allowed[0]))
    assert made == ["42-0"]
    assert first == Transient(
        "held back before part 2 of 3", parts_done=1, provider_message_id="m0", held_back=True
    )
    allowed[0] = True
    rest = asyncio.run(send_in_parts(3, 1, "42", call, lambda: True))
    assert made == ["42-0", "42-1", "42-2"], "each part exactly once"
    assert rest == Sent("m1,m2")


def test_a_part_refused_after_others_were_accepted_reports_them() -> None:
    async def call(index: int, key: str) -> Outcome:
        return Permanent("no") if index == 2 else Sent(f"m{index}")

    outcome = asyncio.run(send_in_parts(3, 0, "7", call))
    assert outcome == Permanent("no", parts_done=2, provider_message_id="m0,m1")


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("HTTP 500: \x00oops\x00", "HTTP 500: oops"),
        ("line one\nline two", "line one line two"),
        ("x" * 600, "x" * 499 + "…"),
    ],
)
def test_a_providers_answer_is_always_fit_to_store_as_a_reason(given: str, stored: str) -> None:
    assert reason(given) == stored


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        (None, None),
        ("", None),
        ("wamid.1", "wamid.1"),
        ("a\x00b", "ab"),
        (42, "42"),
        ("x" * 300, "x" * 200),
        ("x" * 200, "x" * 200),
        ("a,b", "a b"),
        (" a  b ", "a b"),
        ("a\tb", "ab"),
        ("ü-1", "ü-1"),
        ("\u200b", None),
    ],
)
def test_provider_message_ids_are_kept_only_when_fit_to_store(
    given: object, kept: str | None
) -> None:
    assert message_id(given) == kept


@pytest.mark.parametrize(
    ("given", "seconds"),
    [
        ("2", 2.0),
        ("inf", 3600.0),
        ("1e30", 3600.0),
        ("-5", 0.0),
        ("nan", None),
        ("soon", None),
        (None, None),
    ],
)
def test_a_wait_a_provider_asks_for_is_finite_and_bounded(
    given: str | None, seconds: float | None
) -> None:
    assert parse_retry_after(given) == seconds
    if given is not None and seconds is not None:
        assert wait_asked(given) == seconds


def test_telegram_s_per_chat_gap_is_a_second_for_a_person_three_for_a_group() -> None:
    assert chat_gap("123456") == 1.0
    assert chat_gap("-1001234567890") == 3.0
    assert chat_gap("@news_channel") == 3.0


def test_the_parts_of_one_message_go_the_gap_apart() -> None:
    times: list[float] = []

    async def call(index: int, key: str) -> Outcome:
        times.append(asyncio.get_running_loop().time())
        return Sent(f"id-{index}")

    async def run() -> Outcome:
        return await send_in_parts(3, 0, "k", call, gap=0.2)

    outcome = asyncio.run(run())
    assert isinstance(outcome, Sent)
    assert len(times) == 3
    assert all(b - a >= 0.2 for a, b in itertools.pairwise(times))


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (131026, Permanent("WhatsApp 131026: x", unreachable=True)),
        (131047, Permanent("WhatsApp 131047: x")),
        (131049, Permanent("WhatsApp 131049: x")),
        (133010, Transient("WhatsApp 133010: x", refused=True, by_provider=True)),
        (132001, Transient("WhatsApp 132001: x", refused=True, by_provider=True)),
        (131056, Transient("WhatsApp 131056: x", 6.0)),
        (130429, Transient("WhatsApp 130429: x", 1.0, throttled=True)),
    ],
)
def test_whatsapp_errors_are_judged_by_what_each_code_means(code: int, expected: Outcome) -> None:
    body = json.dumps({"error": {"message": "x", "code": code}}).encode()

    class Http:
        async def post(self, url: str, body_: bytes, headers: dict[str, str]) -> Answer:
            return Answer(400, {}, body)

    adapter = WhatsappAdapter(
        {
            "access_token": "t",
            "phone_number_id": "1",
            "api_version": "v21.0",
            "api_base_url": "https://wa.test",
        },
        Http(),  # type: ignore[arg-type]
    )
    assert asyncio.run(adapter.send(OutboundMessage(1, "hi"), "+4915112345678", "7")) == expected
