"""The OpenAPI document, telling the truth about errors: every route documents the problem
answers it can give, in the shape the API serves them (``errors.problem_body``).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}

FIELD_PROBLEM: dict[str, Any] = {
    "title": "FieldProblem",
    "type": "object",
    "required": ["field", "msg", "type"],
    "properties": {
        "field": {
            "type": "string",
            "description": "Dotted path into the request: audience.contact_ids[3], or a query "
            "or header name.",
        },
        "msg": {"type": "string", "description": "What is wrong and what is allowed."},
        "type": {"type": "string", "description": "A stable code for the rule."},
    },
}

PROBLEM: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "description": "RFC 9457 problem details. On 422, `errors` (and `detail`, as before) list "
    "each broken rule; otherwise `detail` is a sentence.",
    "required": ["type", "title", "status", "detail", "message"],
    "properties": {
        "type": {"type": "string", "description": "about:blank: the status says it all."},
        "title": {"type": "string", "description": "The status's reason phrase."},
        "status": {"type": "integer"},
        "detail": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"$ref": "#/components/schemas/FieldProblem"}},
            ]
        },
        "message": {"type": "string", "description": "One sentence a person can act on."},
        "instance": {"type": "string", "description": "The path that was asked for."},
        "errors": {"type": "array", "items": {"$ref": "#/components/schemas/FieldProblem"}},
    },
}

WHY: dict[int, str] = {
    400: "The request could not be read (a malformed form or multipart body).",
    401: "The bearer token is missing, invalid, expired or revoked.",
    403: "Not allowed.",
    404: "No such row in the caller's workspace, or no such route.",
    405: "The route does not answer this method.",
    408: "The request body stopped arriving.",
    409: "The row's state forbids the action, or a concurrent write won.",
    413: "The request body is larger than the route accepts.",
    422: "The input breaks one or more rules; nothing was written.",
    429: "Too many at once; retry after the Retry-After header's seconds.",
    500: "An internal error; nothing half-written.",
    503: "Out of database connections for the moment; retry after Retry-After.",
}
#: Answers any route can give.
EVERY_ROUTE = (400, 404, 405, 422, 500, 503)
#: More for routes behind a token, and for routes that take a body.
WITH_TOKEN = (401, 409, 429)
WITH_BODY = (408, 413)


def _problem(code: int, description: str | None = None) -> dict[str, Any]:
    return {
        "description": description or WHY.get(code) or HTTPStatus(code).phrase,
        "content": {"application/problem+json": {"schema": PROBLEM_REF}},
    }


def document_problems(schema: dict[str, Any]) -> dict[str, Any]:
    """Give every operation of ``schema`` the problem answers it can give."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components["Problem"] = PROBLEM
    components["FieldProblem"] = FIELD_PROBLEM
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            codes = list(EVERY_ROUTE)
            if path.startswith("/v1/"):
                codes += WITH_TOKEN
            if method in ("post", "put", "patch"):
                codes += WITH_BODY
            responses = operation.setdefault("responses", {})
            for code in sorted(set(codes)):
                given = responses.get(str(code))
                if given is None or code == 422 or "content" not in given:
                    described = given.get("description") if given and code != 422 else None
                    responses[str(code)] = _problem(code, described)
            for code, given in list(responses.items()):
                if code.isdigit() and int(code) >= 400 and "content" not in given:
                    responses[code] = _problem(int(code), given.get("description"))
    return schema


#: The path parameter that names each kind of row an answer describes.
ID_OF = {
    "ChannelOut": "channel_id",
    "AccountOut": "account_id",
    "TagOut": "tag_id",
    "ContactOut": "contact_id",
    "BroadcastOut": "broadcast_id",
    "ConversationOut": "conversation_id",
    "MediaOut": "media_id",
}
#: Creates whose body can take the id of a row made just before.
BODY_LINKS = {
    "ChannelOut": [("post", "/v1/accounts", {"channel_id": "$response.body#/id", "name": "a"})],
}


def link_creates(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI links from each create's answer to the operations on what it created (its id
    in their path), so clients and stateful testers can follow them.
    """
    paths = schema.get("paths", {})
    by_param: dict[str, list[tuple[str, str]]] = {}
    for path, operations in paths.items():
        for method, operation in operations.items():
            for param in operation.get("parameters", []):
                if param["in"] == "path":
                    by_param.setdefault(param["name"], []).append((method, path))
    for operations in paths.values():
        for method, operation in operations.items():
            created = operation.get("responses", {}).get("201")
            if method != "post" or created is None:
                continue
            ref = (
                created.get("content", {})
                .get("application/json", {})
                .get("schema", {})
                .get("$ref", "")
            )
            kind = ref.rsplit("/", 1)[-1]
            links: dict[str, Any] = {}
            for target_method, target_path in by_param.get(ID_OF.get(kind, ""), []):
                target = paths[target_path][target_method]
                links[target["operationId"]] = {
                    "operationId": target["operationId"],
                    "parameters": {ID_OF[kind]: "$response.body#/id"},
                }
            for target_method, target_path, body in BODY_LINKS.get(kind, []):
                target = paths[target_path][target_method]
                links[target["operationId"]] = {
                    "operationId": target["operationId"],
                    "requestBody": body,
                }
            if links:
                created["links"] = links
    return schema


def install_openapi(app: FastAPI) -> None:
    """Serve the document with the problem answers in it (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = link_creates(
                document_problems(
                    get_openapi(
                        title=app.title,
                        version=app.version,
                        description=app.description,
                        routes=app.routes,
                    )
                )
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
