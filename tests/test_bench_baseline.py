"""benchmarks.run --baseline: every Keystile scenario gets a twin on the baseline's code, measured
right after it, and the report judges each pair's CPU per request."""

from __future__ import annotations

from benchmarks import report
from benchmarks.run import Outcome, baseline_twins, measure_order, scenarios


def test_each_keystile_scenario_is_followed_by_its_baseline_twin() -> None:
    chosen = [s for s in scenarios([1000]) if s.name in ("nginx", "valid", "auth_none")]
    twins = baseline_twins(chosen, "main")
    names = [s.name for s in twins]
    assert names == ["nginx", "valid", "valid@base", "auth_none", "auth_none@base"]
    base = next(s for s in twins if s.name == "valid@base")
    assert base.server.endswith("@base") and "baseline main" in base.what
    order = [o.scenario.name for o in measure_order([Outcome(s) for s in reversed(twins)])]
    assert order.index("valid@base") == order.index("valid") + 1
    assert order.index("auth_none@base") == order.index("auth_none") + 1


def _outcome(name: str, cpu: list[float]) -> dict[str, object]:
    runs = [{"cpu_us": c, "rps": 1.0} for c in cpu]
    return {"name": name, "status": "ok", "runs": runs, "median": {"cpu_us": sorted(cpu)[len(cpu) // 2]},
            "keys": 1000}


def test_the_report_judges_each_pair_round_by_round() -> None:
    rows = report.targets([_outcome("valid", [50, 52, 70]), _outcome("valid@base", [49, 48, 68])])
    (row,) = [r for r in rows if r["target"].startswith("valid: CPU")]
    assert 1.02 < row["value"] < 1.05 and row["met"]
    rows = report.targets([_outcome("valid", [56, 57, 58]), _outcome("valid@base", [50, 50, 50])])
    (row,) = [r for r in rows if r["target"].startswith("valid: CPU")]
    assert not row["met"]
