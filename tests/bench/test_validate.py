"""`tumorflow bench validate` runs end to end on a small set and prints a table that adds up:
each worker count's rate from its time, the speed-ups from the rates, how the checks ran."""

from __future__ import annotations

import pytest

from tumorflow.cli.main import main
from tumorflow.components.data import validate

IMAGES = 40


def _table(out: str) -> dict[int, dict[str, str | float]]:
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if len(cells) == 6 and cells[0].isdigit():
            workers, how, seconds, rate, busy, speed_up = cells
            rows[int(workers)] = {
                "how": how,
                "seconds": float(seconds),
                "rate": float(rate),
                "busy": float(busy),
                "speed_up": float(speed_up),
            }
    return rows


def test_bench_validate_prints_rates_and_speed_ups_per_worker_count(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(validate, "PROCESS_POOL_MIN_IMAGES", IMAGES // 2)
    args = ["--images", str(IMAGES), "--size", "64", "--workers", "1,2", "--repeats", "1"]
    code = main(["bench", "validate", *args])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"of {IMAGES} 64x64 JPEG scans" in out
    table = _table(out)
    assert sorted(table) == [1, 2]
    assert table[1]["how"] == "serial" and table[2]["how"] == "processes"
    for row in table.values():
        # The printed seconds are rounded to the millisecond, the rate to a tenth.
        low, high = row["seconds"] - 0.0005, row["seconds"] + 0.0005
        assert IMAGES / high - 0.05 <= row["rate"] <= IMAGES / max(low, 1e-6) + 0.05
        assert row["busy"] > 0
    assert table[1]["speed_up"] == 1.0
    assert table[2]["speed_up"] == pytest.approx(
        table[2]["rate"] / table[1]["rate"], rel=0.02, abs=0.01
    )


def test_bench_validate_refuses_worker_counts_that_are_not_a_list(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bench", "validate", "--workers", "one,two"])
    assert exited.value.code == 2
    assert "is not a list like 1,2" in capsys.readouterr().err
