"""``bcast token create|list|revoke``: tokens that expire, a listing that never shows a token,
and a revoked or expired token refused by the API on the very next request.
"""

from __future__ import annotations

import os
import secrets
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from shared.db.engine import transaction
from shared.db.models import ApiToken
from shared.domain.tokens import hash_token, parse_duration
from tests.cli.test_cli import run


@pytest.fixture
def env(database_url: str) -> dict[str, str]:
    """The environment of the run's database, where the API under test reads its tokens."""
    return {**os.environ, "BCAST_DATABASE_URL": database_url}


def workspace_name() -> str:
    return f"cli-{secrets.token_hex(4)}"


def create(env: dict[str, str], workspace: str, *args: str) -> str:
    made = run("token", "create", "--workspace", workspace, *args, env=env)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("bcast_")
    return token


def stored(token: str) -> ApiToken:
    with transaction() as session:
        row = session.execute(
            select(ApiToken).where(ApiToken.token_hash == hash_token(token))
        ).scalar_one()
        session.expunge(row)
    return row


def answers(client: TestClient, token: str) -> int:
    response = client.get("/v1/channels", headers={"Authorization": f"Bearer {token}"})
    if response.status_code == 401:
        assert response.json()["detail"] == "invalid, expired or revoked bearer token"
    return int(response.status_code)


def test_create_with_an_expiry_in_or_at(env: dict[str, str], client: TestClient) -> None:
    ws = workspace_name()
    before = datetime.now(UTC)
    token = create(env, ws, "--name", "ci", "--expires-in", "30d")
    row = stored(token)
    assert row.name == "ci"
    assert row.expires_at is not None
    assert before + timedelta(days=30) <= row.expires_at <= datetime.now(UTC) + timedelta(days=30)
    assert answers(client, token) == 200

    at = create(env, ws, "--expires-at", "2031-05-06T07:08:09+02:00")
    assert stored(at).expires_at == datetime(2031, 5, 6, 5, 8, 9, tzinfo=UTC)
    naive = create(env, ws, "--expires-at", "2031-05-06T07:08")
    assert stored(naive).expires_at == datetime(2031, 5, 6, 7, 8, tzinfo=UTC)
    assert stored(create(env, ws)).expires_at is None


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--expires-in", "30x"], "use a number and a unit (s, m, h, d, w)"),
        (["--expires-in", "0h"], "longer than zero"),
        (["--expires-at", "2001-01-01T00:00:00Z"], "is not in the future"),
        (["--expires-at", "next tuesday"], "is not an ISO 8601 time"),
        (["--expires-in", "1d", "--expires-at", "2031-01-01"], "not both"),
    ],
)
def test_a_bad_expiry_is_refused_and_makes_no_token(
    env: dict[str, str], args: list[str], said: str
) -> None:
    ws = workspace_name()
    result = run("token", "create", "--workspace", ws, *args, env=env)
    assert result.returncode == 2
    assert said in " ".join(result.stderr.replace("│", " ").split())
    assert "bcast_" not in result.stdout
    listed = run("token", "list", "--workspace", ws, env=env)
    assert listed.stdout.strip().count("\n") == 0, "only the header"


def test_durations() -> None:
    assert parse_duration("90m") == timedelta(minutes=90)
    assert parse_duration("12h") == timedelta(hours=12)
    assert parse_duration("1d12h") == timedelta(days=1, hours=12)
    assert parse_duration("2w") == timedelta(weeks=2)
    assert parse_duration("45S") == timedelta(seconds=45)
    for bad in ("", "d", "1.5h", "-1d", "1d 2h", "1y"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


def test_list_shows_each_token_but_never_the_token_or_its_hash(
    env: dict[str, str], client: TestClient
) -> None:
    ws = workspace_name()
    used = create(env, ws, "--name", "deploy-bot", "--expires-in", "12h")
    unused = create(env, ws)
    other = create(env, workspace_name())
    assert answers(client, used) == 200

    listed = run("token", "list", "--workspace", ws, env=env)
    assert listed.returncode == 0, listed.stderr
    header, *lines = listed.stdout.strip().splitlines()
    assert header.split() == [
        "ID", "WORKSPACE", "NAME", "PREFIX", "CREATED", "LAST", "USED", "EXPIRES", "REVOKED"
    ]  # fmt: skip
    assert len(lines) == 2
    first, second = (line.split() for line in lines)
    assert first[:4] == [str(stored(used).id), ws, "deploy-bot", used[:12]]
    assert "never" not in first[6:8], "used: a last-used time"
    assert second[:4] == [str(stored(unused).id), ws, "-", unused[:12]]
    assert second.count("never") == 2, "never used, never expires"
    assert first[-1] == second[-1] == "-", "not revoked"
    everything = run("token", "list", env=env).stdout
    assert other[:12] in everything
    for token in (used, unused, other):
        for text in (listed.stdout, everything):
            assert token not in text
            assert hash_token(token) not in text


def test_revoke_by_id_answers_401_on_the_very_next_request(
    env: dict[str, str], client: TestClient
) -> None:
    ws = workspace_name()
    token, keep = create(env, ws), create(env, ws)
    assert answers(client, token) == 200
    token_id = stored(token).id

    revoked = run("token", "revoke", str(token_id), env=env)
    assert revoked.returncode == 0, revoked.stderr
    assert f"revoked token {token_id} ({token[:12]}, workspace {ws!r})" in revoked.stdout
    assert answers(client, token) == 401
    assert answers(client, keep) == 200, "only that token"
    assert stored(token).revoked_at is not None

    again = run("token", "revoke", str(token_id), env=env)
    assert again.returncode == 0
    assert "was already revoked at" in again.stdout
    listed = run("token", "list", "--workspace", ws, env=env).stdout.splitlines()
    assert listed[1].split()[-1].endswith("Z"), "the revoked token shows when"


def test_revoke_by_prefix_and_refusals(env: dict[str, str], client: TestClient) -> None:
    token = create(env, workspace_name())
    revoked = run("token", "revoke", token[:12], env=env)
    assert revoked.returncode == 0, revoked.stderr
    assert answers(client, token) == 401

    twin = create(env, workspace_name())
    with transaction() as session:  # two tokens may share a shown prefix, however rarely
        row = stored(twin)
        session.add(
            ApiToken(
                workspace_id=row.workspace_id,
                token_hash=hash_token(twin + "x"),
                prefix=row.prefix,
            )
        )
    ambiguous = run("token", "revoke", twin[:12], env=env)
    assert ambiguous.returncode == 1
    assert f"2 tokens have the prefix {twin[:12]!r}" in ambiguous.stderr
    assert "revoke or change it by its id" in ambiguous.stderr
    assert answers(client, twin) == 200, "nothing revoked"

    for ref, said in [
        ("999999999", "no token has the id"),
        ("99999999999999999999", "no token has the id"),
        ("hello", "neither a token id"),
    ]:
        missing = run("token", "revoke", ref, env=env)
        assert missing.returncode == 1
        assert said in missing.stderr


def test_an_expired_token_is_401(env: dict[str, str], client: TestClient) -> None:
    token = create(env, workspace_name(), "--expires-in", "1h")
    assert answers(client, token) == 200
    with transaction() as session:
        session.execute(
            update(ApiToken)
            .where(ApiToken.token_hash == hash_token(token))
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    assert answers(client, token) == 401
    listed = run("token", "list", env=env).stdout
    [line] = [line for line in listed.splitlines() if token[:12] in line]
    assert "(expired)" in line


def test_an_expiry_too_far_ahead_is_refused_with_a_reason(env: dict[str, str]) -> None:
    result = run(
        "token", "create", "--workspace", workspace_name(), "--expires-in", "99999999999d", env=env
    )
    assert result.returncode != 0
    assert "longer than a token may live" in result.stderr
    assert "Traceback" not in result.stderr


def test_change_renames_and_moves_or_removes_the_expiry(
    env: dict[str, str], client: TestClient
) -> None:
    token = create(env, workspace_name(), "--name", "old")
    token_id = stored(token).id
    renamed = run("token", "change", str(token_id), "--name", "deploy bot", env=env)
    assert renamed.returncode == 0, renamed.stderr
    assert "name 'deploy bot', expires never" in renamed.stdout
    before = datetime.now(UTC)
    run("token", "change", token[:12], "--expires-in", "2d", env=env)
    row = stored(token)
    assert row.name == "deploy bot"
    assert row.expires_at is not None
    assert before + timedelta(days=2) <= row.expires_at <= datetime.now(UTC) + timedelta(days=2)
    assert run("token", "change", str(token_id), "--never-expires", env=env).returncode == 0
    assert stored(token).expires_at is None
    for args, words in (
        (["--expires-at", "2001-01-01T00:00:00Z"], "not in the future"),
        (["--never-expires", "--expires-in", "1d"], "give one of"),
        ([], "nothing to change"),
    ):
        refused = run("token", "change", str(token_id), *args, env=env)
        assert refused.returncode != 0
        assert words in refused.stderr
    assert stored(token).expires_at is None
    assert answers(client, token) == 200
    run("token", "revoke", str(token_id), env=env)
    revoked = run("token", "change", str(token_id), "--name", "x", env=env)
    assert revoked.returncode != 0
    assert "is revoked" in revoked.stderr
