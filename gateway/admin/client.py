"""The two ways the CLI reaches the admin operations: over HTTP, or straight to the store.

Owns: ``AdminClient`` (the ``/v1`` API over one aiohttp ``ClientSession``, driven by the same route
table and Structs as the server), ``StoreAdmin`` (``gateway.admin.api.Operations`` on the store,
refusing exactly as the API would) and ``AdminError`` (a refusal from either, in the API's error
shape); both satisfy ``Admin``. Must not: print, parse arguments or read the environment.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import Any, Final, Protocol, TypeVar
from urllib.parse import quote

import aiohttp
import msgspec

from gateway.admin import schemas as s
from gateway.admin.api import ENDPOINTS, Endpoint, Operations, problem

T = TypeVar("T")
_BY_ID: Final = {ep.operation_id: ep for ep in ENDPOINTS}
_error_dec = msgspec.json.Decoder(s.ErrorBody)


class AdminError(Exception):
    """A refusal in the admin API's terms: HTTP status, error code, message and input field."""

    def __init__(self, status: int, body: s.ErrorBody) -> None:
        super().__init__(body.message)
        self.status = status
        self.error = body.error
        self.field = body.field

    @classmethod
    def from_exception(cls, exc: BaseException) -> AdminError | None:
        """The same refusal the API would answer ``exc`` with; None for bugs."""
        mapped = problem(exc)
        return None if mapped is None else cls(mapped[0], mapped[1])


class Admin(Protocol):
    async def create_principal(self, body: s.PrincipalCreate) -> s.PrincipalView: ...
    async def list_principals(self, query: s.PrincipalQuery) -> s.PrincipalPage: ...
    async def get_principal(self, ref: str) -> s.PrincipalView: ...
    async def update_principal(self, ref: str, body: s.PrincipalUpdate) -> s.PrincipalView: ...
    async def set_disabled(self, ref: str, disabled: bool) -> s.PrincipalView: ...
    async def delete_principal(self, ref: str, query: s.PrincipalDeleteQuery) -> None: ...
    async def create_key(self, body: s.KeyCreate) -> s.IssuedKey: ...
    async def list_keys(self, query: s.KeyQuery) -> s.KeyPage: ...
    async def get_key(self, key_id: str) -> s.KeyView: ...
    async def update_key(self, key_id: str, body: s.KeyUpdate) -> s.KeyView: ...
    async def revoke_key(self, key_id: str) -> s.KeyView: ...
    async def delete_key(self, key_id: str) -> None: ...
    async def rotate_key(self, key_id: str, body: s.KeyRotate) -> s.IssuedKey: ...
    async def list_audit(self, query: s.AuditQuery) -> s.AuditPage: ...


def _query_params(query: msgspec.Struct | None) -> dict[str, str]:
    if query is None:
        return {}
    out: dict[str, str] = {}
    for name, value in msgspec.structs.asdict(query).items():
        if value is None:
            continue
        out[name] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out


class AdminClient:
    """The admin API over HTTP; use as ``async with AdminClient(url, token) as admin``."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AdminClient:
        self._session = aiohttp.ClientSession(
            timeout=self._timeout, headers={"Authorization": f"Bearer {self._token}"}
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(
        self,
        operation_id: str,
        params: Mapping[str, str] | None = None,
        *,
        body: msgspec.Struct | None = None,
        query: msgspec.Struct | None = None,
    ) -> Any:
        """Call one route of the table; returns its decoded answer (None for 204)."""
        assert self._session is not None, "use AdminClient in 'async with'"
        ep: Endpoint = _BY_ID[operation_id]
        path = ep.path.format(**{k: quote(v, safe="") for k, v in (params or {}).items()})
        data = None if body is None else msgspec.json.encode(body)
        headers = {} if data is None else {"Content-Type": "application/json"}
        async with self._session.request(
            ep.method, self.base_url + path, params=_query_params(query), data=data, headers=headers
        ) as resp:
            raw = await resp.read()
            status = resp.status
        if status == ep.status or status in ep.extra:
            typ = ep.extra.get(status, ep.response)
            if not isinstance(typ, type) or not raw:
                return None
            return msgspec.json.decode(raw, type=typ)
        try:
            err = _error_dec.decode(raw)
        except msgspec.DecodeError:
            err = s.ErrorBody(error="http_error", message=f"HTTP {status} from {self.base_url}")
        raise AdminError(status, err)

    async def create_principal(self, body: s.PrincipalCreate) -> s.PrincipalView:
        result: s.PrincipalView = await self.call("createPrincipal", body=body)
        return result

    async def list_principals(self, query: s.PrincipalQuery) -> s.PrincipalPage:
        result: s.PrincipalPage = await self.call("listPrincipals", query=query)
        return result

    async def get_principal(self, ref: str) -> s.PrincipalView:
        result: s.PrincipalView = await self.call("getPrincipal", {"principal": ref})
        return result

    async def update_principal(self, ref: str, body: s.PrincipalUpdate) -> s.PrincipalView:
        result: s.PrincipalView = await self.call("updatePrincipal", {"principal": ref}, body=body)
        return result

    async def set_disabled(self, ref: str, disabled: bool) -> s.PrincipalView:
        op = "disablePrincipal" if disabled else "enablePrincipal"
        result: s.PrincipalView = await self.call(op, {"principal": ref})
        return result

    async def delete_principal(self, ref: str, query: s.PrincipalDeleteQuery) -> None:
        await self.call("deletePrincipal", {"principal": ref}, query=query)

    async def create_key(self, body: s.KeyCreate) -> s.IssuedKey:
        result: s.IssuedKey = await self.call("createKey", body=body)
        return result

    async def list_keys(self, query: s.KeyQuery) -> s.KeyPage:
        result: s.KeyPage = await self.call("listKeys", query=query)
        return result

    async def get_key(self, key_id: str) -> s.KeyView:
        result: s.KeyView = await self.call("getKey", {"key_id": key_id})
        return result

    async def update_key(self, key_id: str, body: s.KeyUpdate) -> s.KeyView:
        result: s.KeyView = await self.call("updateKey", {"key_id": key_id}, body=body)
        return result

    async def revoke_key(self, key_id: str) -> s.KeyView:
        result: s.KeyView = await self.call("revokeKey", {"key_id": key_id})
        return result

    async def delete_key(self, key_id: str) -> None:
        await self.call("deleteKey", {"key_id": key_id})

    async def rotate_key(self, key_id: str, body: s.KeyRotate) -> s.IssuedKey:
        result: s.IssuedKey = await self.call("rotateKey", {"key_id": key_id}, body=body)
        return result

    async def list_audit(self, query: s.AuditQuery) -> s.AuditPage:
        result: s.AuditPage = await self.call("listAudit", query=query)
        return result


class StoreAdmin:
    """``Operations`` straight on the store, refusing exactly as the API would (``AdminError``)."""

    def __init__(self, ops: Operations) -> None:
        self._ops = ops

    async def _do(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except Exception as e:
            err = AdminError.from_exception(e)
            if err is None:
                raise
            raise err from None

    async def create_principal(self, body: s.PrincipalCreate) -> s.PrincipalView:
        return await self._do(self._ops.create_principal(body))

    async def list_principals(self, query: s.PrincipalQuery) -> s.PrincipalPage:
        return await self._do(self._ops.list_principals(query))

    async def get_principal(self, ref: str) -> s.PrincipalView:
        return await self._do(self._ops.get_principal(ref))

    async def update_principal(self, ref: str, body: s.PrincipalUpdate) -> s.PrincipalView:
        return await self._do(self._ops.update_principal(ref, body))

    async def set_disabled(self, ref: str, disabled: bool) -> s.PrincipalView:
        return await self._do(self._ops.set_disabled(ref, disabled))

    async def delete_principal(self, ref: str, query: s.PrincipalDeleteQuery) -> None:
        await self._do(self._ops.delete_principal(ref, query))

    async def create_key(self, body: s.KeyCreate) -> s.IssuedKey:
        return await self._do(self._ops.create_key(body))

    async def list_keys(self, query: s.KeyQuery) -> s.KeyPage:
        return await self._do(self._ops.list_keys(query))

    async def get_key(self, key_id: str) -> s.KeyView:
        return await self._do(self._ops.get_key(key_id))

    async def update_key(self, key_id: str, body: s.KeyUpdate) -> s.KeyView:
        return await self._do(self._ops.update_key(key_id, body))

    async def revoke_key(self, key_id: str) -> s.KeyView:
        return await self._do(self._ops.revoke_key(key_id))

    async def delete_key(self, key_id: str) -> None:
        await self._do(self._ops.delete_key(key_id))

    async def rotate_key(self, key_id: str, body: s.KeyRotate) -> s.IssuedKey:
        return await self._do(self._ops.rotate_key(key_id, body))

    async def list_audit(self, query: s.AuditQuery) -> s.AuditPage:
        return await self._do(self._ops.list_audit(query))
