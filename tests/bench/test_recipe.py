"""`tumorflow bench recipe`: the stability measures, the harder phantom and bad arguments."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from PIL import Image

from tumorflow.bench.recipe import (
    HARD_LESION_SCALE,
    HARD_NOISE_SCALE,
    RunStability,
    add_arguments,
    format_table,
    recipe_config,
    run,
    summary_table,
    write_hard_phantom,
)
from tumorflow.components.data.phantom import CLASSES, phantom_slices
from tumorflow.core.errors import ConfigError


def test_a_swinging_run_scores_a_larger_swing_and_drop_than_a_steady_one():
    steady = RunStability("steady", 1, [0.3, 0.4, 0.5, 0.6], [0.3, 0.4, 0.5, 0.6], 3)
    swinging = RunStability("swinging", 1, [0.3, 0.8, 0.4, 0.7], [0.3, 0.4, 0.5, 0.6], 1)
    assert steady.row()["swing_std"] == pytest.approx(0.0, abs=1e-9)
    assert steady.row()["max_drop"] == 0.0
    assert swinging.row()["max_drop"] == pytest.approx(0.4)
    assert swinging.row()["swing_std"] == pytest.approx(np.std([0.5, -0.4, 0.3]))
    assert (swinging.row()["best"], swinging.row()["final"], swinging.row()["kept"]) == (
        0.8,
        0.7,
        0.8,
    )


def test_the_table_averages_each_recipe_over_its_seeds_in_order():
    runs = [
        RunStability("b", 1, [0.2, 0.6], [0.5, 0.6], None),
        RunStability("a", 1, [0.5, 0.5], [0.5, 0.6], 0),
        RunStability("b", 2, [0.4, 0.6], [0.5, 0.6], None),
    ]
    table = summary_table(runs)
    assert [row["recipe"] for row in table] == ["b", "a"]
    assert table[0]["seeds"] == 2
    assert table[0]["final"] == pytest.approx(0.6)
    assert table[0]["best"] == pytest.approx(0.6)
    lines = format_table(table)
    assert lines[2].startswith("| b | 2 | ") and lines[3].startswith("| a | 1 | ")


def test_the_hard_phantom_gives_both_slices_of_a_patient_one_intensity_shift(tmp_path):
    folder = write_hard_phantom(tmp_path, per_class=8, size=32)
    plain = {
        piece.name: piece.pixels.astype(float)
        for piece in phantom_slices(8, 32, 0, 2, HARD_NOISE_SCALE, HARD_LESION_SCALE)
    }
    assert sorted(p.name for p in folder.iterdir()) == sorted(CLASSES)

    def gain(kind: str, number: int) -> float:
        name = f"{kind}- ({number})"
        written = np.asarray(Image.open(folder / kind / f"{name}.jpg"), dtype=float)
        source = plain[name]
        unclipped = (written > 8) & (written < 247) & (source > 8)
        return float(np.polyfit(source[unclipped], written[unclipped], 1)[0])

    # Slices (1) and (2) are one patient, (3) and (4) the next, ...
    for kind in CLASSES:
        assert gain(kind, 1) == pytest.approx(gain(kind, 2), abs=0.08)
    gains = [gain(kind, first) for kind in CLASSES for first in (1, 3, 5, 7)]
    assert np.std(gains) > 0.1


def test_each_recipe_is_a_valid_custom_cnn_config():
    config = recipe_config("constant_bn0.9_lr/3", 2, (3, 1), 3e-3, 16, 48)
    assert (config.backbone, config.weights, config.image_size) == ("custom_cnn", "none", 48)
    assert config.stage1.learning_rate == pytest.approx(1e-3)
    assert config.stage2.learning_rate == pytest.approx(1e-4)
    assert config.seed == 2 and config.lr_schedule == "constant"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--recipes", "magic"], "unknown recipe"),
        (["--seeds", "one"], "--seeds"),
        (["--epochs", "1,3"], "at least 2 epochs"),
    ],
)
def test_bad_arguments_are_a_config_error(argv, message, tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ConfigError, match=message):
        run(parser.parse_args([*argv, "--workdir", str(tmp_path)]))


@pytest.mark.e2e
def test_the_bench_trains_each_recipe_and_prints_its_row(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = [
        *("--recipes", "constant_bn0.9,constant_bn0.9_recalibrated", "--seeds", "1"),
        *("--per-class", "24", "--size", "32", "--epochs", "2,1", "--batch-size", "16"),
        *("--workdir", str(tmp_path), "--figure", str(tmp_path / "curves.png")),
    ]
    assert run(parser.parse_args(args)) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("| constant")]
    assert [row.split("|")[1].strip() for row in rows] == [
        "constant_bn0.9",
        "constant_bn0.9_recalibrated",
    ]
    assert all(0.0 <= float(row.split("|")[5]) <= 1.0 for row in rows)
    assert (tmp_path / "curves.png").stat().st_size > 0
