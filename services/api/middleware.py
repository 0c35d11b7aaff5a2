"""ASGI middleware: request metrics, body limits and deadlines, and the input guard.

Order, outermost first: ``Metrics`` (counts every answer, whatever answered it), ``BodyLimit``
(413 past a route's limit, 408 when a body stalls), ``InputGuard`` (405 for unknown methods;
422 for text that cannot be stored, for JSON that is not JSON or is nested past reason; 500 without a traceback
for anything unexpected), then the application.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.errors import problem_body
from shared.domain.errors import FieldError, field_path
from shared.domain.types import FORBIDDEN, MAX_JSON_DEPTH, describe_forbidden, json_too_deep

log = logging.getLogger(__name__)

REQUESTS = Counter(
    "bcast_api_requests_total",
    "HTTP requests answered, by route and status.",
    ["method", "route", "status"],
)
LATENCY = Histogram(
    "bcast_api_request_duration_seconds",
    "Time to answer an HTTP request.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


def init_metrics(paths: dict[str, Any]) -> None:
    """Each operation's server-error series (500, 503) and its latency at 0 from the start
    (``paths``: the OpenAPI document's): the first 5xx after a start reads as a rise in
    ``rate()`` (and in BcastApiErrors).
    """
    for path, operations in paths.items():
        for method in operations:
            if method.upper() not in METHODS:
                continue
            LATENCY.labels(method.upper(), path)
            for status in ("500", "503"):
                REQUESTS.labels(method.upper(), path, status)


#: The methods the API answers; any other is 405 and counted as ``OTHER``.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class _TooLarge(Exception):
    pass


class _TooSlow(Exception):
    pass


async def send_problem(
    send: Send,
    status: int,
    message: str,
    *,
    path: str | None = None,
    errors: list[FieldError] | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer with a problem document, from below the application."""
    body = json.dumps(problem_body(status, message, instance=path, errors=errors)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Answer 413 to any request whose body is larger than its route allows, and 408 to one
    whose body stops arriving for ``timeout`` seconds or takes more than ``total`` in all (a
    client sending a byte now and then cannot hold a connection for hours).

    Parameters:
      app: the wrapped application.
      limit_for: maps a request path to its largest allowed body in bytes.
      timeout: longest pause, in seconds, between two chunks of a body.
      total: longest time, in seconds, a whole body may take to arrive.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limit_for: Callable[[str], int],
        timeout: float = 30.0,
        total: float = 120.0,
    ) -> None:
        self.app = app
        self.limit_for = limit_for
        self.timeout = timeout
        self.total = total

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(send, limit, scope["path"])
            return
        seen = 0
        started = False
        body_done = False
        deadline: float | None = None

        async def limited_receive() -> Message:
            nonlocal seen, body_done
            if body_done:
                # The body is in; what comes now is the client going away, whenever it does
                # (a streamed answer listens for it for as long as it streams).
                return await receive()
            nonlocal deadline
            if deadline is None:
                deadline = time.monotonic() + self.total
            left = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, min(self.timeout, left)))
            except TimeoutError:
                raise _TooSlow from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _too_large(send, limit, scope["path"])
        except _TooSlow:
            if not started:
                await send_problem(
                    send,
                    408,
                    f"the request body stopped arriving for {self.timeout:g} s, or took "
                    f"longer than {self.total:g} s in all",
                    path=scope["path"],
                    headers=[(b"connection", b"close")],
                )


async def _too_large(send: Send, limit: int, path: str) -> None:
    message = f"request body is larger than {limit:,} bytes, the most this route accepts"
    await send_problem(send, 413, message, path=path)


class InputGuard:
    """What no route should see: unknown methods, text that cannot be stored or sent (NUL
    and other control characters, lone surrogates) in the path, the query or a JSON body, and
    JSON nested past ``MAX_JSON_DEPTH``. Also answers an unexpected error with a plain 500
    problem, logging its type only (an error's text can quote the values of a row).

    Parameters:
      app: the wrapped application.
      bulk: paths whose JSON bodies the route reads itself, row by row and within its own
        limits (the contacts import): only the method, path and query are checked here.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        bulk: frozenset[str] = frozenset(),
        paths: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.app = app
        self.bulk = bulk
        self._paths = paths
        self._methods: list[tuple[re.Pattern[str], frozenset[str]]] | None = None
        self._exact: dict[str, frozenset[str]] = {}

    def allowed(self, path: str) -> frozenset[str] | None:
        """The methods the API answers on ``path``, or None for a path no documented route
        matches. A path spelled out by a route (``/v1/contacts/import``) is that route's; a
        path matched only by templates (``/v1/contacts/{contact_id}``) is theirs together.
        """
        if self._methods is None:
            exact: dict[str, set[str]] = {}
            templated: dict[str, set[str]] = {}
            for template, operations in (self._paths() if self._paths else {}).items():
                answered = {m.upper() for m in operations}
                if "{" not in template:
                    exact.setdefault(template, set()).update(answered)
                    continue
                regex = "^" + re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(template)) + "$"
                templated.setdefault(regex, set()).update(answered)
            self._exact = {p: frozenset(m) for p, m in exact.items()}
            self._methods = [(re.compile(r), frozenset(m)) for r, m in templated.items()]
        if path in self._exact:
            return self._exact[path]
        found: set[str] = set()
        for compiled, methods in self._methods:
            if compiled.match(path):
                found |= methods
        return frozenset(found) if found else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        allowed = self.allowed(path)
        if allowed is not None and "GET" in allowed:
            allowed |= {"HEAD"}
            if scope["method"] == "HEAD":
                # HEAD is GET without the body (the server drops it, knowing the request
                # was HEAD); routes are declared for GET only.
                scope = {**scope, "method": "GET"}
        if allowed is not None and scope["method"] not in allowed:
            allow = ", ".join(sorted(allowed))
            await send_problem(
                send,
                405,
                f"method {scope['method']} is not allowed on {path}; it answers {allow}",
                path=path,
                headers=[(b"allow", allow.encode())],
            )
            return
        errors = _bad_query(scope)
        if FORBIDDEN.search(path):
            errors.insert(0, FieldError("path", _forbidden(path), "control_character"))
        if errors:
            await send_problem(send, 422, _joined(errors), path=path, errors=errors)
            return
        if (
            _is_json(scope)
            and scope["method"] in ("POST", "PUT", "PATCH")
            and path not in self.bulk
        ):
            body, more = await _read_body(receive)
            answer = _check_json(body)
            if answer is not None:
                status, message, found = answer
                await send_problem(send, status, message, path=path, errors=found)
                return
            receive = _replay(body, more, receive)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except (_TooLarge, _TooSlow):
            raise
        except Exception as exc:
            log.error(
                "internal error answering %s %s: %s", scope["method"], path, type(exc).__name__
            )
            if not started:
                await send_problem(send, 500, "internal error; it has been logged", path=path)


def _forbidden(text: str) -> str:
    found = FORBIDDEN.search(text)
    char = describe_forbidden(found.group()) if found else "?"
    return f"contains the control character {char}, which is not allowed"


def _joined(errors: list[FieldError]) -> str:
    return "; ".join(f"{e.field}: {e.message}" for e in errors)


def _bad_query(scope: Scope) -> list[FieldError]:
    raw = scope.get("query_string", b"")
    if not raw:
        return []
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return [FieldError("query", "is not URL-encoded ASCII", "encoding")]
    errors = []
    pairs = parse_qsl(text, keep_blank_values=True, encoding="utf-8", errors="surrogateescape")
    for key, value in pairs:
        if FORBIDDEN.search(key) or FORBIDDEN.search(value):
            field = key if not FORBIDDEN.search(key) else "query"
            errors.append(FieldError(field, _forbidden(key + value), "control_character"))
    return errors


def _is_json(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            media: bytes = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return False


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The whole body (``BodyLimit`` bounds it), and whether the client is still there."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), True


def _replay(body: bytes, connected: bool, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            if connected:
                return {"type": "http.request", "body": body, "more_body": False}
            return {"type": "http.disconnect"}
        return await receive()

    return replayed


def _check_json(body: bytes) -> tuple[int, str, list[FieldError] | None] | None:
    """Why a JSON body is refused, or None when it may go to the route."""
    if not body.strip():
        return None  # the route says what it needs
    if json_too_deep(body):
        deep = FieldError(
            "body",
            f"is nested deeper than {MAX_JSON_DEPTH} levels of arrays and objects",
            "json_too_deep",
        )
        return 422, _joined([deep]), [deep]
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        where = (
            f" (line {exc.lineno}, column {exc.colno})"
            if isinstance(exc, json.JSONDecodeError)
            else ""
        )
        invalid = FieldError("body", f"is not valid JSON{where}", "json_invalid")
        return 422, _joined([invalid]), [invalid]
    found = _forbidden_strings(data)
    if found:
        return 422, _joined(found), found
    return None


def _forbidden_strings(data: Any) -> list[FieldError]:
    """Every string (or key) in ``data`` holding a character no stored string may hold."""
    errors: list[FieldError] = []
    stack: list[tuple[tuple[int | str, ...], Any]] = [((), data)]
    while stack and len(errors) < 10:
        loc, value = stack.pop()
        if isinstance(value, str):
            if FORBIDDEN.search(value):
                errors.append(FieldError(field_path(loc), _forbidden(value), "control_character"))
        elif isinstance(value, dict):
            for key, item in value.items():
                if FORBIDDEN.search(key):
                    errors.append(
                        FieldError(
                            field_path(loc) if loc else "body", _forbidden(key), "control_character"
                        )
                    )
                else:
                    stack.append(((*loc, key), item))
        elif isinstance(value, list):
            stack.extend(((*loc, i), item) for i, item in enumerate(value))
    errors.sort(key=lambda e: e.field)
    return errors


#: The access log: one line per request (probes and scrapes aside).
access = logging.getLogger("bcast.api.access")
#: Requests too frequent and too dull for the access log.
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})


class Metrics:
    """Count and time every request by its route template (never by raw path or id) and by
    method (any method the API does not answer is counted as ``OTHER``), and log it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status_code = 500

        async def recording_send(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            method = method if method in METHODS else "OTHER"
            elapsed = time.perf_counter() - start
            REQUESTS.labels(method, template, str(status_code)).inc()
            LATENCY.labels(method, template).observe(elapsed)
            if template not in QUIET_ROUTES:
                # The path, never its query string (a signed media URL carries its signature
                # there); the route template names the operation.
                access.info(
                    "%s %s %s %.1f ms",
                    method,
                    scope.get("path", ""),
                    status_code,
                    elapsed * 1000,
                    extra={
                        "method": method,
                        "route": template,
                        "path": scope.get("path", ""),
                        "status": status_code,
                        "duration_ms": round(elapsed * 1000, 1),
                    },
                )
