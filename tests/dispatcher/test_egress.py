"""The egress rule, and every adapter under it: a channel reaches public addresses only, never
follows a redirect, and never hands back what an unknown peer said.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from services.dispatcher.channels import make_adapter
from services.dispatcher.channels.base import OutboundMessage, Outcome, Permanent, Sent, Transient
from services.dispatcher.channels.http import (
    MAX_ANSWER,
    UNREACHABLE_PROVIDER,
    clean,
    make_client,
    provider_message,
)
from services.dispatcher.channels.smtp import UNREACHABLE_SERVER
from services.dispatcher.retry import RetryPolicy, decide
from shared.domain.lifecycle import ChannelKind, DeliveryStatus
from shared.egress import Egress, EgressRefused, parse_literal, refusal
from shared.media_store import LocalMediaStore

STRICT = Egress(allow_private=False)
OPEN = Egress(allow_private=True)
MESSAGE = OutboundMessage(1, "hello")
BANNER = b"5.5.5-10.11.6-MariaDB-SECRET-BANNER\x00\x01\xff"


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("100.100.100.200", "not a public"),  # shared address space (Alibaba's metadata)
        ("100.64.0.1", "not a public"),
        ("0.0.0.0", "unspecified"),  # noqa: S104 - the address under test
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "private"),  # reserved, in Python's private list
        ("255.255.255.255", "private"),
        ("192.0.2.1", "private"),  # documentation
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fd00:ec2::254", "private"),  # AWS's IPv6 metadata address
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"),
        ("::127.0.0.1", "loopback"),  # IPv4-compatible
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),  # Teredo, client 127.0.0.1
    ],
)
def test_refused_addresses_say_why(address: str, why: str) -> None:
    said = refusal(ipaddress.ip_address(address))
    assert said is not None
    assert why in said
    with pytest.raises(EgressRefused, match="public internet"):
        STRICT.check(address)
    OPEN.check(address)  # the simulator's setting lets everything through


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "1.1.1.1"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None
    STRICT.check(address)


@pytest.mark.parametrize(
    ("spelling", "address"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("[::1]", "::1"),
        ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
        ("169.254.169.254.", "169.254.169.254"),
        ("fe80::1%eth0", "fe80::1"),
    ],
)
def test_every_spelling_of_an_address_is_read_as_the_address(spelling: str, address: str) -> None:
    assert str(parse_literal(spelling)) == address
    with pytest.raises(EgressRefused):
        STRICT.check_host(spelling)


@pytest.mark.parametrize(
    "name", ["localhost", "LOCALHOST.", "db.internal", "printer.local", "nats"]
)
def test_local_names_are_refused_before_any_lookup(name: str) -> None:
    assert parse_literal(name) is None
    with pytest.raises(EgressRefused, match="a local name"):
        STRICT.check_host(name)
    OPEN.check_host(name)


def test_public_names_are_left_to_the_check_at_connect_time() -> None:
    STRICT.check_host("api.telegram.org")
    STRICT.check_host("graph.facebook.com")


def test_the_socket_factory_refuses_before_a_socket_exists() -> None:
    with pytest.raises(EgressRefused):
        STRICT.socket((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80)))
    sock = OPEN.socket((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80)))
    sock.close()


def test_a_refused_send_spends_no_attempt_and_keeps_the_row_queued() -> None:
    policy = RetryPolicy(max_attempts=1, base_seconds=1, max_seconds=10)
    decision = decide(
        policy, Transient("refused", refused=True), attempts=1, parts_before=0, jitter=0.5
    )
    assert decision.status is DeliveryStatus.QUEUED
    assert decision.attempt_used is False


def test_provider_messages_are_cleaned_bounded_and_only_read_from_json() -> None:
    assert provider_message(b"<html>SECRET</html>", [("error",)]) is None
    assert provider_message(BANNER, [("error",)]) is None
    said = provider_message(
        b'{"error": {"message": "bad\\u0000 \\u001b[31mthing\\n"}}', [("error", "message")]
    )
    assert said == "bad [31mthing"
    assert len(clean("x" * 10_000)) <= 200
    assert clean("token t0k3n here", lambda t: t.replace("t0k3n", "<t>")) == "token <t> here"


# --- adapters against real sockets --------------------------------------------------------


class Peers:
    """Servers on loopback: an HTTP app that records every request, a raw TCP server that
    writes a banner, and a port nothing listens on.
    """

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.http_port = 0
        self.banner_port = 0
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.closed_port = s.getsockname()[1]

    async def _start(self) -> None:
        app = web.Application()

        async def record(request: web.Request) -> web.StreamResponse:
            self.requests.append(request.path)
            await request.read()
            if request.path.startswith("/redirect"):
                raise web.HTTPFound(f"http://127.0.0.1:{self.http_port}/internal/metrics")
            if request.path.startswith("/html"):
                return web.Response(status=500, text="<html>SECRET internal page</html>")
            if request.path.startswith("/huge"):
                # A 200 answer far larger than any provider's: streamed, no length given.
                stream = web.StreamResponse(status=200)
                await stream.prepare(request)
                for _ in range(256):
                    await stream.write(b"x" * 65536)
                return stream
            if request.path.startswith("/odd-id"):
                return web.Response(
                    status=200,
                    body=b'{"ok": true, "id": "\\ud800x\\u001b[1m", '
                    b'"result": {"message_id": "\\ud800"}, "messages": [{"id": "a\\u0000b"}]}',
                    content_type="application/json",
                )
            if request.path.startswith("/leak"):
                return web.json_response(
                    {"error": {"message": "Invalid OAuth access token EAAG-wa-token"}}, status=401
                )
            return web.json_response({"ok": True, "result": {"message_id": 1}, "id": "x"})

        app.router.add_route("*", "/{tail:.*}", record)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        async def banner(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(BANNER + b"\r\n")
            await writer.drain()
            writer.close()

        self.banner = await asyncio.start_server(banner, "127.0.0.1", 0)
        self.banner_port = self.banner.sockets[0].getsockname()[1]

    def start(self) -> None:
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    def stop(self) -> None:
        async def stop() -> None:
            self.banner.close()
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def peers() -> Iterator[Peers]:
    p = Peers()
    p.start()
    yield p
    p.stop()


def config_for(
    kind: ChannelKind, base: str, host: str = "127.0.0.1", port: int = 25
) -> dict[str, Any]:
    configs: dict[ChannelKind, dict[str, Any]] = {
        ChannelKind.WEBHOOK: {"url": base, "secret": "s" * 16},
        ChannelKind.TELEGRAM: {"bot_token": "1:tok", "api_base_url": base},
        ChannelKind.WHATSAPP: {
            "access_token": "EAAG-wa-token",
            "phone_number_id": "1",
            "api_version": "v21.0",
            "api_base_url": base,
        },
        ChannelKind.SMTP: {"host": host, "port": port, "from_address": "a@b.co", "starttls": False},
        ChannelKind.LINE: {"channel_access_token": "line-token", "api_base_url": base},
        ChannelKind.MESSENGER: {
            "page_access_token": "EAAB-page-token",
            "api_version": "v21.0",
            "api_base_url": base,
        },
        ChannelKind.INSTAGRAM: {
            "page_access_token": "IGQV-page-token",
            "ig_user_id": "1",
            "api_version": "v21.0",
            "api_base_url": base,
        },
    }
    return configs[kind]


def attempt(
    kind: ChannelKind, config: dict[str, Any], egress: Egress, message: OutboundMessage = MESSAGE
) -> Outcome:
    """One send through a fresh client session made as a dispatcher makes it."""

    async def go() -> Outcome:
        async with make_client(egress, max_in_flight=8, timeout_seconds=3) as http:
            a = make_adapter(kind, config, http, LocalMediaStore(Path("/nonexistent")), egress)
            try:
                return await a.send(message, ADDRESS[kind], "7")
            finally:
                await a.close()

    return asyncio.run(go())


ADDRESS = {
    ChannelKind.WEBHOOK: "r-1",
    ChannelKind.TELEGRAM: "42",
    ChannelKind.WHATSAPP: "+4915112345678",
    ChannelKind.SMTP: "ann@example.com",
    ChannelKind.LINE: "U" + "0" * 31 + "1",
    ChannelKind.MESSENGER: "1000000001",
    ChannelKind.INSTAGRAM: "1000000002",
}
HTTP_KINDS = [k for k in ChannelKind if k is not ChannelKind.SMTP]
LOOPBACK_SPELLINGS = ["127.0.0.1", "localhost", "2130706433", "[::ffff:127.0.0.1]", "127.1"]


@pytest.mark.parametrize("kind", list(ChannelKind))
@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_no_adapter_connects_to_loopback_in_any_spelling(
    kind: ChannelKind, host: str, peers: Peers
) -> None:
    if kind is ChannelKind.SMTP:
        config = config_for(kind, "", host=host.strip("[]"), port=peers.http_port)
    else:
        config = config_for(kind, f"http://{host}:{peers.http_port}/hook")
    before = len(peers.requests)
    outcome = attempt(kind, config, STRICT)
    assert isinstance(outcome, Transient), outcome
    assert outcome.refused, outcome
    assert outcome.reason.startswith("the channel's provider address is refused: ")
    assert len(peers.requests) == before, "a request reached the loopback server"


@pytest.mark.parametrize("kind", HTTP_KINDS)
def test_redirects_are_never_followed(kind: ChannelKind, peers: Peers) -> None:
    config = config_for(kind, f"http://127.0.0.1:{peers.http_port}/redirect")
    outcome = attempt(kind, config, OPEN)
    assert isinstance(outcome, Permanent), outcome
    assert "302" in outcome.reason
    assert not any(p.startswith("/internal") for p in peers.requests)


@pytest.mark.parametrize("kind", list(ChannelKind))
def test_an_unknown_peer_cannot_hand_its_banner_back_and_ports_read_alike(
    kind: ChannelKind, peers: Peers
) -> None:
    reasons = []
    for port in (peers.banner_port, peers.closed_port):
        if kind is ChannelKind.SMTP:
            config = config_for(kind, "", port=port)
        else:
            config = config_for(kind, f"http://127.0.0.1:{port}/hook")
        outcome = attempt(kind, config, OPEN)
        assert isinstance(outcome, Transient)
        assert not outcome.refused
        assert "SECRET" not in outcome.reason
        assert "MariaDB" not in outcome.reason
        reasons.append(outcome.reason)
    assert reasons[0] == reasons[1], "an open and a closed port must read alike"
    assert reasons[0] in (UNREACHABLE_PROVIDER, UNREACHABLE_SERVER)


@pytest.mark.parametrize("kind", HTTP_KINDS)
def test_an_error_page_is_summarised_never_quoted(kind: ChannelKind, peers: Peers) -> None:
    config = config_for(kind, f"http://127.0.0.1:{peers.http_port}/html")
    outcome = attempt(kind, config, OPEN)
    assert isinstance(outcome, Transient)
    assert "500" in outcome.reason
    assert "SECRET" not in outcome.reason


def test_the_whatsapp_token_quoted_in_an_error_is_scrubbed(
    peers: Peers,
) -> None:
    config = config_for(ChannelKind.WHATSAPP, f"http://127.0.0.1:{peers.http_port}/leak")
    outcome = attempt(ChannelKind.WHATSAPP, config, OPEN)
    assert isinstance(outcome, Permanent)
    assert "Invalid OAuth access token" in outcome.reason
    assert "EAAG-wa-token" not in outcome.reason


def test_smtp_with_a_line_break_in_the_subject_fails_that_message_with_a_reason() -> None:
    message = OutboundMessage(1, "hi", subject="Hello\r\nBcc: everyone@example.com")
    outcome = attempt(ChannelKind.SMTP, config_for(ChannelKind.SMTP, ""), OPEN, message)
    assert isinstance(outcome, Permanent)
    assert "cannot be written as an email" in outcome.reason


@pytest.mark.parametrize("kind", HTTP_KINDS)
def test_an_answer_far_larger_than_a_providers_is_cut_off_not_held(
    kind: ChannelKind, peers: Peers
) -> None:
    config = config_for(kind, f"http://127.0.0.1:{peers.http_port}/huge")
    outcome = attempt(kind, config, OPEN)  # 16 MiB offered; at most 64 KiB read
    assert isinstance(outcome, Sent | Permanent), outcome
    if isinstance(outcome, Sent):
        assert outcome.provider_message_id is None


def test_the_client_reads_at_most_its_limit_of_an_answer(peers: Peers) -> None:
    async def go() -> bytes:
        async with make_client(OPEN, max_in_flight=2, timeout_seconds=5) as http:
            return (await http.get(f"http://127.0.0.1:{peers.http_port}/huge")).body

    assert len(asyncio.run(go())) == MAX_ANSWER


@pytest.mark.parametrize("kind", HTTP_KINDS)
def test_odd_provider_message_ids_are_made_fit_to_store(kind: ChannelKind, peers: Peers) -> None:
    config = config_for(kind, f"http://127.0.0.1:{peers.http_port}/odd-id")
    outcome = attempt(kind, config, OPEN)
    assert isinstance(outcome, Sent), outcome
    said = outcome.provider_message_id or ""
    assert said.isprintable()
    said.encode("utf-8")  # no lone surrogate: Postgres can store it


@pytest.mark.parametrize(
    ("kind", "config"),
    [
        (ChannelKind.WHATSAPP, {"access_token": "abc\r\ndef"}),
    ],
)
def test_a_credential_a_protocol_cannot_carry_pauses_the_channel_not_the_adapter(
    kind: ChannelKind, config: dict[str, str], peers: Peers
) -> None:
    base = config_for(kind, f"http://127.0.0.1:{peers.http_port}/x", port=peers.http_port)
    outcome = attempt(kind, {**base, **config}, OPEN)
    assert isinstance(outcome, Transient), outcome
    assert outcome.refused
    assert "cannot" in outcome.reason
