"""The simulator's listener: webhook calls on its lean protocol answer as the app's route does,
and every other request on a connection is handed to the aiohttp app intact.

A real ``bcast simulator`` process, spoken to over raw sockets so that keep-alive,
pipelining and hand-over are what is tested.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx2 as httpx
import pytest

from bench.ports import free_port
from tests.serving import wait_until_up

SECRET = "front-secret"


@pytest.fixture(scope="module")
def sim() -> Iterator[tuple[str, int]]:
    port, extra = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "simulator",
            "--port",
            str(port),
            "--extra-port",
            str(extra),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    wait_until_up(f"{base}/_sim/health", "the simulator", ready=lambda r: r.status_code == 200)
    try:
        yield base, extra
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert b"Traceback" not in err, err.decode()


def _hook(base: str, name: str, **config: object) -> None:
    httpx.delete(f"{base}/_sim/hooks/{name}").raise_for_status()
    httpx.put(f"{base}/_sim/hooks/{name}", json=config).raise_for_status()


def _body(key: str, to: str = "a", **more: object) -> bytes:
    payload = {"idempotency_key": key, "timestamp": int(time.time()), "to": to, **more}
    return json.dumps(payload).encode()


def _post(name: str, body: bytes, *, signed: bool = True, extra: str = "") -> bytes:
    sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    head = (
        f"POST /hooks/{name} HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nIdempotency-Key: hdr\r\n"
        + (f"X-Bcast-Signature: {sig}\r\n" if signed else "")
        + extra
        + "\r\n"
    )
    return head.encode() + body


class Conn:
    """One keep-alive connection read answer by answer."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            self._more()
        body, self.buf = self.buf[:length], self.buf[length:]
        return int(lines[0].split()[1]), headers, body

    def closed(self) -> bool:
        """Does the server close the connection (no more bytes)?"""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, "the connection closed before a whole answer"
        self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def test_webhook_answers_match_the_routes_rules(sim: tuple[str, int]) -> None:
    base, _ = sim
    _hook(base, "f1", secret=SECRET, fail_addresses=["gone"])
    conn = Conn(_port(base))
    try:
        conn.send(_post("f1", _body("k1")))
        status, headers, body = conn.answer()
        assert (status, headers["content-type"]) == (200, "application/json; charset=utf-8")
        first = json.loads(body)["id"]
        conn.send(_post("f1", _body("k1")))
        assert conn.answer()[0] == 200
        conn.send(_post("f1", _body("k2"), signed=False))
        assert conn.answer()[:1] == (401,)
        conn.send(_post("f1", _body("k3", to="gone")))
        assert conn.answer()[0] == 404
        conn.send(_post("f1", b"not json"))
        assert conn.answer()[0] == 400
        conn.send(_post("f1", b"[1, 2]"))
        status, _, body = conn.answer()
        assert (status, json.loads(body)) == (400, {"error": "body is not a JSON object"})
    finally:
        conn.close()
    stats = httpx.get(f"{base}/_sim/hooks/f1/stats").json()
    assert (stats["accepted"], stats["duplicates"], stats["bad_signatures"]) == (1, 1, 1)
    records = httpx.get(f"{base}/_sim/hooks/f1/requests").json()
    assert [r["key"] for r in records] == ["k1", "k1", "k2", "k3"]
    assert [r["status"] for r in records] == [200, 200, 401, 404]
    assert {r["idempotency_header"] for r in records} == {"hdr"}
    assert records[0]["signature_ok"] is True
    assert records[2]["signature_ok"] is False
    assert first.startswith("sim-")


def test_throttled_answer_carries_retry_after(sim: tuple[str, int]) -> None:
    base, _ = sim
    _hook(base, "f2", throttle_ratio=1.0, retry_after=2.5)
    conn = Conn(_port(base))
    try:
        conn.send(_post("f2", _body("t1")))
        status, headers, _ = conn.answer()
    finally:
        conn.close()
    assert (status, headers["retry-after"]) == (429, "2.5")


def test_answers_keep_request_order_behind_a_latency(sim: tuple[str, int]) -> None:
    """Pipelined calls to a hook with latency, then one to a hook without: answered in order."""
    base, _ = sim
    _hook(base, "slow", latency_ms=150)
    _hook(base, "fast")
    conn = Conn(_port(base))
    try:
        started = time.monotonic()
        conn.send(
            _post("slow", _body("s1")) + _post("slow", _body("s2")) + _post("fast", _body("f"))
        )
        ids = [json.loads(conn.answer()[2])["id"] for _ in range(3)]
        took = time.monotonic() - started
    finally:
        conn.close()
    records = {
        name: httpx.get(f"{base}/_sim/hooks/{name}/requests").json() for name in ("slow", "fast")
    }
    assert [r["key"] for r in records["slow"]] == ["s1", "s2"]
    assert len(set(ids)) == 3
    assert took >= 0.3, "the two slow answers each waited for the hook's latency"


def test_connection_close_is_honoured(sim: tuple[str, int]) -> None:
    """Answered, then closed; a request pipelined behind it is never taken."""
    base, _ = sim
    _hook(base, "f3")
    conn = Conn(_port(base))
    try:
        conn.send(
            _post("f3", _body("c1"), extra="Connection: close\r\n") + _post("f3", _body("c2"))
        )
        status, headers, _ = conn.answer()
        assert (status, headers["connection"]) == (200, "close")
        assert conn.closed()
    finally:
        conn.close()
    assert [r["key"] for r in httpx.get(f"{base}/_sim/hooks/f3/requests").json()] == ["c1"]


def test_other_requests_on_the_connection_go_to_the_app(sim: tuple[str, int]) -> None:
    """A webhook call, then a control request, then another webhook call, on one connection:
    the connection is handed to the app at the control request and stays there."""
    base, _ = sim
    _hook(base, "f4")
    conn = Conn(_port(base))
    try:
        conn.send(_post("f4", _body("h1")))
        assert conn.answer()[0] == 200
        conn.send(b"GET /_sim/hooks/f4/stats HTTP/1.1\r\nHost: sim\r\n\r\n")
        status, _, body = conn.answer()
        assert (status, json.loads(body)["accepted"]) == (200, 1)
        conn.send(_post("f4", _body("h2")))
        status, headers, body = conn.answer()
        assert status == 200
        assert "id" in json.loads(body)
        assert "server" in headers, "answered by the app (aiohttp names itself)"
    finally:
        conn.close()
    assert httpx.get(f"{base}/_sim/hooks/f4/stats").json()["accepted"] == 2


def test_a_chunked_webhook_body_is_handed_to_the_app(sim: tuple[str, int]) -> None:
    base, _ = sim
    _hook(base, "f5")
    body = _body("ch1")
    conn = Conn(_port(base))
    try:
        conn.send(
            b"POST /hooks/f5 HTTP/1.1\r\nHost: sim\r\nTransfer-Encoding: chunked\r\n\r\n"
            + f"{len(body):x}\r\n".encode()
            + body
            + b"\r\n0\r\n\r\n"
        )
        status, _, answer = conn.answer()
    finally:
        conn.close()
    assert status == 200
    assert json.loads(answer)["id"].startswith("sim-")
    assert [r["key"] for r in httpx.get(f"{base}/_sim/hooks/f5/requests").json()] == ["ch1"]


def test_a_malformed_request_gets_400_and_a_closed_connection(sim: tuple[str, int]) -> None:
    base, _ = sim
    conn = Conn(_port(base))
    try:
        conn.send(b"POST /hooks/x HTTP/1.1\r\nContent-Length: nope\r\n\r\n")
        assert conn.answer()[0] == 400
        assert conn.closed()
    finally:
        conn.close()


def test_a_closed_extra_port_cuts_an_open_connection_at_its_next_call(
    sim: tuple[str, int],
) -> None:
    base, extra = sim
    _hook(base, "f6")
    conn = Conn(extra)
    try:
        conn.send(_post("f6", _body("p1")))
        assert conn.answer()[0] == 200
        httpx.put(f"{base}/_sim/ports/{extra}", json={"open": False}).raise_for_status()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", extra), timeout=2).close()
        conn.send(_post("f6", _body("p2")))
        assert conn.closed(), "cut without an answer"
    finally:
        conn.close()
        httpx.put(f"{base}/_sim/ports/{extra}", json={"open": True}).raise_for_status()
    again = Conn(extra)
    try:
        again.send(_post("f6", _body("p3")))
        assert again.answer()[0] == 200
    finally:
        again.close()
    keys = [r["key"] for r in httpx.get(f"{base}/_sim/hooks/f6/requests").json()]
    assert keys == ["p1", "p3"]
