"""`tumorflow phantom` and `tumorflow validate` end to end through the CLI entry point."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import HOSTILE_NAMES, write_hostile_name_corpus

from tumorflow.cli.main import main

SMALL_PHANTOM = ["--set", "dataset.phantom.per_class=12", "--set", "dataset.phantom.size=48"]


def test_phantom_command_writes_the_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(
        ["phantom", "--output", str(tmp_path), "--per-class", "5", "--size", "40", "--corrupt", "2"]
    )
    assert code == 0
    folder = (
        tmp_path
        / "CT-KIDNEY-DATASET-Normal-Cyst-Tumor-Stone"
        / "CT-KIDNEY-DATASET-Normal-Cyst-Tumor-Stone"
    )
    assert len(list(folder.rglob("*- (*).jpg"))) == 20
    assert len(list(folder.rglob("corrupt-*"))) == 2
    assert "wrote 20 images" in capsys.readouterr().out


@pytest.mark.e2e
def test_validate_with_the_phantom_preset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(
        ["validate", "--output", str(tmp_path / "out"), "--preset", "phantom", *SMALL_PHANTOM]
    )
    assert code == 0
    split = tmp_path / "out" / "split"
    manifest = json.loads((split / "split_manifest.json").read_text())
    assert manifest["classes"] == ["cyst", "normal", "stone", "tumor"]
    assert sum(info["count"] for info in manifest["splits"].values()) == 48
    with (split / "quarantine.csv").open() as handle:
        assert next(csv.reader(handle)) == ["path", "reason"]
    assert (tmp_path / "out" / "raw" / "manifest.csv").exists()
    out = capsys.readouterr().out
    # the preset adds three broken files to show the quarantine at work
    assert "| test |" in out and "Quarantined: 3 files" in out and "Duplicate groups:" in out


@pytest.mark.e2e
def test_validate_with_the_kidney_preset_on_a_phantom_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert (
        main(
            [
                "phantom",
                "--output",
                str(tmp_path / "kidney"),
                "--per-class",
                "12",
                "--size",
                "48",
                "--corrupt",
                "3",
            ]
        )
        == 0
    )
    code = main(
        [
            "validate",
            str(tmp_path / "kidney"),
            "--output",
            str(tmp_path / "out"),
            "--preset",
            "kidney_ct",
        ]
    )
    assert code == 0
    manifest = json.loads((tmp_path / "out" / "split" / "split_manifest.json").read_text())
    assert manifest["quarantined"] == 3
    assert manifest["source"]["source"] == str(tmp_path / "kidney")
    assert "Quarantined: 3 files" in capsys.readouterr().out


def test_an_unusable_source_is_reported_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(["validate", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "tumorflow validate: error:" in err and "does not exist" in err
    assert "Traceback" not in err


def test_validate_keeps_every_hostile_file_name(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    write_hostile_name_corpus(tmp_path / "src", per_class=12)
    code = main(["validate", str(tmp_path / "src"), "--output", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err
    manifest = json.loads((tmp_path / "out" / "split" / "split_manifest.json").read_text())
    total = sum(info["count"] for info in manifest["splits"].values())
    with (tmp_path / "out" / "split" / "quarantine.csv").open(newline="") as handle:
        quarantined = list(csv.DictReader(handle))
    # every file is either in the split or quarantined with a reason; none vanished
    assert total + len(quarantined) == 2 * (12 + len(HOSTILE_NAMES))
    assert all(row["reason"] for row in quarantined)
    with (tmp_path / "out" / "split" / "split_manifest.csv").open(newline="") as handle:
        split_paths = [row["path"] for row in csv.DictReader(handle)]
    assert any("~" in path for path in split_paths)  # renamed copies made it into the split
    assert all("\n" not in path for path in split_paths)
