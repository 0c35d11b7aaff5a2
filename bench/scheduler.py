"""Many timed sends due in the same second: how late each one starts, and is first sent.

``count`` one-recipient broadcasts (what a conversation's timed send is) are written with
send times a year ahead, then all moved to the same second, a few seconds ahead, in one
statement. A scheduler and two dispatcher processes run as usual. Reported: start lateness
(the scheduler's ``started_at`` minus ``send_at``) and send lateness (the provider's first
arrival minus ``send_at``), p50 and p99.
"""

from __future__ import annotations

import os
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx2 as httpx

from bench.common import (
    Children,
    bench_env,
    follow_database,
    quantile,
    scratch_database,
    scratch_vhost,
    start_simulator,
    wait_for,
)

#: Seconds from moving the send times to when they fall due.
LEAD = 5.0


def run(count: int = 10_000, processes: int = 2) -> dict[str, Any]:
    """The ``scheduler`` section of the results."""
    with scratch_database() as db_url, scratch_vhost() as vhost:
        env = bench_env(db_url, vhost)
        os.environ.update(env)
        children = Children(env)
        try:
            return _run(children, count, processes)
        finally:
            children.stop_all()


def _run(children: Children, count: int, processes: int) -> dict[str, Any]:
    from sqlalchemy import text

    from shared.db.engine import get_engine, transaction
    from shared.db.models import Account, Channel
    from shared.domain.audience import AudienceSpec
    from shared.domain.broadcasts import Content, NewBroadcast, create_broadcast
    from shared.domain.contacts import ContactIn, import_contacts
    from shared.domain.tokens import ensure_workspace

    follow_database()
    sim = start_simulator(children)
    hook, secret = f"timed-{secrets.token_hex(3)}", secrets.token_urlsafe(24)
    httpx.put(f"{sim}/_sim/hooks/{hook}", json={"secret": secret}).raise_for_status()
    with transaction() as session:
        ws = ensure_workspace(session, "bench")
        channel = Channel(
            workspace_id=ws,
            name=hook,
            kind="webhook",
            config={"url": f"{sim}/hooks/{hook}", "secret": secret},
            rate_limit_per_second=10_000,
        )
        session.add(channel)
        session.flush()
        account = Account(workspace_id=ws, channel_id=channel.id, name=hook)
        session.add(account)
        session.flush()
        import_contacts(
            session, ws, [ContactIn(account_id=account.id, address=f"t-{i}") for i in range(count)]
        )
        contact_ids = [
            r[0]
            for r in session.execute(
                text("SELECT id FROM contact WHERE account_id = :a ORDER BY id"),
                {"a": account.id},
            )
        ]
        channel_id = channel.id
    later = datetime.now(UTC) + timedelta(days=300)
    for start in range(0, count, 1000):
        with transaction() as session:
            for contact_id in contact_ids[start : start + 1000]:
                create_broadcast(
                    session,
                    ws,
                    NewBroadcast(
                        name="timed",
                        channel_id=channel_id,
                        audience=AudienceSpec(selection="manual", contact_ids=[contact_id]),
                        content=Content(text="x"),
                        send_at=later,
                    ),
                )
    children.start("scheduler", "scheduler")
    children.start("dispatcher", "dispatcher", "--processes", str(processes), "--threads", "8")
    time.sleep(6)  # every worker process booted
    due = datetime.now(UTC) + timedelta(seconds=LEAD)
    with transaction() as session:
        session.execute(
            text("UPDATE broadcast SET send_at = :due WHERE workspace_id = :w"),
            {"due": due, "w": ws},
        )

    def all_done() -> bool:
        with transaction() as session:
            left = session.execute(
                text(
                    "SELECT count(*) FROM broadcast WHERE workspace_id = :w AND status <> 'completed'"
                ),
                {"w": ws},
            ).scalar_one()
            return bool(left == 0)

    wait_for("every timed send to complete", all_done, timeout=600, every=0.5)
    with transaction() as session:
        starts = sorted(
            float(r[0])
            for r in session.execute(
                text(
                    "SELECT extract(epoch FROM started_at - send_at) FROM broadcast "
                    "WHERE workspace_id = :w"
                ),
                {"w": ws},
            )
        )
    get_engine().dispose()
    arrivals: dict[str, float] = {}
    for r in httpx.get(f"{sim}/_sim/hooks/{hook}/requests").json():
        arrivals.setdefault(str(r["to"]), float(r["t"]))
    if len(arrivals) != count:
        raise SystemExit(f"{len(arrivals)} of {count} timed sends reached the provider")
    sends = sorted(t - due.timestamp() for t in arrivals.values())
    return {
        "timed_sends": count,
        "p50_lateness_s": round(quantile(starts, 0.5), 3),
        "p99_lateness_s": round(quantile(starts, 0.99), 3),
        "p50_send_lateness_s": round(quantile(sends, 0.5), 3),
        "p99_send_lateness_s": round(quantile(sends, 0.99), 3),
        "last_send_s": round(sends[-1], 3),
    }
