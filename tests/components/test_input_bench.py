"""`tumorflow bench input` runs end to end on a tiny set and prints the comparison table."""

from __future__ import annotations

import pytest

from tumorflow.cli.main import main


@pytest.mark.slow
def test_bench_input_prints_the_table_with_ratios(tmp_path, capsys):
    code = main(
        [
            "bench",
            "input",
            "--images",
            "48",
            "--size",
            "32",
            "--source-size",
            "64",
            "--batch-size",
            "8",
            "--workdir",
            str(tmp_path),
        ]
    )

    out = capsys.readouterr().out
    assert code == 0
    assert "48 images 64px -> 32px, batch 8" in out
    for row in (
        "ours, first epoch",
        "ours, cached epoch",
        "ours grey (CT/MRI presets), first epoch",
        "ours grey, cached epoch",
        "keras image_dataset_from_directory",
        "bare parallel decode (same JPEGs)",
        "bare parallel decode, one channel",
    ):
        line = next(line for line in out.splitlines() if line.startswith(row))
        rate = float(line.split()[-5])
        assert rate > 0
    assert "targets, rgb first epoch: >= 3x keras" in out
    assert "targets, grey first epoch: >= 3x keras" in out
    assert len(list((tmp_path / "folders").rglob("*.jpg"))) == 48
    assert (tmp_path / "split" / "split_manifest.json").exists()
