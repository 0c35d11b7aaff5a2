"""The ``bcast`` command as an operator runs it: real processes, real database."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import httpx2 as httpx
import psycopg
import pytest

from bench.ports import free_port
from shared.db.engine import libpq_url
from shared.domain.tokens import hash_token
from tests.conftest import _drop_database
from tests.serving import wait_until_up

BCAST = [sys.executable, "-m", "services.cli"]


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BCAST, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def fresh_env(database_url: str) -> Iterator[dict[str, str]]:
    """Environment naming a database that does not exist yet."""
    name = database_url.rsplit("/", 1)[1] + "_cli"
    env = {**os.environ, "BCAST_DATABASE_URL": database_url.rsplit("/", 1)[0] + "/" + name}
    yield env
    _drop_database(name)


def test_db_upgrade_creates_and_migrates_then_token_create_and_api_work(
    fresh_env: dict[str, str],
) -> None:
    upgraded = run("db", "upgrade", env=fresh_env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert "created database" in upgraded.stdout
    assert "created database" not in run("db", "upgrade", env=fresh_env).stdout

    made = run("token", "create", "--workspace", "acme", env=fresh_env)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("bcast_")
    with psycopg.connect(libpq_url(fresh_env["BCAST_DATABASE_URL"])) as conn:
        stored = conn.execute("SELECT token_hash FROM api_token").fetchall()
        workspaces = conn.execute("SELECT name FROM workspace").fetchall()
    assert stored == [(hash_token(token),)]
    assert workspaces == [("acme",)]

    port = free_port()
    server = subprocess.Popen(
        [*BCAST, "api", "--port", str(port)],
        env=fresh_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(f"{base}/readyz", "the API", ready=lambda r: r.status_code == 200)
        assert httpx.get(f"{base}/v1/channels").status_code == 401
        ok = httpx.get(f"{base}/v1/channels", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200
        assert ok.json() == {"items": [], "next_cursor": None}
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0].decode()
    assert token not in output, "the token never appears in the logs"


def test_a_second_token_for_the_same_workspace_joins_it(fresh_env: dict[str, str]) -> None:
    assert run("db", "upgrade", env=fresh_env).returncode == 0
    first = run("token", "create", "--workspace", "acme", env=fresh_env).stdout.strip()
    second = run("token", "create", "--workspace", "acme", env=fresh_env).stdout.strip()
    assert first != second
    with psycopg.connect(libpq_url(fresh_env["BCAST_DATABASE_URL"])) as conn:
        assert conn.execute(
            "SELECT count(DISTINCT workspace_id), count(*) FROM api_token"
        ).fetchone() == (1, 2)


def test_bad_database_url_is_a_clear_error(fresh_env: dict[str, str]) -> None:
    result = run("db", "upgrade", env={**fresh_env, "BCAST_DATABASE_URL": "mysql://x/y"})
    assert result.returncode != 0
    assert "postgresql://" in result.stderr + result.stdout


def test_db_check_waits_for_the_schema_at_the_newest_migration(
    fresh_env: dict[str, str], database_url: str
) -> None:
    # Not there yet (no database at all, then no migration): a service's init step waits.
    missing = run("db", "check", env=fresh_env)
    assert missing.returncode == 1
    assert "database schema is not at" in missing.stderr
    assert "unreachable" in missing.stderr
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        name = fresh_env["BCAST_DATABASE_URL"].rsplit("/", 1)[1]
        conn.execute(f'CREATE DATABASE "{name}"')
    empty = run("db", "check", env=fresh_env)
    assert empty.returncode == 1
    assert "at no migration" in empty.stderr
    # Migrated while a check waits: it succeeds then.
    waiting = subprocess.Popen(
        [*BCAST, "db", "check", "--wait", "60"],
        env=fresh_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert run("db", "upgrade", env=fresh_env).returncode == 0
    out, err = waiting.communicate(timeout=90)
    assert waiting.returncode == 0, err
    assert out.startswith("schema at ")
    # A schema newer than this code knows (a rollback, an old pod mid-rollout) lets it start;
    # one it knows but older does not.
    target = fresh_env["BCAST_DATABASE_URL"]
    with psycopg.connect(libpq_url(target), autocommit=True) as conn:
        head = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        conn.execute("UPDATE alembic_version SET version_num = 'ffffffff0000'")
        newer = run("db", "check", env=fresh_env)
        assert newer.returncode == 0, newer.stderr
        assert "newer than this code's" in newer.stdout
        conn.execute("UPDATE alembic_version SET version_num = '0001'")
        older = run("db", "check", env=fresh_env)
        assert older.returncode == 1
        assert "at 0001" in older.stderr
        assert head is not None
        conn.execute("UPDATE alembic_version SET version_num = %s", head)
