"""Request-target normalization: the one path that is both matched and forwarded.

Owns: turning a raw request target into decoded segments (for route matching) and the canonical
encoded path sent upstream, so the routing decision is made on exactly what the upstream will see.
Must not: know about routes, keys or aiohttp.

Rules: only origin-form targets (``/path?query``); percent-escapes must be well formed and decode to
UTF-8; dot segments (also ``%2e``-encoded) are resolved, and one that climbs above the root is
refused; repeated slashes collapse; an encoded ``/`` or ``\\``, a NUL or a control character inside
a segment is refused, because upstreams disagree on what it means. Each segment is re-encoded
canonically (RFC 3986 pchar), so the upstream decodes exactly the segments Keystile matched.

Path parameters (``;``): Tomcat, Jetty and Spring strip ``;...`` from each segment before routing,
so ``/public/..;/admin`` is their ``/admin`` and ``/public/secret;x/y`` their ``/public/secret/y``,
while a plain reading sees segments named ``..;`` and ``secret;x``. By default a ``;`` in a segment,
raw or ``%3B``-encoded, is refused. With ``allow_params`` a segment is matched by its part before
the first ``;`` (so ``..;x`` is ``..`` and ``.;x`` is ``.``) and forwarded with its parameters; a
dot segment's parameters go with it. Either way no common upstream reads a path deeper or
elsewhere than the route Keystile chose for it.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote_to_bytes

_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile("[\x00-\x1f\x7f]")
_PCHAR_SAFE = "!$&'()*+,;=:@"
# A path of plain segments: no escape, no dot segment, no empty segment, no ';', only characters
# that canonical encoding (quote with _PCHAR_SAFE) leaves as they are. Most requests' paths are;
# such a path is its own decoded and canonical form, so nothing is decoded or re-encoded.
_PLAIN = re.compile(r"/|(?:/(?!\.\.?(?:/|$))[A-Za-z0-9\-._~!$&'()*+,=:@]+)+/?")
_NO_PARAMS = "';' path parameters are not accepted (proxy.allow_path_parameters)"


class BadPath(ValueError):
    """The request target cannot be forwarded safely; the message says why (safe to show)."""


class Target:
    """A normalized request target. ``params``: each segment's path parameters (the text after its
    first ``;``, None for none), only when parameters are allowed and present."""

    __slots__ = ("_plain", "params", "query", "segments", "trailing_slash")

    def __init__(
        self,
        segments: list[str],
        trailing_slash: bool,
        query: str,
        params: list[str | None] | None = None,
        plain: str | None = None,
    ) -> None:
        self.segments = segments
        self.trailing_slash = trailing_slash
        self.query = query
        self.params = params
        self._plain = plain  # the raw path, when it is already decoded and canonical (_PLAIN)

    @property
    def path(self) -> str:
        """The decoded path, as routes are matched against it."""
        if self._plain is not None:
            return self._plain
        if not self.segments:
            return "/"
        return "/" + "/".join(self.segments) + ("/" if self.trailing_slash else "")

    def forward_path(self, skip: int = 0) -> str:
        """The canonical encoded path, without the first ``skip`` segments (a stripped prefix)."""
        rest = self.segments[skip:]
        if not rest:
            return "/"
        if self._plain is not None:
            if not skip:
                return self._plain
            return "/" + "/".join(rest) + ("/" if self.trailing_slash else "")
        if self.params is None:
            encoded = "/".join(quote(s, safe=_PCHAR_SAFE) for s in rest)
        else:
            encoded = "/".join(
                quote(s, safe=_PCHAR_SAFE) + ("" if p is None else ";" + quote(p, safe=_PCHAR_SAFE))
                for s, p in zip(rest, self.params[skip:], strict=True)
            )
        return "/" + encoded + ("/" if self.trailing_slash else "")


def parse_target(raw: str, allow_params: bool = False) -> Target:
    """Normalize a raw request target; raises BadPath. ``allow_params``: accept ``;`` path
    parameters (see the module docstring), else refuse them."""
    if not raw.startswith("/"):
        raise BadPath("request target must be a path (absolute-form and authority-form are refused)")
    if "#" in raw:
        raise BadPath("request target must not carry a fragment")
    path, _, query = raw.partition("?")
    if _PLAIN.fullmatch(path):
        trailing = path.endswith("/")
        segments = (path[1:-1] if trailing else path[1:]).split("/") if len(path) > 1 else []
        return Target(segments, trailing, query, None, path)
    return parse_general(path, query, allow_params)


def parse_general(path: str, query: str, allow_params: bool = False) -> Target:
    """``parse_target`` for any path: decode, check and resolve segment by segment. (Plain paths
    take a shortcut with the same result; tests check the two agree.)"""
    if "%" in path and _BAD_ESCAPE.search(path):
        raise BadPath("malformed percent-escape in path")
    if ";" in path and not allow_params:
        raise BadPath(_NO_PARAMS)
    segments: list[str] = []
    params: list[str | None] | None = None
    raw_segments = path.split("/")[1:]
    trailing = False
    for i, seg in enumerate(raw_segments):
        last = i == len(raw_segments) - 1
        if "%" in seg:
            try:
                decoded = unquote_to_bytes(seg).decode("utf-8")
            except UnicodeDecodeError:
                raise BadPath("path is not valid UTF-8 after decoding") from None
            if ";" in decoded and not allow_params:  # %3B
                raise BadPath(_NO_PARAMS)
        else:
            decoded = seg
        if "/" in decoded or "\\" in decoded:
            raise BadPath("encoded slash or backslash in path")
        if _CONTROL.search(decoded):
            raise BadPath("control character in path")
        param = None
        if allow_params and ";" in decoded:
            decoded, _, param = decoded.partition(";")
            if params is None:
                params = [None] * len(segments)
        if decoded in ("", "."):
            trailing = last
            continue
        if decoded == "..":
            if not segments:
                raise BadPath("path climbs above the root")
            segments.pop()
            if params is not None:
                params.pop()
            trailing = last
            continue
        segments.append(decoded)
        if params is not None:
            params.append(param)
        trailing = False
    return Target(segments, trailing, query, params)
