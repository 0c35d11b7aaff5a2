"""The running API against clients that hold on: a head or body that dribbles in is cut off,
and exports to readers that never read hold no database connection from anyone else.
"""

from __future__ import annotations

import socket
import time
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest

from shared import delivery_partitions
from shared import delivery_store as store
from shared.db.engine import libpq_url
from tests.e2e.conftest import Api, System, wait_for

pytestmark = pytest.mark.e2e

#: What the e2e system sets BCAST_API_HEADER_TIMEOUT_SECONDS and ..._BODY_... to.
TIMEOUT = 2.0


def connect(system: System) -> socket.socket:
    host, port = system.api_url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=TIMEOUT * 5)


def test_a_request_head_that_dribbles_in_is_cut_off(system: System) -> None:
    sock = connect(system)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < TIMEOUT * 4:
            try:
                sock.sendall(b"X")  # a header that never ends
            except OSError:
                closed = True
                break
            sock.settimeout(0.3)
            try:
                if sock.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
        assert closed, "the server kept a connection whose head never finished"
        assert time.monotonic() - started < TIMEOUT * 3
    finally:
        sock.close()


def test_a_body_that_stops_arriving_is_answered_408(api: Api, system: System) -> None:
    token = api.http.headers["Authorization"]
    sock = connect(system)
    try:
        sock.sendall(
            b"POST /v1/tags HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: {token}\r\nContent-Length: 100\r\n\r\n".encode()
            + b'{"name": '
        )
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"application/problem+json" in answer
    finally:
        sock.close()
    assert api.ok("GET", "/v1/tags")["items"] == []


def test_a_body_that_dribbles_in_forever_is_cut_off_at_its_total_deadline(
    api: Api, system: System
) -> None:
    token = api.http.headers["Authorization"]
    sock = connect(system)
    try:
        sock.sendall(
            b"POST /v1/tags HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: {token}\r\nContent-Length: 1000\r\n\r\n".encode()
        )
        started = time.monotonic()
        sock.settimeout(0.5)
        answer = b""
        while time.monotonic() - started < 15 and not answer:
            try:
                sock.sendall(b" ")  # a byte at a time, each well inside the pause limit
                answer = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert time.monotonic() - started < 10
    finally:
        sock.close()


def test_exports_to_readers_that_never_read_hold_no_database_connection(
    api: Api, system: System
) -> None:
    channel, _ = api.webhook_channel()
    account = api.account(channel["id"])
    api.import_contacts(account["id"], ["seed"])
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    b = api.broadcast(channel["id"], {}, send_at=later)
    [(workspace_id,)] = system.sql("SELECT workspace_id FROM broadcast WHERE id = %s", (b["id"],))
    system.sql(
        "INSERT INTO contact (workspace_id, account_id, address, name) "
        "SELECT %s, %s, 'x-' || i, 'Name ' || i FROM generate_series(1, 150000) AS i",
        (workspace_id, account["id"]),
    )
    with psycopg.connect(libpq_url(system.database_url), autocommit=True) as conn:
        day = store.run(conn, store.snapshot_day(b["id"]))
        assert day is not None
        store.run(conn, delivery_partitions.ensure(day, 7))
    system.sql(
        "INSERT INTO delivery (workspace_id, broadcast_id, contact_id, address, status, "
        "last_error, part_day) SELECT workspace_id, %s, id, address, 'failed', "
        "'webhook HTTP 404: no such recipient, and a reason long enough to fill the pipe', %s "
        "FROM contact WHERE account_id = %s",
        (b["id"], day, account["id"]),
    )
    token = api.http.headers["Authorization"]
    readers = []
    for _ in range(12):
        sock = connect(system)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(
            f"GET /v1/broadcasts/{b['id']}/recipients?format=csv HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {token}\r\n\r\n".encode()
        )
        readers.append(sock)
    try:
        heads = [sock.recv(12) for sock in readers]
        assert sorted(h[9:12] for h in heads) == [b"200"] * 4 + [b"429"] * 8, heads
        time.sleep(TIMEOUT)  # the four exports fill their pipes and stall on their readers
        for _ in range(20):
            started = time.monotonic()
            assert (
                httpx.get(
                    f"{system.api_url}/v1/channels", headers={"Authorization": token}
                ).status_code
                == 200
            )
            assert time.monotonic() - started < 2.0
        assert httpx.get(f"{system.api_url}/readyz").status_code == 200
        stuck = system.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND state = 'idle in transaction' AND now() - state_change > interval '1 second'"
        )
        assert stuck == [(0,)]
    finally:
        for sock in readers:
            sock.close()

    def export_again() -> bool:
        response = httpx.get(
            f"{system.api_url}/v1/broadcasts/{b['id']}/recipients",
            params={"format": "csv", "status": "failed"},
            headers={"Authorization": token},
            timeout=60,
        )
        return response.status_code == 200 and response.text.count("\n") == 150_002

    wait_for("the export slots to be given back", export_again, timeout=30)
