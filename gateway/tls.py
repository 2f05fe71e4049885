"""TLS for the listeners: one server context per listener, its certificate re-read on reload.

Owns: building a server ``ssl.SSLContext`` with modern settings only (TLS 1.2 with ECDHE and AEAD
ciphers, or TLS 1.3; no compression, no renegotiation, server cipher order) and loading a
certificate chain and key into it. A context is kept for the life of its listener: loading a new
chain into it (on SIGHUP) serves the new certificate on every new connection while open ones go
on with the one they negotiated. Must not: open sockets or read any other file.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable

from gateway.config import Config, ConfigError, TLSConfig

# TLS 1.2 suites: forward secrecy and AEAD only (TLS 1.3's own suites are all of that kind).
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
LISTENERS = ("proxy", "admin")


def files(tls: TLSConfig, listener: str) -> tuple[str, str] | None:
    """The (certificate, key) files configured for ``listener``; None when it speaks plain HTTP."""
    cert, key = getattr(tls, f"{listener}_cert_file"), getattr(tls, f"{listener}_key_file")
    return (cert, key) if cert else None


def _load(ctx: ssl.SSLContext, listener: str, cert: str, key: str) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e.args[-1] if e.args else e)
        raise ConfigError([f"tls.{listener}_cert_file: cannot load {cert} with {key}: {reason}"]) from None


def server_context(tls: TLSConfig, listener: str) -> ssl.SSLContext | None:
    """A new server context for ``listener`` with its certificate loaded, or None (plain HTTP).
    Raises ConfigError naming the field when the files cannot be loaded."""
    pair = files(tls, listener)
    if pair is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["http/1.1"])
    _load(ctx, listener, *pair)
    return ctx


class ListenerTLS:
    """The contexts of the listeners that speak TLS, kept so a reload can swap certificates."""

    def __init__(self, cfg: Config, listeners: Iterable[str] = LISTENERS) -> None:
        self.contexts = {name: server_context(cfg.tls, name) for name in listeners}

    def context(self, listener: str) -> ssl.SSLContext | None:
        return self.contexts.get(listener)

    def reload(self, cfg: Config) -> None:
        """Load the certificates ``cfg`` names into the running contexts. Every file is read
        before any context changes, so a bad file changes nothing (ConfigError names it). Turning
        TLS on or off for a listener needs a restart and is left to the caller to report."""
        staged = []
        for name, ctx in self.contexts.items():
            pair = files(cfg.tls, name)
            if ctx is None or pair is None:
                continue
            server_context(cfg.tls, name)  # reads and checks the pair without touching ctx
            staged.append((ctx, name, pair))
        for ctx, name, pair in staged:
            _load(ctx, name, *pair)
