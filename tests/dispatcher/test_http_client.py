"""The send path's HTTP client against scripted peers on loopback: keep-alive, answers of every
framing, limits, deadlines, TLS, and when a request may go out again.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.dispatcher.channels.client import (
    MAX_ANSWER,
    Answer,
    HttpClient,
    HttpError,
    InvalidUrl,
)
from shared.egress import Egress, EgressRefused

OPEN = Egress(allow_private=True)
STRICT = Egress(allow_private=False)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

#: A peer's script: reads what it needs from the connection and writes what it wants.
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Peer"], Awaitable[None]]


class Peer:
    """A loopback server running one script per connection; keeps what it was sent."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Peer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request


def answering(*answers: bytes, then_close: bool = False) -> Script:
    """A script that answers each request of the connection with the next of ``answers``."""

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer
    ) -> None:
        for answer in answers:
            await peer.read_request(reader)
            writer.write(answer)
            await writer.drain()
        if not then_close:
            await reader.read()  # keep the connection until the client closes it

    return script


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """On asyncio's own loop, and on uvloop (the dispatcher's)."""
    asyncio.run(test())
    uvloop.run(test())


def client(**kwargs: object) -> HttpClient:
    options: dict[str, object] = {"max_in_flight": 4, "timeout_seconds": 5.0}
    options.update(kwargs)
    egress = options.pop("egress", OPEN)
    assert isinstance(egress, Egress)
    return HttpClient(egress, **options)  # type: ignore[arg-type]


def test_connections_are_kept_alive_and_the_request_is_written_as_asked() -> None:
    async def go() -> None:
        async with Peer(answering(OK, OK, OK)) as peer, client() as http:
            for i in range(3):
                answer = await http.post(
                    f"{peer.url}/hook?x=1", b'{"a":1}', {"Idempotency-Key": str(i)}
                )
                assert answer == Answer(200, {"content-length": "2"}, b"ok")
            assert peer.connections == 1
            port = peer.url.rsplit(":", 1)[1]
            assert (
                peer.requests[0]
                == (
                    f"POST /hook?x=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: bcast\r\n"
                    'Idempotency-Key: 0\r\nContent-Length: 7\r\n\r\n{"a":1}'
                ).encode()
            )

    run(go)


def test_an_answer_that_closes_its_connection_is_not_reused() -> None:
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"

    async def go() -> None:
        async with Peer(answering(closing, then_close=True)) as peer, client() as http:
            for _ in range(2):
                assert (await http.post(peer.url, b"x", {})).body == b"ok"
            assert peer.connections == 2

    run(go)


@pytest.mark.parametrize(
    ("answer", "body"),
    [
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            b"abcde",
        ),
        (b"HTTP/1.1 202 Accepted\r\n\r\nuntil the end", b"until the end"),  # no length: to close
        (b"HTTP/1.0 200 OK\r\n\r\nold", b"old"),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\n!", b"!"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    ],
)
def test_answers_of_every_framing_are_read_whole(answer: bytes, body: bytes) -> None:
    async def go() -> None:
        async with Peer(answering(answer, then_close=True)) as peer, client() as http:
            got = await http.post(peer.url, b"x", {})
            assert got.body == body
            assert got.status == int(answer.rsplit(b"HTTP/1.", 1)[1][2:5])

    run(go)


def test_an_answer_arriving_byte_by_byte_is_parsed() -> None:
    answer = b"HTTP/1.1 429 Too Many\r\nRetry-After: 7\r\nContent-Length: 4\r\n\r\nslow"

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer
    ) -> None:
        await peer.read_request(reader)
        for i in range(len(answer)):
            writer.write(answer[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0)
        await reader.read()

    async def go() -> None:
        async with Peer(script) as peer, client() as http:
            got = await http.post(peer.url, b"x", {})
            assert (got.status, got.headers["retry-after"], got.body) == (429, "7", b"slow")

    run(go)


def test_an_answer_is_cut_at_its_limit_and_its_connection_closed() -> None:
    streamed = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (16384, b"y" * 16384)
    announced = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_ANSWER + 1)

    async def endless(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer
    ) -> None:
        await peer.read_request(reader)
        writer.write(streamed)
        for _ in range(1000):  # 16 MiB offered
            writer.write(chunk)
            await writer.drain()

    async def go() -> None:
        async with Peer(endless) as peer, client() as http:
            assert len((await http.post(peer.url, b"x", {})).body) == MAX_ANSWER
            assert len((await http.post(peer.url, b"x", {})).body) == MAX_ANSWER
            assert peer.connections == 2, "a cut answer's connection is never reused"
        async with Peer(answering(announced + b"z" * 100)) as peer, client() as http:
            assert (await http.post(peer.url, b"x", {})).body == b""
            await http.post(peer.url, b"x", {})
            assert peer.connections == 2

    run(go)


async def answer_one_then_drop(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer
) -> None:
    """Answers one request, then takes the next and closes without an answer: a server whose
    idle timeout fired just as the request came.
    """
    await peer.read_request(reader)
    writer.write(OK)
    await writer.drain()
    await peer.read_request(reader)


def test_a_request_that_may_be_repeated_goes_again_when_a_kept_connection_was_dropped() -> None:
    async def go() -> None:
        async with Peer(answer_one_then_drop) as peer, client() as http:
            await http.post(peer.url, b"x", {"Idempotency-Key": "1"})
            got = await http.post(peer.url, b"x", {"Idempotency-Key": "2"})
            assert got.body == b"ok"
            assert peer.connections == 2
            assert len(peer.requests) == 3, "sent once more, on a new connection"

    run(go)


def test_an_idempotency_key_named_in_any_case_makes_a_request_repeatable() -> None:
    async def go() -> None:
        async with Peer(answer_one_then_drop) as peer, client() as http:
            await http.post(peer.url, b"x", {"idempotency-KEY": "1"})
            got = await http.post(peer.url, b"x", {"idempotency-KEY": "2"})
            assert got.body == b"ok"
            assert len(peer.requests) == 3, "sent once more, on a new connection"

    run(go)


def test_a_request_without_an_idempotency_key_is_never_sent_twice() -> None:
    async def go() -> None:
        async with Peer(answer_one_then_drop) as peer, client() as http:
            await http.post(peer.url, b"x", {})
            with pytest.raises(HttpError):
                await http.post(peer.url, b"x", {})
            assert len(peer.requests) == 2
            assert peer.connections == 1

    run(go)


def test_a_connection_the_peer_closed_while_idle_is_not_used() -> None:
    async def answer_one(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer
    ) -> None:
        await peer.read_request(reader)
        writer.write(OK)
        await writer.drain()

    async def go() -> None:
        async with Peer(answer_one) as peer, client() as http:
            await http.post(peer.url, b"x", {})
            await asyncio.sleep(0.2)  # the peer has closed it; nothing was asked since
            assert (await http.post(peer.url, b"x", {})).body == b"ok"
            assert (len(peer.requests), peer.connections) == (2, 2)

    run(go)


def test_idle_connections_past_their_age_are_not_reused() -> None:
    async def go() -> None:
        async with Peer(answering(OK, OK)) as peer, client(idle_seconds=0.05) as http:
            await http.post(peer.url, b"x", {})
            await asyncio.sleep(0.1)
            await http.post(peer.url, b"x", {})
            assert peer.connections == 2

    run(go)


def test_a_call_past_its_deadline_is_a_timeout_and_its_connection_is_closed() -> None:
    closed: list[asyncio.Event] = []

    async def silent(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer
    ) -> None:
        await peer.read_request(reader)
        await reader.read()  # returns when the client closes
        closed[0].set()

    async def go() -> None:
        closed[:] = [asyncio.Event()]
        async with Peer(silent) as peer, client(timeout_seconds=0.3) as http:
            started = asyncio.get_running_loop().time()
            with pytest.raises(TimeoutError):
                await http.post(peer.url, b"x", {})
            assert asyncio.get_running_loop().time() - started < 2
            await asyncio.wait_for(closed[0].wait(), 5)

    run(go)


def test_only_the_calls_past_their_deadline_fail_and_the_watch_stops_when_none_waits() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer) -> None:
        while True:
            await peer.read_request(reader)
            await asyncio.sleep(0.1)
            writer.write(OK)
            await writer.drain()

    async def silent(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer
    ) -> None:
        await peer.read_request(reader)
        await reader.read()

    async def go() -> None:
        async with (
            Peer(slow) as answers,
            Peer(silent) as never,
            client(timeout_seconds=0.5) as http,
        ):
            started = asyncio.get_running_loop().time()
            got = await asyncio.gather(
                *(http.post(answers.url, b"x", {}) for _ in range(3)),
                http.post(never.url, b"x", {}),
                return_exceptions=True,
            )
            assert [a.body for a in got[:3] if isinstance(a, Answer)] == [b"ok"] * 3
            assert isinstance(got[3], TimeoutError)
            assert 0.5 <= asyncio.get_running_loop().time() - started < 2
            # No call waits: the watch ends at its next tick, no timer left to wake the loop.
            until = asyncio.get_running_loop().time() + 1
            while http._watching is not None and asyncio.get_running_loop().time() < until:
                await asyncio.sleep(0.01)
            assert http._watching is None
            # Kept connections still serve later calls, each with a deadline of its own.
            later = await http.post(answers.url, b"x", {})
            assert later.body == b"ok"

    run(go)


def test_a_connection_that_never_completes_its_handshake_is_held_to_the_call_deadline(
    tmp_path: Path,
) -> None:
    cert, _ = _self_signed(tmp_path)
    trusting = ssl.create_default_context(cafile=str(cert))

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer) -> None:
        await reader.read()

    async def go() -> None:
        # Accepts the connection and never says a word: the TLS handshake never ends.
        async with Peer(mute) as peer:
            https = peer.url.replace("http://", "https://")
            async with client(timeout_seconds=0.3, tls_context=trusting) as http:
                started = asyncio.get_running_loop().time()
                with pytest.raises(TimeoutError):
                    await http.post(https, b"x", {})
                assert asyncio.get_running_loop().time() - started < 2

    run(go)


def test_a_peer_that_is_not_http_gives_no_answer() -> None:
    async def banner(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer
    ) -> None:
        writer.write(b"5.5.5-MariaDB\x00\x01\xff\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def go() -> None:
        async with Peer(banner) as peer, client() as http:
            with pytest.raises(HttpError):
                await http.post(peer.url, b"x", {})

    run(go)


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Token": "a\r\nInjected: 1"},
        {"X-Token": "a\rb"},
        {"X-Token": "a\nb"},
        {"X-Token": "a\x00"},
        {"Bad Name": "x"},
    ],
)
def test_a_header_a_request_cannot_carry_is_refused_before_anything_is_sent(
    headers: dict[str, str],
) -> None:
    async def go() -> None:
        async with Peer(answering(OK)) as peer, client() as http:
            with pytest.raises(ValueError, match="header"):
                await http.post(peer.url, b"x", headers)
            assert peer.connections == 0

    run(go)


def test_a_known_header_name_with_a_line_break_in_its_value_is_still_refused() -> None:
    async def go() -> None:
        async with Peer(answering(OK)) as peer, client() as http:
            await http.post(peer.url, b"x", {"X-Known": "fine"})
            with pytest.raises(ValueError, match="header"):
                await http.post(peer.url, b"x", {"X-Known": "a\r\nInjected: 1"})
            with pytest.raises(ValueError, match="header"):
                await http.post(peer.url, b"x", {"X-Known": "ok", "X Known": "x"})
            assert len(peer.requests) == 1

    run(go)


def test_a_urls_user_and_password_become_basic_authorization() -> None:
    async def go() -> None:
        async with Peer(answering(OK)) as peer, client() as http:
            url = peer.url.replace("http://", "http://ann:p%40ss@") + "/h"
            await http.post(url, b"x", {})
            expected = base64.b64encode(b"ann:p@ss").decode()
            assert f"Authorization: Basic {expected}\r\n".encode() in peer.requests[0]

    run(go)


def test_an_authorization_header_given_in_any_case_replaces_the_urls_credentials() -> None:
    async def go() -> None:
        async with Peer(answering(OK)) as peer, client() as http:
            url = peer.url.replace("http://", "http://ann:pass@") + "/h"
            await http.post(url, b"x", {"AUTHORIZATION": "Bearer t"})
            assert b"AUTHORIZATION: Bearer t\r\n" in peer.requests[0]
            assert b"Basic" not in peer.requests[0]

    run(go)


@pytest.mark.parametrize(
    "url", ["ftp://example.com/x", "http:///nohost", "not a url", "file:///etc/passwd"]
)
def test_urls_that_are_not_http_are_refused(url: str) -> None:
    async def go() -> None:
        async with client() as http:
            with pytest.raises(InvalidUrl):
                await http.post(url, b"x", {})

    run(go)


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost", "2130706433", "[::ffff:127.0.0.1]", "127.1", "[::1]"]
)
def test_the_egress_rule_refuses_before_any_connection(host: str) -> None:
    async def go() -> None:
        async with Peer(answering(OK)) as peer, client(egress=STRICT) as http:
            port = peer.url.rsplit(":", 1)[1]
            with pytest.raises(EgressRefused):
                await http.post(f"http://{host}:{port}/", b"x", {})
            assert peer.connections == 0

    run(go)


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bcast test peer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_is_verified_against_the_trusted_authorities(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))

    async def go() -> None:
        server = await asyncio.start_server(
            lambda r, w: answering(OK, OK, OK)(r, w, peer), "127.0.0.1", 0, ssl=server_tls
        )
        port = server.sockets[0].getsockname()[1]
        try:
            # The system's authorities do not know this peer: no answer.
            async with client() as http:
                with pytest.raises((HttpError, OSError)):
                    await http.post(f"https://127.0.0.1:{port}/", b"x", {})
            # Trusted, and the name checked against the certificate: an answer (a name's
            # final dot is the same host).
            async with client(tls_context=trusting) as http:
                for host in ("localhost", "localhost.", "127.0.0.1"):
                    got = await http.post(f"https://{host}:{port}/", b"x", {})
                    assert got.body == b"ok"
        finally:
            server.close()

    peer = Peer(answering(OK))
    run(go)


def test_bytes_after_an_answer_never_reach_the_next_request() -> None:
    extra = b"HTTP/1.1 500 Oops\r\nRetry-After: 3600\r\nContent-Length: 48\r\n\r\n"
    mine = b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\nmine"

    async def go() -> None:
        async with Peer(answering(OK + extra, mine)) as peer, client() as http:
            first = await http.post(peer.url, b"x", {"Idempotency-Key": "1"})
            assert first == Answer(200, {"content-length": "2"}, b"ok")
            await asyncio.sleep(0.05)
            async with Peer(answering(mine)) as fresh:
                second = await http.post(fresh.url, b"x", {"Idempotency-Key": "2"})
                assert second.body == b"mine"
            third = await http.post(peer.url, b"x", {"Idempotency-Key": "3"})
            assert (third.status, third.body) == (200, b"ok"), "a new connection, its own answer"
            assert peer.connections == 2
            assert first.headers == {"content-length": "2"}

    run(go)


def test_idle_connections_of_a_quiet_origin_are_closed_by_age() -> None:
    async def go() -> None:
        closed: list[bool] = []

        async def note_close(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer
        ) -> None:
            await peer.read_request(reader)
            writer.write(OK)
            await writer.drain()
            await reader.read()  # returns once the client closes the connection
            closed.append(True)

        async with Peer(note_close) as peer, client(idle_seconds=0.1) as http:
            await http.post(peer.url, b"x", {})
            deadline = asyncio.get_running_loop().time() + 5
            while not closed and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            assert closed, "no call to that origin since, yet its idle connection was closed"

    run(go)


def test_a_switch_of_protocols_is_no_answer() -> None:
    upgrade = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )

    async def go() -> None:
        async with Peer(answering(upgrade)) as peer, client() as http:
            with pytest.raises(HttpError):
                await http.post(peer.url, b"x", {})

    run(go)
