"""How close to each channel's rate limit the dispatchers run, and whether they ever exceed it.

Four dispatcher processes send to five webhook channels limited at 20/s each, at once. The
simulator enforces the same limit (it answers 429 above it) and records every arrival. For each
channel this prints the achieved rate as a fraction of the limit (first to last arrival) and
the most arrivals seen in any one-second window.

    .venv/bin/python -m bench.ratelimit [--channels 5] [--limit 20] [--per-channel 300] [--processes 4]
"""

from __future__ import annotations

import argparse
import os
import secrets
import time

import httpx2 as httpx

from bench.common import (
    Children,
    bench_env,
    scratch_database,
    scratch_vhost,
    start_simulator,
    wait_for,
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--channels", type=int, default=5)
    parser.add_argument("--limit", type=float, default=20.0)
    parser.add_argument("--per-channel", type=int, default=300)
    parser.add_argument("--processes", type=int, default=4)
    args = parser.parse_args()
    with scratch_database() as db_url, scratch_vhost() as vhost:
        run(db_url, vhost, args)


def run(db_url: str, vhost: str, args: argparse.Namespace) -> None:
    env = bench_env(db_url, vhost)
    os.environ.update(env)
    from shared.db.engine import transaction
    from shared.db.models import Account, Broadcast, Channel
    from shared.domain.audience import AudienceSpec
    from shared.domain.broadcasts import Content, NewBroadcast, create_broadcast
    from shared.domain.contacts import ContactIn, import_contacts
    from shared.domain.tokens import ensure_workspace

    children = Children(env)
    try:
        sim = start_simulator(children)
        children.start("scheduler", "scheduler")
        children.start(
            "dispatcher", "dispatcher", "--processes", str(args.processes), "--threads", "4"
        )
        hooks, ids = [], []
        with transaction() as session:
            ws = ensure_workspace(session, "bench")
            for c in range(args.channels):
                hook = f"limit-{c}-{secrets.token_hex(3)}"
                secret = secrets.token_urlsafe(24)
                httpx.put(
                    f"{sim}/_sim/hooks/{hook}",
                    json={"secret": secret, "rate_limit_per_second": args.limit},
                ).raise_for_status()
                channel = Channel(
                    workspace_id=ws,
                    name=hook,
                    kind="webhook",
                    config={"url": f"{sim}/hooks/{hook}", "secret": secret},
                    rate_limit_per_second=args.limit,
                )
                session.add(channel)
                session.flush()
                account = Account(workspace_id=ws, channel_id=channel.id, name=hook)
                session.add(account)
                session.flush()
                import_contacts(
                    session,
                    ws,
                    [
                        ContactIn(account_id=account.id, address=f"{c}-{i}")
                        for i in range(args.per_channel)
                    ],
                )
                hooks.append((hook, channel.id))
        time.sleep(6)  # every worker process booted
        with transaction() as session:
            for _, channel_id in hooks:
                b, _ = create_broadcast(
                    session,
                    ws,
                    NewBroadcast(
                        name="limit",
                        channel_id=channel_id,
                        audience=AudienceSpec(),
                        content=Content(text="x"),
                        send_at=None,
                    ),
                )
                ids.append(b.id)

        def all_done() -> bool:
            with transaction() as session:
                return all(session.get(Broadcast, i).status == "completed" for i in ids)  # type: ignore[union-attr]

        wait_for(
            "every broadcast to complete",
            all_done,
            timeout=args.per_channel / args.limit * 4 + 60,
            every=0.2,
        )
        stats = [httpx.get(f"{sim}/_sim/hooks/{hook}/stats").json() for hook, _ in hooks]
    finally:
        children.stop_all()

    print(
        f"{args.channels} channels x {args.per_channel} recipients, limit {args.limit:g}/s each, "
        f"{args.processes} dispatcher processes"
    )
    print(
        f"{'channel':10} {'achieved/s':>10} {'fraction':>9} {'max in 1 s':>11} {'429s':>5} {'dups':>5}"
    )
    fractions = []
    for c, s in enumerate(stats):
        rate = (s["requests"] - 1) / (s["last_at"] - s["first_at"])
        fractions.append(rate / args.limit)
        print(
            f"{c:<10} {rate:10.2f} {rate / args.limit:9.3f} {s['max_in_any_second']:11d} {s['throttled']:5d} {s['duplicates']:5d}"
        )
    print(
        f"ratio achieved / limit: min {min(fractions):.3f}  mean {sum(fractions) / len(fractions):.3f}; "
        f"never above the limit in any 1 s window: {all(s['max_in_any_second'] <= args.limit for s in stats)}"
    )


if __name__ == "__main__":
    main()
