"""Tenant isolation, generated from the route table: every operation that takes a row id, in
its path or its query, called with another workspace's token on this workspace's ids, answers
404 (or an empty page) and changes nothing. A new route with an id it does not know fails
here until it is added.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import text

from shared.db.engine import get_engine
from tests.conftest import Api

#: Which row kind each id parameter names.
KINDS = {
    "channel_id": "channel",
    "account_id": "account",
    "tag_id": "tag",
    "contact_id": "contact",
    "broadcast_id": "broadcast",
    "conversation_id": "conversation",
    "media_id": "media",
    "token_id": "token",
}
#: A valid body for every operation with an id in its path that takes one.
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("patch", "/v1/contacts/{contact_id}"): {"name": "changed", "opted_out": True},
    ("post", "/v1/contacts/{contact_id}/inbound"): {},
    ("patch", "/v1/broadcasts/{broadcast_id}"): {"name": "changed"},
    ("patch", "/v1/channels/{channel_id}"): {"name": "changed", "rate_limit_per_second": 1},
    ("patch", "/v1/accounts/{account_id}"): {"name": "changed"},
    ("patch", "/v1/tags/{tag_id}"): {"name": "changed"},
    ("patch", "/v1/tokens/{token_id}"): {"name": "changed"},
    ("post", "/v1/conversations/{conversation_id}/timed-sends"): {"content": {"text": "x"}},
    ("post", "/v1/broadcasts/{broadcast_id}/retry-failed"): {"name": "again"},
    ("post", "/v1/broadcasts/{broadcast_id}/clone"): {"name": "copy"},
    ("post", "/v1/broadcasts/{broadcast_id}/test-send"): {"contact_ids": [1]},
    ("post", "/v1/broadcasts/{broadcast_id}/resume"): {"confirm_late_start": True},
}
#: Operations that are public by design (signed URLs), not a workspace's.
PUBLIC = {("get", "/media/{media_id}")}


@pytest.fixture
def mine(api: Api) -> dict[str, int]:
    """The id of one of every row a workspace can own."""
    made = api.one_of_everything("my-contact", "mine")
    ids = {kind: row if isinstance(row, int) else row["id"] for kind, row in made.items()}
    ids["token"] = api.ok("get", "/v1/tokens")[0]["id"]
    return ids


def rows_of(workspace_id: int) -> dict[str, list[str]]:
    """Every row the workspace owns, table by table, as JSON."""
    with get_engine().connect() as conn:
        tables = [
            r[0]
            for r in conn.execute(
                text(
                    "SELECT table_name FROM information_schema.columns "
                    "WHERE column_name = 'workspace_id' AND table_schema = 'public' "
                    "AND table_name NOT IN ('api_token')"
                )
            )
        ]
        return {
            table: sorted(
                json.dumps(r[0], sort_keys=True, default=str)
                for r in conn.execute(
                    text(f"SELECT row_to_json(t) FROM {table} t WHERE workspace_id = :w"),
                    {"w": workspace_id},
                )
            )
            for table in tables
        }


def operations(app: FastAPI) -> list[tuple[str, str, dict[str, Any]]]:
    doc = app.openapi()
    return [
        (method, path, operation)
        for path, ops in doc["paths"].items()
        for method, operation in ops.items()
        if method in ("get", "post", "put", "patch", "delete")
    ]


def test_every_operation_with_an_id_is_covered(app: FastAPI) -> None:
    for method, path, operation in operations(app):
        for param in operation.get("parameters", []):
            if param["name"].endswith("_id"):
                assert param["name"] in KINDS, f"{method} {path}: add {param['name']} to KINDS"
        takes_body = "requestBody" in operation
        if "{" in path and takes_body and (method, path) not in PUBLIC:
            assert (method, path) in BODIES, f"{method} {path}: add a body to BODIES"


def test_another_workspace_gets_404_on_every_id_of_mine_and_changes_nothing(
    app: FastAPI, api: Api, other_api: Api, mine: dict[str, int]
) -> None:
    before = rows_of(api.workspace_id)
    tried = 0
    for method, path, operation in operations(app):
        if (method, path) in PUBLIC:
            continue
        params = operation.get("parameters", [])
        in_path = [p["name"] for p in params if p["in"] == "path"]
        in_query = [p["name"] for p in params if p["in"] == "query" and p["name"] in KINDS]
        if not in_path and not in_query:
            continue
        url = path.format(**{name: mine[KINDS[name]] for name in in_path})
        query = {name: mine[KINDS[name]] for name in in_query} if not in_path else {}
        kwargs: dict[str, Any] = {"params": query}
        if (method, path) in BODIES:
            kwargs["json"] = BODIES[(method, path)]
        response = getattr(other_api.client, method)(url, headers=other_api.headers, **kwargs)
        tried += 1
        if in_path:
            assert response.status_code == 404, (method, url, response.text)
        else:
            # A filter by my id in their list: their own rows only, and none of them match.
            assert response.status_code == 200, (method, url, response.text)
            assert response.json()["items"] == [], (method, url)
        assert "my-contact" not in response.text
    assert tried >= 15, "the route table lost its id routes?"
    assert rows_of(api.workspace_id) == before
