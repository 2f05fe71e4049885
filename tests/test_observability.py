from __future__ import annotations

import re

import pytest

from gateway.observability import Metrics


def samples(text: str, name: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf"^{name}(\{{.*?\}}) (\S+)$", text, re.M)}


@pytest.mark.parametrize("bucketwise", [True, False])
def test_tallies_reach_prometheus_like_direct_observations(bucketwise: bool) -> None:
    m = Metrics(["/api"])
    m._bucketwise = bucketwise
    for seconds in (0.0001, 0.0007, 0.003, 0.003, 2.0, 30.0):
        m.request("/api", 200, "ok", seconds, seconds / 2)
    m.request("/api", 401, "invalid", 0.0002, None)
    text = m.render().decode()
    buckets = samples(text, "keystile_request_duration_seconds_bucket")
    assert buckets['{le="0.0005",route="/api"}'] == 2
    assert buckets['{le="0.001",route="/api"}'] == 3
    assert buckets['{le="0.005",route="/api"}'] == 5
    assert buckets['{le="2.5",route="/api"}'] == 6
    assert buckets['{le="+Inf",route="/api"}'] == 7
    assert samples(text, "keystile_request_duration_seconds_count") == {'{route="/api"}': 7}
    assert samples(text, "keystile_upstream_duration_seconds_count") == {'{route="/api"}': 6}
    assert samples(text, "keystile_requests_total") == {
        '{route="/api",status_class="2xx"}': 6,
        '{route="/api",status_class="4xx"}': 1,
    }
    assert samples(text, "keystile_auth_total") == {'{outcome="ok"}': 6, '{outcome="invalid"}': 1}
    if bucketwise:  # exact sums only where tallies are added as they are
        total = samples(text, "keystile_request_duration_seconds_sum")['{route="/api"}']
        assert total == pytest.approx(0.0001 + 0.0007 + 0.003 + 0.003 + 2.0 + 30.0 + 0.0002)
    # A second render adds nothing: tallies were moved, not copied.
    assert samples(m.render().decode(), "keystile_request_duration_seconds_count") == {'{route="/api"}': 7}
