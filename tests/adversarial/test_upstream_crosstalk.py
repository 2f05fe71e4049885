"""No cross-talk through the upstream pool (invariant 1), against upstreams that send bytes after
a finished response.

One misbehaving upstream serves two routes of one Keystile: ``/public`` (``auth = "none"``) and
``/api`` (``auth = "required"``), so both share one connection pool (pools are per origin). While
keyed clients send requests that each carry a unique nonce, a client without a key drives one
misbehaving mode over and over. The upstream answers every request with that request's nonce (in
``X-Nonce``, and in the body where there is one); the bytes it sends where no answer is due are a
forged page with its own nonce and a ``Set-Cookie``. Every answer any client gets must carry its
own nonce, and nobody may ever see the forged page.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from tests.adversarial.invariants import answers_own_nonce

FORGED_BODY = b"FORGED-PAGE"
FORGED = (
    b"HTTP/1.1 200 OK\r\nX-Nonce: forged\r\nSet-Cookie: session=forged\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(FORGED_BODY), FORGED_BODY)
)
LATE = 0.002  # "a few ms" later, within upstream.reuse_delay (3 ms by default)


def answer(nonce: str, status: bytes = b"200 OK", body: bytes | None = None) -> bytes:
    """An honest answer: the nonce in a header and, unless ``body`` is b"", in the body."""
    if body is None:
        body = nonce.encode()
    return b"HTTP/1.1 %s\r\nX-Nonce: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        status,
        nonce.encode(),
        len(body),
        body,
    )


def failure(e: Exception) -> str:
    """A client error in short, without the request (its headers carry the key)."""
    return f"{type(e).__name__}: {getattr(e, 'message', '')}".replace("\n", " ")[:120]


Writer = asyncio.StreamWriter
Mode = Callable[[Writer, str], Awaitable[None]]


async def head_body(w: Writer, nonce: str) -> None:
    # Python's http.server with do_HEAD = do_GET: headers, then the stored file (a complete
    # forged response) in a second write.
    w.write(b"HTTP/1.1 200 OK\r\nX-Nonce: %s\r\nContent-Length: %d\r\n\r\n" % (nonce.encode(), len(FORGED)))
    await asyncio.sleep(0)
    w.write(FORGED)


async def head_late_body(w: Writer, nonce: str) -> None:
    w.write(b"HTTP/1.1 200 OK\r\nX-Nonce: %s\r\nContent-Length: %d\r\n\r\n" % (nonce.encode(), len(FORGED)))
    await asyncio.sleep(LATE)
    w.write(FORGED)


async def no_content_body(w: Writer, nonce: str) -> None:
    w.write(b"HTTP/1.1 204 No Content\r\nX-Nonce: %s\r\n\r\n%s" % (nonce.encode(), FORGED))


async def not_modified_late_body(w: Writer, nonce: str) -> None:
    w.write(b"HTTP/1.1 304 Not Modified\r\nX-Nonce: %s\r\n\r\n" % nonce.encode())
    await asyncio.sleep(0.001)
    w.write(FORGED)


async def unsolicited_late(w: Writer, nonce: str) -> None:
    w.write(answer(nonce))
    await asyncio.sleep(LATE)
    w.write(FORGED)


async def two_in_one_write(w: Writer, nonce: str) -> None:
    w.write(answer(nonce) + FORGED)


# mode -> (what the unauthenticated client sends, what it must get, the misbehaviour)
MODES: dict[str, tuple[str, int, Mode]] = {
    "head_body": ("HEAD", 200, head_body),
    "head_late_body": ("HEAD", 200, head_late_body),
    "no_content_body": ("GET", 204, no_content_body),
    "not_modified_late_body": ("GET", 304, not_modified_late_body),
    "unsolicited_late": ("GET", 200, unsolicited_late),
    "two_in_one_write": ("GET", 200, two_in_one_write),
}


class MisbehavingUpstream:
    """Raw asyncio HTTP/1.1 server: ``/public/<mode>/<nonce>`` misbehaves, anything else
    ``/<...>/<nonce>`` is answered honestly. Counts requests per connection."""

    def __init__(self) -> None:
        self.per_connection: Counter[int] = Counter()
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = next(self._ids)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ")
                self.per_connection[conn] += 1
                parts = target.split("/")
                nonce = parts[-1]
                if parts[1] == "public":
                    await MODES[parts[2]][2](writer, nonce)
                else:
                    writer.write(answer(nonce, body=b"" if method == "HEAD" else None))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


KEYED_CLIENTS = 3
REQUESTS_PER_CLIENT = 30


@pytest.mark.parametrize("mode", list(MODES))
async def test_no_response_crosses_between_clients(keystile, mode: str) -> None:
    up = MisbehavingUpstream()
    await up.start()
    method, expected_status, _ = MODES[mode]
    wrong: list[str] = []  # every answer that was not the sender's own
    attacks = 0
    try:
        origin = f"http://127.0.0.1:{up.port}"
        gw = await keystile(
            routes=[
                {"prefix": "/public", "upstream": origin, "auth": "none"},
                {"prefix": "/api", "upstream": origin, "auth": "required"},
            ]
        )
        keys = [await gw.key(owner=f"client{i}") for i in range(KEYED_CLIENTS)]
        keyed_done = asyncio.Event()
        timeout = aiohttp.ClientTimeout(total=5)

        def check(who: str, nonce: str, status: int, r: aiohttp.ClientResponse, body: bytes) -> None:
            own = (
                r.status == status
                and r.reason in ("OK", "No Content", "Not Modified")  # never "OKOK"
                and r.headers.get("X-Nonce") == nonce
                and (not body or answers_own_nonce(nonce, body))
            )
            forged = FORGED_BODY in body or "Set-Cookie" in r.headers
            if not own or forged:
                got = f"{r.status} {r.reason!r} X-Nonce={r.headers.get('X-Nonce')} {body[:40]!r}"
                wrong.append(f"{who} sent {nonce}, got {got}")

        async def keyed(key: str, c: int) -> None:
            async with aiohttp.ClientSession(headers={"X-API-Key": key}, timeout=timeout) as s:
                for i in range(REQUESTS_PER_CLIENT):
                    if len(wrong) >= 5:
                        return  # proven; keep a failing run short
                    nonce = f"k{c}-{i}-{secrets.token_hex(6)}"
                    try:
                        async with s.get(f"{gw.url}/api/{nonce}") as r:
                            check(f"keyed client {c}", nonce, 200, r, await r.read())
                    except (aiohttp.ClientError, TimeoutError) as e:  # not even a valid answer
                        wrong.append(f"keyed client {c} sent {nonce}, got {failure(e)}")

        async def attacker() -> None:
            nonlocal attacks
            async with aiohttp.ClientSession(timeout=timeout) as s:
                while not keyed_done.is_set() or (attacks < 10 and len(wrong) < 5):
                    nonce = f"anon-{attacks}-{secrets.token_hex(6)}"
                    try:
                        async with s.request(method, f"{gw.url}/public/{mode}/{nonce}") as r:
                            check("client without a key", nonce, expected_status, r, await r.read())
                    except (aiohttp.ClientError, TimeoutError) as e:
                        wrong.append(f"client without a key sent {nonce}, got {failure(e)}")
                    attacks += 1

        attack = asyncio.create_task(attacker())
        try:
            await asyncio.gather(*(keyed(k, c) for c, k in enumerate(keys)))
        finally:
            keyed_done.set()
            await attack
    finally:
        await up.stop()

    keyed = [w for w in wrong if w.startswith("keyed")]
    assert not wrong, (
        f"{len(wrong)} answers were not the sender's own ({len(keyed)} to keyed clients): {wrong[:4]}"
    )
    assert sum(up.per_connection.values()) >= KEYED_CLIENTS * REQUESTS_PER_CLIENT + attacks
    assert max(up.per_connection.values()) > 1, "the pool never reused a connection: nothing was tested"
