"""The simulator's Messenger and Instagram endpoints: Meta's Graph Send API shape.

  ``POST /messenger/{name}/{version}/me/messages``             a Facebook Page's messages
  ``POST /instagram/{name}/{version}/{ig_user_id}/messages``   an Instagram account's messages

A success is ``{"recipient_id", "message_id": "m_..."}``; a failure is Graph's
``{"error": {"message", "type", "code", "error_subcode", "fbtrace_id"}}``. Beside the switches
every hook has, these endpoints answer as Graph does:
  * no ``Authorization: Bearer`` token: 400, code 190;
  * ``error_code``: every message answered with that code (500 for 1 and 2, else 400);
  * a body Graph would refuse (no recipient, an unknown messaging type or tag, text over the
    limit, a tag other than HUMAN_AGENT on Instagram): 400, code 100;
  * ``outside_window``: a message to those addresses without ``messaging_type`` MESSAGE_TAG is
    refused with code 10, subcode 2018278; with a tag it goes;
  * a throttled verdict: 400, code 613 (Graph's rate limit is no 429), with Retry-After;
  * unavailable: 500, code 2; ``fail_addresses``: 400, code 551; a refused part: 400, code 100.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from services.simulator.app import Hook, Simulator

#: Tags Messenger takes with ``messaging_type`` MESSAGE_TAG; Instagram takes HUMAN_AGENT only.
MESSENGER_TAGS = frozenset(
    {"HUMAN_AGENT", "ACCOUNT_UPDATE", "CONFIRMED_EVENT_UPDATE", "POST_PURCHASE_UPDATE"}
)
INSTAGRAM_TAGS = frozenset({"HUMAN_AGENT"})
MESSAGING_TYPES = frozenset({"RESPONSE", "UPDATE", "MESSAGE_TAG"})
#: Longest text: Messenger counts characters, Instagram bytes of UTF-8.
MESSENGER_MAX_TEXT = 2000
INSTAGRAM_MAX_TEXT = 1000

#: (HTTP status, code, subcode, message) of a refusal.
Refusal = tuple[int, int, int | None, str]


async def messenger(sim: Simulator, request: web.Request) -> web.Response:
    """``POST /messenger/{name}/{version}/me/messages``."""
    return await _send(sim, request, "messenger")


async def instagram(sim: Simulator, request: web.Request) -> web.Response:
    """``POST /instagram/{name}/{version}/{ig_user_id}/messages``."""
    return await _send(sim, request, "instagram")


async def _send(sim: Simulator, request: web.Request, kind: str) -> web.Response:
    try:
        payload = await request.json()
    except ValueError:
        payload = None
    payload = payload if isinstance(payload, dict) else {}
    recipient = _dict(payload.get("recipient"))
    message = _dict(payload.get("message"))
    attachment = _dict(message.get("attachment"))
    record: dict[str, Any] = {
        "key": request.headers.get("Idempotency-Key"),
        "authorization": request.headers.get("Authorization"),
        "path": request.path,
        "query": request.query_string,
        "version": request.match_info["version"],
        "ig_user_id": request.match_info.get("ig_user_id"),
        "to": recipient.get("id"),
        "messaging_type": payload.get("messaging_type"),
        "tag": payload.get("tag"),
        "text": message.get("text"),
        "type": attachment.get("type"),
        "url": _dict(attachment.get("payload")).get("url"),
        "signature_ok": None,
    }
    hook, now = sim.receive(request.match_info["name"], record)
    await sim.lag(hook)
    refusal = _rule(hook, kind, record)
    if refusal is not None:
        return _error(record, *refusal)
    verdict, detail = sim.decide(hook, str(record["key"]), record["to"], now)
    if verdict in ("ok", "duplicate"):
        record["status"] = 200
        return web.json_response({"recipient_id": record["to"], "message_id": f"m_{detail}"})
    if verdict == "throttled":
        retry_after = {"Retry-After": f"{hook.config.retry_after:g}"}
        return _error(
            record, 400, 613, None, "Calls to this api have exceeded the rate limit.", retry_after
        )
    status, code, subcode, text = {
        "unavailable": (500, 2, None, "Service temporarily unavailable"),
        "unreachable": (400, 551, 1545041, "This person isn't available right now."),
        "refused": (400, 100, 2018047, "(#100) Upload attachment failure."),
    }[verdict]
    return _error(record, status, code, subcode, text)


def _rule(hook: Hook, kind: str, record: dict[str, Any]) -> Refusal | None:
    """Graph's own refusals, before any of the hook's random ones, or None."""
    config = hook.config
    authorization = record["authorization"] or ""
    if not authorization.startswith("Bearer ") or not authorization.removeprefix("Bearer "):
        return 400, 190, None, "Invalid OAuth access token - Cannot parse access token"
    if config.error_code is not None:
        status = 500 if config.error_code in (1, 2) else 400
        return status, config.error_code, None, f"(#{config.error_code}) Simulated error"
    to, messaging_type, tag = record["to"], record["messaging_type"], record["tag"]
    if not isinstance(to, str) or not to:
        return 400, 100, None, "(#100) The parameter recipient is required"
    if messaging_type not in MESSAGING_TYPES:
        return (
            400,
            100,
            None,
            "(#100) Param messaging_type must be one of {RESPONSE, UPDATE, MESSAGE_TAG}",
        )
    tags = INSTAGRAM_TAGS if kind == "instagram" else MESSENGER_TAGS
    if messaging_type == "MESSAGE_TAG" and tag not in tags:
        return 400, 100, None, f"(#100) Param tag must be one of {{{', '.join(sorted(tags))}}}"
    text = record["text"]
    if text is None and record["url"] is None:
        return 400, 100, None, "(#100) Param message must be a text or an attachment"
    if isinstance(text, str) and _too_long(kind, text):
        limit = INSTAGRAM_MAX_TEXT if kind == "instagram" else MESSENGER_MAX_TEXT
        return 400, 100, None, f"(#100) Length of param message[text] must be at most {limit}"
    if to in config.outside_window and messaging_type != "MESSAGE_TAG":
        return 400, 10, 2018278, "(#10) This message is sent outside of allowed window."
    return None


def _too_long(kind: str, text: str) -> bool:
    if kind == "instagram":
        return len(text.encode()) > INSTAGRAM_MAX_TEXT
    return len(text) > MESSENGER_MAX_TEXT


def _error(
    record: dict[str, Any],
    status: int,
    code: int,
    subcode: int | None,
    text: str,
    headers: dict[str, str] | None = None,
) -> web.Response:
    record["status"] = status
    record["error_code"] = code
    error: dict[str, Any] = {"message": text, "type": "OAuthException", "code": code}
    if subcode is not None:
        error["error_subcode"] = subcode
    error["fbtrace_id"] = "sim"
    return web.json_response({"error": error}, status=status, headers=headers)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def add_routes(app: web.Application, sim: Simulator) -> None:
    """Serve the Messenger and Instagram endpoints of ``sim`` from ``app``."""

    async def messenger_route(request: web.Request) -> web.Response:
        return await messenger(sim, request)

    async def instagram_route(request: web.Request) -> web.Response:
        return await instagram(sim, request)

    app.router.add_post("/messenger/{name}/{version}/me/messages", messenger_route)
    app.router.add_post("/instagram/{name}/{version}/{ig_user_id}/messages", instagram_route)
