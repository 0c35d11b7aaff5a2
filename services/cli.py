"""The ``bcast`` command: one entry point that runs each service and the operator's tools.

This module is the composition root: it starts services, but services never import it or
each other.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import typer

from shared import delivery_partitions, delivery_store
from shared.db import migrate
from shared.db.engine import libpq_url, transaction
from shared.domain.tokens import (
    KEEP,
    TokenAmbiguous,
    TokenInfo,
    TokenNotFound,
    change_token,
    create_token,
    list_tokens,
    parse_duration,
    revoke_token,
)
from shared.logsafe import error_text
from shared.settings import get_settings

app = typer.Typer(help="bcast: broadcast one message to a chosen audience.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
secrets_app = typer.Typer(
    help="Keys that encrypt channel secrets and media signing keys at rest (BCAST_SECRET_KEYS).",
    no_args_is_help=True,
)
#: Milliseconds dramatiq's threads wait for a message before they look whether to stop.
DRAMATIQ_WAKE_MS = 200

deliveries_app = typer.Typer(
    help="Partitions of the delivery rows and their retention (docs/retention.md).",
    no_args_is_help=True,
)
app.add_typer(db_app, name="db")
app.add_typer(token_app, name="token")
app.add_typer(secrets_app, name="secrets")
app.add_typer(deliveries_app, name="deliveries")


def _logging(service: str) -> None:
    from shared import logs

    fmt = logs.resolve(get_settings().log_format)
    # Processes started from here (dramatiq's workers write to a pipe, never a terminal)
    # use the same format as this one.
    os.environ["BCAST_LOG_FORMAT"] = fmt
    get_settings.cache_clear()
    logs.configure(service, fmt)


@db_app.command("check")
def db_check(
    wait: float = typer.Option(
        0.0, min=0.0, help="Keep asking this many seconds until the schema is at the newest."
    ),
) -> None:
    """Exit 0 when the database's schema is at the newest migration this code knows (or at a
    newer one, which this code does not know: a rollback, or an older pod during a rollout;
    migrations keep the schema usable by the release before them), 1 when it is older or
    missing: run before a service starts (Kubernetes init containers), it makes every process
    wait for the migration Job.
    """
    settings = get_settings()
    head = migrate.head_revision()
    known = migrate.known_revisions()
    deadline = time.monotonic() + wait
    while True:
        try:
            current = migrate.current_revision(settings.database_url)
            problem = None if current == head else f"at {current or 'no migration'}"
        except psycopg.Error as exc:
            current, problem = None, f"unreachable ({error_text(exc)})"
        if current is not None and current not in known:
            typer.echo(f"schema at {current}, newer than this code's {head}")
            return
        if problem is None:
            typer.echo(f"schema at {head}")
            return
        if time.monotonic() >= deadline:
            typer.echo(f"database schema is not at {head}: {problem}", err=True)
            raise typer.Exit(1)
        time.sleep(2)


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Target migration.")) -> None:
    """Create the database if it is missing and migrate it to the newest schema."""
    settings = get_settings()
    created = migrate.create_database_if_missing(settings.database_url)
    migrate.upgrade(settings.database_url, revision)
    typer.echo(("created database and " if created else "") + f"migrated to {revision}")
    if revision == "head":
        # Broadcasts can start before a scheduler has made partitions ahead.
        with _autocommit() as conn:
            ahead = delivery_store.run(
                conn, delivery_partitions.ensure_ahead(settings.delivery_partition_days)
            )
        typer.echo(f"delivery partitions ready up to {ahead[-1].end_day - timedelta(days=1)}")


def _autocommit() -> psycopg.Connection[Any]:
    return psycopg.connect(
        libpq_url(get_settings().database_url), autocommit=True, application_name="bcast-cli"
    )


@deliveries_app.command("partitions")
def deliveries_partitions() -> None:
    """List the partitions of the delivery rows and the tables retention archived: the days
    each holds, its broadcasts (and how many are not yet completed or canceled), its rows, and
    the first day retention may remove it.
    """
    settings = get_settings()
    with _autocommit() as conn:
        described = delivery_partitions.describe(
            conn, retention_days=settings.delivery_retention_days
        )
    header = (
        "NAME",
        "FIRST DAY",
        "LAST DAY",
        "STATE",
        "BROADCASTS",
        "UNFINISHED",
        "ROWS",
        "REMOVABLE ON",
    )
    rows = [header]
    for d in described:
        p = d.partition
        rows.append(
            (
                p.name,
                p.first_day.isoformat(),
                (p.end_day - timedelta(days=1)).isoformat(),
                p.state.value,
                str(d.broadcasts),
                str(d.unfinished),
                str(d.rows),
                d.removable_on.isoformat() if d.removable_on else "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    if not settings.delivery_retention_days:
        typer.echo("BCAST_DELIVERY_RETENTION_DAYS=0: delivery rows are kept forever", err=True)


@deliveries_app.command("prune")
def deliveries_prune(
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would go; change nothing."),
) -> None:
    """Remove the partitions of delivery rows past retention (BCAST_DELIVERY_RETENTION_DAYS)
    whose broadcasts are all completed or canceled: dropped, or detached and kept as tables of
    their own with BCAST_DELIVERY_ARCHIVE=true. The schedulers do this every 10 minutes.
    """
    _logging("deliveries")
    settings = get_settings()
    if not settings.delivery_retention_days:
        typer.echo("BCAST_DELIVERY_RETENTION_DAYS=0: delivery rows are kept forever")
    with _autocommit() as conn:
        removals = delivery_partitions.prune(
            conn,
            retention_days=settings.delivery_retention_days,
            archive=settings.delivery_archive,
            dry_run=dry_run,
        )
    if not removals:
        typer.echo("no partition past retention")
    for r in removals:
        p = r.partition
        days = f"{p.name} ({p.first_day} to {p.end_day - timedelta(days=1)})"
        if r.action == delivery_partitions.Action.HELD:
            typer.echo(
                f"kept {days}: {r.unfinished} of its {r.broadcasts} broadcasts are not yet "
                "completed or canceled"
            )
            continue
        verb = {"dropped": "drop", "archived": "archive"}[r.action.value]
        done = f"would {verb}" if dry_run else r.action.value
        typer.echo(f"{done} {days}: {r.rows} rows of {r.broadcasts} broadcasts")


@token_app.command("create")
def token_create(
    workspace: str = typer.Option(..., "--workspace", help="Workspace name; created if new."),
    name: str = typer.Option("", "--name", help="A label to tell tokens apart."),
    expires_in: str | None = typer.Option(
        None, "--expires-in", help="Valid for this long: 30d, 12h, 90m, 1d12h (s m h d w)."
    ),
    expires_at: str | None = typer.Option(
        None,
        "--expires-at",
        help="Valid until this ISO 8601 time, e.g. 2030-01-31T12:00:00+01:00 (UTC if no zone).",
    ),
) -> None:
    """Print a new bearer token for WORKSPACE. It is shown once and stored only as a hash;
    without an expiry it is valid until revoked.
    """
    if expires_in is not None and expires_at is not None:
        raise typer.BadParameter("give --expires-in or --expires-at, not both")
    until = None
    try:
        if expires_in is not None:
            until = datetime.now(UTC) + parse_duration(expires_in)
        elif expires_at is not None:
            until = _parse_moment(expires_at)
        with transaction() as session:
            new = create_token(session, workspace, name, expires_at=until)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(new.token)
    if until is not None:
        typer.echo(f"expires {_when(until)}", err=True)


@token_app.command("list")
def token_list(
    workspace: str | None = typer.Option(None, "--workspace", help="Only this workspace's."),
) -> None:
    """List tokens: id, workspace, name, prefix and dates. Never the tokens themselves."""
    with transaction() as session:
        tokens = list_tokens(session, workspace)
    now = datetime.now(UTC)
    header = ("ID", "WORKSPACE", "NAME", "PREFIX", "CREATED", "LAST USED", "EXPIRES", "REVOKED")
    rows = [header, *(_token_row(t, now) for t in tokens)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


@token_app.command("revoke")
def token_revoke(
    token: str = typer.Argument(
        ...,
        metavar="ID_OR_PREFIX",
        help="The token's id, or its prefix as `bcast token list` shows it.",
    ),
) -> None:
    """Revoke a token: the API refuses it from the next request on."""
    try:
        with transaction() as session:
            info, revoked = revoke_token(session, token)
    except (TokenNotFound, TokenAmbiguous) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    label = f"token {info.id} ({info.prefix}, workspace {info.workspace!r})"
    if revoked:
        typer.echo(f"revoked {label}")
    else:
        typer.echo(f"{label} was already revoked at {_when(info.revoked_at)}")


@token_app.command("change")
def token_change(
    token: str = typer.Argument(
        ...,
        metavar="ID_OR_PREFIX",
        help="The token's id, or its prefix as `bcast token list` shows it.",
    ),
    name: str | None = typer.Option(None, "--name", help="A new label."),
    expires_in: str | None = typer.Option(
        None, "--expires-in", help="Valid for this long from now: 30d, 12h, 1d12h."
    ),
    expires_at: str | None = typer.Option(
        None, "--expires-at", help="Valid until this ISO 8601 time (UTC if no zone)."
    ),
    never: bool = typer.Option(False, "--never-expires", help="Valid until revoked."),
) -> None:
    """Rename a token, or give it a new expiry."""
    if sum(x is not None for x in (expires_in, expires_at)) + never > 1:
        raise typer.BadParameter("give one of --expires-in, --expires-at, --never-expires")
    if name is None and expires_in is None and expires_at is None and not never:
        raise typer.BadParameter("nothing to change: give --name or an expiry")
    until: Any = KEEP
    try:
        if expires_in is not None:
            until = datetime.now(UTC) + parse_duration(expires_in)
        elif expires_at is not None:
            until = _parse_moment(expires_at)
        elif never:
            until = None
        with transaction() as session:
            info = change_token(session, token, name=name, expires_at=until)
    except (TokenNotFound, TokenAmbiguous) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    expires = "never" if info.expires_at is None else _when(info.expires_at)
    typer.echo(f"token {info.id} ({info.prefix}): name {info.name or '-'!r}, expires {expires}")


def _parse_moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is not an ISO 8601 time; e.g. 2030-01-31T12:00:00+01:00 or 2030-01-31"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _token_row(token: TokenInfo, now: datetime) -> tuple[str, ...]:
    expires = "never" if token.expires_at is None else _when(token.expires_at)
    if token.expires_at is not None and token.expires_at <= now:
        expires += " (expired)"
    return (
        str(token.id),
        token.workspace,
        token.name or "-",
        token.prefix,
        _when(token.created_at),
        _when(token.last_used_at) if token.last_used_at else "never",
        expires,
        _when(token.revoked_at),
    )


@secrets_app.command("new-key")
def secrets_new_key() -> None:
    """Print a fresh key for BCAST_SECRET_KEYS."""
    from shared.secrets_box import new_key

    typer.echo(new_key())


@secrets_app.command("rotate")
def secrets_rotate(
    batch_size: int = typer.Option(500, min=1, help="Rows per transaction."),
) -> None:
    """Re-encrypt every channel secret and workspace signing key with the first key of
    BCAST_SECRET_KEYS (plain values from before encryption included). Safe to run again:
    values already encrypted with the first key are left alone.
    """
    from pydantic import ValidationError

    from shared.domain.secret_rotation import rotate_secrets
    from shared.secrets_box import SETTING, SecretsBox

    try:
        box = SecretsBox.from_settings(get_settings())
    except ValidationError as exc:
        for error in exc.errors():
            where = "BCAST_" + "_".join(str(p) for p in error["loc"]).upper()
            typer.echo(f"{where}: {error['msg'].removeprefix('Value error, ')}", err=True)
        raise typer.Exit(2) from None
    if not box.enabled:
        typer.echo(
            f"{SETTING} is not set: there is no key to encrypt with. Make one with "
            f"`bcast secrets new-key`, set {SETTING} for every bcast process, then run this again.",
            err=True,
        )
        raise typer.Exit(2)
    report = rotate_secrets(transaction, box, batch_size=batch_size)
    for what, count in (("channels", report.channels), ("workspaces", report.workspaces)):
        typer.echo(
            f"{what}: {count.resealed} re-encrypted, {count.current} already current, "
            f"{len(count.unreadable)} unreadable"
        )
    if not report.complete:
        ids = {"channel": report.channels.unreadable, "workspace": report.workspaces.unreadable}
        named = "; ".join(f"{k} ids {_some(v)}" for k, v in ids.items() if v)
        typer.echo(
            f"some secrets cannot be decrypted with any key in {SETTING} ({named}); they are "
            f"unchanged. Add the key they were encrypted with to {SETTING} (after the first) "
            "and run this again.",
            err=True,
        )
        raise typer.Exit(1)


def _some(ids: list[int], shown: int = 20) -> str:
    listed = ", ".join(map(str, ids[:shown]))
    return listed + (f" and {len(ids) - shown} more" if len(ids) > shown else "")


@app.command("api")
def api(
    host: str | None = typer.Option(None, help="Listen address (default BCAST_API_HOST)."),
    port: int | None = typer.Option(None, help="Listen port (default BCAST_API_PORT)."),
) -> None:
    """Serve the HTTP API."""
    import uvicorn

    from services.api.app import create_app
    from services.api.server import HeadTimeoutH11

    settings = get_settings()
    _logging("api")
    HeadTimeoutH11.header_timeout = settings.api_header_timeout_seconds
    uvicorn.run(
        create_app(settings),
        host=host or settings.api_host,
        port=port or settings.api_port,
        # Its records go through bcast's handler (one format for every line); the access log
        # is bcast's own (services.api.middleware), with the route and the duration.
        log_config=None,
        log_level="info",
        access_log=False,
        http=HeadTimeoutH11,
        # Idle keep-alive connections close after this; a request head has its own deadline.
        timeout_keep_alive=5,
        limit_concurrency=settings.api_max_connections,
        h11_max_incomplete_event_size=16 * 1024,
    )


@app.command("scheduler")
def scheduler(
    metrics_port: int | None = typer.Option(
        None, help="Prometheus port (default BCAST_SCHEDULER_METRICS_PORT; 0 turns it off)."
    ),
) -> None:
    """Start due broadcasts and keep sending ones moving (any number may run)."""
    from prometheus_client import start_http_server

    from services.scheduler.scheduler import Scheduler, install_signal_handlers

    _logging("scheduler")
    settings = get_settings()
    port = settings.scheduler_metrics_port if metrics_port is None else metrics_port
    if port:
        start_http_server(port, addr=settings.metrics_host)
    loop = Scheduler(settings)
    install_signal_handlers(loop)
    logging.getLogger("bcast.scheduler").info("scheduler running")
    loop.run()


@app.command("probe")
def probe(
    service: str = typer.Argument(..., help="dispatcher or scheduler"),
    max_age: float = typer.Option(
        60.0, min=1.0, help="Seconds a live process may go without a heartbeat."
    ),
) -> None:
    """Liveness probe: exits 1 when a live process of SERVICE on this machine has not turned
    its work loop for MAX_AGE seconds (hung or stopped), or when none is running.
    """
    from shared import heartbeat

    if service not in ("dispatcher", "scheduler"):
        typer.echo(f"service must be dispatcher or scheduler, not {service!r}", err=True)
        raise typer.Exit(2)
    verdict = heartbeat.check(get_settings().heartbeat_dir, service, max_age=max_age)
    typer.echo(verdict.message, err=not verdict.ok)
    raise typer.Exit(0 if verdict.ok else 1)


@app.command("dispatcher")
def dispatcher(
    processes: int = typer.Option(2, help="Worker processes."),
    threads: int = typer.Option(8, help="Threads per process (batches sent at once)."),
    metrics_port: int | None = typer.Option(
        None, help="Prometheus port (default BCAST_DISPATCHER_METRICS_PORT; 0 turns it off)."
    ),
) -> None:
    """Run dramatiq workers that snapshot audiences and send to each recipient."""
    from shared.broker import SEND_QUEUE, START_QUEUE

    settings = get_settings()
    _logging("dispatcher")
    port = settings.dispatcher_metrics_port if metrics_port is None else metrics_port
    # Worker processes start fresh (spawn) and find these before prometheus_client loads,
    # so their metrics are summed across processes by dramatiq's exposition server.
    prom_dir = Path(tempfile.mkdtemp(prefix="bcast-dispatcher-metrics-"))
    os.environ.update(
        PROMETHEUS_MULTIPROC_DIR=str(prom_dir),
        prometheus_multiproc_dir=str(prom_dir),
        dramatiq_prom_db=str(prom_dir),
        dramatiq_prom_host=settings.metrics_host,
        dramatiq_prom_port=str(port),
        BCAST_DISPATCHER_METRICS_PORT=str(port),
    )
    # How long dramatiq's consumer and worker threads wait for a message before they look
    # whether they must stop (1 s by default): a stop waits for it twice, the worker threads
    # and then the consumers. A few idle wake-ups a second cost nothing measurable.
    os.environ.setdefault("dramatiq_worker_timeout", str(DRAMATIQ_WAKE_MS))
    from dramatiq.cli import main as dramatiq_main
    from dramatiq.cli import make_argument_parser

    args = make_argument_parser().parse_args(  # type: ignore[no-untyped-call]
        [
            "services.dispatcher.actors",
            "--processes",
            str(processes),
            "--threads",
            str(threads),
            "--queues",
            START_QUEUE,
            SEND_QUEUE,
            "--use-spawn",
            "--worker-shutdown-timeout",
            "30000",
            # bcast's handler, set up above and in each worker process (actors.py): one
            # format for dramatiq's lines and bcast's.
            "--skip-logging",
        ]
    )
    try:
        code = dramatiq_main(args)  # type: ignore[no-untyped-call]
    finally:
        shutil.rmtree(prom_dir, ignore_errors=True)
    raise typer.Exit(code or 0)


@app.command("simulator")
def simulator(
    host: str = typer.Option("127.0.0.1", help="Listen address."),
    port: int = typer.Option(9100, help="Listen port."),
    extra_port: list[int] = typer.Option(
        [],
        "--extra-port",
        help="Also serve on this port, which PUT /_sim/ports/PORT can close and open again "
        "(a provider that goes down and comes back); may be repeated.",
    ),
) -> None:
    """Run the provider simulator (webhook, and the providers' API shapes) for tests and demos."""
    from services.simulator.app import serve

    serve(host, port, extra_port)


@app.command("up")
def up(
    processes: int = typer.Option(2, help="Dispatcher worker processes."),
    threads: int = typer.Option(8, help="Threads per dispatcher process."),
    with_simulator: bool = typer.Option(False, "--with-simulator", help="Also run the simulator."),
    simulator_port: int = typer.Option(9100, help="Simulator port, with --with-simulator."),
) -> None:
    """API, scheduler and dispatchers (and the simulator) in one command; Ctrl-C or SIGTERM
    stops them all.
    """
    me = [sys.executable, "-m", "services.cli"]
    commands = [
        [*me, "api"],
        [*me, "scheduler"],
        [*me, "dispatcher", "--processes", str(processes), "--threads", str(threads)],
    ]
    env = dict(os.environ)
    if with_simulator:
        commands.insert(0, [*me, "simulator", "--port", str(simulator_port)])
        # The simulator is on loopback: channels pointed at it must be allowed to connect.
        env.setdefault("BCAST_ALLOW_PRIVATE_TARGETS", "true")
    children = [
        (c[3], subprocess.Popen(c, start_new_session=True, env=env))  # noqa: S603
        for c in commands
    ]
    stopping = False

    def stop(signum: int = signal.SIGTERM, _frame: object = None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = 0
    while not stopping:
        for name, child in children:
            if child.poll() is not None:
                typer.echo(
                    f"{name} exited with {child.returncode}; stopping everything",
                    err=True,
                )
                stopping, code = True, 1
        time.sleep(0.2)
    for _, child in children:
        if child.poll() is None:
            # The child alone: a dispatcher passes SIGTERM on to its workers itself, and a
            # second one would make them stop hard instead of giving back what they hold.
            os.kill(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + 40
    for _, child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    raise typer.Exit(code)


@app.command("demo")
def demo(
    contacts: int = typer.Option(1000, help="Contacts to create."),
    api_url: str = typer.Option("http://127.0.0.1:8000", help="The running API."),
    simulator_url: str = typer.Option("http://127.0.0.1:9100", help="The running simulator."),
    rate: float = typer.Option(500.0, help="The demo channel's rate limit per second."),
) -> None:
    """Create a workspace, a webhook channel to the simulator, CONTACTS tagged contacts and a
    broadcast to the tagged ones, then follow it to the end.
    """
    from services.demo import run_demo

    raise typer.Exit(
        run_demo(api_url=api_url, simulator_url=simulator_url, contacts=contacts, rate=rate)
    )


@app.command("watch")
def watch(
    broadcast_id: int = typer.Argument(..., help="The broadcast to follow."),
    api_url: str = typer.Option("http://127.0.0.1:8000", help="The running API."),
    token: str | None = typer.Option(
        None,
        envvar="BCAST_TOKEN",
        help="Bearer token (or BCAST_TOKEN); without one the database is read directly.",
    ),
) -> None:
    """Follow a broadcast with a progress bar of sent, failed and queued until it ends."""
    from services.demo import Client, follow, from_database

    if token:
        client = Client(api_url, token)
        follow(lambda: client.request("GET", f"/v1/broadcasts/{broadcast_id}"), broadcast_id)
    else:
        follow(lambda: from_database(broadcast_id), broadcast_id)


if __name__ == "__main__":
    app()
