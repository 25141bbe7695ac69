"""`tumorflow bench serving` runs end to end on loopback and prints figures that add up: the calls
it was asked for, percentiles in order, throughputs the latencies allow, ratios of its own rows."""

from __future__ import annotations

import re

import pytest

from tumorflow.cli.main import main

REQUESTS = 40
# measurement: (calls asked for, concurrent clients, images per call)
PLANNED = {
    "in-process call, batch 1": (REQUESTS, 1, 1),
    "in-process call, batch 32 (ceiling)": (4, 1, 32),
    "gRPC Predict, 1 client(s)": (REQUESTS, 1, 1),
    "gRPC Predict, 8 client(s)": (REQUESTS, 8, 1),
    "gRPC Predict, 32 client(s)": (REQUESTS, 32, 1),
    "gRPC Predict, 1 client, request log on": (REQUESTS, 1, 1),
    "Flask baseline, 8 clients": (REQUESTS // 2, 8, 1),
}
# The table prints milliseconds to 0.01, throughputs to 0.1 and ratios to 0.01.
MS = 0.02
RATIO = {"rel": 0.01, "abs": 0.01}


def _table(out: str) -> dict[str, dict[str, float]]:
    rows = {}
    for name in PLANNED:
        (line,) = [line for line in out.splitlines() if line.startswith(f"{name} ")]
        calls, p50, p99, throughput = line[len(name) :].split()
        rows[name] = {
            "calls": int(calls),
            "p50": float(p50),
            "p99": float(p99),
            "throughput": float(throughput),
        }
    return rows


def _figure(out: str, pattern: str) -> tuple[float, str]:
    """The number a summary line prints, and its verdict (met / missed) when it has one."""
    match = re.search(pattern + r"(?:.*: (met|missed))?", out)
    assert match, f"no line matching {pattern!r}"
    return float(match[1]), match[2]


@pytest.mark.e2e
def test_bench_serving_prints_consistent_latencies_and_ratios(capsys):
    argv = ["bench", "serving", "--requests", str(REQUESTS), "--images", "4"]
    assert main([*argv, "--image-size", "32", "--max-seconds", "60"]) == 0
    out = capsys.readouterr().out
    rows = _table(out)

    for name, (calls, clients, per_call) in PLANNED.items():
        row = rows[name]
        assert row["calls"] == calls, name
        assert 0 < row["p50"] <= row["p99"], name
        # Half the calls took at least p50 and each client calls one at a time, so the run
        # lasted at least calls * p50 / (2 * clients).
        ceiling = 2000 * clients * per_call / (row["p50"] + MS / 2)
        assert 0 < row["throughput"] <= ceiling, name

    inprocess, ceiling = (
        rows["in-process call, batch 1"],
        rows["in-process call, batch 32 (ceiling)"],
    )
    single, many = rows["gRPC Predict, 1 client(s)"], rows["gRPC Predict, 32 client(s)"]
    logged, flask = (
        rows["gRPC Predict, 1 client, request log on"],
        rows["Flask baseline, 8 clients"],
    )

    gap, verdict = _figure(out, r"gRPC batch-1 p50 - in-process p50: ([+-][\d.]+) ms")
    assert gap == pytest.approx(single["p50"] - inprocess["p50"], abs=MS)
    assert verdict == ("met" if gap <= 2 else "missed")
    ratio, verdict = _figure(out, r"gRPC 32 clients / sequential in-process throughput: ([\d.]+)x")
    assert ratio == pytest.approx(many["throughput"] / inprocess["throughput"], **RATIO)
    assert verdict == ("met" if ratio >= 3 else "missed")
    reach, _ = _figure(out, r"batching can reach at most ([\d.]+)x here")
    assert reach == pytest.approx(ceiling["throughput"] / inprocess["throughput"], **RATIO)
    share, _ = _figure(out, r"the server delivers (\d+)% of it")
    assert share == pytest.approx(100 * many["throughput"] / ceiling["throughput"], abs=1)
    cost, verdict = _figure(out, r"request logging for drift adds ([+-][\d.]+) ms p50")
    assert cost == pytest.approx(logged["p50"] - single["p50"], abs=MS)
    assert verdict == ("met" if cost < 1 else "missed")
    ratio, verdict = _figure(out, r"gRPC 32 clients / Flask baseline throughput: ([\d.]+)x")
    assert ratio == pytest.approx(many["throughput"] / flask["throughput"], **RATIO)
    assert verdict == ("met" if ratio >= 5 else "missed")
