"""The ``bcast`` command: one entry point that runs each service and the operator's tools."""

from __future__ import annotations

import typer

from shared.db import migrate
from shared.db.engine import transaction
from shared.domain.tokens import create_token
from shared.settings import get_settings

app = typer.Typer(help="bcast: broadcast one message to a chosen audience.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(token_app, name="token")


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Target migration.")) -> None:
    """Create the database if it is missing and migrate it to the newest schema."""
    settings = get_settings()
    created = migrate.create_database_if_missing(settings.database_url)
    migrate.upgrade(settings.database_url, revision)
    typer.echo(("created database and " if created else "") + f"migrated to {revision}")


@token_app.command("create")
def token_create(
    workspace: str = typer.Option(..., "--workspace", help="Workspace name; created if new."),
    name: str = typer.Option("", "--name", help="A label to tell tokens apart."),
) -> None:
    """Print a new bearer token for WORKSPACE. It is shown once and stored only as a hash."""
    with transaction() as session:
        new = create_token(session, workspace, name)
    typer.echo(new.token)


@app.command("api")
def api(
    host: str | None = typer.Option(None, help="Listen address (default BCAST_API_HOST)."),
    port: int | None = typer.Option(None, help="Listen port (default BCAST_API_PORT)."),
) -> None:
    """Serve the HTTP API."""
    import uvicorn

    from services.api.app import create_app

    settings = get_settings()
    uvicorn.run(
        create_app(settings),
        host=host or settings.api_host,
        port=port or settings.api_port,
        log_level="info",
        access_log=False,
    )


if __name__ == "__main__":
    app()
