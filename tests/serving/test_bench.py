"""`tumorflow bench serving` runs end to end on loopback and prints every row and ratio."""

import pytest

from tumorflow.cli.main import main


@pytest.mark.slow
def test_bench_serving_prints_latencies_and_ratios(capsys):
    argv = ["bench", "serving", "--requests", "40", "--images", "4", "--image-size", "32"]
    assert main([*argv, "--max-seconds", "15"]) == 0
    out = capsys.readouterr().out
    for row in (
        "in-process call, batch 1",
        "in-process call, batch 32 (ceiling)",
        "gRPC Predict, 1 client(s)",
        "gRPC Predict, 32 client(s)",
        "gRPC Predict, 1 client, request log on",
        "Flask baseline, 8 clients",
    ):
        assert row in out
    assert "gRPC batch-1 p50 - in-process p50" in out
    assert "gRPC 32 clients / Flask baseline throughput" in out
    assert "request logging for drift adds" in out
