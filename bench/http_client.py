"""Which HTTP client goes on the send path: CPU per request at 64 in flight, on loopback.

Runs the project's simulator in its own process, warms it up with a plain aiohttp load, then
sends the same number of webhook-shaped POSTs with httpx.AsyncClient, aiohttp.ClientSession
and bcast's own send-path client (``services.dispatcher.channels.client``), measuring the
client process's CPU time for each, all on the dispatcher's event loop (uvloop).

    .venv/bin/python -m bench.http_client [--requests 20000] [--in-flight 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aiohttp
import httpx

try:
    import uvloop
except ImportError:  # pragma: no cover - not on every platform
    uvloop = None  # type: ignore[assignment]

from bench.common import Children, start_simulator

BODY = json.dumps(
    {"idempotency_key": "1", "broadcast_id": 1, "to": "bench", "text": "hello", "media": []}
).encode()


async def drive(
    send: Callable[[int], Awaitable[None]], requests: int, in_flight: int
) -> tuple[float, float]:
    """Run ``requests`` sends with ``in_flight`` at once; return (wall seconds, CPU seconds)."""
    counter = iter(range(requests))

    async def worker() -> None:
        for i in counter:
            await send(i)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return time.perf_counter() - wall, time.process_time() - cpu


async def with_aiohttp(url: str, requests: int, in_flight: int) -> tuple[float, float]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight)) as session:

        async def send(i: int) -> None:
            async with session.post(
                url, data=BODY, headers={"Content-Type": "application/json"}
            ) as r:
                await r.read()
                assert r.status == 200, r.status

        return await drive(send, requests, in_flight)


async def with_bcast(url: str, requests: int, in_flight: int) -> tuple[float, float]:
    from services.dispatcher.channels.client import HttpClient
    from shared.egress import Egress

    headers = {"Content-Type": "application/json"}
    async with HttpClient(
        Egress(allow_private=True), max_in_flight=in_flight, timeout_seconds=30
    ) as client:

        async def send(i: int) -> None:
            answer = await client.post(url, BODY, headers)
            assert answer.status == 200, answer.status

        return await drive(send, requests, in_flight)


async def with_httpx(url: str, requests: int, in_flight: int) -> tuple[float, float]:
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    async with httpx.AsyncClient(limits=limits) as client:

        async def send(i: int) -> None:
            r = await client.post(url, content=BODY, headers={"Content-Type": "application/json"})
            assert r.status_code == 200, r.status_code

        return await drive(send, requests, in_flight)


def run(requests: int = 20_000, in_flight: int = 64) -> dict[str, Any]:
    """The ``http_client`` section of the results: client CPU per request of each client."""
    children = Children(dict(os.environ))
    try:
        url = f"{start_simulator(children)}/hooks/bench"
        run_loop(with_aiohttp(url, 2000, in_flight))  # warm up both sides
        measured = {}
        for name, client in (
            ("aiohttp", with_aiohttp),
            ("httpx", with_httpx),
            ("bcast", with_bcast),
        ):
            wall, cpu = run_loop(client(url, requests, in_flight))
            measured[name] = (wall, cpu)
    finally:
        children.stop_all()
    (a_wall, a_cpu), (h_wall, h_cpu) = measured["aiohttp"], measured["httpx"]
    b_wall, b_cpu = measured["bcast"]
    return {
        "requests": requests,
        "in_flight": in_flight,
        "loop": "uvloop" if uvloop is not None else "asyncio",
        "aiohttp_us_per_request": round(a_cpu / requests * 1e6, 1),
        "httpx_us_per_request": round(h_cpu / requests * 1e6, 1),
        "bcast_us_per_request": round(b_cpu / requests * 1e6, 1),
        "httpx_over_aiohttp_cpu": round(h_cpu / a_cpu, 2),
        "bcast_over_aiohttp_cpu": round(b_cpu / a_cpu, 2),
        "aiohttp_per_second": round(requests / a_wall, 1),
        "httpx_per_second": round(requests / h_wall, 1),
        "bcast_per_second": round(requests / b_wall, 1),
        "send_path": "bcast",
    }


def run_loop(coro: Coroutine[Any, Any, tuple[float, float]]) -> tuple[float, float]:
    """Run on the dispatcher's loop (uvloop where installed)."""
    if uvloop is not None:
        return uvloop.run(coro)
    return asyncio.run(coro)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--in-flight", type=int, default=64)
    args = parser.parse_args()
    for key, value in run(args.requests, args.in_flight).items():
        print(f"{key:28} {value}")


if __name__ == "__main__":
    main()
