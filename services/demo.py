"""``bcast demo`` and ``bcast watch``: the operator's view, through the HTTP API only."""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from shared.db.engine import transaction
from shared.db.models import Broadcast
from shared.domain.broadcasts import counts
from shared.domain.tokens import create_token

FINAL = {"completed", "canceled"}


class Client:
    """A tiny JSON client for the bcast API (and the simulator's control routes)."""

    def __init__(self, base_url: str, token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token

    def request(
        self, method: str, path: str, body: Any = None, *, content_type: str = "application/json"
    ) -> Any:
        data: bytes | None = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method)  # noqa: S310
        request.add_header("Content-Type", content_type)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - our own URLs
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise SystemExit(f"{method} {path} -> {exc.code}: {exc.read().decode()}") from None


def from_database(broadcast_id: int) -> dict[str, Any]:
    """The broadcast as the API shows it, read straight from the database (for an operator
    on a machine of the deployment, without a token).
    """
    with transaction() as session:
        broadcast = session.get(Broadcast, broadcast_id)
        if broadcast is None:
            raise SystemExit(f"broadcast {broadcast_id} not found")
        return {
            "id": broadcast.id,
            "status": broadcast.status,
            "audience_size": broadcast.audience_size,
            "counts": counts(broadcast),
        }


def follow(
    fetch: Callable[[], dict[str, Any]], broadcast_id: int, *, poll: float = 0.25
) -> dict[str, Any]:
    """Show a progress bar until the broadcast is completed or canceled; return it."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:>7.0f}/{task.total:<7.0f}"),
        TextColumn(
            "sent [green]{task.fields[sent]}[/] failed [red]{task.fields[failed]}[/] "
            "partial {task.fields[partial]} queued {task.fields[queued]} "
            "canceled {task.fields[canceled]}"
        ),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("", total=1, sent=0, failed=0, partial=0, queued=0, canceled=0)
        while True:
            b = fetch()
            c = b["counts"]
            total = c["total"] or b["audience_size"]
            done = c["total"] - c["queued"] if c["total"] else 0
            progress.update(
                task,
                description=f"broadcast {broadcast_id} {b['status']}",
                total=total,
                completed=done,
                sent=c["sent"],
                failed=c["failed"],
                partial=c.get("partial", 0),
                queued=c["queued"],
                canceled=c["canceled"],
            )
            if b["status"] in FINAL:
                return dict(b)
            time.sleep(poll)


def run_demo(*, api_url: str, simulator_url: str, contacts: int, rate: float) -> int:
    """The whole operator story against a running system; returns an exit code."""
    suffix = secrets.token_hex(3)
    with transaction() as session:
        token = create_token(session, "demo", "bcast demo").token
    api = Client(api_url, token)
    sim = Client(simulator_url)
    secret = secrets.token_urlsafe(24)
    hook = f"demo-{suffix}"
    sim.request(
        "PUT",
        f"/_sim/hooks/{hook}",
        {"secret": secret, "latency_ms": 5, "fail_addresses": ["user-7"]},
    )
    channel = api.request(
        "POST",
        "/v1/channels",
        {
            "name": f"demo webhook {suffix}",
            "kind": "webhook",
            "config": {"url": f"{simulator_url}/hooks/{hook}", "secret": secret},
            "rate_limit_per_second": rate,
        },
    )
    account = api.request(
        "POST", "/v1/accounts", {"channel_id": channel["id"], "name": f"demo {suffix}"}
    )
    lines = ["account_id,address,name,tags"]
    lines += [
        f"{account['id']},user-{i},Demo user {i},{'customers;vip' if i % 4 == 0 else 'customers'}"
        for i in range(contacts)
    ]
    imported = api.request(
        "POST", "/v1/contacts/import", ("\n".join(lines) + "\n").encode(), content_type="text/csv"
    )
    tags = {t["name"]: t["id"] for t in api.request("GET", "/v1/tags?limit=500")["items"]}
    preview = api.request(
        "POST",
        "/v1/audiences/preview",
        {"channel_id": channel["id"], "tag_ids": [tags["customers"]]},
    )
    print(
        f"imported {imported['created']} contacts; audience of the 'customers' tag: {preview['count']}"
    )
    broadcast = api.request(
        "POST",
        "/v1/broadcasts",
        {
            "name": f"Demo launch {suffix}",
            "channel_id": channel["id"],
            "audience": {"tag_ids": [tags["customers"]], "selection": "all"},
            "content": {"text": "Hello from bcast!"},
            "send_at": None,
        },
    )
    print(
        f"broadcast {broadcast['id']} created; following it (the API token is in BCAST_TOKEN form below)"
    )
    final = follow(lambda: api.request("GET", f"/v1/broadcasts/{broadcast['id']}"), broadcast["id"])
    stats = sim.request("GET", f"/_sim/hooks/{hook}/stats")
    failed = api.request("GET", f"/v1/broadcasts/{broadcast['id']}/recipients?status=failed")[
        "items"
    ]
    print(
        f"status {final['status']}: {final['counts']}; the simulator accepted {stats['accepted']} "
        f"unique messages, {stats['duplicates']} duplicates, {stats['bad_signatures']} bad signatures"
    )
    for row in failed[:5]:
        print(f"  not reached: {row['address']} ({row['last_error']})")
    print(f"export BCAST_TOKEN={token}   # then: bcast watch {broadcast['id']}")
    expected_sent = preview["count"] - len(failed)
    ok = (
        final["status"] == "completed"
        and stats["duplicates"] == 0
        and stats["accepted"] == expected_sent
    )
    return 0 if ok else 1
