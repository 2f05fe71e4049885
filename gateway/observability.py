"""Observability: JSON logging and the counters the admin listener publishes.

Owns: the log format and the in-process counters. Must not: import the store or the proxy. Nothing
logged here may contain a key, a digest or an admin token: callers pass key ids and display starts.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from bisect import bisect_left
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
    """Every line the process writes to stderr becomes one JSON object: its own logs, every
    third-party logger (they propagate to the root), Python warnings (``py.warnings``) and
    uncaught exceptions in any thread."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own access logger is replaced by ours.
    logging.getLogger("aiohttp.access").disabled = True
    logging.captureWarnings(True)
    crash = logging.getLogger("keystile.crash")

    def excepthook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        crash.critical("uncaught %s", kind.__name__, exc_info=(kind, exc, tb))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None:
            crash.error(
                "uncaught %s in thread %s",
                args.exc_type.__name__,
                args.thread.name if args.thread else "?",
                exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
            )

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook


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

    A request only adds to plain in-process tallies (no locks, no label lookups); ``sync()`` moves
    them into prometheus-client's counters and histograms. It runs before every scrape and once a
    second (``Gateway`` does that), so with ``--workers`` — prometheus-client's multi-process mode,
    the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` — every worker's files are at most a second
    behind. Histogram tallies are added bucket by bucket through the client's per-bucket values;
    if a client version lacks them, ``sync`` falls back to ``observe`` per tallied sample.
    State that already lives in the pieces (cache tiers, breaker, usage buffer) is read at scrape
    time by a collector. Label values are route prefixes, status classes and fixed outcome names:
    never a key, a digest or request input.
    """

    # "throttled": refused with 429 before any lookup (gateway.throttle).
    OUTCOMES: Final = (
        "ok",
        "missing",
        "invalid",
        "expired",
        "insufficient_scope",
        "unavailable",
        "throttled",
    )

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
        # Tallies since the last sync.
        self._req_tally: dict[tuple[str, int], int] = {}
        self._auth_tally: dict[str, int] = dict.fromkeys(self.OUTCOMES, 0)
        self._dur_tally: dict[str, _Tally] = {}
        self._up_tally: dict[str, _Tally] = {}
        # Whether histogram children expose per-bucket values: learnt from the first real child
        # (a probe child would show in /metrics, and removing one warns in multi-process mode).
        self._bucketwise: bool | None = None

    def add_routes(self, routes: Iterable[str]) -> None:
        """Kept for callers that announce routes; label children are created on first use."""

    def request(
        self, route: str, status: int, outcome: str | None, seconds: float, upstream: float | None
    ) -> None:
        key = (route, status // 100)
        tally = self._req_tally
        tally[key] = tally.get(key, 0) + 1
        if outcome is not None:
            self._auth_tally[outcome] += 1
        dur = self._dur_tally.get(route)
        if dur is None:
            dur = self._dur_tally[route] = _Tally()
        dur.add(seconds)
        if upstream is not None:
            up = self._up_tally.get(route)
            if up is None:
                up = self._up_tally[route] = _Tally()
            up.add(upstream)

    def sync(self) -> None:
        """Move the tallies into the prometheus-client metrics."""
        tally, self._req_tally = self._req_tally, {}
        for (route, cls), n in tally.items():
            self._requests.labels(route, f"{cls}xx").inc(n)
        for outcome, n in self._auth_tally.items():
            if n:
                self._auth.labels(outcome).inc(n)
                self._auth_tally[outcome] = 0
        for hist, tallies in ((self._duration, self._dur_tally), (self._upstream, self._up_tally)):
            for route, t in tallies.items():
                if t.count:
                    self._flush_tally(hist.labels(route), t)

    def _flush_tally(self, child: Any, t: _Tally) -> None:
        if self._bucketwise is None:
            self._bucketwise = hasattr(child, "_buckets") and hasattr(child, "_sum")
        if self._bucketwise:
            for i, n in enumerate(t.buckets):
                if n:
                    child._buckets[i].inc(n)
            child._sum.inc(t.total)
        else:  # one observation per tallied sample, at its bucket's bound
            for i, n in enumerate(t.buckets):
                for _ in range(n):
                    child.observe(_BUCKETS[i] if i < len(_BUCKETS) else _BUCKETS[-1] * 2)
        t.reset()

    def upstream_error(self, kind: str) -> None:
        self._upstream_errors.labels(kind).inc()

    def add_state(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Publish values read at scrape time (tier counters, breaker, usage buffer)."""
        collector = _StateCollector(collect)
        self._state.append(collector)
        self.registry.register(collector)

    def render(self) -> bytes:
        self.sync()
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        # Workers: request metrics summed over every worker's files; state from this worker.
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self._multiprocess_dir)  # type: ignore[no-untyped-call]
        for collector in self._state:
            merged.register(collector)
        return generate_latest(merged)


class _Tally:
    """Per-route latency tally: counts per bucket (last one +Inf) and the sum."""

    __slots__ = ("buckets", "count", "total")

    def __init__(self) -> None:
        self.buckets = [0] * (len(_BUCKETS) + 1)
        self.count = 0
        self.total = 0.0

    def add(self, value: float) -> None:
        # bisect_left: the first bound >= value, as a Prometheus bucket is "value <= le".
        self.buckets[bisect_left(_BUCKETS, value)] += 1
        self.count += 1
        self.total += value

    def reset(self) -> None:
        self.buckets = [0] * (len(_BUCKETS) + 1)
        self.count = 0
        self.total = 0.0


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
