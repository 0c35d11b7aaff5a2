"""The SMTP adapter against a real SMTP server on loopback (aiosmtpd)."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from services.dispatcher.channels.base import MediaRef, OutboundMessage, Permanent, Sent, Transient
from services.dispatcher.channels.smtp import TIMEOUT_SECONDS, UNREACHABLE_SERVER, SmtpAdapter
from shared.egress import Egress
from shared.media_store import LocalMediaStore
from tests.smtp_box import Mailbox, authenticator, start

#: Adapters a test made, closed (connections QUIT) when it ends.
_opened: list[SmtpAdapter] = []


def _close_opened() -> None:
    while _opened:
        asyncio.run(_opened.pop().close())


@pytest.fixture(autouse=True)
def _close_adapters() -> Iterator[None]:
    yield
    _close_opened()


@pytest.fixture
def mailbox() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    controller = start(box)
    yield box, controller.port
    _close_opened()  # while the server still listens, so each QUIT is answered
    controller.stop()


@pytest.fixture
def store(tmp_path: Path) -> LocalMediaStore:
    return LocalMediaStore(tmp_path)


def image(store: LocalMediaStore, key: str, color: str) -> MediaRef:
    buf = io.BytesIO()
    Image.new("RGB", (2, 2), color).save(buf, "PNG")
    store.put(key, buf.getvalue())
    return MediaRef(
        media_id=len(key), url=f"http://unused/{key}", content_type="image/png", storage_key=key
    )


#: The test mail server is on loopback.
LOOPBACK_ALLOWED = Egress(allow_private=True)


def adapter(
    port: int, store: LocalMediaStore, *, timeout: float = TIMEOUT_SECONDS, **config: object
) -> SmtpAdapter:
    made = SmtpAdapter(
        {
            "host": "127.0.0.1",
            "port": port,
            "starttls": False,
            "from_address": "news@shop.test",
            **config,
        },
        store,
        timeout=timeout,
        egress=LOOPBACK_ALLOWED,
    )
    _opened.append(made)
    return made


def send(a: SmtpAdapter, message: OutboundMessage, to: str, key: str = "1") -> object:
    return asyncio.run(a.send(message, to, key))


def test_close_quits_every_pooled_connection(
    mailbox: tuple[Mailbox, int], store: LocalMediaStore
) -> None:
    box, port = mailbox
    a = adapter(port, store)

    async def two_at_once_then_close() -> None:
        await asyncio.gather(
            a.send(OutboundMessage(1, "x"), "ann@x.test", "1"),
            a.send(OutboundMessage(1, "x"), "bob@x.test", "2"),
        )
        await a.close()

    asyncio.run(two_at_once_then_close())
    assert len(box.messages) == 2
    assert box.greetings >= 1
    assert box.quits == box.greetings, "every connection the adapter opened said QUIT"


def test_text_only(mailbox: tuple[Mailbox, int], store: LocalMediaStore) -> None:
    box, port = mailbox
    result = send(
        adapter(port, store),
        OutboundMessage(1, "Hello\nthere", subject="Launch"),
        "ann@x.test",
        "77",
    )
    assert result == Sent("<bcast-77@shop.test>")
    [msg] = box.messages
    assert (msg["From"], msg["To"], msg["Subject"], msg["Message-ID"]) == (
        "news@shop.test",
        "ann@x.test",
        "Launch",
        "<bcast-77@shop.test>",
    )
    assert msg["X-Bcast-Idempotency-Key"] == "77"
    assert msg.get_content().replace("\r\n", "\n").strip() == "Hello\nthere"


@pytest.mark.parametrize("count", [1, 3])
def test_images_are_inline_in_an_html_part(
    mailbox: tuple[Mailbox, int], store: LocalMediaStore, count: int
) -> None:
    box, port = mailbox
    media = tuple(image(store, f"k{i}", c) for i, c in enumerate(["red", "green", "blue"][:count]))
    assert isinstance(
        send(adapter(port, store), OutboundMessage(1, "look <here>", media), "ann@x.test"), Sent
    )
    [msg] = box.messages
    plain = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert plain is not None
    assert html is not None
    assert plain.get_content().strip() == "look <here>"
    body = html.get_content()
    assert "look &lt;here&gt;" in body
    inline = [p for p in msg.walk() if p.get_content_type() == "image/png"]
    assert len(inline) == count
    for part, ref in zip(inline, media, strict=True):
        assert part.get_payload(decode=True) == store.get(ref.storage_key)
        assert f"cid:{part['Content-ID'].strip('<>')}" in body
        assert part.get_content_disposition() == "inline"


def test_4xx_is_transient_then_sends(mailbox: tuple[Mailbox, int], store: LocalMediaStore) -> None:
    box, port = mailbox
    box.transient_first = 1
    a = adapter(port, store)
    first = send(a, OutboundMessage(1, "x"), "ann@x.test")
    assert isinstance(first, Transient)
    assert first.reason.startswith("SMTP 451")
    assert isinstance(send(a, OutboundMessage(1, "x"), "ann@x.test"), Sent)
    assert len(box.messages) == 1


def test_refused_mailbox_is_permanent_and_unreachable(
    mailbox: tuple[Mailbox, int], store: LocalMediaStore
) -> None:
    box, port = mailbox
    box.refuse = {"gone@x.test"}
    result = send(adapter(port, store), OutboundMessage(1, "x"), "gone@x.test")
    assert result == Permanent("SMTP 550: 5.1.1 No such user here", unreachable=True)
    assert box.messages == []


def test_a_relay_that_stalls_mid_conversation_cannot_hold_a_send_past_its_timeout(
    mailbox: tuple[Mailbox, int], store: LocalMediaStore
) -> None:
    box, port = mailbox
    box.stall_seconds = 5.0
    a = adapter(port, store, timeout=0.5)
    started = time.monotonic()
    result = send(a, OutboundMessage(1, "x"), "ann@x.test")
    took = time.monotonic() - started
    assert result == Transient("SMTP timed out after 0.5 s")
    assert took < 2.0, took
    box.stall_seconds = 0.0
    assert isinstance(send(a, OutboundMessage(1, "x"), "bob@x.test"), Sent), "and it recovers"


def test_a_server_that_never_greets_cannot_hold_a_send_past_its_timeout(
    store: LocalMediaStore,
) -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, then says nothing (a tarpit)
    try:
        a = adapter(silent.getsockname()[1], store, timeout=0.5)
        started = time.monotonic()
        result = send(a, OutboundMessage(1, "x"), "ann@x.test")
        took = time.monotonic() - started
    finally:
        silent.close()
    assert isinstance(result, Transient)
    assert took < 1.5, took


def test_server_down_is_transient(store: LocalMediaStore) -> None:
    from bench.ports import free_port

    result = send(adapter(free_port(), store), OutboundMessage(1, "x"), "ann@x.test")
    assert result == Transient(UNREACHABLE_SERVER)


def test_starttls_and_login(
    store: LocalMediaStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    box = Mailbox()
    controller = start(
        box,
        tls_context=context,
        require_starttls=True,
        authenticator=authenticator,
        auth_require_tls=True,
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    try:
        good = adapter(
            controller.port, store, starttls=True, username="news", password="s3cret-pass"
        )
        assert isinstance(send(good, OutboundMessage(1, "secure"), "ann@x.test"), Sent)
        bad = adapter(controller.port, store, starttls=True, username="news", password="wrong")
        refused = send(bad, OutboundMessage(1, "secure"), "ann@x.test")
        assert isinstance(refused, Permanent)
        assert refused.reason.startswith("SMTP login refused: 535")
        plain = adapter(controller.port, store, starttls=False)
        assert isinstance(send(plain, OutboundMessage(1, "x"), "ann@x.test"), Permanent | Transient)
    finally:
        _close_opened()
        controller.stop()
    assert len(box.messages) == 1


def test_a_login_smtp_cannot_carry_pauses_the_channel_and_scrubs_nothing_into_a_reason(
    store: LocalMediaStore,
) -> None:
    box = Mailbox()
    controller = start(box, authenticator=authenticator, auth_require_tls=False)
    try:
        a = adapter(controller.port, store, username="\u00fcser", password="p\u00e9\r\nx")
        result = send(a, OutboundMessage(1, "x"), "ann@x.test")
    finally:
        controller.stop()
    assert isinstance(result, Transient)
    assert result.refused
    assert "SMTP settings cannot be used" in result.reason
    assert box.messages == []


def test_credentials_a_server_quotes_back_are_scrubbed_plain_and_in_base64() -> None:
    smtp = SmtpAdapter(
        {
            "host": "smtp.example.com",
            "from_address": "a@b.co",
            "username": "news",
            "password": "pw",
        },
        LocalMediaStore(Path("/nonexistent")),
    )
    plain = base64.b64encode(b"\0news\0pw").decode()
    said = smtp._said(f"535 bad AUTH PLAIN {plain} for news, {base64.b64encode(b'pw').decode()}")
    assert "news" not in said
    assert plain not in said
    assert "cHc=" not in said
