"""Pause during a large send, repeated: how long provider calls go on after the pause answer.

Each repeat creates a broadcast through the API on a fresh channel, lets it reach full speed,
pauses it through the API and takes the time the answer came back; the provider's records then
show the last call that arrived after that moment. Reported: p50 and p99 of "last call after
the pause answered" (0 when none came later) and the most calls that slipped through in one
repeat. Calls already under way when the pause lands finish; none may start after it.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import httpx2 as httpx

from bench.common import (
    Children,
    bench_system,
    create_broadcast,
    import_contacts,
    ok,
    quantile,
    start_api,
    start_simulator,
    wait_for,
    webhook_channel,
)

#: Sends a broadcast makes before it is paused: it is at full speed by then.
WARM = 1500


def run(repeats: int = 20, recipients: int = 20_000, processes: int = 2) -> dict[str, Any]:
    """The ``pause`` section of the results."""
    with bench_system() as (children, env, api):
        return _run(children, env, api, repeats, recipients, processes)


def _run(
    children: Children, env: dict[str, str], api: str, repeats: int, n: int, processes: int
) -> dict[str, Any]:
    sim = start_simulator(children)
    client, _ = start_api(children, api)
    children.start("scheduler", "scheduler")
    children.start("dispatcher", "dispatcher", "--processes", str(processes), "--threads", "8")
    time.sleep(6)  # every worker process booted
    after: list[float] = []
    slipped: list[int] = []
    for r in range(repeats):
        hook = f"pause-{r}-{secrets.token_hex(3)}"
        secret = secrets.token_urlsafe(24)
        httpx.put(f"{sim}/_sim/hooks/{hook}", json={"secret": secret}).raise_for_status()
        channel_id, account_id = webhook_channel(client, f"{sim}/hooks/{hook}", secret, name=hook)
        import_contacts(client, account_id, n, prefix="p-")
        broadcast_id = create_broadcast(client, channel_id, name=hook, text="x")

        def warm(hook: str = hook) -> bool:
            return int(httpx.get(f"{sim}/_sim/hooks/{hook}/stats").json()["requests"]) >= WARM

        wait_for("the send to reach full speed", warm, timeout=120, every=0.02)
        ok(client.post(f"/v1/broadcasts/{broadcast_id}/pause"))
        paused_at = time.time()
        time.sleep(3)
        arrivals = [float(x["t"]) for x in httpx.get(f"{sim}/_sim/hooks/{hook}/requests").json()]
        later = [t - paused_at for t in arrivals if t > paused_at]
        after.append(max(later, default=0.0))
        slipped.append(len(later))
        if len(arrivals) >= n:
            raise SystemExit("the broadcast finished before it was paused: raise the recipients")
        ok(client.post(f"/v1/broadcasts/{broadcast_id}/cancel"))
    client.close()
    ordered = sorted(after)
    return {
        "repeats": repeats,
        "recipients": n,
        "p50_s": round(quantile(ordered, 0.50), 3),
        "p99_s": round(quantile(ordered, 0.99), 3),
        "max_s": round(ordered[-1], 3),
        "slipped_max": max(slipped),
        "slipped_mean": round(sum(slipped) / len(slipped), 1),
    }
