"""The admin API's OpenAPI 3.1 document, generated from the route table and its msgspec Structs.

Owns: turning the route table (``gateway.admin.api.ENDPOINTS``) into ``/v1/openapi.json`` (built
once, served as bytes) and that route's own entry (``ENDPOINT``). Must not: describe anything by
hand that a Struct or an ``Endpoint`` already says; a test calls every route and checks each answer
against this document.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Final

import msgspec

from gateway import __version__, text
from gateway.admin import schemas as s
from gateway.admin.api import ENDPOINTS, Endpoint, required_role
from gateway.admin.operations import Context
from gateway.lifecycle import MAX_TOKEN

REF: Final = "#/components/schemas/{name}"
_PATH_PARAM = re.compile(r"\{(\w+)\}")
_PATH_PARAMS: Final = {
    "principal": "the principal's id (`prn_...`) or name",
    "key_id": "the key's id (`key_...`)",
    "project": "a project's name",
    "role": "a role's name within the project",
}
# Path parameters with a rule of their own (the lifecycle enforces the same, naming the field).
_PATH_SCHEMAS: Final = {
    name: {"type": "string", "minLength": 1, "maxLength": MAX_TOKEN, "$ref": s.PROJECT_TEXT}
    for name in ("project", "role")
}
# Error statuses: component name and when they happen.
_ERRORS: Final = {
    400: ("MalformedJSON", "The request body is not valid JSON."),
    401: ("Unauthenticated", "No admin token, or not a valid one."),
    403: ("Forbidden", "The admin token's role does not allow this operation."),
    404: ("NotFound", "The principal, key, role or project policy named in the path does not exist."),
    409: ("Conflict", "The change would break a rule: `error` says which."),
    422: ("InvalidRequest", "Invalid input or a broken policy; `field` names the input."),
    503: ("StoreUnavailable", "The key store cannot be reached; retry after `Retry-After` seconds."),
}
_DESCRIPTION = """\
Manage Keystile's principals (users and service accounts), their grants and their API keys, each
project's roles and key policy, verify keys for services that are not behind the proxy, and read
the audit trail.

Authenticate with an admin token (`KEYSTILE_ADMIN_TOKENS` or `admin.tokens_file`) as
`Authorization: Bearer <token>`; this document and the health routes are public. A token has a
role, each allowing what the ones before it allow: `verify` (check keys), `read` (list and read
keys, principals and the audit log), `write` (the key lifecycle), `admin` (principals, grants and
policies too); each operation names its least role in `x-keystile-role`. Times are UNIX
seconds (UTC). Request bodies reject unknown fields. Every error is
`{"error": code, "message": text, "field": input or null}`. Lists are newest first (principals:
by name) and page with `limit` and `next_cursor`."""


async def _serve(ctx: Context) -> msgspec.Raw:
    return msgspec.Raw(document())  # the very bytes built once, encoded as they are


ENDPOINT: Final = Endpoint(
    "GET",
    "/v1/openapi.json",
    "getOpenAPI",
    "meta",
    "This document",
    _serve,
    response={"type": "object", "description": "an OpenAPI 3.1 document"},
    public=True,
    cache_control="no-cache",
)
ALL_ENDPOINTS: Final[tuple[Endpoint[Any], ...]] = (*ENDPOINTS, ENDPOINT)


def _json(ref: str | dict[str, Any]) -> dict[str, Any]:
    schema = {"$ref": REF.format(name=ref)} if isinstance(ref, str) else ref
    return {"application/json": {"schema": schema}}


def _query_schema(prop: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is absent or a string: drop the ``null`` alternative and default."""
    prop = dict(prop)
    alternatives = [a for a in prop.get("anyOf", ()) if a != {"type": "null"}]
    if "anyOf" in prop and len(alternatives) == 1:
        del prop["anyOf"]
        prop = {**alternatives[0], **prop}
    if prop.get("default", ...) is None:
        del prop["default"]
    return prop


def _operation(ep: Endpoint[Any], components: dict[str, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": ep.operation_id, "tags": [ep.tag], "summary": ep.summary}
    if ep.description:
        op["description"] = ep.description
    params: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "description": _PATH_PARAMS[name],
            "schema": _PATH_SCHEMAS.get(name, {"type": "string"}),
        }
        for name in _PATH_PARAM.findall(ep.path)
    ]
    if ep.query is not None:
        schema = components[ep.query.__name__]
        for name, raw in schema["properties"].items():
            prop = _query_schema(raw)
            param: dict[str, Any] = {"name": name, "in": "query", "required": name in schema["required"]}
            if "description" in prop:
                param["description"] = prop.pop("description")
            param["schema"] = prop
            params.append(param)
    if params:
        op["parameters"] = params
    if ep.body is not None:
        name = ep.body.__name__
        op["requestBody"] = {"required": bool(components[name]["required"]), "content": _json(name)}
    responses: dict[str, Any] = {}
    answers: dict[int, type[msgspec.Struct] | dict[str, Any] | None] = {ep.status: ep.response}
    answers.update(ep.extra)
    for status, body in answers.items():
        entry: dict[str, Any] = {"description": "No content" if body is None else "OK"}
        if isinstance(body, dict):
            entry["content"] = _json(body)
        elif body is not None:
            entry["description"] = (body.__doc__ or body.__name__).strip().splitlines()[0]
            entry["content"] = _json(body.__name__)
        responses[str(status)] = entry
    for status in ep.errors:
        responses[str(status)] = {"$ref": f"#/components/responses/{_ERRORS[status][0]}"}
    op["responses"] = dict(sorted(responses.items()))
    op["security"] = [] if ep.public else [{"adminToken": []}]
    if not ep.public:
        role = required_role(ep)
        op["x-keystile-role"] = role
        responses["403"] = {"$ref": f"#/components/responses/{_ERRORS[403][0]}"}
        op["responses"] = dict(sorted(responses.items()))
        note = f"Needs an admin token of role `{role}` or above."
        op["description"] = f"{op['description']}\n\n{note}" if op.get("description") else note
    return op


def build(endpoints: tuple[Endpoint[Any], ...]) -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``endpoints``."""
    types: list[type[msgspec.Struct]] = [s.ErrorBody]
    for ep in endpoints:
        for t in (ep.body, ep.query, ep.response, *ep.extra.values()):
            if isinstance(t, type) and t not in types:
                types.append(t)
    _, components = msgspec.json.schema_components(types, ref_template=REF)
    # The character rules of names, projects/scopes and metadata keys (``gateway.text``), which
    # fields refer to (``schemas.NAME_TEXT``...) rather than repeat.
    components["NameText"] = {"type": "string", "pattern": text.name_pattern()}
    components["ProjectText"] = {"type": "string", "pattern": text.token_pattern()}
    components["MetadataKeyText"] = {"type": "string", "pattern": text.text_pattern()}
    # A rule between two fields, which a Struct cannot say: one expiry, not both.
    # (Said as "not both set" rather than "one of them null": the generators of the schema tests
    # cannot combine the latter with a field that is a number or a text.)
    components["KeyCreate"]["not"] = {  # null is "not given" in a create
        "required": ["expires_at", "expires_in"],
        "properties": {"expires_at": {"type": "number"}, "expires_in": {"type": ["number", "string"]}},
    }
    components["KeyUpdate"]["not"] = {"required": ["expires_at", "expires_in"]}  # null clears in an update
    paths: dict[str, dict[str, Any]] = {}
    for ep in endpoints:
        paths.setdefault(ep.path, {})[ep.method.lower()] = _operation(ep, components)
    for ep in endpoints:  # query Structs became parameters
        if ep.query is not None:
            components.pop(ep.query.__name__, None)
    error_responses: dict[str, Any] = {}
    for status, (name, description) in _ERRORS.items():
        error_responses[name] = {"description": description, "content": _json("ErrorBody")}
        if status == 503:
            error_responses[name]["headers"] = {
                "Retry-After": {"description": "seconds", "schema": {"type": "integer"}}
            }
    tags = sorted({ep.tag for ep in endpoints})
    return {
        "openapi": "3.1.0",
        "info": {"title": "Keystile admin API", "version": __version__, "description": _DESCRIPTION},
        "tags": [{"name": t} for t in tags],
        "paths": paths,
        "components": {
            "schemas": components,
            "responses": error_responses,
            "securitySchemes": {
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an admin token from KEYSTILE_ADMIN_TOKENS or admin.tokens_file",
                }
            },
        },
        "security": [{"adminToken": []}],
    }


@functools.cache
def document() -> bytes:
    """The served document, built on first use and kept."""
    return msgspec.json.encode(build(ALL_ENDPOINTS))
