"""The FastAPI application: routes, error handlers, body limits and metrics."""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import FastAPI, Request, status
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from services.api import errors
from services.api.console import routes as console
from services.api.middleware import BodyLimit, InputGuard, Metrics, init_metrics
from services.api.openapi import install_openapi
from services.api.routes import (
    broadcasts,
    channels,
    contacts,
    conversations,
    health,
    media,
    tokens,
)
from shared.domain.media import MAX_IMAGES
from shared.media_store import make_media_store
from shared.secrets_box import get_secrets_box
from shared.settings import Settings, get_settings

DESCRIPTION = """
Broadcast one message to a chosen audience on one channel, now or later, and see exactly who
got it. Every `/v1` route needs `Authorization: Bearer <token>` (make one with
`bcast token create --workspace NAME`); each workspace sees only its own rows.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API application."""
    settings = settings or get_settings()
    app = FastAPI(title="bcast", version="0.1.0", description=DESCRIPTION)
    app.state.media_store = make_media_store(settings)
    get_secrets_box()  # made at start, so a process without keys says so at once
    errors.install(app)
    for module in (health, channels, contacts, broadcasts, conversations, media, tokens):
        app.include_router(module.router)
    app.include_router(media.public_router)
    app.include_router(console.router)
    app.mount("/console/static", StaticFiles(directory=console.STATIC), name="console-static")

    @app.exception_handler(console.SignInNeeded)
    def _sign_in(request: Request, exc: console.SignInNeeded) -> Response:
        target = "/console/login?" + urlencode({"next": exc.next_path})
        return RedirectResponse(target, status.HTTP_303_SEE_OTHER)

    def limit_for(path: str) -> int:
        if path in ("/v1/contacts/import", "/console/contacts/import"):
            return settings.import_max_body_bytes
        if path == "/console/broadcasts/new":
            # A message's images come with the form that creates it.
            return settings.media_max_bytes * (MAX_IMAGES + 1)
        if path == "/v1/media":
            # Room above the image limit, so an image a little too large gets a 422 that
            # says by how much, rather than a bare 413.
            return settings.media_max_bytes * 4
        return settings.max_body_bytes

    app.add_middleware(
        InputGuard,
        bulk=frozenset({"/v1/contacts/import"}),
        paths=lambda: app.openapi()["paths"],
    )
    app.add_middleware(
        BodyLimit,
        limit_for=limit_for,
        timeout=settings.api_body_timeout_seconds,
        total=settings.api_body_total_seconds,
    )
    app.add_middleware(Metrics)
    install_openapi(app)
    init_metrics(app.openapi()["paths"])
    return app
