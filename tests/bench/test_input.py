"""`tumorflow bench input` runs end to end on a tiny set and prints a table that adds up: every
pipeline measured over the same images, ratios computed from the rates it shows."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from tumorflow.bench.input import (
    BARE,
    BARE_GREY,
    KERAS,
    OURS_GREY,
    OURS_GREY_CACHED,
    OURS_RGB,
    OURS_RGB_CACHED,
)
from tumorflow.cli.main import main
from tumorflow.components.data.synthetic import SYNTHETIC_CLASSES
from tumorflow.components.data.tfrecords import read_records

PIPELINES = (OURS_RGB, OURS_RGB_CACHED, OURS_GREY, OURS_GREY_CACHED, KERAS, BARE, BARE_GREY)
IMAGES = 48
# The table prints rates to 0.1 image/s and ratios to 0.01.
RATIO = {"rel": 0.01, "abs": 0.01}


def _table(out: str) -> dict[str, dict[str, float]]:
    """The pipeline rows of the bench's table, each printed once."""
    rows = {}
    for name in PIPELINES:
        (line,) = [line for line in out.splitlines() if line.startswith(f"{name} ")]
        images, rate, spread, cpu_ms, vs_keras, vs_decode = line[len(name) :].split()
        low, high = spread.split("-")
        rows[name] = {
            "images": int(images),
            "rate": float(rate),
            "low": float(low),
            "high": float(high),
            "cpu_ms": float(cpu_ms),
            "vs_keras": float(vs_keras.removesuffix("x")),
            "vs_decode": float(vs_decode.removesuffix("x")),
        }
    return rows


@pytest.mark.e2e
def test_bench_input_measures_every_pipeline_on_the_same_images(tmp_path, capsys):
    argv = ["bench", "input", "--images", str(IMAGES), "--size", "32", "--source-size", "64"]
    code = main([*argv, "--batch-size", "8", "--repeats", "2", "--workdir", str(tmp_path)])

    out = capsys.readouterr().out
    assert code == 0
    assert f"{IMAGES} images 64px -> 32px, batch 8" in out and "median of 2 passes" in out
    rows = _table(out)
    keras, decode = rows[KERAS]["rate"], rows[BARE]["rate"]
    for name, row in rows.items():
        assert row["images"] == IMAGES, f"{name} did not go over every image"
        assert row["low"] - 0.5 <= row["rate"] <= row["high"] + 0.5, f"{name}: median off range"
        assert row["cpu_ms"] > 0, f"{name} measured no CPU time"
        assert row["vs_keras"] == pytest.approx(row["rate"] / keras, **RATIO), name
        assert row["vs_decode"] == pytest.approx(row["rate"] / decode, **RATIO), name
    assert rows[KERAS]["vs_keras"] == rows[BARE]["vs_decode"] == 1.0

    for label, first, bare in (("rgb", OURS_RGB, BARE), ("grey", OURS_GREY, BARE_GREY)):
        match = re.search(
            rf"targets, {label} first epoch: >= 3x keras \(([\d.]+)x\), "
            r">= 0\.8x bare decode with as many channels \(([\d.]+)x\)",
            out,
        )
        assert match, f"no {label} targets line"
        assert float(match[1]) == pytest.approx(rows[first]["rate"] / keras, **RATIO)
        assert float(match[2]) == pytest.approx(rows[first]["rate"] / rows[bare]["rate"], **RATIO)

    # The Keras baseline reads the class folders, ours and bare decoding the TFRecord split:
    # the same JPEG bytes under the same labels.
    folders = Counter(
        (path.parent.name, path.read_bytes()) for path in (tmp_path / "folders").rglob("*.jpg")
    )
    records = Counter(
        (SYNTHETIC_CLASSES[record.label], record.encoded)
        for record in read_records(tmp_path / "split", "train")
    )
    assert sum(folders.values()) == IMAGES
    assert folders == records
