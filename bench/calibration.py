"""`tumorflow bench calibration`: the test split's ECE before and after temperature scaling, on
the phantom and on the harder phantom of `tumorflow bench recipe`.

Each dataset is split as the pipeline splits it, a custom_cnn is trained on it (the train step
fits the temperature on the validation split and the export folds it in), and the test split is
scored through the served SavedModel, as the evaluate step scores it (its `calibration` figures:
"before" undoes the temperature exactly).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from tumorflow.bench.pointing_game import write_phantom_split
from tumorflow.bench.recipe import prepare_split, recipe_config
from tumorflow.components.data.phantom import phantom_slices
from tumorflow.components.evaluation.evaluate import (
    calibration_figures,
    plot_reliability,
    reliability_curves,
    score_saved_model,
)
from tumorflow.core.artifacts import MODEL_INFO_FILE, SERVING_EXPORT

RECIPE = "cosine_bn0.9_recalibrated"


@dataclass(frozen=True)
class CalibrationFigures:
    dataset: str
    temperature: float
    test_images: int
    ece_before: float
    ece_after: float

    def line(self) -> str:
        return (
            f"{self.dataset:<14} T={self.temperature:5.2f}  test n={self.test_images:<4} "
            f"ECE {self.ece_before:.3f} -> {self.ece_after:.3f}"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--per-class", type=int, default=120, help="images per class of each phantom (120)")
    add("--size", type=int, default=64, help="image side in pixels (64)")
    add("--epochs", default="8,2", help="stage 1,2 epochs (default 8,2)")
    add("--workdir", default="calibration-bench", help="where data, models and plots go")


def phantom_split(workdir: Path, per_class: int, size: int) -> Path:
    """The demo phantom with patients of separate seeds per split (train 0, val 1, test 2)."""
    val = max(8, per_class // 4)
    return write_phantom_split(
        workdir / f"phantom-split-{per_class}-{size}",
        {
            "train": list(phantom_slices(per_class, size, seed=0)),
            "val": list(phantom_slices(val, size, seed=1)),
            "test": list(phantom_slices(val, size, seed=2)),
        },
    )


def measure(
    name: str, split_dir: Path, run_dir: Path, size: int, epochs: tuple[int, int]
) -> CalibrationFigures:
    """Train, export and score one dataset's test split; write its reliability plot."""
    import keras

    from tumorflow.components.training.export import export_model_artifact
    from tumorflow.components.training.train import train_model

    keras.backend.clear_session()
    config = recipe_config(RECIPE, 1, epochs, 2e-3, 32, size)
    result = train_model(split_dir, run_dir / "model", config, run_dir / "checkpoints")
    export_model_artifact(result.model_dir)
    temperature = json.loads((result.model_dir / MODEL_INFO_FILE).read_text())["calibration"][
        "temperature"
    ]
    scored = score_saved_model(result.model_dir / SERVING_EXPORT, split_dir, "test")
    figures = calibration_figures(scored, temperature)
    curves = reliability_curves(scored, {"calibration": figures})
    plot_reliability(curves, run_dir / "reliability.png")
    return CalibrationFigures(
        name, temperature, len(scored.y_true), figures["ece_before"], figures["ece"]
    )


def run(args: argparse.Namespace) -> int:
    """Print the ECE before and after on both phantoms."""
    workdir = Path(args.workdir)
    first, second = (int(value) for value in args.epochs.split(","))
    splits = {
        "phantom": phantom_split(workdir, args.per_class, args.size),
        "hard phantom": prepare_split(workdir, args.per_class, args.size),
    }
    print(f"custom_cnn, {args.per_class}/class at {args.size}px, epochs {first}+{second}")
    for name, split_dir in splits.items():
        figures = measure(
            name, split_dir, workdir / name.replace(" ", "-"), args.size, (first, second)
        )
        print(figures.line())
    print(f"reliability plots: {workdir}/*/reliability.png")
    return 0
