"""Bearer tokens guard every /v1 route; health and docs are open."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from shared.db.engine import transaction
from shared.db.models import ApiToken
from shared.domain.tokens import hash_token
from tests.conftest import Api

V1_ROUTES = [
    ("get", "/v1/channels"),
    ("post", "/v1/channels"),
    ("get", "/v1/accounts"),
    ("get", "/v1/tags"),
    ("get", "/v1/contacts"),
    ("post", "/v1/contacts/import"),
    ("post", "/v1/audiences/preview"),
    ("get", "/v1/broadcasts"),
    ("post", "/v1/broadcasts"),
    ("get", "/v1/broadcasts/1"),
    ("patch", "/v1/broadcasts/1"),
    ("post", "/v1/broadcasts/1/pause"),
    ("get", "/v1/broadcasts/1/recipients"),
    ("post", "/v1/conversations"),
    ("post", "/v1/conversations/1/timed-sends"),
    ("post", "/v1/media"),
]


@pytest.mark.parametrize(("method", "path"), V1_ROUTES)
def test_every_v1_route_answers_401_without_a_token(
    client: TestClient, method: str, path: str
) -> None:
    response = getattr(client, method)(path)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_a_wrong_token_is_401(client: TestClient) -> None:
    response = client.get(
        "/v1/channels", headers={"Authorization": "Bearer bcast_not-a-real-token"}
    )
    assert response.status_code == 401
    assert "invalid" in response.json()["detail"]


def test_a_revoked_token_is_401(api: Api) -> None:
    assert api.get("/v1/channels").status_code == 200
    with transaction() as session:
        session.execute(
            update(ApiToken)
            .where(ApiToken.token_hash == hash_token(api.token))
            .values(revoked_at=ApiToken.created_at)
        )
    assert api.get("/v1/channels").status_code == 401


def test_tokens_are_stored_only_as_hashes(api: Api) -> None:
    with transaction() as session:
        stored = session.execute(
            select(ApiToken).where(ApiToken.workspace_id == api.workspace_id)
        ).scalar_one()
    assert stored.token_hash == hash_token(api.token)
    assert api.token not in (stored.token_hash, stored.prefix)
    assert stored.last_used_at is None or stored.last_used_at >= stored.created_at


def test_health_ready_and_docs_need_no_token(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ok", "database": "ok"}
    spec = client.get("/openapi.json").json()
    assert "/v1/broadcasts" in spec["paths"]
    assert "/v1/contacts/import" in spec["paths"]
    assert client.get("/docs").status_code == 200


def test_metrics_expose_request_counts_by_route_template(api: Api, client: TestClient) -> None:
    api.get("/v1/broadcasts/424242")
    text = client.get("/metrics").text
    assert (
        'bcast_api_requests_total{method="GET",route="/v1/broadcasts/{broadcast_id}",status="404"}'
        in text
    )
    assert "/v1/broadcasts/424242" not in text


def test_each_route_s_server_errors_are_counted_from_zero_before_any() -> None:
    # A fresh process: the series a first 500 or 503 adds to exist at 0 (rate() sees the rise).
    script = (
        "from prometheus_client import generate_latest\n"
        "from services.api.app import create_app\n"
        "create_app()\n"
        "print(generate_latest().decode())\n"
    )
    exported = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    for method, route in (("POST", "/v1/broadcasts"), ("GET", "/readyz")):
        for status in ("500", "503"):
            sample = f'bcast_api_requests_total{{method="{method}",route="{route}",status="{status}"}} 0.0'
            assert sample in exported
        assert (
            f'bcast_api_request_duration_seconds_count{{method="{method}",route="{route}"}} 0.0'
            in exported
        )
