"""One shape for every error answer: ``{"detail": ..., "message": ...}``.

422 answers list each broken rule as ``{"field", "msg", "type"}``; ``field`` is a dotted path
into the request (``audience.contact_ids[3]``, or a query or header name).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from shared.domain.errors import (
    FieldError,
    NotFound,
    StateConflict,
    ValidationFailed,
    describe,
    field_path,
)
from shared.secrets_box import SecretKeyError

log = logging.getLogger(__name__)


def unprocessable(errors: list[FieldError]) -> JSONResponse:
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content={
            "detail": [{"field": e.field, "msg": e.message, "type": e.type} for e in errors],
            "message": "; ".join(f"{e.field}: {e.message}" for e in errors),
        },
    )


def _request_field(loc: tuple[Any, ...]) -> str:
    # ("body", "audience", "tag_ids", 0) -> "audience.tag_ids[0]"; ("query", "status") -> "status"
    where, *rest = loc if loc else ("body",)
    if where in ("body", "query", "path", "header", "cookie") and rest:
        return field_path(rest)
    return field_path(loc)


async def _on_request_validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return unprocessable(
        [FieldError(_request_field(tuple(e["loc"])), describe(e), e["type"]) for e in exc.errors()]
    )


async def _on_validation_failed(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ValidationFailed)
    return unprocessable(exc.errors)


async def _on_not_found(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(status_code=404, content={"detail": str(exc), "message": str(exc)})


async def _on_conflict(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(status_code=409, content={"detail": str(exc), "message": str(exc)})


async def _on_secret_key_error(request: Request, exc: Exception) -> JSONResponse:
    # The operator's to fix; the caller learns only that the server cannot answer.
    log.error("%s %s: %s", request.method, request.url.path, exc)
    message = "a stored secret cannot be read by the server; the operator must check its keys"
    return JSONResponse(status_code=500, content={"detail": message, "message": message})


def install(app: FastAPI) -> None:
    """Register the handlers that turn domain errors into HTTP answers."""
    app.add_exception_handler(RequestValidationError, _on_request_validation)
    app.add_exception_handler(ValidationFailed, _on_validation_failed)
    app.add_exception_handler(NotFound, _on_not_found)
    app.add_exception_handler(StateConflict, _on_conflict)
    app.add_exception_handler(SecretKeyError, _on_secret_key_error)
