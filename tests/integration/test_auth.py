"""Authentication through the proxy listener: key sources, the exact 401/403 bodies, identity headers."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time

import aiohttp
import pytest
from msgspec.structs import replace

from gateway.clock import ManualClock
from gateway.keys import generate_key
from tests.upstream import RecordingUpstream, exchange, raw_request

MISSING = {
    "error": "missing_api_key",
    "message": "An API key is required: send it in X-API-Key or Authorization: Bearer.",
}
INVALID = {"error": "invalid_api_key", "message": "The API key is not valid."}
EXPIRED = {"error": "expired_api_key", "message": "The API key has expired."}
FORBIDDEN = {"error": "insufficient_scope", "message": "The API key does not grant what this route requires."}


async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers or {}) as r:
        return r.status, dict(r.headers), await r.read()


async def test_valid_key_reaches_upstream_with_identity(keystile, upstream: RecordingUpstream) -> None:
    gw = await keystile()
    key = await gw.key(scopes=["read"])
    status, _, body = await get(gw.url + "/things?a=1", {"X-API-Key": key})
    assert status == 200
    seen = upstream.received[-1]
    assert seen.raw_path == "/things?a=1"
    assert seen.header("X-Keystile-Owner") == ["alice"]
    assert seen.header("X-Keystile-Project") == ["p1"]
    assert seen.header("X-Keystile-Scopes") == ["read"]
    assert seen.header("X-Keystile-Key-Id")[0].startswith("key_")
    assert seen.header("X-API-Key") == []  # the credential never reaches the upstream
    assert key not in json.dumps(seen.headers)


async def test_bearer_key_is_accepted_and_stripped(keystile, upstream: RecordingUpstream) -> None:
    gw = await keystile()
    key = await gw.key()
    status, _, _ = await get(gw.url + "/x", {"Authorization": f"Bearer {key}"})
    assert status == 200
    assert upstream.received[-1].header("Authorization") == []


async def test_authorization_wins_over_x_api_key(keystile, upstream: RecordingUpstream) -> None:
    gw = await keystile()
    good = await gw.key()
    bogus = generate_key("ks", "live")
    status, _, body = await get(gw.url + "/x", {"Authorization": f"Bearer {bogus}", "X-API-Key": good})
    assert (status, json.loads(body)) == (401, INVALID)
    status, _, _ = await get(gw.url + "/x", {"Authorization": f"Bearer {good}", "X-API-Key": bogus})
    assert status == 200
    # X-API-Key is stripped even when the bearer token was the one used.
    assert upstream.received[-1].header("X-API-Key") == []


async def test_other_authorization_schemes_pass_through(keystile, upstream: RecordingUpstream) -> None:
    gw = await keystile()
    key = await gw.key()
    status, _, _ = await get(gw.url + "/x", {"Authorization": "Basic dXNlcjpwYXNz", "X-API-Key": key})
    assert status == 200
    assert upstream.received[-1].header("Authorization") == ["Basic dXNlcjpwYXNz"]


async def test_missing_key_is_401_with_challenge(keystile, upstream: RecordingUpstream) -> None:
    gw = await keystile()
    status, headers, body = await get(gw.url + "/x")
    assert status == 401
    assert json.loads(body) == MISSING
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert upstream.received == []


async def test_malformed_unknown_and_revoked_keys_get_one_identical_answer(
    keystile, upstream: RecordingUpstream
) -> None:
    gw = await keystile()
    key = await gw.key()
    kid = (
        (
            await gw.store.list_keys(
                __import__("gateway.store", fromlist=["KeyFilter"]).KeyFilter(), time.time()
            )
        )
        .items[0]
        .id
    )
    await gw.lifecycle.revoke_key(kid, actor="test")
    forged = key[:-1] + ("A" if key[-1] != "A" else "B")  # checksum now wrong
    answers = set()
    for candidate in ("not-a-key", forged, generate_key("ks", "live"), key, "ks_live_" + "a" * 36):
        status, headers, body = await get(gw.url + "/x", {"X-API-Key": candidate})
        answers.add((status, body, headers["WWW-Authenticate"]))
    assert len(answers) == 1
    status, body, _ = answers.pop()
    assert status == 401 and json.loads(body) == INVALID
    assert upstream.received == []


async def test_key_of_another_prefix_is_invalid(keystile) -> None:
    gw = await keystile()
    status, _, body = await get(gw.url + "/x", {"X-API-Key": generate_key("other", "live")})
    assert (status, json.loads(body)) == (401, INVALID)


async def test_expired_key(keystile, upstream: RecordingUpstream) -> None:
    clock = ManualClock()
    gw = await keystile(clock=clock)
    key = await gw.key(expires_in=0.5)
    assert (await get(gw.url + "/x", {"X-API-Key": key}))[0] == 200
    clock.advance(0.6)
    status, _, body = await get(gw.url + "/x", {"X-API-Key": key})
    assert (status, json.loads(body)) == (401, EXPIRED)
    assert len(upstream.received) == 1


async def test_insufficient_scope_is_403(keystile, upstream: RecordingUpstream) -> None:
    gw = await keystile()
    key = await gw.key(grant=("read",))
    status, _, body = await get(gw.url + "/admin/users", {"X-API-Key": key})
    assert (status, json.loads(body)) == (403, FORBIDDEN)
    assert upstream.received == []
    admin_key = await gw.key(owner="root", grant=("admin",))
    assert (await get(gw.url + "/admin/users", {"X-API-Key": admin_key}))[0] == 200


async def test_key_narrowed_below_grant(keystile) -> None:
    gw = await keystile()
    key = await gw.key(owner="ops", grant=("admin", "read"), scopes=["read"])
    assert (await get(gw.url + "/admin/x", {"X-API-Key": key}))[0] == 403
    assert (await get(gw.url + "/x", {"X-API-Key": key}))[0] == 200


async def test_auth_none_and_optional_routes(keystile, upstream: RecordingUpstream) -> None:
    gw = await keystile()
    key = await gw.key()
    assert (await get(gw.url + "/public/x"))[0] == 200
    assert upstream.received[-1].header("X-Keystile-Owner") == []
    assert (await get(gw.url + "/opt/x"))[0] == 200
    assert upstream.received[-1].header("X-Keystile-Owner") == []
    assert (await get(gw.url + "/opt/x", {"X-API-Key": key}))[0] == 200
    assert upstream.received[-1].header("X-Keystile-Owner") == ["alice"]
    # A key that is presented must be valid, even where none is required.
    assert (await get(gw.url + "/opt/x", {"X-API-Key": "nope"}))[0] == 401


async def test_duplicate_key_headers_are_refused(keystile, upstream: RecordingUpstream) -> None:
    gw = await keystile()
    key = await gw.key()
    for dup in (f"X-API-Key: {key}\r\nX-API-Key: {key}", f"Authorization: Bearer {key}\r\nAuthorization: Basic eDp5"):
        for path in ("/x", "/public/x"):
            req = f"GET {path} HTTP/1.1\r\nHost: a\r\n{dup}\r\nConnection: close\r\n\r\n".encode()
            status, _, body = await raw_request(gw.port, req)
            assert status == 400 and json.loads(body)["error"] == "bad_request"
    assert upstream.received == []


@pytest.mark.parametrize(
    "spoof",
    [
        "X-Keystile-Owner: mallory\r\n",
        "x-keystile-owner: mallory\r\n",
        "X-KEYSTILE-OWNER: mallory\r\nX-Keystile-Owner: eve\r\n",
        "X_Keystile_Owner: mallory\r\n",
        "x_keystile_scopes: admin\r\n",
        "X-Keystile-Admin: yes\r\n",
        "Connection: X-Keystile-Owner\r\nX-Keystile-Owner: mallory\r\n",
    ],
)
async def test_identity_headers_cannot_be_forged(keystile, upstream: RecordingUpstream, spoof: str) -> None:
    gw = await keystile()
    key = await gw.key()
    for path, with_key in (("/x", True), ("/public/x", False)):
        key_line = f"X-API-Key: {key}\r\n" if with_key else ""
        req = f"GET {path} HTTP/1.1\r\nHost: a\r\n{spoof}{key_line}Connection: close\r\n\r\n".encode()
        status, _, _ = await raw_request(gw.port, req)
        assert status == 200
        seen = upstream.received[-1]
        forged = [(k, v) for k, v in seen.headers if k.lower().replace("_", "-").startswith("x-keystile-")]
        expected = [("X-Keystile-Owner", "alice")] if with_key else []
        assert [(k, v) for k, v in forged if k == "X-Keystile-Owner"] == expected
        assert all(v not in ("mallory", "eve", "admin", "yes") for _, v in forged)


async def test_whoami(keystile, upstream: RecordingUpstream) -> None:
    gw = await keystile()
    key = await gw.key(scopes=["read"], expires_in=3600)
    status, _, body = await get(gw.url + "/_keystile/whoami", {"Authorization": f"Bearer {key}"})
    assert status == 200
    data = json.loads(body)
    assert data["principal"] == "alice" and data["project"] == "p1" and data["scopes"] == ["read"]
    assert data["start"] == key[:12] + "…"
    assert data["expires_at"] > time.time()
    assert key not in body.decode()
    assert upstream.received == []
    assert data["last_used_at"] is None
    before = time.time()
    assert (await get(gw.url + "/x", {"X-API-Key": key}))[0] == 200
    data = json.loads((await get(gw.url + "/_keystile/whoami", {"X-API-Key": key}))[2])
    assert data["last_used_at"] >= before  # from memory, before any flush
    await gw.gateway.usage.flush()
    data = json.loads((await get(gw.url + "/_keystile/whoami", {"X-API-Key": key}))[2])
    assert data["last_used_at"] >= before  # from the store
    assert (await get(gw.url + "/_keystile/whoami"))[0] == 401


async def test_rejections_are_framed_like_any_response(keystile) -> None:
    """The 401 is written from prebuilt bytes: it must still honour keep-alive, HTTP/1.0 and HEAD."""
    gw = await keystile()
    bad = "X-API-Key: ks_live_not-a-key\r\n"
    # HTTP/1.1: two rejections on one kept connection, each a complete framed JSON answer.
    one = f"GET /x HTTP/1.1\r\nHost: t\r\n{bad}\r\n".encode()
    replies, closed = await exchange(gw.port, one * 2, 2)
    assert not closed
    for raw in replies:
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
        assert json.loads(body) == INVALID
        assert b"\r\nContent-Type: application/json\r\n" in head + b"\r\n"
        assert b"\r\nWWW-Authenticate: Bearer realm=\"keystile\", error=\"invalid_token\"" in head
        date = head.split(b"\r\nDate: ")[1].split(b"\r\n")[0].decode()
        assert abs(email.utils.parsedate_to_datetime(date).timestamp() - time.time()) < 5
        assert b"Connection:" not in head
    # HTTP/1.1 with Connection: close: said, then done.
    replies, closed = await exchange(gw.port, f"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{bad}\r\n".encode(), 1)
    assert b"\r\nConnection: close\r\n" in replies[0] and closed
    # HTTP/1.0: closed unless keep-alive was asked for, and then announced.
    replies, closed = await exchange(gw.port, f"GET /x HTTP/1.0\r\n{bad}\r\n".encode(), 1)
    assert replies[0].startswith(b"HTTP/1.0 401 ") and b"Connection:" not in replies[0] and closed
    replies, closed = await exchange(gw.port, f"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n{bad}\r\n".encode(), 1)
    assert b"\r\nConnection: keep-alive\r\n" in replies[0] and not closed
    # HEAD: the headers (with the body's length), no body; the next answer is not corrupted by one.
    head_req = f"HEAD /x HTTP/1.1\r\nHost: t\r\n{bad}\r\n".encode()
    replies, closed = await exchange(gw.port, head_req * 2, 2)
    assert all(r.startswith(b"HTTP/1.1 401 ") and r.endswith(b"\r\n\r\n") for r in replies) and not closed
    length = int(replies[0].split(b"Content-Length: ")[1].split(b"\r\n")[0])
    assert length == len(json.dumps(INVALID, separators=(",", ":")).encode())


async def test_whoami_and_per_request_refusals_are_framed_like_the_fixed_ones(keystile) -> None:
    """whoami's JSON and a 400 whose message is made per request are built the one way the fixed
    refusals are: JSON, no-store, their length, a Date; keep-alive kept, no body for HEAD."""
    gw = await keystile()
    key = await gw.key()
    whoami = f"GET /_keystile/whoami HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\n\r\n".encode()
    bad_path = b"GET /a%00b HTTP/1.1\r\nHost: t\r\n\r\n"
    replies, closed = await exchange(gw.port, whoami + bad_path + whoami, 3)
    assert not closed
    for raw, status in zip(replies, (b"200 OK", b"400 Bad Request", b"200 OK"), strict=True):
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 " + status + b"\r\n")
        fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
        assert fields[b"Content-Type"] == b"application/json" and fields[b"Cache-Control"] == b"no-store"
        assert int(fields[b"Content-Length"]) == len(body) and b"Date" in fields
        assert key.encode() not in raw
    assert json.loads(replies[0].partition(b"\r\n\r\n")[2])["principal"] == "alice"
    assert json.loads(replies[1].partition(b"\r\n\r\n")[2])["error"] == "bad_request"
    head_req = whoami.replace(b"GET", b"HEAD", 1)
    replies, closed = await exchange(gw.port, head_req * 2, 2)
    assert all(r.startswith(b"HTTP/1.1 200 OK\r\n") and r.endswith(b"\r\n\r\n") for r in replies) and not closed


class OneConnection:
    """Requests one after another on a single keep-alive connection to the proxy listener, where
    the connection remembers the last well-formed key it presented (``gateway.listener``)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> OneConnection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def get(self, key: str | bytes) -> tuple[int, bytes]:
        value = key if isinstance(key, bytes) else key.encode()
        self.writer.write(b"GET /x HTTP/1.1\r\nHost: t\r\nX-API-Key: " + value + b"\r\n\r\n")
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        assert b"Connection: close" not in head  # still the same connection afterwards
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        return int(head.split(b" ")[1]), await asyncio.wait_for(self.reader.readexactly(length), 5)

    def close(self) -> None:
        self.writer.close()


async def test_a_connection_that_changes_key_is_checked_as_the_new_key(
    keystile, upstream: RecordingUpstream
) -> None:
    gw = await keystile()
    alice, bob = await gw.key("alice"), await gw.key("bob")
    swapped = alice[:-2] + alice[-1] + alice[-2]
    typo = swapped if swapped != alice else alice[:-1] + ("1" if alice[-1] == "0" else "0")
    conn = await OneConnection.open(gw.port)
    try:
        owners = []
        for key in (alice, alice, bob, alice):
            status, _ = await conn.get(key)
            assert status == 200
            owners.append(upstream.received[-1].header("X-Keystile-Owner"))
        assert owners == [["alice"], ["alice"], ["bob"], ["alice"]]
        # Right after a remembered key: one that differs, has another shape, or is not ASCII.
        for bad in (typo, alice[:-1], alice + "0", "ks_live_" + "a" * 36, generate_key("ks", "live")):
            assert (await conn.get(alice))[0] == 200
            status, body = await conn.get(bad)
            assert (status, json.loads(body)) == (401, INVALID), bad
        assert (await conn.get(alice))[0] == 200
        status, body = await conn.get(alice[:-1].encode() + "é".encode())
        assert (status, json.loads(body)) == (401, INVALID)
    finally:
        conn.close()
    assert len(upstream.received) == 4 + 5 + 1


async def test_a_key_revoked_while_its_connection_stays_open_is_refused_at_once(keystile) -> None:
    gw = await keystile()
    await gw.key("carol")
    key = await gw.lifecycle.create_key("carol", "p1", actor="test")
    conn = await OneConnection.open(gw.port)
    try:
        assert (await conn.get(key.secret))[0] == 200
        await gw.lifecycle.revoke_key(key.record.id, actor="test")
        status, body = await conn.get(key.secret)
        assert (status, json.loads(body)) == (401, INVALID)
    finally:
        conn.close()


async def test_a_reload_that_changes_the_key_prefix_applies_to_open_connections(keystile) -> None:
    gw = await keystile()
    key = await gw.key()
    conn = await OneConnection.open(gw.port)
    try:
        assert (await conn.get(key))[0] == 200
        await gw.gateway.reload(replace(gw.cfg, keys=replace(gw.cfg.keys, prefix="other")))
        status, body = await conn.get(key)  # an old-prefix key, remembered by this connection
        assert (status, json.loads(body)) == (401, INVALID)
    finally:
        conn.close()
