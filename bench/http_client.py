"""Which HTTP client goes on the send path: CPU per request at 64 in flight, on loopback.

Runs the project's simulator in its own process, first measures its raw rate with a plain
aiohttp load, then sends the same number of webhook-shaped POSTs with httpx.AsyncClient and
with aiohttp.ClientSession, measuring the client process's CPU time for each.

    .venv/bin/python -m bench.http_client [--requests 20000] [--in-flight 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable

import aiohttp
import httpx

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


async def with_httpx(url: str, requests: int, in_flight: int) -> tuple[float, float]:
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    async with httpx.AsyncClient(limits=limits) as client:

        async def send(i: int) -> None:
            r = await client.post(url, content=BODY, headers={"Content-Type": "application/json"})
            assert r.status_code == 200, r.status_code

        return await drive(send, requests, in_flight)


def run(requests: int = 20_000, in_flight: int = 64) -> dict[str, float]:
    """The ``http_client`` section of the results: client CPU per request of each client."""
    children = Children(dict(os.environ))
    try:
        url = f"{start_simulator(children)}/hooks/bench"
        asyncio.run(with_aiohttp(url, 2000, in_flight))  # warm up both sides
        measured = {}
        for name, client in (("aiohttp", with_aiohttp), ("httpx", with_httpx)):
            wall, cpu = asyncio.run(client(url, requests, in_flight))
            measured[name] = (wall, cpu)
    finally:
        children.stop_all()
    (a_wall, a_cpu), (h_wall, h_cpu) = measured["aiohttp"], measured["httpx"]
    return {
        "requests": requests,
        "in_flight": in_flight,
        "aiohttp_us_per_request": round(a_cpu / requests * 1e6, 1),
        "httpx_us_per_request": round(h_cpu / requests * 1e6, 1),
        "httpx_over_aiohttp_cpu": round(h_cpu / a_cpu, 2),
        "aiohttp_per_second": round(requests / a_wall, 1),
        "httpx_per_second": round(requests / h_wall, 1),
    }


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
