"""The two ways the CLI reaches the admin operations: over HTTP, or straight to the store.

Owns: ``Admin`` (the one interface: ``call(operation, **path params, body=, query=)`` with an
operation function of ``gateway.admin.operations``), its two implementations, both driven by the
route table (``gateway.admin.api``): ``AdminClient`` (the entry's route over one aiohttp
``ClientSession``) and ``StoreAdmin`` (the entry's operation on a store-backed ``Context``,
refusing exactly as the API would); and ``AdminError`` (a refusal from either, in the API's error
shape). Must not: print, parse arguments or read the environment.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar, cast
from urllib.parse import quote

import aiohttp
import msgspec

from gateway.admin import schemas as s
from gateway.admin.api import BY_OPERATION, Endpoint, invoke
from gateway.admin.operations import Context
from gateway.admin.problems import problem

R = TypeVar("R")
Operation = Callable[..., Awaitable[R]]
Input = msgspec.Struct | None  # a request body or query (None: the empty one)
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


class Admin(ABC):
    """The admin operations, run over HTTP (``AdminClient``) or on the store (``StoreAdmin``)."""

    async def call(
        self,
        operation: Operation[R],
        /,
        *,
        body: Input = None,
        query: Input = None,
        **params: str,
    ) -> R:
        """Run ``operation`` (e.g. ``operations.get_principal``, ``principal="alice"``) and return
        its answer; a refusal raises ``AdminError``. A body or query left out is the one the API
        reads from an empty request: every field at its default."""
        ep: Endpoint[R] = BY_OPERATION[operation]
        assert body is None or (ep.body is not None and isinstance(body, ep.body)), ep.operation_id
        assert query is None or (ep.query is not None and isinstance(query, ep.query)), ep.operation_id
        return await self._run(ep, params, body, query)

    @abstractmethod
    async def _run(self, ep: Endpoint[R], params: Mapping[str, str], body: Input, query: Input) -> R:
        """Run ``ep`` with these path parameters, body and query."""


def _query_params(query: Input) -> dict[str, str]:
    if query is None:
        return {}
    out: dict[str, str] = {}
    for name, value in msgspec.structs.asdict(query).items():
        if value is None:
            continue
        out[name] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out


class AdminClient(Admin):
    """The admin API over HTTP; use as ``async with AdminClient(url, token) as admin``."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 30.0, source: str = "api") -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._source = source  # recorded in the audit log (the server takes "cli", else "api")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AdminClient:
        self._session = aiohttp.ClientSession(
            timeout=self._timeout,
            headers={"Authorization": f"Bearer {self._token}", "X-Keystile-Source": self._source},
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def _run(self, ep: Endpoint[R], params: Mapping[str, str], body: Input, query: Input) -> R:
        assert self._session is not None, "use AdminClient in 'async with'"
        path = ep.path.format(**{k: quote(v, safe="") for k, v in params.items()})
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
                return cast(R, None)
            return cast(R, msgspec.json.decode(raw, type=typ))
        try:
            err = _error_dec.decode(raw)
        except msgspec.DecodeError:
            err = s.ErrorBody(error="http_error", message=f"HTTP {status} from {self.base_url}")
        raise AdminError(status, err)


class StoreAdmin(Admin):
    """The operations straight on the store (``ctx``), refusing exactly as the API would."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    async def _run(self, ep: Endpoint[R], params: Mapping[str, str], body: Input, query: Input) -> R:
        try:
            return await invoke(ep, self._ctx, params, _or_empty(ep.body, body), _or_empty(ep.query, query))
        except Exception as e:
            err = AdminError.from_exception(e)
            if err is None:
                raise
            raise err from None


def _or_empty(typ: type[msgspec.Struct] | None, value: Input) -> Any:
    """``value``, or what the API decodes from an empty body or query string."""
    return value if value is not None or typ is None else msgspec.convert({}, typ)
