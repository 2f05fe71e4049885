"""A test client for the admin API that checks every answer against the OpenAPI document.

Every exchange is recorded; each answer must be a status the document lists for that operation,
with a body that validates against the documented schema (jsonschema, draft 2020-12, which
OpenAPI 3.1 uses). So every test that talks to the admin API also keeps the document true.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from jsonschema import Draft202012Validator

from gateway.admin.openapi import document

DOC: dict[str, Any] = json.loads(document())
_NO_BODY = object()


def _operations() -> list[tuple[str, str, re.Pattern[str], dict[str, Any]]]:
    ops = []
    for template, item in DOC["paths"].items():
        pattern = re.compile("^" + re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(template)) + "$")
        for method, op in item.items():
            ops.append((method.upper(), template, pattern, op))
    # Literal paths win over templates (/v1/keys/verify over /v1/keys/{key_id}).
    ops.sort(key=lambda o: o[1].count("{"))
    return ops


OPERATIONS = _operations()


def operation_for(method: str, path: str) -> tuple[str, dict[str, Any]] | None:
    for m, template, pattern, op in OPERATIONS:
        if m == method and pattern.match(path):
            return template, op
    return None


def validate(instance: Any, schema: dict[str, Any]) -> None:
    """Validate against a schema that may ``$ref`` the document's components."""
    root = {**DOC, "allOf": [schema]}
    Draft202012Validator(root).validate(instance)


def check_against_document(method: str, path: str, status: int, body: Any, raw: bytes) -> str:
    """Assert the exchange is documented; returns the operation id."""
    found = operation_for(method, path)
    assert found is not None, f"{method} {path} is not in the OpenAPI document"
    template, op = found
    responses = op["responses"]
    assert str(status) in responses, f"{op['operationId']} answered {status}, documented: {list(responses)}"
    response = responses[str(status)]
    if "$ref" in response:
        response = DOC["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    content = response.get("content")
    if content is None:
        assert raw == b"", f"{op['operationId']} {status}: undocumented body {raw[:200]!r}"
    else:
        validate(body, content["application/json"]["schema"])
    return str(op["operationId"])


@dataclass
class Reply:
    status: int
    json: Any
    headers: dict[str, str]
    raw: bytes

    @property
    def error(self) -> str | None:
        return self.json.get("error") if isinstance(self.json, dict) else None


@dataclass
class AdminAPI:
    session: aiohttp.ClientSession
    base: str
    token: str | None
    # (operation id, status) of every exchange, for coverage checks.
    seen: list[tuple[str, int]] = field(default_factory=list)

    async def request(
        self,
        method: str,
        path: str,
        body: Any = _NO_BODY,
        *,
        params: dict[str, str] | None = None,
        raw: bytes | None = None,
        token: str | object | None = _NO_BODY,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        hdrs = dict(headers or {})
        tok = self.token if token is _NO_BODY else token
        if tok is not None:
            hdrs["Authorization"] = f"Bearer {tok}"
        data = raw
        if body is not _NO_BODY:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        async with self.session.request(
            method, self.base + path, params=params, data=data, headers=hdrs
        ) as r:
            content = await r.read()
            reply = Reply(r.status, json.loads(content) if content else None, dict(r.headers), content)
        op_id = check_against_document(method, path.split("?")[0], reply.status, reply.json, content)
        self.seen.append((op_id, reply.status))
        if reply.status >= 400:
            assert set(reply.json) == {"error", "message", "field"} or op_id == "verifyKey", reply.json
        return reply

    async def get(self, path: str, **kw: Any) -> Reply:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, body: Any = _NO_BODY, **kw: Any) -> Reply:
        return await self.request("POST", path, body, **kw)

    async def patch(self, path: str, body: Any = _NO_BODY, **kw: Any) -> Reply:
        return await self.request("PATCH", path, body, **kw)

    async def delete(self, path: str, **kw: Any) -> Reply:
        return await self.request("DELETE", path, **kw)

    async def ok(self, method: str, path: str, body: Any = _NO_BODY, status: int = 200, **kw: Any) -> Any:
        reply = await self.request(method, path, body, **kw)
        assert reply.status == status, (method, path, reply.status, reply.json)
        return reply.json

    async def principal(
        self, name: str = "alice", grants: dict[str, list[str]] | None = None, **kw: Any
    ) -> Any:
        body = {"name": name, "grants": {"p1": ["read", "write"]} if grants is None else grants, **kw}
        return await self.ok("POST", "/v1/principals", body, status=201)

    async def key(self, owner: str = "alice", project: str = "p1", **fields: Any) -> Any:
        return await self.ok("POST", "/v1/keys", {"owner": owner, "project": project, **fields}, status=201)

    async def state(self) -> tuple[Any, Any, Any]:
        """Everything a failed request must leave unchanged: principals, keys and audit."""
        principals = await self.ok("GET", "/v1/principals", params={"limit": "500"})
        keys = await self.ok("GET", "/v1/keys", params={"limit": "500"})
        audit = await self.ok("GET", "/v1/audit", params={"limit": "500"})
        # Status and last use move with time and traffic, not with writes.
        for k in keys["items"]:
            k.pop("status")
        return principals, keys, audit
