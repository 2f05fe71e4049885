"""Observability: JSON logging and the counters the admin listener publishes.

Owns: the log format and the in-process counters. Must not: import the store or the proxy. Nothing
logged here may contain a key, a digest or an admin token: callers pass key ids and display starts.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from typing import Any

import msgspec

_enc = msgspec.json.Encoder()


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if extra:
            data.update(extra)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return _enc.encode(data).decode()


def configure_logging(level: str, stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own access logger is replaced by ours.
    logging.getLogger("aiohttp.access").disabled = True


class Metrics:
    """Plain counters; the metrics endpoint renders them."""

    def __init__(self) -> None:
        self.started = time.time()
        self.requests: Counter[tuple[str, str]] = Counter()  # (route, status class)
        self.auth: Counter[str] = Counter()  # outcome
        self.upstream_errors: Counter[str] = Counter()  # kind

    def request(self, route: str, status: int, auth_outcome: str | None) -> None:
        self.requests[(route, f"{status // 100}xx")] += 1
        if auth_outcome is not None:
            self.auth[auth_outcome] += 1
