"""The front door under attack: a raw-socket corpus, every case checked against the four invariants.

Keystile runs in front of the recording upstream with nested routes: ``/public`` (no key),
``/public/secret`` and ``/adm`` (key required), ``/opt`` (key optional). Each case is sent as raw
bytes on a fresh connection, one at a time, so what the upstream recorded during a case belongs to
it. For every case:

- a case marked ``refused`` never reaches the upstream, and a parser error is answered with
  Keystile's fixed JSON body (nothing echoed);
- what reaches the upstream on a path that *any* common upstream would read as a protected route
  (``strictest_reading``: path parameters stripped, escapes decoded, case folded) carries the
  identity of a valid key the client sent (invariants 2 and 3);
- no key appears in the response, in the upstream's request headers, or (checked at the end of each
  test) in any log line (invariant 4).

Invariant 1 (no cross-talk) is the upstream-leg suite's subject; here every connection carries one
request and the answer is read to its end.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote

import pytest

from gateway.observability import JSONFormatter
from tests.adversarial.invariants import assert_no_key, leaked_keys
from tests.conftest import ADMIN_TOKEN
from tests.upstream import RecordingUpstream

# Keystile's answer to anything its HTTP parser refuses: fixed, nothing from the request in it.
MALFORMED = {"error": "bad_request", "message": "The request is not valid HTTP/1.1."}

# Headers an upstream may believe about the client or the request's origin, and headers asking an
# upstream to treat the request as another method or URL; each spelled the ways clients try.
FORWARDING = (
    "X-Forwarded-For",
    "X-Forwarded-Host",
    "X-Forwarded-Proto",
    "X-Forwarded-Port",
    "X-Forwarded-Prefix",
    "X-Forwarded-Ssl",
    "X-Forwarded-Server",
    "X-Forwarded-Scheme",
    "Forwarded",
    "X-Real-IP",
    "X-Client-IP",
    "True-Client-IP",
    "X-Original-Forwarded-For",
    "Client-IP",
    "CF-Connecting-IP",
)
OVERRIDE = (
    "X-HTTP-Method-Override",
    "X-HTTP-Method",
    "X-Method-Override",
    "X-Original-URL",
    "X-Rewrite-URL",
    "X-Original-Method",
)
SPOOFED = "203.0.113.66"


def spellings(name: str) -> list[str]:
    """The name as sent by a careful client, in lower and upper case, and with ``_`` for ``-``."""
    out = [name, name.lower(), name.upper()]
    if "-" in name:
        out += [name.replace("-", "_"), name.lower().replace("-", "_")]
    return out


def strictest_reading(raw_path: str) -> list[str]:
    """The path segments as the most permissive common upstream reads them: escapes decoded, path
    parameters (``;...``) stripped from each segment (Tomcat, Jetty, Spring), dot segments
    resolved, case folded (IIS and other case-insensitive servers)."""
    segs: list[str] = []
    for seg in raw_path.split("?", 1)[0].split("/"):
        name = unquote(seg).split(";", 1)[0].lower()
        if name in ("", "."):
            continue
        if name == "..":
            if segs:
                segs.pop()
            continue
        segs.append(name)
    return segs


def protected(raw_path: str) -> bool:
    segs = strictest_reading(raw_path)
    return segs[:1] == ["adm"] or segs[:2] == ["public", "secret"]


@dataclass
class Case:
    name: str
    raw: bytes
    refused: bool = False  # must not reach the upstream
    status: int | None = None  # the status the client must get, when fixed
    body: dict[str, str] | None = None  # the exact JSON body, when fixed
    owner: str | None = None  # whose identity the upstream must see (None: no identity)
    absent: Sequence[str] = ()  # header names (any case, "_" for "-") the upstream must not get
    present: dict[str, list[str]] = field(default_factory=dict)  # exact values the upstream must get


def request(
    target: str, *headers: str, method: str = "GET", body: str = "", version: str = "HTTP/1.1"
) -> bytes:
    lines = [f"{method} {target} {version}", "Host: gw.test", *headers, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode("latin-1")


async def send(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        chunks = []
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
        return b"".join(chunks)
    except ConnectionResetError:
        return b"".join(chunks)
    finally:
        writer.close()


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


async def run_corpus(gw: object, upstream: RecordingUpstream, cases: Sequence[Case]) -> list[str]:
    """Send every case; return one line per broken expectation (empty: all held)."""
    port: int = gw.port  # type: ignore[attr-defined]
    failures: list[str] = []
    for case in cases:
        before = len(upstream.received)
        try:
            raw = await send(port, case.raw)
        except TimeoutError:
            failures.append(f"{case.name}: no complete answer within 5 s")
            continue
        head, _, body = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.") else 0
        if leaked_keys(raw):
            failures.append(f"{case.name}: a key in the response")
        if case.status is not None and status != case.status:
            failures.append(f"{case.name}: status {status}, expected {case.status}: {raw[:200]!r}")
        if case.body is not None:
            try:
                got = json.loads(body)
            except ValueError:
                got = body
            if got != case.body:
                failures.append(f"{case.name}: body {body[:200]!r}")
        reached = upstream.received[before:]
        if case.refused:
            if reached:
                failures.append(f"{case.name}: reached the upstream as {reached[0].raw_path!r}")
            if not 400 <= status < 600:
                failures.append(f"{case.name}: refused with status {status}")
            continue
        for seen in reached:
            where = f"{case.name} (upstream got {seen.method} {seen.raw_path!r})"
            if leaked_keys(json.dumps(seen.headers)) or leaked_keys(seen.raw_path):
                failures.append(f"{where}: a key in the upstream request")
            owners = seen.header("X-Keystile-Owner")
            if protected(seen.raw_path) and not owners:
                failures.append(f"{where}: a protected path reached the upstream without a key")
            if owners != ([case.owner] if case.owner else []):
                failures.append(f"{where}: identity {owners}, expected {case.owner}")
            names = {_norm(k) for k, _ in seen.headers}
            for absent in case.absent:
                if _norm(absent) in names:
                    failures.append(f"{where}: {absent} reached the upstream")
            for name, values in case.present.items():
                got = [v for k, v in seen.headers if _norm(k) == _norm(name)]
                if got != values:
                    failures.append(f"{where}: {name} (any spelling) = {got}, expected {values}")
    return failures


def logs_text(caplog: pytest.LogCaptureFixture, stderr: str) -> str:
    """Every log line as written (JSON, exceptions included) plus the access log on stderr."""
    formatter = JSONFormatter()
    return "\n".join(formatter.format(r) for r in caplog.records) + "\n" + caplog.text + stderr


ROUTES_SPEC = (
    ("/public", "none"),
    ("/public/secret", "required"),
    ("/adm", "required"),
    ("/opt", "optional"),
)


@pytest.fixture
async def front(keystile, upstream: RecordingUpstream, caplog: pytest.LogCaptureFixture):  # type: ignore[no-untyped-def]
    """Keystile with the nested routes, and two keys: alice's and bob's."""
    caplog.set_level(logging.DEBUG)

    async def start(**sections: object):  # type: ignore[no-untyped-def]
        routes = [{"prefix": p, "upstream": upstream.url, "auth": a} for p, a in ROUTES_SPEC]
        gw = await keystile(routes=sections.pop("routes", routes), **sections)
        a = await gw.key(owner="alice")
        b = await gw.key(owner="bob")
        return gw, a, b

    return start


async def check_logs(gw: object, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    gw.gateway.access_log.flush()  # type: ignore[attr-defined]
    assert_no_key("logs", [logs_text(caplog, capsys.readouterr().err)])


# -- framing, smuggling and malformed heads -----------------------------------------------------


def malformed_cases(a: str) -> list[Case]:
    """Requests the HTTP parser must refuse; each carries alice's key somewhere a careless error
    message or log line would repeat it."""
    k = f"X-API-Key: {a}"
    h = "Host: gw.test\r\n"
    heads = {
        "CL.TE": f"POST /adm/x HTTP/1.1\r\n{h}{k}\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
        "TE.CL": f"POST /adm/x HTTP/1.1\r\n{h}{k}\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
        "TE.TE two values": f"POST /public/x HTTP/1.1\r\n{h}{k}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n",
        "TE xchunked": f"POST /public/x HTTP/1.1\r\n{h}{k}\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        "TE space before colon": f"POST /public/x HTTP/1.1\r\n{h}{k}\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        "TE chunked, identity": f"POST /public/x HTTP/1.1\r\n{h}{k}\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        "TE obs-folded": f"POST /public/x HTTP/1.1\r\n{h}{k}\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
        "two Content-Length": f"POST /public/x HTTP/1.1\r\n{h}{k}\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
        "Content-Length list": f"POST /public/x HTTP/1.1\r\n{h}{k}\r\nContent-Length: 3, 5\r\n\r\nabcde",
        "Content-Length signed": f"POST /public/x HTTP/1.1\r\n{h}{k}\r\nContent-Length: +3\r\n\r\nabc",
        "Content-Length hex": f"POST /public/x HTTP/1.1\r\n{h}{k}\r\nContent-Length: 0x3\r\n\r\nabc",
        "chunk size overflow": f"POST /public/x HTTP/1.1\r\n{h}{k}\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff1\r\na\r\n0\r\n\r\n",
        "obs-fold": f"GET /public/x HTTP/1.1\r\n{h}X-A: b\r\n c\r\n{k}\r\n\r\n",
        "obs-fold carrying the key": f"GET /adm/x HTTP/1.1\r\n{h}X-API-Key:\r\n {a}\r\n\r\n",
        "bare LF ends the key line": f"GET /adm/x HTTP/1.1\r\n{h}{k}\n\r\n",
        "bare LF inside a value": f"GET /public/x HTTP/1.1\r\n{h}X-A: b\n{k}\r\n\r\n",
        "bare CR inside the key line": f"GET /adm/x HTTP/1.1\r\n{h}X-API-Key: {a}\rX\r\n\r\n",
        "bare LF request line": f"GET /adm/x HTTP/1.1\n{h}{k}\r\n\r\n",
        "NUL after the key": f"GET /adm/x HTTP/1.1\r\n{h}X-API-Key: {a}\x00\r\n\r\n",
        "DEL after the key": f"GET /adm/x HTTP/1.1\r\n{h}X-API-Key: {a}\x7f\r\n\r\n",
        "control char in bearer": f"GET /adm/x HTTP/1.1\r\n{h}Authorization: Bearer {a[:10]}\x01{a[10:]}\r\n\r\n",
        "control char after bearer": f"GET /adm/x HTTP/1.1\r\n{h}Authorization: Bearer {a}\x02\r\n\r\n",
        "space before colon": f"GET /adm/x HTTP/1.1\r\n{h}X-API-Key : {a}\r\n\r\n",
        "space in header name": f"GET /adm/x HTTP/1.1\r\n{h}X API Key: {a}\r\n\r\n",
        "header line without colon": f"GET /adm/x HTTP/1.1\r\n{h}X-API-Key {a}\r\n\r\n",
        "leading whitespace header": f"GET /adm/x HTTP/1.1\r\n {k}\r\n{h}\r\n",
        "bad request line, key in query": f"GET /adm/x?k={a} HTTP/1.1 x\r\n{h}\r\n",
        "HTTP/1.2": f"GET /adm/x HTTP/1.2\r\n{h}{k}\r\n\r\n",
        "HTTP/3.0": f"GET /adm/x HTTP/3.0\r\n{h}{k}\r\n\r\n",
        "lower-case version": f"GET /adm/x http/1.1\r\n{h}{k}\r\n\r\n",
        "bad method": f"G@T /adm/x HTTP/1.1\r\n{h}{k}\r\n\r\n",
        "TLS on the HTTP port": "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + a,
    }
    cases = [
        Case(name, data.encode("latin-1"), refused=True, status=400, body=MALFORMED) for name, data in heads.items()
    ]
    # Parsed, but not HTTP/1.0 or 1.1: refused by Keystile itself (505, fixed body).
    for version in ("HTTP/2.0", "HTTP/0.9"):
        cases.append(
            Case(
                f"request line {version}",
                request("/adm/x", k, version=version),
                refused=True,
                status=505,
                body={
                    "error": "http_version_not_supported",
                    "message": "Only HTTP/1.0 and HTTP/1.1 are served.",
                },
            )
        )
    cases += [
        Case("two Host headers", request("/public/x", "Host: other", k), refused=True, status=400),
        Case("absolute-form target", request("http://gw.test/adm/x", k), refused=True, status=400),
        Case("CONNECT", request("gw.test:443", k, method="CONNECT"), refused=True),
    ]
    return cases


async def test_malformed_requests_never_reach_the_upstream_nor_leak_the_key(
    front, upstream: RecordingUpstream, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    gw, a, _ = await front()
    failures = await run_corpus(gw, upstream, malformed_cases(a))
    assert failures == []
    await check_logs(gw, caplog, capsys)
    # Parser errors are logged as one line each, without a traceback.
    bad = [r for r in caplog.records if r.getMessage().startswith("malformed request")]
    assert bad and all(r.exc_info is None for r in bad)


async def test_a_parser_error_on_a_keep_alive_connection_closes_it_after_the_fixed_answer(front) -> None:
    gw, a, _ = await front()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(f"GET /public/x HTTP/1.1\r\nHost: gw.test\r\nX-API-Key: {a}\r\n\r\n".encode())
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert first.startswith(b"HTTP/1.1 200 ")
        length = int(first.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        await asyncio.wait_for(reader.readexactly(length), 5)
        writer.write(f"GET /adm/x HTTP/1.1\r\nHost: gw.test\r\nX-API-Key: {a}\n\r\n".encode())
        second = await asyncio.wait_for(reader.read(-1), 5)  # then the connection closes
    finally:
        writer.close()
    assert second.startswith(b"HTTP/1.1 400 ") and b"Connection: close\r\n" in second
    assert json.loads(second.partition(b"\r\n\r\n")[2]) == MALFORMED
    assert not leaked_keys(second)


# -- paths --------------------------------------------------------------------------------------


PATH_BYPASSES = (
    "/public/..;/adm/x",
    "/public/..;jsessionid=1/adm/x",
    "/public/%2e%2e;/adm/x",
    "/public/.;/secret/x",
    "/public/secret;jsessionid=1/x",
    "/public/secret;/x",
    "/public/secret%3bx/y",
    "/public/secret%3Bx/y",
    "/public;x/secret/x",
    "/public/secret;a=b;c=d/x",
)
PATH_RESOLVED = (
    "/public/../adm/x",
    "/public/%2e%2e/adm/x",
    "/public//secret/x",
    "/public/./secret/x",
    "/public/secret/../secret/x",
    "/public/sec%72et/x",
    "/public/%73ecret/x",
)


def path_cases(a: str) -> list[Case]:
    cases = [Case(f"{p} (no key)", request(p), refused=True, status=400) for p in PATH_BYPASSES]
    cases += [Case(f"{p} (key)", request(p, f"X-API-Key: {a}"), refused=True, status=400) for p in PATH_BYPASSES]
    cases += [Case(f"{p} (no key)", request(p), refused=True, status=401) for p in PATH_RESOLVED]
    cases += [Case(f"{p} (key)", request(p, f"X-API-Key: {a}"), status=200, owner="alice") for p in PATH_RESOLVED]
    cases += [
        Case(p, request(p), refused=True, status=400)
        for p in ("/public/..%2fadm/x", "/public%2fsecret/x", "/public/secret%5cx", "/public/secret%00/x", "/..;/adm")
    ]
    # Case-sensitive by default: these match no route here (no catch-all), so nothing is forwarded.
    cases += [Case(p, request(p), refused=True, status=404) for p in ("/ADM/x", "/Public/Secret/x")]
    cases += [
        Case("/public/x", request("/public/x"), status=200),
        Case("HTTP/1.0", request("/public/x", version="HTTP/1.0"), status=200),
        Case("HTTP/1.0 keyed", request("/adm/x", f"X-API-Key: {a}", version="HTTP/1.0"), status=200, owner="alice"),
    ]
    return cases


async def test_paths_never_reach_a_protected_route_without_a_key(
    front, upstream: RecordingUpstream, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    gw, a, _ = await front()
    assert await run_corpus(gw, upstream, path_cases(a)) == []
    await check_logs(gw, caplog, capsys)


async def test_allowed_path_parameters_route_on_the_segment_before_the_semicolon(
    front, upstream: RecordingUpstream
) -> None:
    gw, a, _ = await front(proxy={"allow_path_parameters": True})
    cases = [Case(f"{p} (no key)", request(p), refused=True, status=401) for p in PATH_BYPASSES]
    cases += [
        Case(f"{p} (key)", request(p, f"X-API-Key: {a}"), status=200, owner="alice")
        for p in PATH_BYPASSES
    ]
    assert await run_corpus(gw, upstream, cases) == []
    # The parameters reach the upstream that needs them, on the segment that carried them.
    await send(gw.port, request("/public/secret;jsessionid=1/x", f"X-API-Key: {a}"))
    assert upstream.received[-1].raw_path == "/public/secret;jsessionid=1/x"
    await send(gw.port, request("/public/..;jsessionid=1/adm/x", f"X-API-Key: {a}"))
    assert upstream.received[-1].raw_path == "/adm/x"


async def test_case_insensitive_routes_close_the_case_bypass(front, upstream: RecordingUpstream) -> None:
    routes = [{"prefix": p, "upstream": upstream.url, "auth": a} for p, a in ROUTES_SPEC]
    routes.append({"prefix": "/", "upstream": upstream.url, "auth": "none"})
    # Off (the default): a case-insensitive upstream would read /ADM/x as /adm/x, Keystile does not.
    gw, a, _ = await front(routes=routes)
    assert (await send(gw.port, request("/ADM/x")))[9:12] == b"200"
    gw, a, _ = await front(routes=routes, proxy={"case_insensitive_routes": True})
    cases = [
        Case(p, request(p), refused=True, status=401)
        for p in ("/ADM/x", "/Adm", "/PUBLIC/SECRET/x", "/public/Secret/x", "/Public/%53ecret/x")
    ]
    cases += [Case("/ADM/x (key)", request("/ADM/x", f"X-API-Key: {a}"), status=200, owner="alice")]
    cases += [Case("/PUBLIC/x", request("/PUBLIC/x"), status=200)]
    assert await run_corpus(gw, upstream, cases) == []
    assert upstream.received[-2].raw_path == "/ADM/x"  # forwarded as sent


# -- credentials ------------------------------------------------------------------------------


def credential_cases(a: str, b: str) -> list[Case]:
    basic = "Authorization: Basic dXNlcjpwYXNz"
    ambiguous = {
        "the issue's case: Bearer A, Basic, X-API-Key B": (f"Authorization: Bearer {a}", basic, f"X-API-Key: {b}"),
        "Basic then Bearer": (basic, f"Authorization: Bearer {a}"),
        "two Bearer": (f"Authorization: Bearer {a}", f"Authorization: Bearer {a}"),
        "two Basic": (basic, basic),
        "two X-API-Key": (f"X-API-Key: {a}", f"X-API-Key: {a}"),
        "X-API-Key in two cases": (f"X-API-Key: {a}", f"x-api-key: {b}"),
    }
    cases = [
        Case(f"{name} on {path}", request(path, *hs), refused=True, status=400)
        for name, hs in ambiguous.items()
        for path in ("/adm/x", "/public/x", "/opt/x")
    ]
    cases += [
        Case("Bearer<TAB>key", request("/adm/x", f"Authorization: Bearer\t{a}"), status=200, owner="alice", absent=["Authorization"]),
        Case("bearer lower case", request("/adm/x", f"Authorization: bearer {a}"), status=200, owner="alice", absent=["Authorization"]),
        Case("Bearer two spaces", request("/adm/x", f"Authorization: Bearer  {a}"), status=200, owner="alice", absent=["Authorization"]),
        Case("Bearer<TAB>key on /public", request("/public/x", f"Authorization: Bearer\t{a}"), status=200, absent=["Authorization"]),
        Case("Bearer beats X-API-Key", request("/adm/x", f"X-API-Key: {a}", f"Authorization: Bearer {b}"), status=200, owner="bob", absent=["X-API-Key", "Authorization"]),
        Case("X_API_Key beside X-API-Key", request("/adm/x", f"X-API-Key: {a}", f"X_API_Key: {b}"), status=200, owner="alice", absent=["X-API-Key"]),
        Case("Basic passes", request("/adm/x", f"X-API-Key: {a}", basic), status=200, owner="alice", present={"Authorization": ["Basic dXNlcjpwYXNz"]}),
        # A key anywhere else is not read as a credential, and never forwarded either.
        Case("Authorization: Token key", request("/public/x", f"Authorization: Token {a}"), status=200, absent=["Authorization"]),
        Case("Bearer without a space", request("/public/x", f"Authorization: Bearer{a}"), status=200, absent=["Authorization"]),
        Case("key in a custom header", request("/public/x", f"X-Auth-Token: {a}"), status=200, absent=["X-Auth-Token"]),
        Case("key in a cookie", request("/public/x", f"Cookie: session=1; key={a}"), status=200, absent=["Cookie"]),
        Case("key in a custom header, keyed", request("/adm/x", f"X-API-Key: {b}", f"X-Token: {a}"), status=200, owner="bob", absent=["X-Token"]),
        Case("key on a public route", request("/public/x", f"X-API-Key: {a}"), status=200, absent=["X-API-Key"]),
        Case("key on an optional route", request("/opt/x", f"X-API-Key: {a}"), status=200, owner="alice"),
        Case("no key, required route", request("/adm/x"), refused=True, status=401),
        Case("no key, nested required route", request("/public/secret/x"), refused=True, status=401),
    ]
    return cases


async def test_credentials_are_unambiguous_and_never_forwarded(
    front, upstream: RecordingUpstream, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    gw, a, b = await front()
    assert await run_corpus(gw, upstream, credential_cases(a, b)) == []
    await check_logs(gw, caplog, capsys)


# -- header spoofing --------------------------------------------------------------------------


def spoofing_cases(a: str) -> list[Case]:
    cases = []
    for path, key, owner in (("/public/x", None, None), ("/adm/x", a, "alice")):
        keyed = (f"X-API-Key: {key}",) if key else ()
        ours = {"X-Forwarded-For": ["127.0.0.1"], "X-Forwarded-Proto": ["http"], "X-Forwarded-Host": ["gw.test"]}
        for name in FORWARDING:
            others = [n for n in FORWARDING if n not in ours]
            for spelled in spellings(name):
                cases.append(
                    Case(
                        f"{spelled} on {path}",
                        request(path, *keyed, f"{spelled}: {SPOOFED}"),
                        status=200,
                        owner=owner,
                        absent=others,
                        present=ours,
                    )
                )
        for name in OVERRIDE:
            for spelled in spellings(name):
                value = "/adm/x" if "URL" in name else "DELETE"
                cases.append(
                    Case(f"{spelled} on {path}", request(path, *keyed, f"{spelled}: {value}"), status=200, owner=owner, absent=OVERRIDE)
                )
        for spelled in ("X-Keystile-Owner", "x_keystile_owner", "X_KEYSTILE_KEY_ID", "X-Keystile-Scopes"):
            cases.append(Case(f"{spelled} on {path}", request(path, *keyed, f"{spelled}: mallory"), status=200, owner=owner))
        # Framing and hop-by-hop headers spelled with "_": an upstream that reads "_" as "-" would
        # take them for the real ones.
        for spelled in ("Transfer_Encoding", "Content_Length", "Keep_Alive", "Proxy_Connection", "Proxy_Authorization"):
            cases.append(
                Case(f"{spelled} on {path}", request(path, *keyed, f"{spelled}: chunked"), status=200, owner=owner, absent=[spelled])
            )
    return cases


async def test_spoofed_forwarding_override_and_identity_headers_never_reach_the_upstream(
    front, upstream: RecordingUpstream, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    gw, a, _ = await front()
    assert await run_corpus(gw, upstream, spoofing_cases(a)) == []
    await check_logs(gw, caplog, capsys)


async def test_override_headers_pass_when_configured(front, upstream: RecordingUpstream) -> None:
    gw, _, _ = await front(proxy={"pass_override_headers": True})
    await send(gw.port, request("/public/x", "X-HTTP-Method-Override: DELETE", "X-Original-URL: /adm/x"))
    seen = upstream.received[-1]
    assert seen.header("X-HTTP-Method-Override") == ["DELETE"]
    assert seen.header("X-Original-URL") == ["/adm/x"]


async def test_a_trusted_proxy_keeps_its_forwarding_headers(front, upstream: RecordingUpstream) -> None:
    gw, _, _ = await front(proxy={"trusted_proxies": ["127.0.0.0/8"]})
    await send(
        gw.port,
        request(
            "/public/x",
            "X-Forwarded-For: 198.51.100.7",
            "X-Forwarded-Port: 443",
            "X-Real-IP: 198.51.100.7",
            "Forwarded: for=198.51.100.7",
            "X_Forwarded_Port: 1",
            "X-HTTP-Method-Override: DELETE",
        ),
    )
    seen = upstream.received[-1]
    assert seen.header("X-Forwarded-For") == ["198.51.100.7, 127.0.0.1"]
    assert seen.header("X-Forwarded-Port") == ["443"]
    assert seen.header("X-Real-IP") == ["198.51.100.7"]
    assert seen.header("Forwarded") == ["for=198.51.100.7"]
    # A proxy never spells a header with "_"; an override is not the proxy's to pass either.
    assert seen.header("X_Forwarded_Port") == [] and seen.header("X-HTTP-Method-Override") == []


# -- the admin listener ---------------------------------------------------------------------


async def test_admin_listener_parser_errors_are_fixed_json_without_the_token(
    front, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    gw, a, _ = await front()
    h = "Host: gw.test\r\n"
    for data in (
        f"GET /v1/keys HTTP/1.1\r\n{h}Authorization: Bearer {ADMIN_TOKEN}\x01\r\n\r\n",
        f"GET /v1/keys HTTP/1.1\r\n{h}Authorization: Bearer {ADMIN_TOKEN}\n\r\n",
        f"POST /v1/keys/verify HTTP/1.1\r\n{h}X-API-Key: {a}\n\r\n",
        f"GET /v1/keys?t={ADMIN_TOKEN} HTTP/1.1 x\r\n{h}\r\n",
    ):
        raw = await send(gw.gateway.admin_port, data.encode())
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), raw
        assert json.loads(body) == MALFORMED
        assert ADMIN_TOKEN.encode() not in raw
        assert_no_key("admin response", [raw])
    gw.gateway.access_log.flush()
    text = logs_text(caplog, capsys.readouterr().err)
    assert ADMIN_TOKEN not in text
    assert_no_key("logs", [text])
