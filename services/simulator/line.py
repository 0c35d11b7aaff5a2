"""The simulator's LINE Messaging API: ``push`` and ``multicast``, with the retry key.

``POST /line/{name}/v2/bot/message/push``       ``{"to": userId, "messages": [...]}``
``POST /line/{name}/v2/bot/message/multicast``  ``{"to": [userId, ...], "messages": [...]}``

As LINE does: a request needs ``Authorization: Bearer``; ``X-Line-Retry-Key`` must be a UUID,
and a key already accepted is answered 409 with ``x-line-accepted-request-id`` and delivers
nothing again; one to five message objects (text of at most 5000 characters, images with
both URLs); a multicast carries one to 500 user ids (``U`` and 32 hex digits). A request is
accepted before the hook's latency is waited: an answer lost to a sender killed meanwhile is
a request LINE carried out. The hook's ``rate_limit_per_second``, ``throttle_ratio`` (429),
``error_ratio`` (500) and ``transient_first`` apply; ``error_code`` answers every request with
that HTTP status. Each record lists the users an accepted request reached (``to``), so a test
can count who got a message twice.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from services.simulator.app import Simulator

_USER = re.compile(r"U[0-9a-f]{32}")
MAX_RECIPIENTS = 500
MAX_MESSAGES = 5
MAX_TEXT = 5000


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"message": message}, status=status, headers=headers)


def _call_of(payload: Any) -> Any:
    """What makes a call the same call: its users (in any order) and its messages."""
    if not isinstance(payload, dict):
        return None
    to = payload.get("to")
    users = sorted(to) if isinstance(to, list) else [to]
    return (users, json.dumps(payload.get("messages"), sort_keys=True))


def _problem(payload: Any, multicast: bool) -> str | None:
    """Why LINE would refuse this body (400), or None."""
    if not isinstance(payload, dict):
        return "The request body has 1 error(s)"
    to = payload.get("to")
    if multicast and (not isinstance(to, list) or not 1 <= len(to) <= MAX_RECIPIENTS):
        return f"The property, 'to', must hold 1 to {MAX_RECIPIENTS} user IDs"
    users: list[Any] = to if isinstance(to, list) and multicast else [to]
    if not all(isinstance(u, str) and _USER.fullmatch(u) for u in users):
        return "The property, 'to', in the request body is invalid (expected user IDs)"
    messages = payload.get("messages")
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
        return f"Size must be between 1 and {MAX_MESSAGES}"
    for m in messages:
        kind = m.get("type") if isinstance(m, dict) else None
        if kind == "text":
            if not isinstance(m.get("text"), str) or not 1 <= len(m["text"]) <= MAX_TEXT:
                return f"Length must be between 1 and {MAX_TEXT}"
        elif kind == "image":
            if not m.get("originalContentUrl") or not m.get("previewImageUrl"):
                return "An image needs originalContentUrl and previewImageUrl"
        else:
            return "The property, 'type', in the request body is invalid"
    return None


async def _handle(sim: Simulator, request: web.Request, multicast: bool) -> web.Response:
    body = await request.read()
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    key = request.headers.get("X-Line-Retry-Key", "")
    record: dict[str, Any] = {
        "key": key,
        "endpoint": "multicast" if multicast else "push",
        "authorization": request.headers.get("Authorization"),
        "to": [],
        "messages": payload.get("messages") if isinstance(payload, dict) else None,
        "signature_ok": None,
    }
    hook, now = sim.receive(request.match_info["name"], record)
    answer = _decide(sim, hook, request, payload, key, multicast, now, record)
    record["status"] = answer.status
    await sim.lag(hook)
    return answer


def _decide(
    sim: Simulator,
    hook: Any,
    request: web.Request,
    payload: Any,
    key: str,
    multicast: bool,
    now: float,
    record: dict[str, Any],
) -> web.Response:
    if not str(request.headers.get("Authorization", "")).startswith("Bearer "):
        return _error(401, "Authentication failed. Confirm that the access token is valid.")
    if hook.config.error_code is not None:
        return _error(hook.config.error_code, "Simulated error")
    try:
        uuid.UUID(key)
    except ValueError:
        return _error(400, "The value of the X-Line-Retry-Key header is invalid")
    if key in hook.accepted:
        hook.duplicates += 1
        # LINE does not compare a repeat with the request it accepted; a sender must repeat
        # exactly the same call. The record says whether it did.
        first = hook.line_calls.get(key)
        record["same_as_first"] = first == _call_of(payload)
        return _error(
            409,
            "The retry key is already accepted",
            **{"x-line-accepted-request-id": hook.accepted[key]},
        )
    problem = _problem(payload, multicast)
    if problem is not None:
        return _error(400, problem)
    verdict, detail = sim.decide(hook, key, None, now)
    if verdict == "throttled":
        return _error(
            429,
            "The API rate limit has been exceeded. Try again later.",
            **{"Retry-After": f"{hook.config.retry_after:g}"},
        )
    if verdict == "unavailable":
        return _error(500, "An error occurred on the server")
    # Accepted (``decide`` noted the key): these users got the messages.
    to = payload["to"]
    record["to"] = list(to) if multicast else [to]
    request_id = f"line-{detail}"
    hook.accepted[key] = request_id
    hook.line_calls[key] = _call_of(payload)
    headers = {"x-line-request-id": request_id}
    if multicast:
        return web.json_response({}, headers=headers)
    sent = [{"id": f"{detail}-{i}", "quoteToken": "q"} for i in range(len(payload["messages"]))]
    return web.json_response({"sentMessages": sent}, headers=headers)


def add_routes(app: web.Application, sim: Simulator) -> None:
    async def push(request: web.Request) -> web.Response:
        return await _handle(sim, request, multicast=False)

    async def multicast(request: web.Request) -> web.Response:
        return await _handle(sim, request, multicast=True)

    app.router.add_post("/line/{name}/v2/bot/message/push", push)
    app.router.add_post("/line/{name}/v2/bot/message/multicast", multicast)
