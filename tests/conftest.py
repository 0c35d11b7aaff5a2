"""Fixtures: one fresh Postgres database per test run, and an API client per workspace.

Tests talk to the real Postgres; every test makes its own workspace, so tests never see
each other's rows and need no cleanup between them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from psycopg import sql

from shared import delivery_partitions, delivery_store
from shared.db import migrate
from shared.db.engine import get_engine, get_sessionmaker, libpq_url
from shared.secrets_box import get_secrets_box, new_key
from shared.settings import Settings, get_settings

if TYPE_CHECKING:
    from tests.secret_rows import SecretRows

ADMIN_URL = os.environ.get("BCAST_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def scratch_vhost(prefix: str) -> Iterator[str]:
    """A RabbitMQ vhost of its own (named ``<prefix>_<pid>_<random>``), deleted afterwards."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        yield name
    finally:
        rabbitmqctl("delete_vhost", name)


def _drop_database(name: str) -> None:
    with psycopg.connect(libpq_url(ADMIN_URL), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database made for this test run, migrated to head, dropped at the end. Secrets are
    encrypted at rest with a key made for the run (processes the tests start inherit it).
    """
    name = f"bcast_test_{os.getpid()}_{secrets.token_hex(3)}"
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    os.environ["BCAST_DATABASE_URL"] = url
    os.environ["BCAST_MEDIA_DIR"] = str(tmp_path_factory.mktemp("media"))
    # Providers in tests are simulators on loopback; tests of the egress rule turn it on.
    os.environ["BCAST_ALLOW_PRIVATE_TARGETS"] = "true"
    os.environ["BCAST_SECRET_KEYS"] = new_key()
    _clear_caches()
    migrate.upgrade(url)
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        width = get_settings().delivery_partition_days
        delivery_store.run(conn, delivery_partitions.ensure_ahead(width))
    yield url
    get_engine().dispose()
    _clear_caches()
    _drop_database(name)


#: The e2e files that break things or start whole stacks of their own (private servers,
#: crashes, a browser).
WHOLE_STACK_FILES = frozenset(
    {
        "test_faults.py",
        "test_schemathesis.py",
        "test_resilience.py",
        "test_console_browser.py",
        "test_cli_tools.py",
        "test_prometheus.py",
    }
)
#: Folders whose tests start processes of their own and measure no rate or delay: the
#: ``bcast`` command line, promtool and amtool.
OWN_PROCESS_DIRS = ("tests/cli/", "tests/deploy/")
#: The lanes a test can run in (``lane_of``).
IN_PROCESS, E2E, OWN_PROCESSES, REST = "in-process", "e2e", "own processes", "the rest"


def lane_of(nodeid: str, lanes: int = 3) -> str:
    """The lane (one worker, tests one at a time in their collected order) a test runs in.

    The tests that start processes of their own and measure no rate or delay (whole stacks,
    the command line, promtool) are one lane. With three lanes, the in-process tests and the
    e2e tests that measure rates and delays are the other two; with two, they are one.
    """
    path = nodeid.split("::", 1)[0]
    if path.startswith(OWN_PROCESS_DIRS) or (
        path.startswith("tests/e2e/") and path.rsplit("/", 1)[1] in WHOLE_STACK_FILES
    ):
        return OWN_PROCESSES
    if lanes < 3:
        return REST
    return E2E if path.startswith("tests/e2e/") else IN_PROCESS


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """With ``-n 2`` or ``-n 3`` and ``--dist loadfile`` (``BCAST_TEST_WORKERS=2
    deploy/local/test.sh``) the suite runs as lanes side by side, each on a worker of its own,
    each in the order one process would run it (``lane_of``). The tests within a lane see
    each other's leftovers (a sweep is global) as they always did.
    """
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    lanes = _lanes(config)

    class Lanes(LoadScopeScheduling):  # type: ignore[misc]  # an untyped base
        def _split_scope(self, nodeid: str) -> str:
            return lane_of(nodeid, lanes)

    return Lanes(config, log)


def _lanes(config: pytest.Config) -> int:
    """How many lanes the run has: its worker count, at most three."""
    try:
        return max(1, min(3, int(config.getvalue("numprocesses") or 0)))
    except (TypeError, ValueError):
        return 3


#: How much the lane of own processes gives way to the others (``os.nice``).
BACKGROUND_NICENESS = 10


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """On a worker of a run in lanes, the lane of own processes (fault scenarios on private
    servers, the browser, the command line: the heaviest) gives way on the cores (``nice``,
    inherited by every process it starts) to the lanes whose tests check rates and timeouts.
    """
    if (
        os.environ.get("PYTEST_XDIST_WORKER")  # (a worker's own --dist reads "no")
        and lane_of(item.nodeid) == OWN_PROCESSES
        and os.nice(0) < BACKGROUND_NICENESS
    ):
        os.nice(BACKGROUND_NICENESS - os.nice(0))


def _clear_caches() -> None:
    get_settings.cache_clear()
    get_engine.cache_clear()
    get_sessionmaker.cache_clear()
    get_secrets_box.cache_clear()


@pytest.fixture(scope="session")
def settings(database_url: str) -> Settings:
    return get_settings()


@pytest.fixture(scope="session")
def app(settings: Settings) -> FastAPI:
    from services.api.app import create_app

    return create_app(settings)


@pytest.fixture
def egress_rule_on(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The production setting: channels may reach public addresses only. It asks for
    ``settings`` so the run's own environment is in place first, and this test's change is the
    one undone afterwards (even when it is the first test of its process).
    """
    monkeypatch.setenv("BCAST_ALLOW_PRIVATE_TARGETS", "false")
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


class Api:
    """A client signed in to one workspace, with shortcuts for the rows most tests need."""

    def __init__(self, client: TestClient, token: str, workspace_id: int) -> None:
        self.client = client
        self.token = token
        self.workspace_id = workspace_id
        self.headers = {"Authorization": f"Bearer {token}"}

    def get(self, path: str, **kw: Any) -> Any:
        return self.client.get(path, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self.client.post(path, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def patch(self, path: str, **kw: Any) -> Any:
        return self.client.patch(path, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.client.delete(path, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def ok(self, method: str, path: str, expect: int = 200, **kw: Any) -> Any:
        response = getattr(self, method)(path, **kw)
        assert response.status_code == expect, response.text
        return response.json()

    def channel(self, kind: str = "webhook", **overrides: Any) -> dict[str, Any]:
        configs = {
            "webhook": {"url": "http://127.0.0.1:9/hook", "secret": "s3cret-webhook-key-0001"},
            "telegram": {"bot_token": "123456:ABCdef_ghi-jkl"},
            "whatsapp": {"access_token": "EAAG-secret-token", "phone_number_id": "1065"},
            "smtp": {
                "host": "127.0.0.1",
                "port": 2525,
                "from_address": "news@example.com",
                "password": "smtp-pass-1",
            },
        }
        body = {
            "name": f"{kind}-{secrets.token_hex(3)}",
            "kind": kind,
            "config": configs[kind],
            **overrides,
        }
        result: dict[str, Any] = self.ok("post", "/v1/channels", 201, json=body)
        return result

    def account(self, channel_id: int, name: str | None = None) -> dict[str, Any]:
        body = {"channel_id": channel_id, "name": name or f"acct-{secrets.token_hex(3)}"}
        result: dict[str, Any] = self.ok("post", "/v1/accounts", 201, json=body)
        return result

    def contact(
        self, account_id: int, address: str, *, tags: list[str] | None = None, **kw: Any
    ) -> dict[str, Any]:
        body = {"account_id": account_id, "address": address, "tags": tags or [], **kw}
        result: dict[str, Any] = self.ok("post", "/v1/contacts", 201, json=body)
        return result

    def tag_id(self, name: str) -> int:
        tags = self.ok("get", "/v1/tags")["items"]
        return int(next(t["id"] for t in tags if t["name"].lower() == name.lower()))

    def one_of_everything(self, address: str, tag: str) -> dict[str, Any]:
        """One of every row a workspace can own (the tag as its id, the rest as answered)."""
        import io

        from PIL import Image

        channel = self.channel()
        account = self.account(channel["id"])
        contact = self.contact(account["id"], address, tags=[tag])
        conversation = self.ok(
            "post",
            "/v1/conversations",
            201,
            json={"account_id": account["id"], "contact_id": contact["id"]},
        )
        buf = io.BytesIO()
        Image.new("RGB", (2, 2)).save(buf, "PNG")
        media = self.ok(
            "post", "/v1/media", 201, files={"file": ("a.png", buf.getvalue(), "image/png")}
        )
        return {
            "channel": channel,
            "account": account,
            "contact": contact,
            "tag": self.tag_id(tag),
            "conversation": conversation,
            "media": media,
            "broadcast": self.broadcast(channel["id"]),
        }

    def broadcast(
        self, channel_id: int, audience: dict[str, Any] | None = None, **kw: Any
    ) -> dict[str, Any]:
        body = {
            "name": "test broadcast",
            "channel_id": channel_id,
            "audience": audience or {},
            "content": {"text": "hello"},
            **kw,
        }
        result: dict[str, Any] = self.ok("post", "/v1/broadcasts", 201, json=body)
        return result


def new_workspace(client: TestClient, name: str | None = None) -> Api:
    from shared.db.engine import transaction
    from shared.domain.tokens import create_token

    with transaction() as session:
        token = create_token(session, name or f"ws-{secrets.token_hex(4)}")
    return Api(client, token.token, token.workspace_id)


@pytest.fixture(scope="session")
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def api(client: TestClient) -> Api:
    """A fresh workspace and a client signed in to it."""
    return new_workspace(client)


@pytest.fixture
def other_api(client: TestClient) -> Api:
    """A second, unrelated workspace."""
    return new_workspace(client)


@pytest.fixture
def secret_rows(database_url: str) -> Iterator[SecretRows]:
    """A migrated database of its own, to fill with secrets (see ``tests.secret_rows``)."""
    from sqlalchemy.orm import sessionmaker

    from shared.db.engine import make_engine
    from tests.secret_rows import SecretRows

    name = f"{database_url.rsplit('/', 1)[1]}_secrets_{secrets.token_hex(3)}"
    url = database_url.rsplit("/", 1)[0] + "/" + name
    migrate.upgrade(url)
    engine = make_engine(url, pool_size=1)
    try:
        yield SecretRows(url, sessionmaker(engine).begin)
    finally:
        engine.dispose()
        _drop_database(name)


@pytest.fixture
def media_dir(settings: Settings) -> Path:
    return settings.media_dir
