"""The console's server-side sessions: who a browser is signed in as, its CSRF token, and the one
secret waiting to be shown once.

Owns: ``Session`` and ``SessionStore`` (in this process's memory, bounded; idle and absolute
expiry read from an injected ``Clock``). Must not: decide who may do what (``access``), speak
HTTP, or keep a key secret longer than the redirect that shows it (``take_secret`` hands it out
once and forgets it; an unclaimed one is dropped after ``SECRET_HOLD`` seconds).

The browser holds only the session id (a random 256-bit token); everything else stays here, so
sign-out and expiry end a session at once.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final, Literal

from gateway.clock import SYSTEM, Clock

MAX_SESSIONS: Final = 10_000
SECRET_HOLD: Final = 60.0  # seconds a created secret waits for the page that shows it

Kind = Literal["anonymous", "operator", "user"]


@dataclass(frozen=True, slots=True)
class ShownOnce:
    """A secret just created (or rotated in) for ``key_id``, to show in the next page only."""

    key_id: str
    secret: str
    held_until: float


@dataclass(slots=True)
class Session:
    id: str
    kind: Kind
    # operator: "admin:<8 hex of the token's sha256>"; user: the principal's name; anonymous: "".
    subject: str
    csrf: str
    started: float
    last_seen: float
    shown_once: ShownOnce | None = field(default=None, repr=False)
    notice: str | None = None  # what the last action did, shown on the next page


class SessionStore:
    def __init__(self, idle: float, absolute: float, clock: Clock = SYSTEM) -> None:
        self.idle = idle
        self.absolute = absolute
        self._now = clock.monotonic
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def new(self, kind: Kind, subject: str = "") -> Session:
        now = self._now()
        s = Session(secrets.token_urlsafe(32), kind, subject, secrets.token_urlsafe(32), now, now)
        self._sessions[s.id] = s
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)  # the least recently seen goes first
        return s

    def get(self, session_id: str | None) -> Session | None:
        """The live session of that id (its idle time restarts), or None when unknown or expired."""
        if not session_id:
            return None
        s = self._sessions.get(session_id)
        if s is None:
            return None
        now = self._now()
        if now - s.last_seen > self.idle or now - s.started > self.absolute:
            del self._sessions[session_id]
            return None
        s.last_seen = now
        self._sessions.move_to_end(session_id)
        return s

    def end(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def hold_secret(self, s: Session, key_id: str, secret: str) -> None:
        s.shown_once = ShownOnce(key_id, secret, self._now() + SECRET_HOLD)

    def take_secret(self, s: Session) -> ShownOnce | None:
        """The waiting secret, once: the next call returns None."""
        shown, s.shown_once = s.shown_once, None
        if shown is None or self._now() > shown.held_until:
            return None
        return shown
