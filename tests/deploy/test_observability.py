"""The Grafana dashboard and Prometheus rules in deploy/observability/ name only metrics that exist.

A running gateway (real store, real Redis, a live and a dead upstream) is driven through every
outcome the files chart, then its /metrics is read: a metric renamed in code and not in the files
fails here instead of silently charting nothing.
"""

from __future__ import annotations

import json
import re
from typing import Any

import aiohttp
import yaml

from tests.deploy._files import DEPLOY
from tests.servers import RedisServer, free_port
from tests.upstream import RecordingUpstream

OBS = DEPLOY / "observability"
DASHBOARD = OBS / "grafana-dashboard.json"
RULES = OBS / "prometheus-rules.yaml"
_METRIC = re.compile(r"\bkeystile_[a-z_]+\b")


def dashboard_exprs() -> list[str]:
    data = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in data["panels"] for t in p["targets"]]


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    return [r for g in data["groups"] for r in g["rules"]]


def exposed(text: str) -> set[str]:
    """Metric names as Prometheus stores them (with _total, _bucket, ... suffixes)."""
    return {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines() if line and line[0] != "#"}


def missing(exprs: list[str], names: set[str]) -> set[str]:
    return {m for e in exprs for m in _METRIC.findall(e)} - names


def test_the_dashboard_charts_what_the_issue_lists() -> None:
    data = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"].lower() for p in data["panels"])
    for topic in (
        "requests",
        "latency",
        "authentication",
        "cache",
        "invalidation lag",
        "breaker",
        "usage flush",
        "upstream errors",
    ):
        assert topic in titles, topic
    assert {p["id"] for p in data["panels"]} == set(range(1, len(data["panels"]) + 1))
    for p in data["panels"]:
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]


def test_every_rule_is_complete() -> None:
    seen = set()
    for r in rules():
        assert r["alert"] not in seen
        seen.add(r["alert"])
        assert r["expr"].strip() and _METRIC.search(r["expr"]), r["alert"]
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        assert r["annotations"]["summary"], r["alert"]
    assert "KeystileInvalidationLag" in seen


def test_the_check_itself_notices_an_unknown_metric() -> None:
    assert missing(["rate(keystile_no_such_thing_total[5m])"], {"keystile_requests_total"}) == {
        "keystile_no_such_thing_total"
    }


async def test_every_metric_they_name_is_in_metrics(
    keystile, upstream: RecordingUpstream, private_redis: RedisServer
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gw = await keystile(
        redis={"url": private_redis.url},
        routes=[{"prefix": "/dead", "upstream": dead}, {"prefix": "/", "upstream": upstream.url}],
    )
    key = await gw.key()
    async with aiohttp.ClientSession() as s:
        for path, headers in (("/x", {"X-API-Key": key}), ("/x", {}), ("/dead/x", {"X-API-Key": key})):
            async with s.get(gw.url + path, headers=headers) as r:
                await r.read()
        async with s.get(gw.admin_url + "/metrics") as r:
            assert r.status == 200
            names = exposed(await r.text())
    assert not missing(dashboard_exprs(), names)
    assert not missing([r["expr"] for r in rules()], names)
    assert "keystile_invalidation_lag_seconds" in names
