"""Request-target normalization: the one path that is both matched and forwarded.

Owns: turning a raw request target into decoded segments (for route matching) and the canonical
encoded path sent upstream, so the routing decision is made on exactly what the upstream will see.
Must not: know about routes, keys or aiohttp.

Rules: only origin-form targets (``/path?query``); percent-escapes must be well formed and decode to
UTF-8; dot segments (also ``%2e``-encoded) are resolved, and one that climbs above the root is
refused; repeated slashes collapse; an encoded ``/`` or ``\\``, a NUL or a control character inside
a segment is refused, because upstreams disagree on what it means. Each segment is re-encoded
canonically (RFC 3986 pchar), so the upstream decodes exactly the segments Keystile matched.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote_to_bytes

_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile("[\x00-\x1f\x7f]")
_PCHAR_SAFE = "!$&'()*+,;=:@"


class BadPath(ValueError):
    """The request target cannot be forwarded safely; the message says why (safe to show)."""


class Target:
    """A normalized request target."""

    __slots__ = ("query", "segments", "trailing_slash")

    def __init__(self, segments: list[str], trailing_slash: bool, query: str) -> None:
        self.segments = segments
        self.trailing_slash = trailing_slash
        self.query = query

    @property
    def path(self) -> str:
        """The decoded path, as routes are matched against it."""
        if not self.segments:
            return "/"
        return "/" + "/".join(self.segments) + ("/" if self.trailing_slash else "")

    def forward_path(self, skip: int = 0) -> str:
        """The canonical encoded path, without the first ``skip`` segments (a stripped prefix)."""
        rest = self.segments[skip:]
        if not rest:
            return "/"
        encoded = "/".join(quote(s, safe=_PCHAR_SAFE) for s in rest)
        return "/" + encoded + ("/" if self.trailing_slash else "")


def parse_target(raw: str) -> Target:
    """Normalize a raw request target; raises BadPath."""
    if not raw.startswith("/"):
        raise BadPath("request target must be a path (absolute-form and authority-form are refused)")
    if "#" in raw:
        raise BadPath("request target must not carry a fragment")
    path, _, query = raw.partition("?")
    if "%" in path and _BAD_ESCAPE.search(path):
        raise BadPath("malformed percent-escape in path")
    segments: list[str] = []
    raw_segments = path.split("/")[1:]
    trailing = False
    for i, seg in enumerate(raw_segments):
        last = i == len(raw_segments) - 1
        if "%" in seg:
            try:
                decoded = unquote_to_bytes(seg).decode("utf-8")
            except UnicodeDecodeError:
                raise BadPath("path is not valid UTF-8 after decoding") from None
        else:
            decoded = seg
        if "/" in decoded or "\\" in decoded:
            raise BadPath("encoded slash or backslash in path")
        if _CONTROL.search(decoded):
            raise BadPath("control character in path")
        if decoded in ("", "."):
            trailing = last
            continue
        if decoded == "..":
            if not segments:
                raise BadPath("path climbs above the root")
            segments.pop()
            trailing = last
            continue
        segments.append(decoded)
        trailing = False
    return Target(segments, trailing, query)
