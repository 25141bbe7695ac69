"""`tumorflow bench signing` prints each cost with its ratio against a baseline of the same run."""

from __future__ import annotations

import re

from tumorflow.cli.main import main


def test_bench_signing_prints_ratios_against_its_baselines(capsys) -> None:
    assert main(["bench", "signing", "--repeats", "5"]) == 0
    out = capsys.readouterr().out
    for name in ("sign + write a decision", "verify a decision", "verify release record"):
        line = next(line for line in out.splitlines() if name in line)
        assert re.search(r"[0-9.]+ ms\s+[0-9.]+x the baseline", line), line
    assert "plain JSON write of a decision (baseline)" in out
    assert "SavedModel load (baseline)" in out
