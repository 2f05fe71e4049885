"""HTTP/1.1 serialisation for the exchange: the request head, the chunked body, the client's head.

Owns: ``serialize_head`` (the request line and header block, refusing CR, LF and NUL), the
chunked framing of a body received whole, and ``ResponseHeads``: the client's status line tail
and header block from an upstream's parsed response, with the caches of what upstreams send.
Must not: decide which headers pass (``gateway.proxy.headers`` says which are hop-by-hop) or touch
a socket.
"""

from __future__ import annotations

from typing import Final

from gateway import wire
from gateway.proxy.headers import HOP_BY_HOP, UnsafeHeader, connection_listed

_LAST_CHUNK: Final = b"0\r\n\r\n"


def serialize_head(
    method: str, target: str, headers: list[tuple[str, str]], chunked: bool, checked: str = ""
) -> bytes:
    """The request line and header block, in the given order; refuses CR, LF and NUL anywhere.

    ``checked``: header lines (each ending CRLF) already known to be clean, appended last.
    """
    head = method + " " + target + " HTTP/1.1\r\n"
    if headers:
        head += "\r\n".join(map(": ".join, headers)) + "\r\n"
    # Exactly one CR and one LF per line we wrote: any other one came from a name or value.
    n = len(headers) + 1
    if head.count("\n") != n or head.count("\r") != n or "\x00" in head or " " in target:
        raise UnsafeHeader("CR, LF or NUL in the request line or a header, or a space in the target")
    head += checked + ("Transfer-Encoding: chunked\r\n\r\n" if chunked else "\r\n")
    # Header text came from bytes decoded as UTF-8 with surrogateescape: this restores them.
    return head.encode("utf-8", "surrogateescape")


def chunked_body(body: bytes) -> bytes:
    """A whole body as one chunk and the last chunk (only the last one when it is empty)."""
    return (b"%x\r\n%b\r\n" % (len(body), body) + _LAST_CHUNK) if body else _LAST_CHUNK


# What the client's head does with a response header (by name; see ResponseHeads._name).
_KEEP_H, _DROP_H, _CONN_H, _DATE_H, _LENGTH_H = range(5)
# Each cache below stops growing at this size, against an upstream sending junk.
_CACHE_MAX: Final = 4096
# Control characters: llhttp lets them through in a reason phrase, and they are never relayed.
_CTL: Final = bytes(range(32)) + b"\x7f"


class ResponseHeads:
    """The client's status line and headers from an upstream's response, and the caches of what
    upstreams send (each bounded by ``_CACHE_MAX``; past it, answers are computed per call). One
    per process (``RESPONSE_HEADS``), shared by every config generation: nothing in it depends on
    the config."""

    __slots__ = ("_listed", "_names", "_reasons", "_tails")

    def __init__(self) -> None:
        # reason phrase as received -> as sent to the client; None lets aiohttp use the standard one
        self._reasons: dict[bytes, str | None] = {}
        # Connection header value -> the header names it lists that are not hop-by-hop anyway
        # (usually none: "keep-alive", "close")
        self._listed: dict[bytes, frozenset[str]] = {}
        # header name as received -> (lower-case name, what the client's head does with it)
        self._names: dict[bytes, tuple[str, int]] = {}
        # (status, reason phrase as received) -> the status line after the version
        self._tails: dict[tuple[int, bytes], bytes] = {}

    def reason(self, raw: bytes) -> str | None:
        """The reason phrase for the client: ``raw`` when it is clean, else None (standard)."""
        try:
            return self._reasons[raw]
        except KeyError:
            pass
        ok = raw and len(raw.translate(None, _CTL)) == len(raw)
        reason = raw.decode("utf-8", "surrogateescape") if ok else None
        if len(self._reasons) < _CACHE_MAX:
            self._reasons[raw] = reason
        return reason

    def status_tail(self, status: int, raw_reason: bytes) -> bytes:
        """The status line after the version, as sent to the client."""
        tail = self._tails.get((status, raw_reason))
        if tail is None:
            tail = wire.status_tail(status, self.reason(raw_reason))
            if len(self._tails) < _CACHE_MAX:
                self._tails[(status, raw_reason)] = tail
        return tail

    def _listed_by(self, raw: bytes) -> frozenset[str]:
        got = self._listed.get(raw)
        if got is None:
            got = connection_listed(raw.decode("latin-1"))
            if len(self._listed) < _CACHE_MAX:
                self._listed[raw] = got
        return got

    def _name(self, raw: bytes) -> tuple[str, int]:
        low = raw.decode("latin-1").lower()  # llhttp allows only token characters
        kind = (
            _CONN_H
            if low == "connection"
            else _DROP_H
            if low in HOP_BY_HOP
            else _DATE_H
            if low == "date"
            else _LENGTH_H
            if low == "content-length"
            else _KEEP_H
        )
        got = (low, kind)
        if len(self._names) < _CACHE_MAX:
            self._names[raw] = got
        return got

    def client_head(
        self, raw: list[tuple[bytes, bytes]], status: int, body: bytes, head: bool
    ) -> tuple[bytes, bool]:
        """The header block for a complete upstream response and whether it carries ``Date``.

        Like ``client_headers`` (order and duplicates kept, hop-by-hop and Connection-listed
        headers dropped), with the framing aiohttp would apply: no Content-Length on 1xx/204, one
        added from the body when the upstream framed it otherwise (chunked, or up to close)
        unless the status or a HEAD request forbids a body. Raises UnsafeHeader on CR, LF or NUL
        inside a name or value.
        """
        names_seen = self._names
        lines: list[bytes] = []
        names: list[str] = []
        listed: frozenset[str] = frozenset()
        has_date = has_length = False
        no_body_status = status < 200 or status == 204
        for rname, rvalue in raw:
            low, kind = names_seen.get(rname) or self._name(rname)
            if kind:
                if kind == _DROP_H:
                    continue
                if kind == _CONN_H:
                    listed |= self._listed_by(rvalue)
                    continue
                if kind == _DATE_H:
                    has_date = True
                elif no_body_status:
                    continue  # Content-Length on a response that cannot have a body
                else:
                    has_length = True
            lines.append(rname + b": " + rvalue + b"\r\n")
            names.append(low)
        if listed:
            lines = [line for line, name in zip(lines, names, strict=True) if name not in listed]
        if not has_length and not no_body_status and status != 304 and not head:
            lines.append(b"Content-Length: %d\r\n" % len(body))
        block = b"".join(lines)
        n = len(lines)
        if block.count(b"\n") != n or block.count(b"\r") != n or b"\x00" in block:
            raise UnsafeHeader("CR, LF or NUL in a response header")
        return block, has_date

    def client_headers(self, raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
        """The upstream's response headers for the client: order and duplicates kept, hop-by-hop
        headers and those its ``Connection`` header names dropped."""
        names_seen = self._names
        out: list[tuple[str, str]] = []
        listed: frozenset[str] = frozenset()
        for rname, rvalue in raw:
            _, kind = names_seen.get(rname) or self._name(rname)
            if kind == _DROP_H:
                continue
            if kind == _CONN_H:
                listed |= self._listed_by(rvalue)
                continue
            out.append((rname.decode("latin-1"), rvalue.decode("utf-8", "surrogateescape")))
        if listed:
            out = [p for p in out if p[0].lower() not in listed]
        return out


RESPONSE_HEADS: Final = ResponseHeads()
