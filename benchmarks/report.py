"""Turning a run into a markdown table, JSON and a PNG chart in ``benchmarks/results/``."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.tools import describe

METRICS = ("rps", "p50_ms", "p99_ms", "cpu_us")


def build(
    *,
    outcomes: list[dict[str, Any]],
    reference: str,
    machine: dict[str, Any],
    settings: dict[str, Any],
    micro: dict[str, Any] | None,
) -> dict[str, Any]:
    ref_o = next((o for o in outcomes if o["name"] == reference and o["median"]), None)
    for o in outcomes:
        o["ratio_to_" + reference] = _ratios(o, ref_o) if ref_o is not None else {}
    return {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "reference": reference,
        "machine": machine,
        "settings": settings,
        "scenarios": outcomes,
        "targets": targets(outcomes),
        "micro": micro,
    }


def _paired(a: dict[str, Any] | None, b: dict[str, Any] | None, metric: str) -> float | None:
    """Median over rounds of a's value / b's value in the same round (ratio of medians when the
    rounds do not pair up); None when either is missing."""
    if not a or not b or not a["median"] or not b["median"]:
        return None
    if len(a["runs"]) == len(b["runs"]):
        rs = [x[metric] / y[metric] for x, y in zip(a["runs"], b["runs"], strict=True) if y.get(metric)]
        if rs:
            return statistics.median(rs)
    return a["median"][metric] / b["median"][metric] if b["median"].get(metric) else None


def targets(outcomes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The performance targets of the benchmark issue, each from ratios measured in this run."""
    by = {o["name"]: o for o in outcomes if o.get("status") == "ok"}
    keyed = sorted((o["keys"], o["name"]) for o in outcomes if o["name"].startswith("keys_"))
    small, large = (keyed[0][1], keyed[-1][1]) if len(keyed) > 1 else (None, None)

    def row(what: str, value: float | None, ok: bool | None, shown: str) -> dict[str, Any]:
        return {"target": what, "value": value, "met": ok, "shown": shown}

    out = []
    r = _paired(by.get("valid"), by.get("nginx"), "cpu_us")
    out.append(row("CPU per proxied request, in-process hit, ≤ 6× nginx (goal 3×)", r,
                   None if r is None else r <= 6.0, "—" if r is None else f"{r:.2f}× nginx"))
    r = _paired(by.get("valid"), by.get("auth_none"), "rps")
    cost = None if r is None else 1 - r
    out.append(row('authentication costs ≤ 5% of throughput (valid key vs auth = "none")', cost,
                   None if cost is None else cost <= 0.05, "—" if cost is None else f"{cost:.1%}"))
    r = _paired(by.get("redis_only"), by.get("valid"), "rps")
    out.append(row("Redis tier only ≥ 70% of the in-process-hit throughput", r,
                   None if r is None else r >= 0.70, "—" if r is None else f"{r:.0%}"))
    r = _paired(by.get("malformed"), by.get("hello"), "cpu_us")
    out.append(row("rejecting a malformed key costs ≤ aiohttp hello world (CPU per request)", r,
                   None if r is None else r <= 1.0, "—" if r is None else f"{r:.2f}× hello"))
    r = _paired(by.get(large) if large else None, by.get(small) if small else None, "rps")
    drop = None if r is None else 1 - r
    out.append(row(f"{small} → {large}: throughput drops < 10%", drop,
                   None if drop is None else drop < 0.10, "—" if drop is None else f"{drop:.1%}"))
    # The same drop with the traffic held fixed: only the store grows (see benchmarks/README).
    hot = next((name for name in by if name.startswith("store_") and "_hot_" in name), None)
    r = _paired(by.get(hot) if hot else None, by.get(small) if small else None, "rps")
    drop = None if r is None else 1 - r
    out.append(row(f"{small} → {hot} (the store alone grows): throughput drops < 10%", drop,
                   None if drop is None else drop < 0.10, "—" if drop is None else f"{drop:.1%}"))
    r = _paired(by.get("workers_2"), by.get("valid"), "cpu_us")
    out.append(row("--workers 2: CPU per request within 10% of 1 worker", r,
                   None if r is None else r <= 1.10, "—" if r is None else f"{r:.2f}× 1 worker"))
    # --baseline: each scenario against its twin on the baseline's code (a change's cost).
    for name in by:
        base = by.get(name + "@base")
        r = _paired(by[name], base, "cpu_us") if base else None
        if r is not None:
            out.append(row(f"{name}: CPU per request within 5% of the baseline's", r, r <= 1.05,
                           f"{r:.3f}× baseline"))
    return out


def _ratios(o: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    """Median over rounds of (value / reference value in the same round).

    Rounds alternate, so each round's pair saw the same machine state; the median of per-round
    ratios shrugs off a noisy round better than a ratio of medians. Falls back to the ratio of
    medians when the rounds do not pair up.
    """
    out: dict[str, float] = {}
    if not o["median"]:
        return out
    paired = len(o["runs"]) == len(ref["runs"]) and o["runs"]
    for k in METRICS:
        if paired:
            rs = [a[k] / b[k] for a, b in zip(o["runs"], ref["runs"], strict=True)
                  if b.get(k) and not math.isnan(a[k])]
            if rs:
                out[k] = round(statistics.median(rs), 3)
        elif ref["median"].get(k) and not math.isnan(o["median"][k]):
            out[k] = round(o["median"][k] / ref["median"][k], 3)
    return out


def _num(v: float | None, digits: int = 0) -> str:
    if v is None or math.isnan(v):
        return "—"
    return f"{v:,.{digits}f}"


def _ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def _settled(result: dict[str, Any]) -> str:
    """keys_N scenarios warm up longer (their caches start cold): say how long."""
    longer = [
        f"{o['name']} {o['warmup_s']:g} s"
        for o in result["scenarios"]
        if o.get("keys") and o.get("warmup_s", 0) > result["settings"]["warmup_s"]
    ]
    return f" ({', '.join(longer)})" if longer else ""


def markdown(result: dict[str, Any]) -> str:
    ref = result["reference"]
    s = result["settings"]
    m = result["machine"]
    rounds = f"median of {s['runs']} alternating rounds" if s["runs"] > 1 else "1 round"
    lines = [
        f"# Keystile benchmark — {result['timestamp']}",
        "",
        f"**Machine:** {describe(m)}",
        "",
        f"**Method:** wrk -t{s['wrk_threads']} -c{s['connections']}, {s['duration_s']:g} s per run "
        f"after a {s['warmup_s']:g} s warm-up{_settled(result)}, {rounds}"
        f"{' (--quick)' if s['quick'] else ''}. "
        f"Server under test alone on core {s['server_core']}; wrk, the upstream "
        f"(nginx `return 200`, keep-alive){' and a private Redis' if s.get('redis_private') else ''}"
        f" on core {s['load_core']}. CPU µs/req = utime+stime of "
        "the server's whole process tree (/proc) ÷ requests completed. "
        f"× {ref} = value ÷ the {ref} key-auth proxy's value in the same round, median over "
        "rounds (lower is better for latency and CPU, higher for req/s). Absolute numbers vary "
        f"between machines; compare ratios. Load average before/after: {s.get('loadavg_before', '?')} / "
        f"{s.get('loadavg_after', '?')} (anything else running on these cores adds noise).",
        "",
        f"| scenario | what | req/s | × {ref} | p50 ms | p99 ms | × {ref} (p99) | CPU µs/req "
        f"| × {ref} (CPU) | check |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for o in result["scenarios"]:
        med, ratio = o["median"], o["ratio_to_" + ref]
        name = o["name"] if o["group"] == "peer" else f"keystile: {o['name']}"
        if o["status"] != "ok" or not med:
            first = (o["reason"] or o["status"]).splitlines()[0][:90].replace("|", "/")
            lines.append(f"| {name} | {o['what']} | {o['status']} | | | | | | | {first} |")
            continue
        check = "; ".join(o["checks"]) or "ok"
        lines.append(
            f"| {name} | {o['what']} | {_num(med['rps'])} | {_ratio(ratio.get('rps'))} "
            f"| {_num(med['p50_ms'], 2)} | {_num(med['p99_ms'], 2)} | {_ratio(ratio.get('p99_ms'))} "
            f"| {_num(med['cpu_us'], 1)} | {_ratio(ratio.get('cpu_us'))} | {check} |"
        )
    tiered = [o for o in result["scenarios"] if o["status"] == "ok" and "local_miss" in (o["median"] or {})]
    if tiered:
        lines += [
            "",
            "**Past the in-process tier** (Keystile, one process; % of requests in the measured runs, "
            "median over rounds; concurrent requests for one key share a lookup, and a store load "
            "is one batched query for many misses):",
            "",
            "| scenario | in-process misses | Redis hits | Redis misses | store loads |",
            "|---|--:|--:|--:|--:|",
        ]
        for o in tiered:
            med = o["median"]
            lines.append(
                f"| {o['name']} | {med['local_miss']:.1f}% | {med.get('redis_hit', 0):.1f}% "
                f"| {med.get('redis_miss', 0):.1f}% | {med.get('store_load', 0):.2f}% |"
            )
    rows = [t for t in result.get("targets") or [] if t["value"] is not None]
    if rows:
        lines += ["", "**Targets** (ratios of this run: median over rounds of the per-round ratio):", ""]
        lines += ["| target | this run | met |", "|---|--:|---|"]
        for t in rows:
            lines.append(f"| {t['target']} | {t['shown']} | {'yes' if t['met'] else 'no'} |")
    micro = result.get("micro")
    if micro:
        lines += ["", "**Micro-benchmarks** (ns per op, one process pinned to the server core):", ""]
        lines += ["| operation | ns/op | note |", "|---|--:|---|"]
        for row in micro.get("results", []):
            ns = _num(row["ns_per_op"]) if row.get("ns_per_op") is not None else "—"
            lines.append(f"| {row['name']} | {ns} | {row.get('note', '')} |")
    return "\n".join(lines) + "\n"


def chart(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "matplotlib is not installed: no PNG chart "
            "(pip install 'keystile[bench]' or pip install matplotlib)",
            file=sys.stderr,
        )
        return False
    ref = result["reference"]
    rows = [o for o in result["scenarios"] if o["status"] == "ok" and o["median"]]
    if not rows:
        return False
    names = [o["name"] if o["group"] == "peer" else f"ks: {o['name']}" for o in rows]
    cpu = [o["median"]["cpu_us"] for o in rows]
    ratio = [o["ratio_to_" + ref].get("cpu_us", float("nan")) for o in rows]
    colors = ["#888888" if o["group"] == "peer" else "#2b6cb0" for o in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) + 1.8), sharey=True)
    y = list(range(len(rows)))
    a1.barh(y, cpu, color=colors)
    a1.set_yticks(y, names)
    a1.invert_yaxis()
    a1.set_xlabel("server CPU µs per request (lower is better)")
    for yi, v in zip(y, cpu, strict=True):
        a1.text(v, yi, f" {v:.1f}", va="center", fontsize=8)
    a2.barh(y, ratio, color=colors)
    a2.axvline(1.0, color="black", linewidth=0.8)
    a2.set_xlabel(f"CPU per request × {ref} (same run)")
    for yi, v in zip(y, ratio, strict=True):
        if not math.isnan(v):
            a2.text(v, yi, f" {v:.2f}×", va="center", fontsize=8)
    desc = describe(result["machine"])
    cut = desc.find(";", len(desc) // 3)
    fig.suptitle(f"Keystile benchmark {result['timestamp']}\n{desc[: cut + 1]}\n{desc[cut + 2 :]}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(result: dict[str, Any], md: str, results_dir: Path) -> list[Path]:
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = [results_dir / f"{stamp}.md", results_dir / f"{stamp}.json"]
    out[0].write_text(md)
    out[1].write_text(json.dumps(result, indent=2, default=str) + "\n")
    png = results_dir / f"{stamp}.png"
    if chart(result, png):
        out.append(png)
    for p in list(out):
        latest = results_dir / ("latest" + p.suffix)
        shutil.copyfile(p, latest)
        out.append(latest)
    stale = results_dir / "latest.png"
    if not png.exists() and stale.exists():
        stale.unlink()  # a chart from an older run would not match latest.md
    return out
