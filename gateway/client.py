"""Keystile's Python client: the admin API and key verification, for services and scripts.

Owns: ``Keystile`` (async) and ``SyncKeystile`` (the same calls for code without an event loop),
both over the admin API's HTTP client (``gateway.admin.client.AdminClient``, which the CLI uses
too), so every call is the route table's own operation with its typed request and answer
(``gateway.admin.schemas``). The named methods cover the common calls; ``call`` reaches every
operation of ``gateway.admin.operations``. A refusal raises ``AdminError`` (``status``, ``error``,
``field``). Must not: print, read the environment, or keep a key it was given.

    async with Keystile("http://127.0.0.1:8081", token) as ks:
        issued = await ks.create_key("alice", "billing", name="ci")
        answer = await ks.verify(issued.key, scopes=["invoices:read"])
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from gateway.admin import operations as ops
from gateway.admin import schemas as s
from gateway.admin.client import AdminClient, AdminError, Operation

__all__ = ["AdminError", "Keystile", "SyncKeystile", "ops", "s"]

R = TypeVar("R")


class Keystile:
    """The admin API over HTTP, async: ``async with Keystile(url, token) as ks``."""

    def __init__(self, url: str, token: str, *, timeout: float = 30.0) -> None:
        self._admin = AdminClient(url, token, timeout=timeout)

    async def __aenter__(self) -> Keystile:
        await self._admin.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._admin.__aexit__(*exc)

    def call(
        self, operation: Operation[R], /, *, body: Any = None, query: Any = None, **params: str
    ) -> Awaitable[R]:
        """Any operation, e.g. ``call(ops.update_key, key_id=..., body=s.KeyUpdate(name="n"))``."""
        return self._admin.call(operation, body=body, query=query, **params)

    async def verify(self, key: str, scopes: Sequence[str] = ()) -> s.VerifyResponse:
        """What the proxy would decide for ``key`` on a route needing ``scopes``: ``valid``,
        ``code`` (``invalid_api_key``, ``expired``, ``insufficient_scope``...) and the identity."""
        return await self.call(ops.verify_key, body=s.VerifyRequest(key=key, scopes=list(scopes)))

    async def create_principal(self, name: str, **fields: Any) -> s.PrincipalView:
        """``fields``: ``kind``, ``grants`` ({project: [scopes]}), ``metadata``."""
        return await self.call(ops.create_principal, body=s.PrincipalCreate(name=name, **fields))

    async def create_key(self, owner: str, project: str, **fields: Any) -> s.IssuedKey:
        """A new key; its secret is in the answer (``.key``) and nowhere else, ever.
        ``fields``: ``name``, ``scopes``, ``expires_at``, ``expires_in``, ``env``, ``metadata``."""
        return await self.call(ops.create_key, body=s.KeyCreate(owner=owner, project=project, **fields))

    async def get_key(self, key_id: str) -> s.KeyView:
        return await self.call(ops.get_key, key_id=key_id)

    async def keys(self, **filters: Any) -> AsyncIterator[s.KeyView]:
        """Every key matching ``filters`` (``owner``, ``project``, ``status``, ``q``), newest
        first, fetched a page (``limit``) at a time."""
        query = s.KeyQuery(**filters)
        while True:
            page = await self.call(ops.list_keys, query=query)
            for item in page.items:
                yield item
            if page.next_cursor is None:
                return
            query = s.KeyQuery(**{**filters, "cursor": page.next_cursor})

    async def rotate_key(self, key_id: str, **fields: Any) -> s.IssuedKey:
        """A successor key; ``fields``: the grace the old key keeps working (see ``s.KeyRotate``)."""
        return await self.call(ops.rotate_key, key_id=key_id, body=s.KeyRotate(**fields))

    async def revoke_key(self, key_id: str) -> s.KeyView:
        return await self.call(ops.revoke_key, key_id=key_id)

    async def delete_key(self, key_id: str) -> None:
        await self.call(ops.delete_key, key_id=key_id)


class SyncKeystile:
    """``Keystile`` for code without an event loop: the same methods, blocking. It runs its own
    loop on a private thread; use ``with SyncKeystile(url, token) as ks`` (or ``close()``)."""

    def __init__(self, url: str, token: str, *, timeout: float = 30.0) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="keystile-client", daemon=True)
        self._thread.start()
        self._async = Keystile(url, token, timeout=timeout)
        self._run(self._async.__aenter__())

    def __enter__(self) -> SyncKeystile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._async.__aexit__(None, None, None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _run(self, coro: Coroutine[Any, Any, R]) -> R:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def call(self, operation: Operation[R], /, *, body: Any = None, query: Any = None, **params: str) -> R:
        async def run() -> R:
            return await self._async.call(operation, body=body, query=query, **params)

        return self._run(run())

    def verify(self, key: str, scopes: Sequence[str] = ()) -> s.VerifyResponse:
        return self._run(self._async.verify(key, scopes))

    def create_principal(self, name: str, **fields: Any) -> s.PrincipalView:
        return self._run(self._async.create_principal(name, **fields))

    def create_key(self, owner: str, project: str, **fields: Any) -> s.IssuedKey:
        return self._run(self._async.create_key(owner, project, **fields))

    def get_key(self, key_id: str) -> s.KeyView:
        return self._run(self._async.get_key(key_id))

    def keys(self, **filters: Any) -> Iterator[s.KeyView]:
        pages = self._async.keys(**filters)

        async def step() -> s.KeyView | None:
            return await anext(pages, None)

        while (item := self._run(step())) is not None:
            yield item

    def rotate_key(self, key_id: str, **fields: Any) -> s.IssuedKey:
        return self._run(self._async.rotate_key(key_id, **fields))

    def revoke_key(self, key_id: str) -> s.KeyView:
        return self._run(self._async.revoke_key(key_id))

    def delete_key(self, key_id: str) -> None:
        self._run(self._async.delete_key(key_id))
