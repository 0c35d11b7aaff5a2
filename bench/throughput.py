"""End-to-end send rate of the pipeline against the simulator's own raw rate, same run.

Starts a scheduler, dispatchers and the simulator on a scratch database and vhost; measures
the simulator's raw rate with a tight aiohttp load (64 in flight); then sends one broadcast to
N contacts on a channel with no effective rate limit and measures the rate the simulator saw
from first to last request, the time from create to completed, and the dispatchers' CPU per
recipient. Prints the pipeline's rate as a ratio of the raw rate.

    .venv/bin/python -m bench.throughput [--recipients 20000] [--processes 2] [--threads 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import time

import httpx2 as httpx

from bench.common import (
    Children,
    bench_env,
    cpu_seconds,
    scratch_database,
    scratch_vhost,
    start_simulator,
    wait_for,
)
from bench.http_client import with_aiohttp


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipients", type=int, default=20_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    with scratch_database() as db_url, scratch_vhost() as vhost:
        run(db_url, vhost, args.recipients, args.processes, args.threads)


def run(db_url: str, vhost: str, n: int, processes: int, threads: int) -> None:
    env = bench_env(db_url, vhost)
    os.environ.update(env)
    from shared.db.engine import transaction
    from shared.db.models import Account, Channel
    from shared.domain.audience import AudienceSpec
    from shared.domain.broadcasts import Content, NewBroadcast, create_broadcast
    from shared.domain.contacts import ContactIn, import_contacts
    from shared.domain.tokens import ensure_workspace

    children = Children(env)
    try:
        sim = start_simulator(children)
        asyncio.run(with_aiohttp(f"{sim}/hooks/warm", 2000, 64))
        raw_wall, _ = asyncio.run(with_aiohttp(f"{sim}/hooks/raw", n, 64))
        raw_rate = n / raw_wall

        secret = secrets.token_urlsafe(24)
        httpx.put(f"{sim}/_sim/hooks/bench", json={"secret": secret}).raise_for_status()
        with transaction() as session:
            ws = ensure_workspace(session, "bench")
            channel = Channel(
                workspace_id=ws,
                name="bench",
                kind="webhook",
                config={"url": f"{sim}/hooks/bench", "secret": secret},
                rate_limit_per_second=1_000_000,
            )
            session.add(channel)
            session.flush()
            account = Account(workspace_id=ws, channel_id=channel.id, name="bench")
            session.add(account)
            session.flush()
            rows = [ContactIn(account_id=account.id, address=f"b-{i}") for i in range(n)]
            import_contacts(session, ws, rows)
            channel_id = channel.id

        scheduler = children.start("scheduler", "scheduler")
        dispatcher = children.start(
            "dispatcher", "dispatcher", "--processes", str(processes), "--threads", str(threads)
        )
        time.sleep(6)  # let every worker process boot before the clock starts
        cpu_before = cpu_seconds(dispatcher.pid)
        sched_before = cpu_seconds(scheduler.pid)
        created = time.time()
        with transaction() as session:
            broadcast, _ = create_broadcast(
                session,
                ws,
                NewBroadcast(
                    name="bench",
                    channel_id=channel_id,
                    audience=AudienceSpec(),
                    content=Content(text="bench"),
                    send_at=None,
                ),
            )
            broadcast_id = broadcast.id

        def finished() -> bool:
            with transaction() as session:
                from shared.db.models import Broadcast

                b = session.get(Broadcast, broadcast_id)
                return b is not None and b.status == "completed"

        wait_for("the broadcast to complete", finished, timeout=600, every=0.05)
        done = time.time()
        cpu = cpu_seconds(dispatcher.pid) - cpu_before
        sched_cpu = cpu_seconds(scheduler.pid) - sched_before
        stats = httpx.get(f"{sim}/_sim/hooks/bench/stats").json()
    finally:
        children.stop_all()

    send_wall = stats["last_at"] - stats["first_at"]
    send_rate = stats["requests"] / send_wall
    print(f"recipients                         {n}")
    print(
        f"dispatchers                        {processes} processes x {threads} threads, 2 cores shared with Postgres, RabbitMQ, simulator"
    )
    print(f"simulator raw rate (aiohttp, 64)   {raw_rate:8.0f} req/s")
    print(f"pipeline send rate (first->last)   {send_rate:8.0f} req/s")
    print(
        f"create -> completed                {done - created:8.2f} s  ({n / (done - created):.0f} recipients/s)"
    )
    print(f"first request after create         {stats['first_at'] - created:8.3f} s")
    print(f"accepted / duplicates              {stats['accepted']} / {stats['duplicates']}")
    print(
        f"dispatcher CPU per recipient       {cpu / n * 1e6:8.0f} µs   (scheduler: {sched_cpu / n * 1e6:.1f} µs)"
    )
    print(f"ratio pipeline / raw simulator     {send_rate / raw_rate:8.2f}")


if __name__ == "__main__":
    main()
