"""`tumorflow bench serving` runs end to end on loopback and prints figures that add up: the calls
it was asked for, percentiles in order, throughputs the latencies allow, ratios of its own rows,
and PASS or MISS against the server's targets."""

from __future__ import annotations

import os
import re

import pytest

from tumorflow.cli.main import main

REQUESTS = 40
# measurement: (calls asked for, concurrent clients, images per call)
PLANNED = {
    "in-process call, batch 1": (REQUESTS, 1, 1),
    # Measured before and after the gRPC runs, 4 calls each.
    "in-process call, batch 32 (ceiling)": (8, 1, 32),
    "gRPC Predict, 1 client(s)": (REQUESTS, 1, 1),
    "gRPC Predict, 8 client(s)": (REQUESTS, 8, 1),
    "gRPC Predict, 32 client(s)": (REQUESTS, 32, 1),
    "gRPC Predict, 1 client, request log on": (REQUESTS, 1, 1),
    "gRPC empty Predict, 1 client": (REQUESTS, 1, 1),
    "gRPC empty Predict, 32 clients": (REQUESTS, 32, 1),
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


def _figure(out: str, label: str) -> tuple[float, str]:
    """The number a summary line prints, and its verdict (PASS / MISS)."""
    match = re.search(
        re.escape(label) + r"\s+([+-]?[\d.]+)[^(\n]*\(target [^)]*\): (PASS|MISS)", out
    )
    assert match, f"no summary line {label!r}"
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

    share, verdict = _figure(out, "gRPC 32 clients / batch-32 ceiling throughput:")
    assert share == pytest.approx(many["throughput"] / ceiling["throughput"], **RATIO)
    assert verdict == ("PASS" if share >= 0.85 else "MISS")
    gap, verdict = _figure(out, "gRPC batch-1 p50 - in-process p50:")
    assert gap == pytest.approx(single["p50"] - inprocess["p50"], abs=MS)
    # The overhead is also shown as a ratio to the in-process call.
    (times,) = re.findall(r"= ([\d.]+)x in-process", out)
    assert float(times) == pytest.approx(single["p50"] / inprocess["p50"], **RATIO)
    assert verdict == ("PASS" if gap <= 1.5 else "MISS")
    # Where the CPU went: both processes' cores within the machine's, and the scaled ceiling
    # follows from the cores the clients left.
    (cpu,) = re.findall(
        r"the clients ([\d.]+) cores, the server ([\d.]+); with the cores the clients left, "
        r"the ceiling is (\d+) images/s and the server reached ([\d.]+) of it",
        out,
    )
    client_cores, server_cores, scaled, reached = map(float, cpu)
    cores = os.cpu_count()
    assert client_cores > 0 and server_cores > 0
    # The server's CPU time is read from /proc in clock ticks, before and after a short run.
    wall = many["calls"] / many["throughput"]
    tick = 1 / os.sysconf("SC_CLK_TCK")
    assert client_cores + server_cores <= cores + 2 * tick / wall + 0.05
    left = (cores - client_cores) / cores
    assert scaled == pytest.approx(ceiling["throughput"] * left, rel=0.02, abs=1)
    # share, the clients' cores and reached are printed to 2 decimals: reached is share / left
    # within what that rounding allows (a printed share 0.27 with 0.26 client cores came with
    # 0.30, where 0.27 / 0.87 is 0.31).
    half = 0.005
    lowest = (share - half) / ((cores - client_cores + half) / cores)
    highest = (share + half) / ((cores - client_cores - half) / cores)
    assert lowest - half <= reached <= highest + half
    # gRPC's own round trip, taking turns with the batch-1 rows, is printed beside the overhead.
    floor_single, floor_many = (
        rows["gRPC empty Predict, 1 client"],
        rows["gRPC empty Predict, 32 clients"],
    )
    (round_trip,) = re.findall(r"gRPC's own round trip [^:]*: ([\d.]+) ms p50", out)
    assert float(round_trip) == pytest.approx(floor_single["p50"], abs=MS)
    # The bound: gRPC's own CPU per request and the model's per image (at most every core for
    # the ceiling's time) cap what any server behind Python's gRPC could reach here.
    (bound_line,) = re.findall(
        r"gRPC's own cost \(gRPC empty Predict, 32 clients, no model\): ([\d.]+) core-ms per "
        r"request, clients and server; with the model's ([\d.]+) core-ms per image in the "
        r"ceiling row, no server behind Python's gRPC with its clients on these (\d+) cores can "
        r"pass (\d+) images/s = ([\d.]+) of the ceiling; the server reached ([\d.]+) of that",
        out,
    )
    grpc_cost, model_cost, bound_cores, bound, bound_share, bound_reached = map(float, bound_line)
    assert bound_cores == cores
    assert grpc_cost > 0 and model_cost > 0
    assert model_cost <= 1000 * cores / ceiling["throughput"] * 1.01 + 0.01
    # Printed figures are rounded (costs to 0.01 core-ms): compare within that.
    assert bound == pytest.approx(1000 * cores / (model_cost + grpc_cost), rel=0.02, abs=1)
    assert bound_share == pytest.approx(bound / ceiling["throughput"], rel=0.02, abs=0.01)
    assert bound_reached == pytest.approx(many["throughput"] / bound, rel=0.02, abs=0.01)
    # gRPC with no model costs the clients and the server CPU, and answers faster than the model.
    assert floor_many["throughput"] > 0 and floor_single["p50"] < single["p50"]
    tail, verdict = _figure(out, "gRPC 32 clients p99 / batch-32 call p99:")
    assert tail == pytest.approx(many["p99"] / ceiling["p99"], **RATIO)
    assert verdict == ("PASS" if tail <= 2 else "MISS")
    cost, verdict = _figure(out, "request logging for drift adds (p50):")
    assert cost == pytest.approx(logged["p50"] - single["p50"], abs=MS)
    assert verdict == ("PASS" if cost < 1 else "MISS")
    ratio, verdict = _figure(out, "gRPC 32 clients / Flask baseline throughput:")
    # The table rounds the (slow) Flask throughput to 0.1 images/s: allow for that rounding.
    rounding = 0.05 / flask["throughput"] + 0.05 / many["throughput"]
    assert ratio == pytest.approx(
        many["throughput"] / flask["throughput"], rel=RATIO["rel"] + rounding, abs=RATIO["abs"]
    )
    assert verdict == ("PASS" if ratio >= 5 else "MISS")
    # The stale target (32 clients against the sequential in-process call) is gone.
    assert "sequential" not in out
