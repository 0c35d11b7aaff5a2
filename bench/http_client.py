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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--in-flight", type=int, default=64)
    args = parser.parse_args()
    children = Children(dict(os.environ))
    try:
        url = f"{start_simulator(children)}/hooks/bench"
        asyncio.run(with_aiohttp(url, 2000, args.in_flight))  # warm up both sides
        results = {}
        for name, run in (
            ("aiohttp.ClientSession", with_aiohttp),
            ("httpx.AsyncClient", with_httpx),
        ):
            wall, cpu = asyncio.run(run(url, args.requests, args.in_flight))
            results[name] = (wall, cpu)
            print(
                f"{name:22} {args.requests / wall:8.0f} req/s   "
                f"{cpu / args.requests * 1e6:7.1f} µs client CPU per request"
            )
        (a_wall, a_cpu), (h_wall, h_cpu) = (
            results["aiohttp.ClientSession"],
            results["httpx.AsyncClient"],
        )
        print(f"httpx / aiohttp client CPU per request: {h_cpu / a_cpu:.2f}x")
        print(f"aiohttp throughput / httpx throughput: {h_wall / a_wall:.2f}x")
    finally:
        children.stop_all()


if __name__ == "__main__":
    main()
