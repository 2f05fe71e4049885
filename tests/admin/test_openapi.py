"""The OpenAPI document tells the truth: it lists exactly the routes that exist, it is generated
from the Structs the handlers decode and encode, and every route answers as it says.

(``tests.admin_client`` checks every answer of every admin API test against the document; the
scenario here makes sure each operation is exercised, on success and on refusal.)
"""

from __future__ import annotations

import json
import typing
from collections.abc import Iterator
from typing import Any

import aiohttp
import msgspec
import pytest
from jsonschema import Draft202012Validator

from gateway import auth, errors
from gateway.admin import create_admin_app
from gateway.admin import schemas as s
from gateway.admin.api import ENDPOINTS, VERIFY_CODES
from gateway.admin.openapi import ALL_ENDPOINTS, REF, build, document
from tests.admin_client import DOC, AdminAPI
from tests.conftest import ADMIN_TOKEN


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def test_the_document_is_openapi_3_1_and_self_consistent() -> None:
    assert DOC["openapi"] == "3.1.0" and DOC["info"]["title"] and DOC["info"]["version"]
    for ref in set(_refs(DOC)):
        assert ref.startswith("#/"), ref
        node: Any = DOC
        for part in ref[2:].split("/"):
            node = node[part]  # every reference resolves
    for schema in DOC["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    ids = [op["operationId"] for item in DOC["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    for template, item in DOC["paths"].items():
        for method, op in item.items():
            assert method in {"get", "post", "put", "patch", "delete"}
            assert op["responses"] and op["summary"]
            params = {p["name"] for p in op.get("parameters", ()) if p["in"] == "path"}
            assert params == {seg[1:-1] for seg in template.split("/") if seg.startswith("{")}
            public = template in ("/healthz", "/readyz", "/v1/openapi.json")
            assert op["security"] == ([] if public else [{"adminToken": []}])
            if not public:
                assert "401" in op["responses"]


def test_the_document_is_built_from_the_handlers_structs() -> None:
    assert json.loads(document()) == json.loads(msgspec.json.encode(build(ALL_ENDPOINTS)))
    _, generated = msgspec.json.schema_components(
        [t for ep in ENDPOINTS for t in (ep.body, ep.response) if isinstance(t, type)], ref_template=REF
    )
    schemas = DOC["components"]["schemas"]
    for name, schema in generated.items():
        # The one rule between two fields no Struct can say (one expiry), added by hand.
        extra = {"not"} if name in ("KeyCreate", "KeyUpdate") else set()
        assert {k: v for k, v in schemas[name].items() if k not in extra} == schema, name
    for ep in ENDPOINTS:
        op = DOC["paths"][ep.path][ep.method.lower()]
        if ep.body is not None:
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert ref == REF.format(name=ep.body.__name__)
            assert schemas[ep.body.__name__]["additionalProperties"] is False  # unknown fields refused
        else:
            assert "requestBody" not in op
        if ep.query is not None:
            documented = {p["name"] for p in op["parameters"] if p["in"] == "query"}
            assert documented == set(ep.query.__struct_fields__)
        ok = op["responses"][str(ep.status)]
        if isinstance(ep.response, type):
            assert ok["content"]["application/json"]["schema"]["$ref"] == REF.format(
                name=ep.response.__name__
            )
        elif ep.response is None:
            assert "content" not in ok


def test_request_structs_refuse_unknown_fields_and_responses_never_carry_a_digest() -> None:
    for ep in ENDPOINTS:
        for t in (ep.body, ep.query):
            if t is not None:
                assert t.__struct_config__.forbid_unknown_fields, t
    for name, schema in DOC["components"]["schemas"].items():
        assert "digest" not in schema.get("properties", {}), name
    secret_bearing = {
        n for n, sc in DOC["components"]["schemas"].items() if "key" in sc.get("properties", {})
    }
    assert secret_bearing == {"IssuedKey", "VerifyRequest"}


def test_verify_codes_are_the_proxys_error_codes() -> None:
    assert VERIFY_CODES[auth.MISSING] == errors.MISSING_KEY.code
    assert VERIFY_CODES[auth.INVALID] == errors.INVALID_KEY.code
    assert VERIFY_CODES[auth.EXPIRED] == errors.EXPIRED_KEY.code
    assert VERIFY_CODES[auth.INSUFFICIENT_SCOPE] == errors.INSUFFICIENT_SCOPE.code
    assert VERIFY_CODES[auth.UNAVAILABLE] == errors.AUTH_UNAVAILABLE.code
    assert set(VERIFY_CODES.values()) == set(typing.get_args(s.VerifyCode))


async def test_the_router_serves_exactly_the_documented_routes(keystile) -> None:
    gw = await keystile()
    app = create_admin_app(gw.gateway)
    routes = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}
    documented = {(m.upper(), path) for path, item in DOC["paths"].items() for m in item}
    # Besides the documented methods, each path answers any other with 405 and its own Allow.
    assert routes == documented | {("*", path) for path in DOC["paths"]}
    async with aiohttp.ClientSession() as session, session.get(gw.admin_url + "/v1/openapi.json") as r:
        assert r.status == 200 and r.content_type == "application/json"
        assert await r.read() == document()  # public, and the very bytes built once


async def test_every_operation_answers_as_documented(keystile, admin) -> None:
    gw = await keystile(policy={"max_active_keys": 2})
    api: AdminAPI = admin(gw)
    anonymous: AdminAPI = admin(gw, token=None)
    anonymous.seen = api.seen  # one record of what was exercised

    # success, every operation
    await api.get("/healthz")
    await api.get("/readyz")
    await api.get("/v1/openapi.json")
    alice = await api.principal("alice", {"p1": ["read"]})
    await api.principal("bob")
    await api.ok("GET", "/v1/principals")
    await api.ok("GET", f"/v1/principals/{alice['id']}")
    await api.ok("PATCH", "/v1/principals/alice", {"grants": {"p1": ["read", "write"]}})
    await api.ok("POST", "/v1/principals/alice/disable")
    await api.ok("POST", "/v1/principals/alice/enable")
    k = await api.key()
    await api.ok("GET", "/v1/keys", params={"owner": "alice", "status": "active", "q": "API"})
    await api.ok("GET", f"/v1/keys/{k['id']}")
    await api.ok("PATCH", f"/v1/keys/{k['id']}", {"name": "renamed", "metadata": {"a": "b"}})
    await api.ok("PATCH", f"/v1/keys/{k['id']}/limits", {"limits": [{"name": "burst", "limit": 5, "window": "1s"}]})
    await api.ok("GET", f"/v1/keys/{k['id']}/limits")
    await api.ok("POST", f"/v1/keys/{k['id']}/credits", {"remaining": 10, "refill": {"amount": 10, "every": "daily"}})
    await api.ok("PATCH", "/v1/principals/alice/limits", {"limits": [{"name": "pool", "limit": 50, "window": "1m"}]})
    await api.ok("GET", "/v1/principals/alice/limits")
    await api.ok("POST", "/v1/principals/alice/credits", {"add": 5})
    await api.ok("POST", "/v1/keys/verify", {"key": k["key"], "scopes": ["read"]})
    await api.ok("POST", "/v1/keys/verify", {"key": "nope"})
    await api.ok("POST", f"/v1/keys/{k['id']}/rotate", {"grace_seconds": 30})
    await api.ok("POST", f"/v1/keys/{k['id']}/revoke")
    await api.ok("GET", "/v1/audit", params={"principal": "alice", "since": "0"})
    await api.ok("DELETE", f"/v1/keys/{k['id']}", status=204)
    await api.ok("DELETE", "/v1/principals/bob", status=204)
    await api.ok("PUT", "/v1/projects/p1/roles/viewer", {"scopes": ["read"], "description": "reads"})
    await api.ok("GET", "/v1/projects/p1/roles")
    await api.ok("GET", "/v1/projects/p1/roles/viewer")
    await api.ok("PATCH", "/v1/principals/alice", {"roles": {"p1": ["viewer"]}})
    await api.ok("GET", "/v1/audit", params={"source": "api"})
    await api.ok("PUT", "/v1/projects/p9/roles/gone", {"scopes": []})
    await api.ok("DELETE", "/v1/projects/p9/roles/gone", status=204)
    await api.ok("GET", "/v1/projects/p1/policy")
    await api.ok("PUT", "/v1/projects/p9/policy", {"max_active_keys": 1, "max_lifetime": None})
    await api.ok("DELETE", "/v1/projects/p9/policy")

    # refusals: unauthenticated, not found, invalid, malformed, conflicting
    for ep in ENDPOINTS:
        if ep.public:
            continue
        path = ep.path.format(principal="alice", key_id="key_nope", project="p1", role="viewer")
        assert (await anonymous.request(ep.method, path)).status == 401
        if "{" in ep.path and 404 in ep.errors:  # not create-or-replace, not a computed answer
            missing = ep.path.format(principal="nobody", key_id="key_nope", project="nobody", role="nobody")
            body = {"body": {}} if ep.body else {}
            assert (await api.request(ep.method, missing, **body)).status == 404, ep.operation_id
        if ep.body is not None:
            assert (await api.request(ep.method, path, raw=b"{")).status == 400
            assert (await api.request(ep.method, path, {"unknown": 1})).status == 422
        if ep.query is not None:
            assert (await api.request(ep.method, path, params={"unknown": "1"})).status == 422
    await api.key(name="a")
    await api.key(name="b")
    assert (await api.post("/v1/keys", {"owner": "alice", "project": "p1"})).status == 409
    assert (await api.post("/v1/principals", {"name": "alice"})).status == 409
    assert (await api.delete("/v1/principals/alice")).status == 409

    seen = set(api.seen)
    for ep in ENDPOINTS:
        assert (ep.operation_id, ep.status) in seen, f"{ep.operation_id} never succeeded"
        if not ep.public:
            assert (ep.operation_id, 401) in seen
    documented_errors = {
        (op["operationId"], int(st))
        for it in DOC["paths"].values()
        for op in it.values()
        for st in op["responses"]
    }
    assert seen <= documented_errors


@pytest.mark.parametrize("token", [None, "", "x" * 64, ADMIN_TOKEN.upper()])
async def test_a_missing_or_wrong_token_is_a_json_401(keystile, admin, token: str | None) -> None:
    gw = await keystile()
    r = await admin(gw, token=token).get("/v1/principals")
    assert r.status == 401 and r.json["error"] == "unauthenticated" and r.json["field"] is None
    assert ADMIN_TOKEN not in r.raw.decode()
