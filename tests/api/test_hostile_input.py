"""A catalogue of hostile input: every case gets a clear 4xx problem naming what is wrong,
never a 500, and leaves nothing written.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from services.api.middleware import REQUESTS
from services.api.routes.broadcasts import export_slots
from shared.settings import get_settings
from tests.conftest import Api

HUGE = 2**63  # past bigint, and far past MAX_ID
PROBLEM = "application/problem+json"


def problem(response: Any, status: int) -> dict[str, Any]:
    """The answer is a problem document with ``status``; returns it."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM), response.headers
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["title"]
    assert body["type"] == "about:blank"
    assert isinstance(body["message"], str)
    assert body["message"]
    return body


def fields(response: Any) -> dict[str, str]:
    body = problem(response, 422)
    assert body["errors"] == body["detail"]
    return {e["field"]: e["msg"] for e in body["errors"]}


def reachable_channel(api: Api, kind: str = "webhook") -> dict[str, Any]:
    """A channel with one contact, so a broadcast on it has an audience."""
    channel = api.channel(kind)
    account = api.account(channel["id"])
    api.contact(account["id"], "ann@example.com" if kind == "smtp" else "r-1")
    return channel


def nothing_written(api: Api) -> None:
    for path in ("/v1/channels", "/v1/broadcasts", "/v1/contacts", "/v1/tags"):
        assert api.ok("get", path)["items"] == [], path


# --- integers past the database's range ---------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        f"/v1/broadcasts/{HUGE}",
        f"/v1/broadcasts/{HUGE}/recipients",
        f"/v1/channels/{HUGE}",
        f"/v1/contacts/{HUGE}",
        f"/v1/media/{HUGE}",
        f"/v1/contacts?account_id={HUGE}",
        f"/v1/accounts?channel_id={HUGE}",
        "/v1/broadcasts?limit=99999999999999999999999",
        "/v1/broadcasts/0",
        "/v1/broadcasts/-1",
    ],
)
def test_ids_past_the_database_range_are_422_not_500(api: Api, path: str) -> None:
    problem(api.get(path), 422)


def test_a_cursor_past_the_database_range_is_refused(api: Api) -> None:
    cursor = base64.urlsafe_b64encode(str(HUGE).encode()).decode().rstrip("=")
    assert "cursor" in fields(api.get("/v1/broadcasts", params={"cursor": cursor}))


def test_the_public_media_route_refuses_huge_numbers_and_odd_signatures(api: Api) -> None:
    problem(api.client.get(f"/media/{HUGE}?expires=1&signature=x"), 422)
    problem(api.client.get(f"/media/1?expires={HUGE}&signature=x"), 422)
    # A signature that is not ASCII is simply wrong, never an error inside.
    problem(api.client.get("/media/1?expires=4102444800&signature=%C3%A9%C3%A9"), 403)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"channel_id": HUGE}, "channel_id"),
        ({"audience": {"tag_ids": [HUGE]}}, "audience.tag_ids[0]"),
        (
            {"audience": {"selection": "manual", "contact_ids": [1, HUGE]}},
            "audience.contact_ids[1]",
        ),
        ({"content": {"media_ids": [2**70]}}, "content.media_ids[0]"),
    ],
)
def test_ids_in_a_body_past_the_database_range_name_the_field(
    api: Api, body: dict[str, Any], field: str
) -> None:
    channel = api.channel()
    base = {"name": "b", "channel_id": channel["id"], "audience": {}, "content": {"text": "x"}}
    assert field in fields(api.post("/v1/broadcasts", json={**base, **body}))
    assert api.ok("get", "/v1/broadcasts")["items"] == []


# --- strict types ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, "1", 1.0, "1e3", None])
def test_ids_must_be_json_integers(api: Api, value: Any) -> None:
    channel = api.channel()
    body = {"name": "b", "channel_id": value, "audience": {}, "content": {"text": "x"}}
    if value == 1.0:
        body["channel_id"] = channel["id"] * 1.0
    assert "channel_id" in fields(api.post("/v1/broadcasts", json=body))
    assert api.ok("get", "/v1/broadcasts")["items"] == []


@pytest.mark.parametrize("value", [4102444800, 4102444800.5, True])
def test_send_at_is_an_iso_8601_string_only(api: Api, value: Any) -> None:
    channel = api.channel()
    body = {
        "name": "b",
        "channel_id": channel["id"],
        "audience": {},
        "content": {"text": "x"},
        "send_at": value,
    }
    errors = fields(api.post("/v1/broadcasts", json=body))
    assert "ISO-8601" in errors["send_at"]


# --- characters that cannot be stored or sent ------------------------------------------------


@pytest.mark.parametrize("bad", ["\x00", "\x1b[2J", "\ud800", "\x7f", "\x85"])
def test_control_characters_anywhere_in_a_body_are_refused_with_the_field(
    api: Api, bad: str
) -> None:
    cases = [
        ("/v1/channels", {"name": f"c{bad}", "kind": "webhook", "config": {}}, "name"),
        (
            "/v1/channels",
            {
                "name": "c",
                "kind": "webhook",
                "config": {"url": "https://x.example/", "secret": f"{bad}" * 16},
            },
            "config.secret",
        ),
        ("/v1/tags", {"name": f"t{bad}"}, "name"),
    ]
    for path, body, field in cases:
        raw = json.dumps(body).encode()  # a lone surrogate goes as its \\u escape
        response = api.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert field in fields(response), (path, response.text)
    nothing_written(api)


def test_line_breaks_are_fine_in_text_but_not_in_a_name(api: Api) -> None:
    channel = reachable_channel(api, "smtp")
    base = {"channel_id": channel["id"], "audience": {}}
    errors = fields(
        api.post(
            "/v1/broadcasts",
            json={**base, "name": "Hi\r\nBcc: all@example.com", "content": {"text": "x"}},
        )
    )
    assert "one line" in errors["name"]
    ok = api.post(
        "/v1/broadcasts", json={**base, "name": "Hi", "content": {"text": "line 1\nline 2\tend"}}
    )
    assert ok.status_code == 201, ok.text


@pytest.mark.parametrize("name", ["Ann\x00", "Ann\nBob", "=HYPERLINK\u2028x"])
def test_a_contact_name_that_cannot_be_stored_fails_its_import_row(api: Api, name: str) -> None:
    channel = api.channel()
    account = api.account(channel["id"])
    rows = [
        {"account_id": account["id"], "address": "r-1"},
        {"account_id": account["id"], "address": "r-2", "name": name},
    ]
    errors = fields(api.post("/v1/contacts/import", json=rows))
    assert "rows[1].name" in errors
    assert api.ok("get", "/v1/contacts")["items"] == []


def test_a_nul_in_the_query_is_refused_with_its_name(api: Api) -> None:
    assert "status" in fields(api.get("/v1/broadcasts?status=pending%00"))


# --- JSON itself ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/broadcasts", "/v1/contacts/import", "/v1/audiences/preview"])
def test_deeply_nested_json_is_refused_not_recursed_into(api: Api, path: str) -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    response = api.post(path, content=body, headers={"Content-Type": "application/json"})
    assert "body" in fields(response)
    body = b'{"a":' * 50 + b"1" + b"}" * 50
    response = api.post(path, content=body, headers={"Content-Type": "application/json"})
    problem(response, 422)


def test_a_body_that_is_not_json_says_so(api: Api) -> None:
    errors = fields(
        api.post("/v1/broadcasts", content=b"{nope", headers={"Content-Type": "application/json"})
    )
    assert "not valid JSON" in errors["body"]


def test_a_broken_multipart_upload_is_a_problem_with_a_message(api: Api) -> None:
    response = api.post(
        "/v1/media",
        content=b'--x\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc',
        headers={"Content-Type": "multipart/form-data; boundary=x"},
    )
    assert 400 <= response.status_code < 500
    problem(response, response.status_code)


# --- idempotency keys -----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["", " ", " padded", "naïve", "a" * 256])
def test_a_bad_idempotency_key_is_refused_not_ignored(api: Api, key: str) -> None:
    channel = reachable_channel(api)
    body = {"name": "b", "channel_id": channel["id"], "audience": {}, "content": {"text": "x"}}
    first = api.post("/v1/broadcasts", json=body)
    assert first.status_code == 201
    response = api.post(
        "/v1/broadcasts",
        json=body,
        headers={"Idempotency-Key": key.encode("utf-8")},
    )
    assert "Idempotency-Key" in fields(response)
    assert len(api.ok("get", "/v1/broadcasts")["items"]) == 1


# --- methods, routes, sizes: every answer is a problem ---------------------------------------


def test_an_unknown_method_is_405_and_counted_under_one_label(api: Api) -> None:
    before = REQUESTS.labels("OTHER", "unmatched", "405")._value.get()
    for method in ("FOO", "PROPFIND", "X-RANDOM-1", "X-RANDOM-2"):
        response = api.client.request(method, "/v1/broadcasts", headers=api.headers)
        problem(response, 405)
        assert "GET" in response.headers["allow"]
    assert REQUESTS.labels("OTHER", "unmatched", "405")._value.get() == before + 4
    metrics = api.client.get("/metrics").text
    assert "X-RANDOM" not in metrics
    assert "PROPFIND" not in metrics


def test_errors_of_every_kind_are_problem_documents(api: Api) -> None:
    problem(api.client.get("/v1/broadcasts"), 401)
    problem(api.get("/v1/nope"), 404)
    problem(api.get("/v1/broadcasts/12345"), 404)
    problem(api.client.delete("/healthz"), 405)
    big = b"x" * (get_settings().max_body_bytes + 1)
    problem(
        api.post("/v1/broadcasts", content=big, headers={"Content-Type": "application/json"}), 413
    )
    channel = reachable_channel(api)
    b = api.broadcast(channel["id"])
    api.ok("post", f"/v1/broadcasts/{b['id']}/cancel")
    body = problem(api.post(f"/v1/broadcasts/{b['id']}/pause"), 409)
    assert body["instance"] == f"/v1/broadcasts/{b['id']}/pause"


def test_the_openapi_document_describes_the_errors_it_serves(api: Api) -> None:
    doc = api.client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    assert set(schemas["Problem"]["required"]) >= {"type", "title", "status", "detail", "message"}
    assert schemas["FieldProblem"]["required"] == ["field", "msg", "type"]
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            wanted = {"404", "405", "422", "500"}
            if path.startswith("/v1/"):
                wanted |= {"401", "409"}
            if method in ("post", "patch", "put"):
                wanted |= {"413"}
            assert wanted <= codes, (method, path, wanted - codes)
            for code in wanted:
                content = operation["responses"][code]["content"]
                assert content == {
                    "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
                }, (method, path, code)


# --- bounded work ---------------------------------------------------------------------------


@pytest.fixture
def ten_rows_per_import(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("BCAST_IMPORT_MAX_ROWS", "10")
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.mark.usefixtures("ten_rows_per_import")
def test_an_import_stops_reading_at_the_row_limit(api: Api) -> None:
    channel = api.channel()
    account = api.account(channel["id"])
    rows = ",".join(
        json.dumps({"account_id": account["id"], "address": f"r-{i}"}) for i in range(11)
    )
    # Past the 11th row the body is not even JSON: reading stopped before it got there.
    body = f"[{rows}, this is never read".encode()
    errors = fields(
        api.post("/v1/contacts/import", content=body, headers={"Content-Type": "application/json"})
    )
    assert "more than 10" in errors["body"]
    csv_body = (
        "account_id,address\n" + "".join(f"{account['id']},c-{i}\n" for i in range(11)) + '"broken'
    )
    errors = fields(
        api.post("/v1/contacts/import", content=csv_body, headers={"Content-Type": "text/csv"})
    )
    assert "more than 10" in errors["body"]
    assert api.ok("get", "/v1/contacts")["items"] == []


def test_an_image_that_claims_too_many_pixels_is_refused_before_decoding(api: Api) -> None:
    buffer = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 200_000  # a small file that would decode to 144 megapixels
    response = api.post("/v1/media", files={"file": ("bomb.png", buffer.getvalue(), "image/png")})
    assert "pixels" in fields(response)["file"]


def test_csv_exports_per_workspace_are_capped(api: Api) -> None:
    channel = reachable_channel(api)
    b = api.broadcast(channel["id"])
    slots = export_slots(get_settings().api_exports_per_workspace)
    for _ in range(slots.limit):
        assert slots.take(api.workspace_id)
    try:
        response = api.get(f"/v1/broadcasts/{b['id']}/recipients", params={"format": "csv"})
        problem(response, 429)
        assert response.headers["retry-after"]
    finally:
        for _ in range(slots.limit):
            slots.give_back(api.workspace_id)
    response = api.get(f"/v1/broadcasts/{b['id']}/recipients", params={"format": "csv"})
    assert response.status_code == 200
    assert not slots._running, "every slot is given back once its export is done with"


# --- one case folding for tag names ----------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "same"),
    [
        ("Straße-İ", "STRASSE-i̇"),
        ("İstanbul", "i̇stanbul"),
        ("ﬁnance", "FINANCE"),
        ("\uff36\uff49\uff50", "vip"),
    ],
)
def test_tag_names_that_fold_alike_are_one_tag_everywhere(api: Api, first: str, same: str) -> None:
    channel = api.channel()
    account = api.account(channel["id"])
    a = api.contact(account["id"], "r-1", tags=[first])
    rows = [{"account_id": account["id"], "address": "r-2", "tags": [same, first]}]
    api.ok("post", "/v1/contacts/import", json=rows)
    tags = api.ok("get", "/v1/tags")["items"]
    assert len(tags) == 1, tags
    problem(api.post("/v1/tags", json={"name": same}), 409)
    contacts = api.ok("get", "/v1/contacts", params={"tag_id": tags[0]["id"]})["items"]
    assert {c["address"] for c in contacts} == {"r-1", "r-2"}
    assert a["tags"] == [tags[0]["name"]]


def test_a_database_error_never_quotes_the_values_of_its_statement(api: Api) -> None:
    from sqlalchemy import text as sql_text
    from sqlalchemy.exc import DBAPIError

    from shared.db.engine import get_engine

    with get_engine().connect() as conn:
        try:
            conn.execute(sql_text("SELECT CAST(:v AS integer)"), {"v": "sekrit-value"})
        except DBAPIError as exc:
            said = str(exc)
        else:
            pytest.fail("the cast should have failed")
    assert "sekrit-value" not in said.split("[SQL")[1]
    assert "hidden due to hide_parameters" in said


def test_readiness_says_unavailable_while_every_pooled_connection_is_held(api: Api) -> None:
    from shared.db.engine import get_engine

    engine = get_engine()
    assert api.client.get("/readyz").status_code == 200
    pool: Any = engine.pool
    held = [engine.connect() for _ in range(pool.size() + pool._max_overflow)]
    try:
        response = api.client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["database"] == "pool exhausted"
        assert 'bcast_api_db_connections{state="in_use"}' in api.client.get("/metrics").text
    finally:
        for conn in held:
            conn.close()
    assert api.client.get("/readyz").status_code == 200


@pytest.mark.parametrize("spelling", ["%20%31", "+1", "01", "1_0", "1.0", "%D9%A1"])
def test_an_id_in_a_path_or_query_is_plain_digits(api: Api, spelling: str) -> None:
    channel = api.channel()
    assert api.get(f"/v1/channels/{channel['id']}").status_code == 200
    problem(api.get(f"/v1/channels/{spelling}"), 422)
    problem(api.get(f"/v1/accounts?channel_id={spelling}"), 422)


def test_head_is_answered_wherever_get_is(api: Api) -> None:
    response = api.client.head("/v1/channels", headers=api.headers)
    assert response.status_code == 200
    assert response.content == b""
    response = api.client.head("/v1/broadcasts/pause-me/pause", headers=api.headers)
    assert response.status_code == 405
    assert "HEAD" not in response.headers["allow"]


@pytest.mark.parametrize(
    "value", ["1795658685", "1795658685000", "2030-01-01 09:00:00Z", "2030-01-01T09:00:00.1234567Z"]
)
def test_send_at_strings_other_than_iso_8601_are_refused(api: Api, value: str) -> None:
    channel = reachable_channel(api)
    body = {"name": "b", "channel_id": channel["id"], "audience": {}, "content": {"text": "x"}}
    assert (
        "ISO-8601" in fields(api.post("/v1/broadcasts", json={**body, "send_at": value}))["send_at"]
    )
    assert api.ok("get", "/v1/broadcasts")["items"] == []


@pytest.mark.parametrize(
    "csv_body",
    ['account_id,address\n1,"never closed\n', "account_id,address\n1," + "x" * 200_000 + "\n"],
)
def test_a_malformed_csv_import_is_a_422_not_a_500(api: Api, csv_body: str) -> None:
    errors = fields(
        api.post("/v1/contacts/import", content=csv_body, headers={"Content-Type": "text/csv"})
    )
    assert "body" in errors or any(f.startswith("rows[") for f in errors)


def test_an_upload_whose_filename_cannot_be_stored_is_refused(api: Api) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, "PNG")
    body = (
        b'--x\r\nContent-Disposition: form-data; name="file"; filename="a\x01b.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + buf.getvalue() + b"\r\n--x--\r\n"
    )
    response = api.post(
        "/v1/media", content=body, headers={"Content-Type": "multipart/form-data; boundary=x"}
    )
    assert "file.filename" in fields(response)


@pytest.mark.parametrize(
    ("kind", "config", "field"),
    [
        ("whatsapp", {"access_token": "abc\r\ndef", "phone_number_id": "1"}, "config.access_token"),
        (
            "smtp",
            {"host": "smtp.example.com", "from_address": "a@b.co", "password": "p\u00e9"},
            "config.password",
        ),
        ("smtp", {"host": "smtp.exa\nmple.com", "from_address": "a@b.co"}, "config.host"),
        (
            "smtp",
            {"host": "smtp.example.com", "from_address": "n\u00e9ws@ex\u00e4mple.com"},
            "config.from_address",
        ),
    ],
)
def test_credentials_and_hosts_a_protocol_cannot_carry_are_refused_at_create(
    api: Api, kind: str, config: dict[str, str], field: str
) -> None:
    response = api.post("/v1/channels", json={"name": "c", "kind": kind, "config": config})
    assert field in fields(response)
    assert api.ok("get", "/v1/channels")["items"] == []
