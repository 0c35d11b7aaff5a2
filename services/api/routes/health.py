"""Liveness, readiness and Prometheus metrics: the routes without a token."""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from services.api.errors import PROBLEM_JSON, problem_body
from shared.db.engine import get_engine, pool_exhausted

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


DB_CONNECTIONS = Gauge(
    "bcast_api_db_connections",
    "Database connections of this API process's pool, by state (in_use, limit).",
    ["state"],
)


@router.get(
    "/readyz",
    responses={
        200: {"description": "Ready: a database connection is free and the database answers."},
        503: {
            "description": "The database cannot be reached, or every pooled connection is busy.",
            "content": {
                "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
            },
        },
    },
)
def readyz(request: Request) -> JSONResponse:
    """The process can serve: a database connection is free and the database answers."""
    engine = get_engine()
    if pool_exhausted(engine):
        # Every connection is held (slow requests, a stuck client): new requests would wait
        # and then fail, so a load balancer should send them elsewhere.
        return _unready(request, "pool exhausted", "every pooled database connection is busy")
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        return _unready(request, type(exc).__name__, "the database cannot be reached")
    return JSONResponse(content={"status": "ok", "database": "ok"})


def _unready(request: Request, database: str, message: str) -> JSONResponse:
    body = problem_body(503, message, instance=request.url.path)
    body["database"] = database
    return JSONResponse(
        body, status_code=503, media_type=PROBLEM_JSON, headers={"Retry-After": "5"}
    )


@router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    pool: Any = get_engine().pool
    with contextlib.suppress(AttributeError):
        DB_CONNECTIONS.labels("in_use").set(pool.checkedout())
        DB_CONNECTIONS.labels("limit").set(pool.size() + max(pool._max_overflow, 0))
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
