"""Observability: JSON logging and the counters the admin listener publishes.

Owns: the log format and the in-process counters. Must not: import the store or the proxy. Nothing
logged here may contain a key, a digest or an admin token: callers pass key ids and display starts.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, Final, TextIO

import msgspec
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

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


class AccessLog:
    """One JSON line per request, written in batches: a request costs one encode and an append.

    Lines have the application logs' shape (``time``, ``level``, ``logger``, ``message`` plus the
    request fields) and go to stderr (resolved at write time) or the given stream. The buffer is
    written every ``interval`` seconds, when it passes ``max_bytes``, and on ``flush()``.
    """

    def __init__(
        self, stream: TextIO | None = None, interval: float = 0.2, max_bytes: int = 64 * 1024
    ) -> None:
        self._stream = stream
        self._interval = interval
        self._max = max_bytes
        self._lines: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None

    def write(self, fields: dict[str, Any]) -> None:
        line = _enc.encode(
            {
                "time": round(time.time(), 6),
                "level": "info",
                "logger": "keystile.access",
                "message": "request",
                **fields,
            }
        )
        self._lines.append(line)
        self._size += len(line) + 1
        if self._size >= self._max:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        data = b"\n".join(self._lines) + b"\n"
        self._lines.clear()
        self._size = 0
        stream = self._stream or sys.stderr
        try:
            stream.write(data.decode())
            stream.flush()
        except (OSError, ValueError):  # a closed or broken log stream must not break requests
            pass


class Metrics:
    """Prometheus metrics for one gateway, in a registry of its own.

    Request-path metrics are prometheus-client counters and histograms (multi-process safe when
    ``PROMETHEUS_MULTIPROC_DIR`` is set by the supervisor); label children are bound once per
    route, so a request costs dictionary lookups, not label parsing. State that already lives in
    the pieces (cache tiers, breaker, usage buffer) is read at scrape time by a collector.
    Label values are route prefixes, status classes and fixed outcome names: never a key, a digest
    or request input.
    """

    OUTCOMES: Final = ("ok", "missing", "invalid", "expired", "insufficient_scope", "unavailable")

    def __init__(self, routes: Iterable[str], multiprocess_dir: str | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._multiprocess_dir = multiprocess_dir
        self._state: list[Collector] = []
        self._requests = Counter(
            "keystile_requests",
            "Requests answered by the proxy listener.",
            ["route", "status_class"],
            registry=self.registry,
        )
        self._auth = Counter("keystile_auth", "Authentication outcomes.", ["outcome"], registry=self.registry)
        self._duration = Histogram(
            "keystile_request_duration_seconds",
            "Whole request time in the proxy.",
            ["route"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self._upstream = Histogram(
            "keystile_upstream_duration_seconds",
            "Time spent on the upstream leg.",
            ["route"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self._upstream_errors = Counter(
            "keystile_upstream_errors", "Upstream failures by kind.", ["kind"], registry=self.registry
        )
        self._req_children: dict[tuple[str, int], Any] = {}
        self._dur_children: dict[str, Any] = {}
        self._up_children: dict[str, Any] = {}
        self._auth_children = {o: self._auth.labels(o) for o in self.OUTCOMES}
        for route in ("-", "whoami", *routes):
            self._bind(route)

    def _bind(self, route: str) -> None:
        for cls in range(1, 6):
            self._req_children[(route, cls)] = self._requests.labels(route, f"{cls}xx")
        self._dur_children[route] = self._duration.labels(route)
        self._up_children[route] = self._upstream.labels(route)

    def add_routes(self, routes: Iterable[str]) -> None:
        for route in routes:
            if route not in self._dur_children:
                self._bind(route)

    def request(
        self, route: str, status: int, outcome: str | None, seconds: float, upstream: float | None
    ) -> None:
        child = self._req_children.get((route, status // 100))
        if child is None:
            self._bind(route)
            child = self._req_children[(route, status // 100)]
        child.inc()
        if outcome is not None:
            self._auth_children[outcome].inc()
        self._dur_children[route].observe(seconds)
        if upstream is not None:
            self._up_children[route].observe(upstream)

    def upstream_error(self, kind: str) -> None:
        self._upstream_errors.labels(kind).inc()

    def add_state(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Publish values read at scrape time (tier counters, breaker, usage buffer)."""
        collector = _StateCollector(collect)
        self._state.append(collector)
        self.registry.register(collector)

    def render(self) -> bytes:
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        # Workers: request metrics summed over every worker's files; state from this worker.
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self._multiprocess_dir)  # type: ignore[no-untyped-call]
        for collector in self._state:
            merged.register(collector)
        return generate_latest(merged)


_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _StateCollector(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


def counter(name: str, doc: str, samples: Iterable[tuple[dict[str, str], float]]) -> Metric:
    fam = CounterMetricFamily(name, doc, labels=sorted({k for labels, _ in samples for k in labels}) or None)
    for labels, value in samples:
        fam.add_metric([labels[k] for k in sorted(labels)], value)
    return fam


def gauge(name: str, doc: str, value: float) -> Metric:
    return GaugeMetricFamily(name, doc, value=value)
