"""Rate-limited channels: how close to each limit the dispatchers run, and the worst second.

Several webhook channels, each limited at ``limit`` sends per second, are sent to at once by
four dispatcher processes. Only accepted arrivals count (a 429 is not a send): the achieved
rate of a channel is its accepted sends from the first to the last, as a fraction of its limit,
and the worst window is the most accepted sends the provider saw in any one second, as a
ratio of the limit (above 1.00 would break the provider's limit).
"""

from __future__ import annotations

import os
import secrets
import time
from typing import Any

import httpx2 as httpx

from bench.common import (
    Children,
    bench_env,
    follow_database,
    metric,
    scrape,
    scratch_database,
    scratch_vhost,
    start_simulator,
    wait_for,
)
from bench.ports import free_port
from services.dispatcher.metrics import SLOT_REASONS
from services.simulator.app import max_in_window

#: (channels, limit per channel) pairs a full run measures.
CASES = ((20, 20.0), (4, 400.0))


def run(cases: tuple[tuple[int, float], ...] = CASES, seconds: float = 15.0) -> dict[str, Any]:
    """The ``rate_limited`` section of the results."""
    runs = [run_case(channels, limit, seconds) for channels, limit in cases]
    return {
        "runs": runs,
        "min_fraction": min(r["min_fraction"] for r in runs),
        "worst_window_ratio": max(r["worst_window_ratio"] for r in runs),
    }


def run_case(channels: int, limit: float, seconds: float, processes: int = 4) -> dict[str, Any]:
    per_channel = int(limit * seconds)
    with scratch_database() as db_url, scratch_vhost() as vhost:
        env = bench_env(db_url, vhost)
        os.environ.update(env)
        children = Children(env)
        try:
            return _case(children, channels, limit, per_channel, processes)
        finally:
            children.stop_all()


def _case(
    children: Children, channels: int, limit: float, per_channel: int, processes: int
) -> dict[str, Any]:
    from shared.db.engine import get_engine, transaction
    from shared.db.models import Account, Broadcast, Channel
    from shared.domain.audience import AudienceSpec
    from shared.domain.broadcasts import Content, NewBroadcast, create_broadcast
    from shared.domain.contacts import ContactIn, import_contacts
    from shared.domain.tokens import ensure_workspace

    # Each case has its own database: the process's settings and engine follow it.
    follow_database()
    sim = start_simulator(children)
    children.start("scheduler", "scheduler")
    # The dispatchers serve their metrics, as in production: the slots each channel took and
    # let pass unused are read from them at the end.
    metrics_port = free_port()
    children.start(
        "dispatcher",
        "dispatcher",
        "--processes",
        str(processes),
        "--threads",
        "4",
        "--metrics-port",
        str(metrics_port),
    )
    hooks: list[tuple[str, int]] = []
    with transaction() as session:
        ws = ensure_workspace(session, "bench")
        for c in range(channels):
            hook = f"limit-{c}-{secrets.token_hex(3)}"
            secret = secrets.token_urlsafe(24)
            httpx.put(
                f"{sim}/_sim/hooks/{hook}",
                json={"secret": secret, "rate_limit_per_second": limit},
            ).raise_for_status()
            channel = Channel(
                workspace_id=ws,
                name=hook,
                kind="webhook",
                config={"url": f"{sim}/hooks/{hook}", "secret": secret},
                rate_limit_per_second=limit,
            )
            session.add(channel)
            session.flush()
            account = Account(workspace_id=ws, channel_id=channel.id, name=hook)
            session.add(account)
            session.flush()
            rows = [
                ContactIn(account_id=account.id, address=f"{c}-{i}") for i in range(per_channel)
            ]
            import_contacts(session, ws, rows)
            hooks.append((hook, channel.id))
    time.sleep(6)  # every worker process booted
    ids = []
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
            return all(
                (b := session.get(Broadcast, i)) is not None and b.status == "completed"
                for i in ids
            )

    wait_for(
        "every broadcast to complete", all_done, timeout=per_channel / limit * 4 + 60, every=0.2
    )
    get_engine().dispose()
    samples = wait_for("the dispatchers' metrics", lambda: scrape(metrics_port), timeout=30)
    fractions, windows, throttled = [], [], 0
    unused_shares: list[float] = []
    worst_unused: dict[str, int] = {}
    for hook, channel_id in hooks:
        sent = metric(samples, "bcast_channel_sends_total", channel=str(channel_id))
        lost = metric(samples, "bcast_channel_slots_unused_total", channel=str(channel_id))
        share = lost / max(1.0, sent + lost)
        if share >= max(unused_shares, default=0.0):
            worst_unused = {
                reason: int(
                    metric(
                        samples,
                        "bcast_channel_slots_unused_total",
                        channel=str(channel_id),
                        reason=reason,
                    )
                )
                for reason in SLOT_REASONS
            }
        unused_shares.append(share)
        records = httpx.get(f"{sim}/_sim/hooks/{hook}/requests").json()
        seen: set[str] = set()
        accepted: list[float] = []
        for r in records:
            if r.get("status") == 200 and r["key"] not in seen:
                seen.add(r["key"])
                accepted.append(float(r["t"]))
            throttled += r.get("status") == 429
        if len(accepted) != per_channel:
            raise SystemExit(f"{hook}: {len(accepted)} of {per_channel} accepted")
        span = accepted[-1] - accepted[0]
        fractions.append((len(accepted) - 1) / span / limit)
        windows.append(max_in_window(accepted, 1.0) / limit)
    return {
        "channels": channels,
        "limit_per_second": limit,
        "recipients_per_channel": per_channel,
        "dispatcher_processes": processes,
        "min_fraction": round(min(fractions), 3),
        "mean_fraction": round(sum(fractions) / len(fractions), 3),
        "worst_window_ratio": round(max(windows), 3),
        "throttled": throttled,
        # Of the slots the dispatchers took for a channel, the share that passed unused
        # (bcast_channel_slots_unused_total): the capacity a busy machine cost it.
        "max_unused_slot_share": round(max(unused_shares), 3),
        # That channel's unused slots by reason (late, stopped, left).
        "unused_slots_by_reason": worst_unused,
    }
