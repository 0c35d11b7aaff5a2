"""Per-channel throughput: each provider kind at its provider's own limit, against the
simulator speaking its API (which enforces that limit with 429s).

For each kind a channel is made at the provider's default rate (requests a second, as
``shared.domain.channels.DEFAULT_RATE_LIMIT_PER_SECOND`` has it) with about ``seconds`` of
sending, and a broadcast of text goes to all of it. Measured at the provider from its
accepted requests: requests a second (against the limit: the fraction used), recipients a
second, and the worst one-second window. LINE goes twice: personalised text (a push per
user) and plain text (multicasts of up to 500 users a call), which shows what the multicast
is worth against the provider's 200 requests a second.
"""

from __future__ import annotations

import os
import secrets
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx

from bench.common import (
    Children,
    bench_env,
    follow_database,
    scratch_database,
    scratch_vhost,
    start_simulator,
    wait_for,
)
from services.simulator.app import max_in_window

#: Seconds of sending per kind at its limit.
SECONDS = 10.0
#: Recipients of the LINE multicast run: the pipeline's pace, not the provider's, bounds it.
LINE_MULTICAST = 100_000


def run(seconds: float = SECONDS, line_recipients: int = LINE_MULTICAST) -> dict[str, Any]:
    with scratch_database() as db_url, scratch_vhost() as vhost:
        env = bench_env(db_url, vhost)
        os.environ.update(env)
        children = Children(env)
        try:
            return _run(children, seconds, line_recipients)
        finally:
            children.stop_all()


def _cases(seconds: float, line_recipients: int) -> list[tuple[str, str, int, str]]:
    """(label, kind, recipients, text) of each run."""
    from shared.domain.channels import DEFAULT_RATE_LIMIT_PER_SECOND
    from shared.domain.lifecycle import ChannelKind

    def n(kind: ChannelKind) -> int:
        return int(DEFAULT_RATE_LIMIT_PER_SECOND[kind] * seconds)

    return [
        ("telegram", "telegram", n(ChannelKind.TELEGRAM), "x"),
        ("whatsapp", "whatsapp", n(ChannelKind.WHATSAPP), "x"),
        ("messenger", "messenger", n(ChannelKind.MESSENGER), "x"),
        ("instagram", "instagram", n(ChannelKind.INSTAGRAM), "x"),
        ("line_push", "line", n(ChannelKind.LINE), "Hi {{name}}"),
        ("line_multicast", "line", line_recipients, "x"),
    ]


def _address(kind: str, i: int) -> str:
    if kind == "line":
        return f"U{uuid.UUID(int=i + 1).hex}"
    if kind == "whatsapp":
        return f"+4915{i:09d}"
    return str(10**9 + i)


def _config(kind: str, sim: str, hook: str) -> dict[str, Any]:
    token = secrets.token_urlsafe(24)
    return {
        "telegram": {"bot_token": f"1:{token}", "api_base_url": f"{sim}/telegram/{hook}"},
        "whatsapp": {
            "access_token": token,
            "phone_number_id": "1",
            "api_version": "v21.0",
            "api_base_url": f"{sim}/whatsapp/{hook}",
        },
        "messenger": {
            "page_access_token": token,
            "api_version": "v21.0",
            "api_base_url": f"{sim}/messenger/{hook}",
        },
        "instagram": {
            "page_access_token": token,
            "ig_user_id": "1",
            "api_version": "v21.0",
            "api_base_url": f"{sim}/instagram/{hook}",
        },
        "line": {"channel_access_token": token, "api_base_url": f"{sim}/line/{hook}"},
    }[kind]


def _run(children: Children, seconds: float, line_recipients: int) -> dict[str, Any]:
    from shared.db.engine import get_engine, transaction
    from shared.db.models import Account, Broadcast, Channel
    from shared.domain.audience import AudienceSpec
    from shared.domain.broadcasts import Content, NewBroadcast, create_broadcast
    from shared.domain.channels import DEFAULT_RATE_LIMIT_PER_SECOND
    from shared.domain.contacts import ContactIn, import_contacts
    from shared.domain.lifecycle import ChannelKind
    from shared.domain.tokens import ensure_workspace

    follow_database()
    sim = start_simulator(children)
    children.start("scheduler", "scheduler")
    children.start("dispatcher", "dispatcher", "--processes", "2", "--threads", "8")
    time.sleep(6)  # every worker process booted
    results: dict[str, Any] = {}
    for label, kind, n, text in _cases(seconds, line_recipients):
        limit = DEFAULT_RATE_LIMIT_PER_SECOND[ChannelKind(kind)]
        hook = f"{label}-{secrets.token_hex(3)}"
        httpx.put(
            f"{sim}/_sim/hooks/{hook}", json={"rate_limit_per_second": limit}
        ).raise_for_status()
        wrote = datetime.now(UTC)
        with transaction() as session:
            ws = ensure_workspace(session, "bench")
            channel = Channel(
                workspace_id=ws,
                name=hook,
                kind=kind,
                config=_config(kind, sim, hook),
                rate_limit_per_second=limit,
            )
            session.add(channel)
            session.flush()
            account = Account(workspace_id=ws, channel_id=channel.id, name=hook)
            session.add(account)
            session.flush()
            for start in range(0, n, 50_000):
                rows = [
                    ContactIn(
                        account_id=account.id,
                        address=_address(kind, i),
                        name=f"n{i}",
                        last_inbound_at=wrote,
                    )
                    for i in range(start, min(n, start + 50_000))
                ]
                import_contacts(session, ws, rows)
            channel_id = channel.id
        created = time.perf_counter()
        with transaction() as session:
            b, _ = create_broadcast(
                session,
                ws,
                NewBroadcast(
                    name=label,
                    channel_id=channel_id,
                    audience=AudienceSpec(account_ids=[account.id]),
                    content=Content(text=text),
                    send_at=None,
                ),
            )
            broadcast_id = b.id

        def done(broadcast_id: int = broadcast_id) -> bool:
            with transaction() as session:
                found = session.get(Broadcast, broadcast_id)
                return found is not None and found.status == "completed"

        wait_for(f"the {label} broadcast to complete", done, timeout=n / limit * 4 + 120, every=0.2)
        total = time.perf_counter() - created
        records = httpx.get(f"{sim}/_sim/hooks/{hook}/requests").json()
        results[label] = _measure(records, kind, n, limit, total)
        print(label, results[label], flush=True)
    get_engine().dispose()
    return results


def _measure(
    records: list[dict[str, Any]], kind: str, n: int, limit: float, total: float
) -> dict[str, Any]:
    accepted = [r for r in records if r.get("status") == 200]
    times = [float(r["t"]) for r in accepted]
    reached: list[str] = []
    for r in accepted:
        to = r["to"]
        reached.extend(to if isinstance(to, list) else [str(to)])
    if len(reached) != n or len(set(reached)) != n:
        raise SystemExit(
            f"{kind}: {len(set(reached))} of {n} recipients reached, {len(reached)} deliveries"
        )
    span = max(times[-1] - times[0], 1e-9) if len(times) > 1 else 1.0
    requests_per_second = (len(times) - 1) / span if len(times) > 1 else 0.0
    return {
        "recipients": n,
        "limit_requests_per_second": limit,
        "requests": len(accepted),
        "requests_per_second": round(requests_per_second, 1),
        "fraction_of_limit": round(requests_per_second / limit, 3),
        "recipients_per_second": round(n / span, 1),
        "recipients_per_second_create_to_completed": round(n / total, 1),
        "worst_window_ratio": round(max_in_window(times, 1.0) / limit, 3),
        "throttled": sum(1 for r in records if r.get("status") == 429),
    }
