"""The key-management console: server-rendered pages on their own listener (``[console]``).

Owns: the console package. ``server`` (the application, its listener, security headers, sessions,
sign-in, CSRF), ``access`` (who the viewer is and ``may_manage``), ``sessions`` (server-side
sessions and the show-once slot), ``pages`` (the API Keys page and its dialogs), ``actions`` (the
writes, through ``gateway.lifecycle``), ``templates/`` and ``static/`` (our own CSS and a small
script; no CDN, no build step). Must not: import the proxy's request path or the admin API's
HTTP layer, or hold key policy.
"""

from __future__ import annotations

from gateway.console.server import ConsoleDeps, ConsoleListener

__all__ = ["ConsoleDeps", "ConsoleListener"]
