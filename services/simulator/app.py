"""The simulator's HTTP app.

Provider side:
  ``POST /hooks/{name}``  the signed webhook format.
Control side (for tests and benchmarks):
  ``PUT /_sim/hooks/{name}``           set how the hook behaves (see ``HookConfig``)
  ``GET /_sim/hooks/{name}/stats``     counts: requests, accepted, unique keys, duplicates, ...
  ``GET /_sim/hooks/{name}/requests``  every request received, in arrival order
  ``DELETE /_sim/hooks/{name}``        forget the hook (config and records)
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

SIGNATURE_HEADER = "X-Bcast-Signature"


class HookConfig(BaseModel):
    """How one simulated endpoint behaves. Every switch defaults to "behave well"."""

    model_config = ConfigDict(extra="forbid")

    #: The webhook secret, to check signatures (unchecked when empty).
    secret: str = ""
    latency_ms: float = Field(default=0.0, ge=0)
    latency_jitter_ms: float = Field(default=0.0, ge=0)
    #: Addresses answered with a permanent 4xx.
    fail_addresses: list[str] = Field(default_factory=list)
    #: Share of requests answered 5xx / 429 at random.
    error_ratio: float = Field(default=0.0, ge=0, le=1)
    throttle_ratio: float = Field(default=0.0, ge=0, le=1)
    #: Retry-After seconds sent with every 429.
    retry_after: float = Field(default=1.0, ge=0)
    #: Each idempotency key is answered 503 this many times before it is accepted.
    transient_first: int = Field(default=0, ge=0)
    #: Above this many requests in the last second, answer 429 (0: no limit).
    rate_limit_per_second: float = Field(default=0.0, ge=0)
    seed: int = 0


@dataclass
class Hook:
    config: HookConfig
    rng: random.Random
    records: list[dict[str, Any]] = field(default_factory=list)
    accepted: dict[str, str] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    arrivals: list[float] = field(default_factory=list)
    duplicates: int = 0


class Simulator:
    """All simulated endpoints of one process."""

    def __init__(self) -> None:
        self.hooks: dict[str, Hook] = {}
        self.next_id = 0

    def hook(self, name: str) -> Hook:
        if name not in self.hooks:
            self.hooks[name] = Hook(HookConfig(), random.Random(0))  # noqa: S311 - a simulation
        return self.hooks[name]

    def configure(self, name: str, config: HookConfig) -> None:
        hook = self.hook(name)
        hook.config = config
        hook.rng = random.Random(config.seed)  # noqa: S311 - a simulation

    def over_rate(self, hook: Hook, now: float) -> bool:
        limit = hook.config.rate_limit_per_second
        if not limit:
            return False
        window = [t for t in hook.arrivals[-int(limit) - 2 :] if t > now - 1.0]
        return len(window) > limit

    async def webhook(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        hook = self.hook(name)
        config = hook.config
        body = await request.read()
        now = time.time()
        hook.arrivals.append(now)
        try:
            payload = json.loads(body)
        except ValueError:
            return web.json_response({"error": "body is not JSON"}, status=400)
        signature_ok: bool | None = None
        if config.secret:
            expected = (
                "sha256=" + hmac.new(config.secret.encode(), body, hashlib.sha256).hexdigest()
            )
            signature_ok = hmac.compare_digest(expected, request.headers.get(SIGNATURE_HEADER, ""))
        key = str(payload.get("idempotency_key"))
        record: dict[str, Any] = {
            "t": now,
            "key": key,
            "to": payload.get("to"),
            "text": payload.get("text"),
            "media": payload.get("media"),
            "broadcast_id": payload.get("broadcast_id"),
            "signature_ok": signature_ok,
            "idempotency_header": request.headers.get("Idempotency-Key"),
        }
        hook.records.append(record)
        if config.latency_ms or config.latency_jitter_ms:
            await asyncio.sleep(
                (config.latency_ms + hook.rng.uniform(0, config.latency_jitter_ms)) / 1000
            )
        status, answer, headers = self._decide(hook, key, payload, now)
        record["status"] = status
        return web.json_response(answer, status=status, headers=headers)

    def _decide(
        self, hook: Hook, key: str, payload: dict[str, Any], now: float
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        config = hook.config
        retry = {"Retry-After": f"{config.retry_after:g}"}
        if config.secret and not hmac.compare_digest(
            (hook.records[-1]["signature_ok"] and "ok") or "", "ok"
        ):
            return 401, {"error": "bad signature"}, {}
        if self.over_rate(hook, now):
            return 429, {"error": "rate limit exceeded"}, retry
        if config.throttle_ratio and hook.rng.random() < config.throttle_ratio:
            return 429, {"error": "slow down"}, retry
        if config.error_ratio and hook.rng.random() < config.error_ratio:
            return 503, {"error": "temporarily unavailable"}, {}
        seen = hook.attempts.get(key, 0)
        hook.attempts[key] = seen + 1
        if seen < config.transient_first:
            return 503, {"error": f"transient failure {seen + 1} of {config.transient_first}"}, {}
        if payload.get("to") in config.fail_addresses:
            return 404, {"error": f"no such recipient: {payload.get('to')}"}, {}
        if key in hook.accepted:
            hook.duplicates += 1
            return 200, {"id": hook.accepted[key], "duplicate": True}, {}
        self.next_id += 1
        hook.accepted[key] = f"sim-{self.next_id}"
        return 200, {"id": hook.accepted[key]}, {}

    def stats(self, hook: Hook) -> dict[str, Any]:
        statuses = [r.get("status") for r in hook.records]
        return {
            "requests": len(hook.records),
            "accepted": len(hook.accepted),
            "duplicates": hook.duplicates,
            "throttled": statuses.count(429),
            "transient_errors": sum(1 for s in statuses if s is not None and s >= 500),
            "permanent_errors": sum(
                1 for s in statuses if s is not None and 400 <= s < 500 and s != 429
            ),
            "bad_signatures": sum(1 for r in hook.records if r["signature_ok"] is False),
            "max_in_any_second": max_in_window(hook.arrivals, 1.0),
            "first_at": hook.arrivals[0] if hook.arrivals else None,
            "last_at": hook.arrivals[-1] if hook.arrivals else None,
        }


def max_in_window(times: list[float], width: float) -> int:
    """Most arrivals in any half-open window ``[t, t + width)``."""
    ordered = sorted(times)
    best = start = 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - width:
            start += 1
        best = max(best, end - start + 1)
    return best


def make_app() -> web.Application:
    sim = Simulator()
    app = web.Application(client_max_size=16 * 1024 * 1024)

    async def put_hook(request: web.Request) -> web.Response:
        try:
            config = HookConfig.model_validate(await request.json())
        except (ValidationError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=422)
        sim.configure(request.match_info["name"], config)
        return web.json_response(config.model_dump())

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(sim.stats(sim.hook(request.match_info["name"])))

    async def get_requests(request: web.Request) -> web.Response:
        return web.json_response(sim.hook(request.match_info["name"]).records)

    async def delete_hook(request: web.Request) -> web.Response:
        sim.hooks.pop(request.match_info["name"], None)
        return web.json_response({"deleted": True})

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_post("/hooks/{name}", sim.webhook)
    app.router.add_put("/_sim/hooks/{name}", put_hook)
    app.router.add_get("/_sim/hooks/{name}/stats", get_stats)
    app.router.add_get("/_sim/hooks/{name}/requests", get_requests)
    app.router.add_delete("/_sim/hooks/{name}", delete_hook)
    app.router.add_get("/_sim/health", health)
    app["simulator"] = sim
    return app


def serve(host: str, port: int) -> None:
    web.run_app(make_app(), host=host, port=port, access_log=None, print=None)
