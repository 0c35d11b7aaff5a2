"""One shape for every error answer: RFC 9457 problem details (``application/problem+json``).

Every 4xx and 5xx body is::

    {"type": "about:blank", "title": "Not Found", "status": 404,
     "detail": "broadcast 7 not found", "message": "broadcast 7 not found",
     "instance": "/v1/broadcasts/7"}

A 422 lists each broken rule as ``{"field", "msg", "type"}`` in ``errors`` and, as before, in
``detail``; ``field`` is a dotted path into the request (``audience.contact_ids[3]``, or a
query or header name) and ``message`` joins them in one sentence. ``message`` is always a
string a person can read.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.domain.errors import (
    FieldError,
    NotFound,
    StateConflict,
    ValidationFailed,
    describe,
    field_path,
)
from shared.logsafe import error_text
from shared.secrets_box import SecretKeyError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
#: Seconds a client waits before trying again when the API is out of database connections.
BUSY_RETRY_AFTER = 2


def problem_body(
    status: int,
    message: str,
    *,
    instance: str | None = None,
    errors: list[FieldError] | None = None,
) -> dict[str, Any]:
    """The problem document for one answer."""
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": _title(status),
        "status": status,
        "detail": message,
        "message": message,
    }
    if errors is not None:
        listed = [{"field": e.field, "msg": e.message, "type": e.type} for e in errors]
        body["detail"] = listed
        body["errors"] = listed
    if instance:
        body["instance"] = instance
    return body


def problem(
    status: int,
    message: str,
    *,
    request: Request | None = None,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """An error answer: ``status`` with a problem document saying ``message``."""
    instance = request.url.path if request is not None else None
    return JSONResponse(
        problem_body(status, message, instance=instance, errors=errors),
        status_code=status,
        headers=headers,
        media_type=PROBLEM_JSON,
    )


def unprocessable(errors: list[FieldError], request: Request | None = None) -> JSONResponse:
    return problem(
        422,
        "; ".join(f"{e.field}: {e.message}" for e in errors),
        request=request,
        errors=errors,
    )


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _request_field(loc: tuple[Any, ...]) -> str:
    # ("body", "audience", "tag_ids", 0) -> "audience.tag_ids[0]"; ("query", "status") -> "status"
    where, *rest = loc if loc else ("body",)
    if where in ("body", "query", "path", "header", "cookie") and rest:
        return field_path(rest)
    return field_path(loc)


async def _on_request_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return unprocessable(
        [FieldError(_request_field(tuple(e["loc"])), describe(e), e["type"]) for e in exc.errors()],
        request,
    )


async def _on_validation_failed(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ValidationFailed)
    return unprocessable(exc.errors, request)


async def _on_not_found(request: Request, exc: Exception) -> JSONResponse:
    return problem(404, str(exc), request=request)


async def _on_conflict(request: Request, exc: Exception) -> JSONResponse:
    return problem(409, str(exc), request=request)


async def _on_integrity_error(request: Request, _: Exception) -> JSONResponse:
    # A concurrent request wrote the same unique row first; the checks before the write
    # answer the common case with a specific message.
    message = "conflicts with a row written at the same time; read it back or retry"
    return problem(409, message, request=request)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else _title(exc.status_code)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.url.path}: see /docs for the routes"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    elif exc.status_code == 400 and "parsing the body" in message:
        message = "the request body could not be read as the declared content type"
    headers = dict(exc.headers) if exc.headers else None
    return problem(exc.status_code, message, request=request, headers=headers)


async def _on_pool_timeout(request: Request, _: Exception) -> JSONResponse:
    log.warning("no database connection free for %s %s", request.method, request.url.path)
    return problem(
        503,
        "the API is out of database connections for the moment; retry shortly",
        request=request,
        headers={"Retry-After": str(BUSY_RETRY_AFTER)},
    )


async def _on_database_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning(
        "database unreachable answering %s %s: %s",
        request.method,
        request.url.path,
        error_text(exc),
    )
    return problem(
        503,
        "the database cannot be reached for the moment; retry shortly",
        request=request,
        headers={"Retry-After": str(BUSY_RETRY_AFTER)},
    )


async def _on_secret_key_error(request: Request, exc: Exception) -> JSONResponse:
    # The operator's to fix; the caller learns only that the server cannot answer.
    log.error("%s %s: %s", request.method, request.url.path, exc)
    message = "a stored secret cannot be read by the server; the operator must check its keys"
    return problem(500, message, request=request)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Logged with its type only: an exception's text can quote a row's values.
    log.error(
        "internal error answering %s %s: %s",
        request.method,
        request.url.path,
        type(exc).__name__,
    )
    return problem(500, "internal error; it has been logged", request=request)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into a problem document."""
    app.add_exception_handler(RequestValidationError, _on_request_validation)
    app.add_exception_handler(ValidationFailed, _on_validation_failed)
    app.add_exception_handler(NotFound, _on_not_found)
    app.add_exception_handler(StateConflict, _on_conflict)
    app.add_exception_handler(IntegrityError, _on_integrity_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(PoolTimeout, _on_pool_timeout)
    app.add_exception_handler(OperationalError, _on_database_down)
    app.add_exception_handler(psycopg.OperationalError, _on_database_down)
    app.add_exception_handler(SecretKeyError, _on_secret_key_error)
    app.add_exception_handler(Exception, _on_unexpected)
