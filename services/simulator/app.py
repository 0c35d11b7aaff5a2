"""The simulator's HTTP app.

Provider side (``name`` picks a simulated endpoint with its own switches and records):
  ``POST /hooks/{name}``                                        the signed webhook format
  ``POST /telegram/{name}/bot{token}/{method}``                 the Telegram Bot API
  ``POST /whatsapp/{name}/{version}/{phone_number_id}/messages``  the WhatsApp Cloud API
  ``POST /messenger/{name}/{version}/me/messages``              Messenger's Send API (``graph``)
  ``POST /instagram/{name}/{version}/{ig_user_id}/messages``    Instagram's Send API (``graph``)
  ``POST /line/{name}/v2/bot/message/push`` and ``.../multicast``  LINE's Messaging API (``line``)
Control side (for tests and benchmarks):
  ``PUT /_sim/hooks/{name}``           set how the hook behaves (see ``HookConfig``)
  ``GET /_sim/hooks/{name}/stats``     counts: requests, accepted, unique keys, duplicates, ...
  ``GET /_sim/hooks/{name}/requests``  every request received, in arrival order
  ``DELETE /_sim/hooks/{name}``        forget the hook (config and records)
  ``PUT /_sim/ports/{port}``           ``{"open": false}`` closes an extra port (``serve``'s
                                       ``extra_ports``): connections to it are refused and the
                                       open ones cut; ``{"open": true}`` listens again. The
                                       records are kept: a provider that is down, then back.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import hmac
import json
import random
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.simulator import graph, line
from services.simulator.front import Front

SIGNATURE_HEADER = "X-Bcast-Signature"
#: Oldest signed webhook body the simulator accepts, as a receiver should.
MAX_SIGNED_AGE = 300
#: Every this many requests kept, what the process holds is moved out of the garbage
#: collector's sight (``gc.freeze``).
FREEZE_EVERY = 10_000


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
    #: Parts of a several-call message from this index on are refused for good (the key of
    #: part ``i`` ends in ``-i``); None refuses none.
    refuse_parts_from: int | None = Field(default=None, ge=0)
    #: Telegram: answer 429 to a second message to one chat within a second (three seconds for
    #: a group: a negative id or an @username), as Telegram's per-chat limit does.
    chat_limit: bool = False
    #: WhatsApp: addresses that last wrote more than 24 hours ago: a free-form message (text
    #: or image) to them is refused with 131047, as the Cloud API refuses it.
    outside_window: list[str] = Field(default_factory=list)
    #: WhatsApp: addresses over the marketing-message frequency cap (131049).
    frequency_capped: list[str] = Field(default_factory=list)
    #: WhatsApp: answer every message with this error code (e.g. 132001, a template problem).
    error_code: int | None = None
    #: WhatsApp: the approved templates, ``"name:language"`` -> the number of body
    #: parameters; when set, a template message is checked against them as the Cloud API
    #: does (132001 unknown name or language, 132000 wrong number of parameters).
    templates: dict[str, int] = Field(default_factory=dict)
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
    #: Telegram: when each chat was last sent to.
    chat_last: dict[str, float] = field(default_factory=dict)
    #: LINE: the call each accepted retry key carried (its users and messages).
    line_calls: dict[str, Any] = field(default_factory=dict)
    #: The webhook secret's HMAC, keyed once and copied per body.
    mac: Any = None


@dataclass
class Arrival:
    """A webhook call noted on arrival, not yet answered."""

    hook: Hook
    key: str
    record: dict[str, Any]
    now: float


class Simulator:
    """All simulated endpoints of one process."""

    def __init__(self) -> None:
        self.hooks: dict[str, Hook] = {}
        self.next_id = 0
        self.kept = 0

    def hook(self, name: str) -> Hook:
        if name not in self.hooks:
            self.hooks[name] = Hook(HookConfig(), random.Random(0))  # noqa: S311 - a simulation
        return self.hooks[name]

    def configure(self, name: str, config: HookConfig) -> None:
        hook = self.hook(name)
        hook.config = config
        hook.mac = None
        hook.rng = random.Random(config.seed)  # noqa: S311 - a simulation

    def over_rate(self, hook: Hook, now: float) -> bool:
        limit = hook.config.rate_limit_per_second
        if not limit:
            return False
        window = [t for t in hook.arrivals[-int(limit) - 2 :] if t > now - 1.0]
        return len(window) > limit

    def receive(self, name: str, record: dict[str, Any]) -> tuple[Hook, float]:
        """Note a request's arrival; return its hook and the arrival time."""
        hook = self.hook(name)
        now = time.time()
        hook.arrivals.append(now)
        record["t"] = now
        hook.records.append(record)
        self.kept += 1
        if self.kept % FREEZE_EVERY == 0:
            # The records are kept for the life of the process (a test reads them back), and
            # a full collection walks every one: 0.35 s at 150,000 records, seconds at a
            # million, during which this provider answers nobody. A real provider does not
            # stop for the size of a test's memory, and a benchmark's raw limit, measured
            # while few records are kept, never would. Frozen objects are still freed by
            # their reference counts (a hook deleted) and only leave the collector's walk.
            gc.freeze()
        return hook, now

    async def lag(self, hook: Hook) -> None:
        config = hook.config
        if config.latency_ms or config.latency_jitter_ms:
            await asyncio.sleep(
                (config.latency_ms + hook.rng.uniform(0, config.latency_jitter_ms)) / 1000
            )

    def decide(self, hook: Hook, key: str, to: Any, now: float) -> tuple[str, str]:
        """What to answer, whatever the provider's shape: (verdict, detail).

        Verdicts: ``ok`` (detail: the message id), ``duplicate`` (detail: the first id),
        ``throttled``, ``unavailable``, ``unreachable``, ``refused``, ``bad_signature``.
        """
        config = hook.config
        if hook.records[-1].get("signature_ok") is False:
            return "bad_signature", "bad signature"
        if self.over_rate(hook, now):
            return "throttled", "rate limit exceeded"
        if config.throttle_ratio and hook.rng.random() < config.throttle_ratio:
            return "throttled", "slow down"
        if config.error_ratio and hook.rng.random() < config.error_ratio:
            return "unavailable", "temporarily unavailable"
        seen = hook.attempts.get(key, 0)
        hook.attempts[key] = seen + 1
        if seen < config.transient_first:
            return "unavailable", f"transient failure {seen + 1} of {config.transient_first}"
        if str(to) in config.fail_addresses:
            return "unreachable", f"no such recipient: {to}"
        part = key.rpartition("-")[2] if "-" in key else ""
        refused_from = config.refuse_parts_from
        if refused_from is not None and part.isdigit() and int(part) >= refused_from:
            return "refused", f"part {part} refused"
        if key in hook.accepted:
            hook.duplicates += 1
            return "duplicate", hook.accepted[key]
        self.next_id += 1
        hook.accepted[key] = f"sim-{self.next_id}"
        return "ok", hook.accepted[key]

    async def webhook(self, request: web.Request) -> web.Response:
        """The signed webhook: 2xx with ``id``, 429 + Retry-After, 503, 404, 401. (The
        listener ``serve`` opens answers it itself, through the same two methods.)
        """
        got = self.take_webhook(
            request.match_info["name"],
            await request.read(),
            request.headers.get(SIGNATURE_HEADER),
            request.headers.get("Idempotency-Key"),
        )
        if isinstance(got, tuple):
            return web.json_response(got[1], status=got[0])
        await self.lag(got.hook)
        status, answer, headers = self.answer_webhook(got)
        return web.json_response(answer, status=status, headers=headers)

    def take_webhook(
        self, name: str, body: bytes, signature: str | None, idempotency_header: str | None
    ) -> Arrival | tuple[int, dict[str, Any]]:
        """A webhook call's arrival, noted; or, for a body that is not JSON, the answer."""
        try:
            payload = json.loads(body)
        except ValueError:
            return 400, {"error": "body is not JSON"}
        if not isinstance(payload, dict):
            return 400, {"error": "body is not a JSON object"}
        hook = self.hook(name)
        signature_ok: bool | None = None
        if hook.config.secret:
            if hook.mac is None:
                hook.mac = hmac.new(hook.config.secret.encode(), digestmod=hashlib.sha256)
            mac = hook.mac.copy()
            mac.update(body)
            signature_ok = hmac.compare_digest("sha256=" + mac.hexdigest(), signature or "")
            # A receiver refuses signed bodies that are too old: a replay of a captured one.
            stamp = payload.get("timestamp")
            if not isinstance(stamp, int) or abs(time.time() - stamp) > MAX_SIGNED_AGE:
                signature_ok = False
        key = str(payload.get("idempotency_key"))
        record: dict[str, Any] = {
            "key": key,
            "to": payload.get("to"),
            "text": payload.get("text"),
            "media": payload.get("media"),
            "broadcast_id": payload.get("broadcast_id"),
            "signature_ok": signature_ok,
            "idempotency_header": idempotency_header,
        }
        hook, now = self.receive(name, record)
        return Arrival(hook, key, record, now)

    def lags(self, hook: Hook) -> bool:
        """Does the hook answer after a latency?"""
        return bool(hook.config.latency_ms or hook.config.latency_jitter_ms)

    def answer_webhook(self, got: Arrival) -> tuple[int, dict[str, Any], dict[str, str]]:
        """The answer to a noted webhook call: status, JSON body, extra headers."""
        hook = got.hook
        verdict, detail = self.decide(hook, got.key, got.record["to"], got.now)
        answers: dict[str, tuple[int, dict[str, Any], dict[str, str]]] = {
            "ok": (200, {"id": detail}, {}),
            "duplicate": (200, {"id": detail, "duplicate": True}, {}),
            "throttled": (429, {"error": detail}, {"Retry-After": f"{hook.config.retry_after:g}"}),
            "unavailable": (503, {"error": detail}, {}),
            "unreachable": (404, {"error": detail}, {}),
            "refused": (422, {"error": detail}, {}),
            "bad_signature": (401, {"error": detail}, {}),
        }
        status, answer, headers = answers[verdict]
        got.record["status"] = status
        return status, answer, headers

    async def telegram(self, request: web.Request) -> web.Response:
        """Bot API shape: ``{"ok": true, "result": ...}`` or ``{"ok": false, "error_code", ...}``."""
        method = request.match_info["method"]
        payload = await request.json()
        record: dict[str, Any] = {
            "key": request.headers.get("Idempotency-Key"),
            "method": method,
            "token": request.match_info["token"],
            "to": payload.get("chat_id"),
            "text": payload.get("text") or payload.get("caption"),
            "photo": payload.get("photo"),
            "media": payload.get("media"),
            "signature_ok": None,
        }
        hook, now = self.receive(request.match_info["name"], record)
        await self.lag(hook)
        chat = str(record["to"])
        gap = 3.0 if chat.startswith(("-", "@")) else 1.0
        last = hook.chat_last.get(chat)
        if hook.config.chat_limit and last is not None and now - last < gap:
            verdict, detail = "throttled", "too many messages to one chat"
        else:
            verdict, detail = self.decide(hook, str(record["key"]), record["to"], now)
        if verdict in ("ok", "duplicate"):
            hook.chat_last[chat] = now
            message_id = int(detail.removeprefix("sim-"))
            count = len(payload.get("media") or []) if method == "sendMediaGroup" else 1
            result: Any = {"message_id": message_id, "chat": {"id": record["to"]}}
            if method == "sendMediaGroup":
                result = [{"message_id": message_id * 100 + i} for i in range(count)]
            record["status"] = 200
            return web.json_response({"ok": True, "result": result})
        status, description, extra = {
            "throttled": (
                429,
                f"Too Many Requests: retry after {hook.config.retry_after:g}",
                {"parameters": {"retry_after": hook.config.retry_after}},
            ),
            "unavailable": (502, "Bad Gateway", {}),
            "unreachable": (403, "Forbidden: bot was blocked by the user", {}),
            "refused": (400, "Bad Request: wrong file identifier/HTTP URL specified", {}),
        }[verdict]
        record["status"] = status
        return web.json_response(
            {"ok": False, "error_code": status, "description": description, **extra}, status=status
        )

    async def whatsapp(self, request: web.Request) -> web.Response:
        """Cloud API shape: ``{"messages": [{"id": "wamid..."}]}`` or ``{"error": {"code", ...}}``."""
        payload = await request.json()
        kind = payload.get("type")
        body = payload.get(kind) or {}
        record: dict[str, Any] = {
            "key": request.headers.get("Idempotency-Key"),
            "authorization": request.headers.get("Authorization"),
            "phone_number_id": request.match_info["phone_number_id"],
            "version": request.match_info["version"],
            "to": payload.get("to"),
            "type": kind,
            "text": body.get("body") if kind == "text" else body.get("caption"),
            "link": body.get("link"),
            "template": body if kind == "template" else None,
            "signature_ok": None,
        }
        hook, now = self.receive(request.match_info["name"], record)
        await self.lag(hook)
        refusal = self.whatsapp_rule(hook.config, kind, str(record["to"]), record["template"])
        if refusal is not None:
            code, message, details = refusal
            record["status"] = 400
            error = {
                "message": message,
                "type": "OAuthException",
                "code": code,
                "error_data": {"messaging_product": "whatsapp", "details": details},
                "fbtrace_id": "sim",
            }
            return web.json_response({"error": error}, status=400)
        verdict, detail = self.decide(hook, str(record["key"]), record["to"], now)
        if verdict in ("ok", "duplicate"):
            record["status"] = 200
            return web.json_response(
                {
                    "messaging_product": "whatsapp",
                    "contacts": [{"input": record["to"], "wa_id": str(record["to"]).lstrip("+")}],
                    "messages": [{"id": f"wamid.{detail}"}],
                }
            )
        status, code, message = {
            "throttled": (429, 130429, "Rate limit hit"),
            "unavailable": (503, 131016, "Service unavailable"),
            "unreachable": (400, 131026, "Message undeliverable"),
            "refused": (400, 131053, "Media upload error"),
        }[verdict]
        record["status"] = status
        error = {"message": message, "type": "OAuthException", "code": code, "fbtrace_id": "sim"}
        return web.json_response({"error": error}, status=status)

    @staticmethod
    def whatsapp_rule(
        config: HookConfig, kind: Any, to: str, template: Any
    ) -> tuple[int, str, str] | None:
        """The Cloud API's own refusals: (code, message, details), or None."""
        if config.error_code is not None:
            return config.error_code, f"(#{config.error_code}) Simulated error", "simulated"
        if kind == "template" and config.templates:
            return template_problem(config.templates, template)
        if kind in ("text", "image") and to in config.outside_window:
            return (
                131047,
                "Re-engagement message",
                "Message failed to send because more than 24 hours have passed since the "
                "customer last replied to this number.",
            )
        if to in config.frequency_capped:
            return (
                131049,
                "This message was not delivered to maintain healthy ecosystem engagement.",
                "In order to maintain a healthy ecosystem engagement, the message failed to "
                "be delivered.",
            )
        return None

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


def template_problem(approved: dict[str, int], template: Any) -> tuple[int, str, str] | None:
    """Why the Cloud API would refuse this template message, or None."""
    if not isinstance(template, dict):
        return 131008, "Required parameter is missing", "template is required"
    language = template.get("language")
    code = language.get("code") if isinstance(language, dict) else None
    wanted = approved.get(f"{template.get('name')}:{code}")
    if wanted is None:
        return (
            132001,
            "Template name does not exist in the translation",
            f"template name ({template.get('name')}) does not exist in {code}",
        )
    body = [c for c in template.get("components") or [] if c.get("type") == "body"]
    given = len(body[0].get("parameters") or []) if body else 0
    if given != wanted:
        return (
            132000,
            "Number of parameters does not match the expected number of params",
            f"body: number of localizable_params ({given}) does not match the expected "
            f"number of params ({wanted})",
        )
    return None


class ExtraPorts:
    """Ports that serve the same simulator beside its main one and can be closed and opened
    again, so a test can take the provider down (connections refused) and bring it back while
    the control port, and every record, stay.

    Parameters:
      host: the listen address.
      protocol: makes the protocol of each connection (``serve``'s listener).
    """

    def __init__(self, host: str, protocol: Callable[[], asyncio.Protocol]) -> None:
        self.host = host
        self.protocol = protocol
        self.sites: dict[int, asyncio.AbstractServer | None] = {}

    async def open(self, port: int) -> None:
        if self.sites.get(port) is None:
            loop = asyncio.get_running_loop()
            self.sites[port] = await loop.create_server(self.protocol, self.host, port)

    async def close(self, port: int) -> None:
        """Stop listening on ``port``: new connections are refused, and a connection already
        open is cut when its next request comes (one being answered is answered first).
        """
        site = self.sites.get(port)
        if site is not None:
            self.sites[port] = None
            site.close()

    def is_closed(self, port: int | None) -> bool:
        """Is ``port`` an extra port that is closed now?"""
        return port in self.sites and self.sites[port] is None

    def cut(self, request: web.Request) -> bool:
        """Cut the request's connection if it came through a closed port; True if it did."""
        if all(site is not None for site in self.sites.values()):
            return False
        transport = request.transport
        if transport is None:
            return False
        sockname = transport.get_extra_info("sockname")
        if not self.is_closed(sockname[1] if isinstance(sockname, tuple) else None):
            return False
        transport.close()
        return True


#: Where an app made by ``make_app`` keeps its ``Simulator``.
SIMULATOR = web.AppKey("simulator", Simulator)
#: Where ``serve`` keeps the extra ports (absent in an app made for in-process tests).
EXTRA_PORTS = web.AppKey("extra_ports", ExtraPorts)


def max_in_window(times: list[float], width: float) -> int:
    """Most arrivals in any half-open window ``[t, t + width)``."""
    ordered = sorted(times)
    best = start = 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - width:
            start += 1
        best = max(best, end - start + 1)
    return best


@web.middleware
async def _outages(request: web.Request, handler: Handler) -> web.StreamResponse:
    ports = request.app.get(EXTRA_PORTS)
    if ports is not None and ports.cut(request):
        # Never written: the connection is gone, as when a provider goes down.
        return web.Response(status=503)
    return await handler(request)


def make_app() -> web.Application:
    """The simulator's app; ``app[SIMULATOR]`` is its state, for in-process tests."""
    sim = Simulator()
    app = web.Application(client_max_size=16 * 1024 * 1024, middlewares=[_outages])

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

    async def put_port(request: web.Request) -> web.Response:
        ports = request.app.get(EXTRA_PORTS)
        port = int(request.match_info["port"])
        if ports is None or port not in ports.sites:
            return web.json_response({"error": f"{port} is not an extra port"}, status=404)
        body = await request.json()
        if not isinstance(body, dict) or not isinstance(body.get("open"), bool):
            return web.json_response({"error": 'body must be {"open": true|false}'}, status=422)
        if body["open"]:
            await ports.open(port)
        else:
            await ports.close(port)
        return web.json_response({"port": port, "open": ports.sites[port] is not None})

    app.router.add_post("/hooks/{name}", sim.webhook)
    app.router.add_post("/telegram/{name}/bot{token}/{method}", sim.telegram)
    app.router.add_post("/whatsapp/{name}/{version}/{phone_number_id}/messages", sim.whatsapp)
    graph.add_routes(app, sim)
    line.add_routes(app, sim)
    app.router.add_put("/_sim/hooks/{name}", put_hook)
    app.router.add_get("/_sim/hooks/{name}/stats", get_stats)
    app.router.add_get("/_sim/hooks/{name}/requests", get_requests)
    app.router.add_delete("/_sim/hooks/{name}", delete_hook)
    app.router.add_get("/_sim/health", health)
    app.router.add_put(r"/_sim/ports/{port:\d+}", put_port)
    app[SIMULATOR] = sim
    return app


def serve(host: str, port: int, extra_ports: Iterable[int] = ()) -> None:
    """Serve the simulator on ``port`` (and on each of ``extra_ports``, which the control
    side can close and open again) until SIGINT or SIGTERM, on uvloop where it is installed.
    """
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        runner.run(_serve(host, port, list(extra_ports)))


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def _serve(host: str, port: int, extra_ports: list[int]) -> None:
    app = make_app()
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    conns: set[Front] = set()

    def app_protocol() -> asyncio.Protocol:
        assert runner.server is not None
        return runner.server()

    def protocol() -> Front:
        return Front(app[SIMULATOR], app_protocol, ports, conns)

    ports = app[EXTRA_PORTS] = ExtraPorts(host, protocol)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    main: asyncio.AbstractServer | None = None
    try:
        main = await loop.create_server(protocol, host, port)
        for extra in extra_ports:
            await ports.open(extra)
        await stop.wait()
    finally:
        for server in [main, *ports.sites.values()]:
            if server is not None:
                server.close()
        for conn in list(conns):
            if conn.transport is not None:
                conn.transport.close()
        with contextlib.suppress(Exception):
            await runner.cleanup()
