"""`tumorflow bench recipe`: how steadily custom_cnn trains from scratch under each recipe.

Real scans made validation accuracy swing from epoch to epoch while train accuracy rose steadily.
This bench builds a harder phantom where that happens (small lesions, more noise, an intensity
gain and offset per patient, as scanners and protocols give), splits it like the pipeline does,
then trains the same model on it with each recipe over a few seeds. Per run it reports the std
of the epoch-to-epoch val-accuracy changes, the largest epoch-to-epoch drop, and the best, final
and kept (best-epoch restore) val accuracy; the table gives the mean over seeds.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tumorflow.components.data.phantom import CLASSES, JPEG_QUALITY, phantom_slices
from tumorflow.components.data.tfrecords import MANIFEST_JSON
from tumorflow.core.errors import ConfigError

log = logging.getLogger(__name__)

# Each recipe spelt out in full, so that it means the same whatever the defaults are.
RECIPES: dict[str, dict[str, Any]] = {
    "constant_bn0.9": {"lr_schedule": "constant", "batchnorm_momentum": 0.9},
    "constant_bn0.6": {"lr_schedule": "constant", "batchnorm_momentum": 0.6},
    "cosine_bn0.9": {"lr_schedule": "warmup_cosine", "warmup_epochs": 2, "batchnorm_momentum": 0.9},
    "cosine_bn0.6": {"lr_schedule": "warmup_cosine", "warmup_epochs": 2, "batchnorm_momentum": 0.6},
    "constant_bn0.9_lr/3": {
        "lr_schedule": "constant",
        "batchnorm_momentum": 0.9,
        "lr_scale": 1 / 3,
    },
    "constant_bn0.9_recalibrated": {
        "lr_schedule": "constant",
        "batchnorm_momentum": 0.9,
        "batchnorm_recalibration": True,
    },
    "cosine_bn0.9_recalibrated": {
        "lr_schedule": "warmup_cosine",
        "warmup_epochs": 2,
        "batchnorm_momentum": 0.9,
        "batchnorm_recalibration": True,
    },
    "cosine_bn0.6_lr/3": {
        "lr_schedule": "warmup_cosine",
        "warmup_epochs": 2,
        "batchnorm_momentum": 0.6,
        "lr_scale": 1 / 3,
    },
}
# What makes the phantom harder than the demo's: lesions, noise, the per-patient gain / offset.
HARD_LESION_SCALE = 0.8
HARD_NOISE_SCALE = 1.8
HARD_GAIN = (0.6, 1.5)
HARD_OFFSET = 45.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recipes",
        default=",".join(RECIPES),
        help=f"recipes to compare, comma-separated (default all: {', '.join(RECIPES)})",
    )
    parser.add_argument("--seeds", default="1,2,3", help="training seeds (default 1,2,3)")
    parser.add_argument("--per-class", type=int, default=400, help="images per class (400)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (64)")
    parser.add_argument("--epochs", default="10,4", help="stage 1,2 epochs (default 10,4)")
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=2e-3,
        help="stage-1 rate (2e-3, the phantom preset's)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (32)")
    parser.add_argument("--workdir", default="recipe-bench", help="where data and runs go")
    parser.add_argument("--figure", default="", help="write the val-accuracy curves here (.png)")


@dataclass(frozen=True)
class RunStability:
    """How one training run's validation accuracy moved over its epochs (both stages)."""

    recipe: str
    seed: int
    val_accuracy: list[float]
    accuracy: list[float]
    kept_index: int | None

    @property
    def changes(self) -> np.ndarray:
        return np.diff(np.asarray(self.val_accuracy))

    def row(self) -> dict[str, float]:
        changes = self.changes
        kept = self.kept_index if self.kept_index is not None else len(self.val_accuracy) - 1
        return {
            "swing_std": float(changes.std()) if changes.size else 0.0,
            "max_drop": float(max(0.0, -changes.min())) if changes.size else 0.0,
            "best": max(self.val_accuracy),
            "final": self.val_accuracy[-1],
            "kept": self.val_accuracy[kept],
        }


def _patient_shift(seed: int, kind: str, patient: int) -> tuple[float, float]:
    rng = np.random.default_rng([seed, CLASSES.index(kind), patient, 7])
    return float(rng.uniform(*HARD_GAIN)), float(rng.uniform(-HARD_OFFSET, HARD_OFFSET))


def write_hard_phantom(folder: Path, per_class: int, size: int, seed: int = 0) -> Path:
    """The phantom's slices made harder (see the module docstring), one folder per class.

    Two slices per patient; both get the patient's gain and offset, so the split's patient
    grouping still keeps them together."""
    slices_per_patient = 2
    folder = Path(folder)
    for kind in CLASSES:
        (folder / kind).mkdir(parents=True, exist_ok=True)
    for piece in phantom_slices(
        per_class, size, seed, slices_per_patient, HARD_NOISE_SCALE, HARD_LESION_SCALE
    ):
        number = int(piece.name.rsplit("(", 1)[1].rstrip(")"))
        gain, offset = _patient_shift(seed, piece.kind, (number - 1) // slices_per_patient)
        pixels = np.clip(piece.pixels.astype(np.float32) * gain + offset, 0, 255)
        Image.fromarray(pixels.round().astype(np.uint8), mode="L").save(
            folder / piece.kind / f"{piece.name}.jpg", quality=JPEG_QUALITY
        )
    return folder


def prepare_split(workdir: Path, per_class: int, size: int) -> Path:
    """Generate, ingest and split the hard phantom as the pipeline would; reuse it if present."""
    from tumorflow.components.data.download import download_dataset
    from tumorflow.components.data.validate import validate_and_split
    from tumorflow.core.config import DatasetConfig, SplitConfig

    split_dir = workdir / f"split-{per_class}-{size}"
    if (split_dir / MANIFEST_JSON).exists():
        return split_dir
    images = write_hard_phantom(workdir / f"images-{per_class}-{size}", per_class, size)
    raw_dir = workdir / f"raw-{per_class}-{size}"
    dataset = DatasetConfig(name="hard-phantom", source=str(images))
    download_dataset(str(images), raw_dir, dataset)
    validate_and_split(raw_dir, split_dir, SplitConfig(group_consecutive_numbers=True))
    return split_dir


def recipe_config(
    recipe: str,
    seed: int,
    epochs: tuple[int, int],
    learning_rate: float,
    batch_size: int,
    size: int,
) -> Any:
    """The TrainConfig of one recipe: custom_cnn from scratch, grey, augmentation as the phantom
    preset's; stage 2 at a tenth of the stage-1 rate."""
    from tumorflow.core.config import TrainConfig

    settings = dict(RECIPES[recipe])
    rate = learning_rate * settings.pop("lr_scale", 1.0)
    return TrainConfig.model_validate(
        {
            "backbone": "custom_cnn",
            "weights": "none",
            "image_size": size,
            "grayscale": True,
            "batch_size": batch_size,
            "stage1": {"epochs": epochs[0], "learning_rate": rate},
            "stage2": {"epochs": epochs[1], "learning_rate": rate / 10},
            "early_stopping_patience": max(epochs[1], 1),
            "mixed_precision": "off",
            "augment": {"rotation_degrees": 5, "zoom": 0.05, "brightness": 0.0, "contrast": 0.0},
            "seed": seed,
            **settings,
        }
    )


def train_recipe(
    split_dir: Path, run_dir: Path, recipe: str, seed: int, **options: Any
) -> RunStability:
    """Train one recipe with one seed (resuming a finished or half-done run from its folder)."""
    import keras

    from tumorflow.components.training.train import train_model

    keras.backend.clear_session()
    config = recipe_config(recipe, seed, **options)
    result = train_model(split_dir, run_dir / "model", config, run_dir / "checkpoints")
    kept = result.info.get("kept_epoch") or {}
    steps = [(row["stage"], row["epoch"]) for row in result.history]
    kept_key = (kept.get("stage"), kept.get("epoch"))
    return RunStability(
        recipe,
        seed,
        [float(row["val_accuracy"]) for row in result.history],
        [float(row["accuracy"]) for row in result.history],
        steps.index(kept_key) if kept_key in steps else None,
    )


def summary_table(runs: list[RunStability]) -> list[dict[str, Any]]:
    """One row per recipe: each stability measure's mean over its seeds, in recipe order."""
    table = []
    for recipe in dict.fromkeys(run.recipe for run in runs):
        rows = [run.row() for run in runs if run.recipe == recipe]
        table.append(
            {
                "recipe": recipe,
                "seeds": len(rows),
                **{key: float(np.mean([row[key] for row in rows])) for key in rows[0]},
            }
        )
    return table


def format_table(table: list[dict[str, Any]]) -> list[str]:
    """The table as Markdown lines."""
    lines = [
        "| recipe | seeds | swing std | max drop | best val acc | final val acc | kept val acc |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in table:
        lines.append(
            f"| {row['recipe']} | {row['seeds']} | {row['swing_std']:.3f} | "
            f"{row['max_drop']:.3f} | {row['best']:.3f} | {row['final']:.3f} | {row['kept']:.3f} |"
        )
    return lines


def plot_recipe_curves(runs: list[RunStability], path: Path, stage1_epochs: int) -> None:
    """Train (thin) and val (thick) accuracy per epoch, one panel per recipe, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = list(dict.fromkeys(run.recipe for run in runs))
    columns = min(len(recipes), 3)
    rows = -(-len(recipes) // columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(4.2 * columns, 3.4 * rows), sharey=True, squeeze=False
    )
    for axis in axes.flat[len(recipes) :]:
        axis.set_visible(False)
    for axis, recipe in zip(axes.flat, recipes, strict=False):
        for index, run in enumerate(r for r in runs if r.recipe == recipe):
            color = f"C{index}"
            epochs = np.arange(1, len(run.val_accuracy) + 1)
            axis.plot(
                epochs, run.val_accuracy, "-o", color=color, ms=3, label=f"val, seed {run.seed}"
            )
            axis.plot(epochs, run.accuracy, ":", color=color, lw=1)
        axis.axvline(stage1_epochs + 0.5, color="grey", linestyle=":")
        axis.set_title(recipe)
        axis.set_xlabel("epoch (stage 2 after the grey line)")
    for axis in axes[:, 0]:
        axis.set_ylabel("val accuracy (dotted: train)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _parse(args: argparse.Namespace) -> tuple[list[str], list[int], tuple[int, int]]:
    recipes = [name.strip() for name in args.recipes.split(",") if name.strip()]
    unknown = [name for name in recipes if name not in RECIPES]
    if not recipes or unknown:
        raise ConfigError(f"unknown recipe(s) {unknown}; choose from: {', '.join(RECIPES)}")
    try:
        seeds = [int(value) for value in args.seeds.split(",")]
        first, second = (int(value) for value in args.epochs.split(","))
    except ValueError:
        raise ConfigError("--seeds takes integers like 1,2,3 and --epochs two like 10,4") from None
    if first < 2 or second < 0:
        raise ConfigError("--epochs: stage 1 needs at least 2 epochs to measure a swing")
    return recipes, seeds, (first, second)


def run(args: argparse.Namespace) -> int:
    recipes, seeds, epochs = _parse(args)
    workdir = Path(args.workdir)
    split_dir = prepare_split(workdir, args.per_class, args.size)
    options = {
        "epochs": epochs,
        "learning_rate": args.learning_rate,
        "batch_size": args.batch_size,
        "size": args.size,
    }
    runs = []
    for recipe in recipes:
        for seed in seeds:
            run_dir = (
                workdir / "runs" / f"{recipe.replace('/', '_')}-seed{seed}-{epochs[0]}-{epochs[1]}"
            )
            runs.append(train_recipe(split_dir, run_dir, recipe, seed, **options))
            log.info("%s seed %d: %s", recipe, seed, runs[-1].row())
    table = summary_table(runs)
    (workdir / "recipe_bench.json").write_text(
        json.dumps({"table": table, "runs": [run.__dict__ for run in runs]}, indent=2)
    )
    print(
        f"custom_cnn from scratch, hard phantom {args.per_class}/class at {args.size}px, "
        f"epochs {epochs[0]}+{epochs[1]}, stage-1 rate {args.learning_rate:g}, "
        f"batch {args.batch_size}, seeds {','.join(map(str, seeds))}"
    )
    print("\n".join(format_table(table)))
    if args.figure:
        plot_recipe_curves(runs, Path(args.figure), epochs[0])
    return 0
