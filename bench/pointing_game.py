"""The pointing game (Zhang et al. 2016) of the served `explain` signature on phantom slices.

The phantom generator knows where every lesion is; an explanation "hits" when its heat map's
peak falls on the lesion (within `tolerance` pixels, the game's usual 15 px at 224 px, scaled).
Only correctly classified Cyst, Stone and Tumor slices count: the heat map explains the model's
answer, and a Normal slice has no lesion to point at. `tumorflow bench explain` trains a small
classifier on one set of phantom patients and plays the game on unseen ones.
"""

from __future__ import annotations

import argparse
import io
import logging
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tumorflow.components.data.phantom import CLASSES, PhantomSlice, phantom_slices
from tumorflow.components.data.tfrecords import Record, write_split
from tumorflow.components.training.export import EXPLAIN_SIGNATURE, HEATMAP, INPUT
from tumorflow.core.artifacts import SERVING_EXPORT

log = logging.getLogger(__name__)

# The original game's tolerance: 15 pixels of a 224-pixel image.
TOLERANCE_FRACTION = 15 / 224


@dataclass
class PointingGameResult:
    """Hits and counted slices per class; `hit_rate` over all counted slices."""

    hits: dict[str, int] = field(default_factory=dict)
    counted: dict[str, int] = field(default_factory=dict)
    misclassified: int = 0
    # Per counted slice: the share of its pixels that would count as a hit (a random peak's odds).
    chance_shares: list[float] = field(default_factory=list)

    @property
    def chance_rate(self) -> float:
        """The hit rate a peak placed uniformly at random would reach on the same slices."""
        return float(np.mean(self.chance_shares)) if self.chance_shares else 0.0

    @property
    def hit_rate(self) -> float:
        total = sum(self.counted.values())
        return sum(self.hits.values()) / total if total else 0.0

    def summary(self) -> str:
        per_class = ", ".join(
            f"{kind} {self.hits.get(kind, 0)}/{count}" for kind, count in self.counted.items()
        )
        return (
            f"pointing game: {self.hit_rate:.1%} of {sum(self.counted.values())} correctly "
            f"classified lesion slices ({per_class}; {self.misclassified} misclassified, "
            f"not counted); a random peak: {self.chance_rate:.1%}"
        )


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _near_lesion(lesion_mask: np.ndarray, tolerance: float) -> np.ndarray:
    """The pixels within `tolerance` of a lesion pixel."""
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(~lesion_mask) <= tolerance


def peak_hits_lesion(heatmap: np.ndarray, lesion_mask: np.ndarray, tolerance: float) -> bool:
    """Whether the heat map's peak, scaled to the slice's size, lies within `tolerance` pixels
    of a lesion pixel."""
    row, column = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    scale_r = lesion_mask.shape[0] / heatmap.shape[0]
    scale_c = lesion_mask.shape[1] / heatmap.shape[1]
    peak = np.array([(row + 0.5) * scale_r - 0.5, (column + 0.5) * scale_c - 0.5])
    lesion = np.argwhere(lesion_mask)
    if len(lesion) == 0:
        return False
    return bool(np.min(np.hypot(*(lesion - peak).T)) <= tolerance)


def play_pointing_game(
    export_dir: Path, slices: Iterable[PhantomSlice], batch_size: int = 32
) -> PointingGameResult:
    """Play the game with the `explain` signature of the SavedModel in `export_dir`, whose
    classes are the phantom's (any case)."""
    import tensorflow as tf

    explain = tf.saved_model.load(str(export_dir)).signatures[EXPLAIN_SIGNATURE]
    result = PointingGameResult()
    lesion_slices = [s for s in slices if s.lesion_mask.any()]
    for start in range(0, len(lesion_slices), batch_size):
        batch = lesion_slices[start : start + batch_size]
        answer = explain(**{INPUT: tf.constant([_png(s.pixels) for s in batch])})
        predicted = [c.decode().lower() for c in answer["predicted_class"].numpy()]
        for one, guess, heatmap in zip(batch, predicted, answer[HEATMAP].numpy(), strict=True):
            if guess != one.kind.lower():
                result.misclassified += 1
                continue
            tolerance = TOLERANCE_FRACTION * one.pixels.shape[0]
            result.counted[one.kind] = result.counted.get(one.kind, 0) + 1
            result.chance_shares.append(float(_near_lesion(one.lesion_mask, tolerance).mean()))
            if peak_hits_lesion(heatmap, one.lesion_mask, tolerance):
                result.hits[one.kind] = result.hits.get(one.kind, 0) + 1
    return result


def write_phantom_split(folder: Path, splits: dict[str, list[PhantomSlice]]) -> Path:
    """A split dataset (docs/artifacts.md) of phantom slices, one patient per duplicate group."""
    records = {
        split: [
            Record(_png(s.pixels), CLASSES.index(s.kind), f"{split}/{s.kind}/{s.name}", s.name)
            for s in slices
        ]
        for split, slices in splits.items()
    }
    return write_split(folder, CLASSES, records)


def train_phantom_classifier(workdir: Path, per_class: int, size: int, epochs: int) -> Path:
    """Train and export a custom_cnn on phantom patients of seeds 0 (train) and 1 (val); return
    the serving export. Test patients come from other seeds."""
    from tumorflow.components.training.export import export_model_artifact
    from tumorflow.components.training.train import train_model
    from tumorflow.core.config import TrainConfig

    split_dir = write_phantom_split(
        Path(workdir) / "split",
        {
            "train": list(phantom_slices(per_class, size, seed=0)),
            "val": list(phantom_slices(max(4, per_class // 4), size, seed=1)),
        },
    )
    config = TrainConfig.model_validate(
        {
            "backbone": "custom_cnn",
            "image_size": size,
            "grayscale": True,
            "batch_size": 16,
            "stage1": {"epochs": epochs, "learning_rate": 1e-3},
            "stage2": {"epochs": 0, "learning_rate": 1e-4},
            "dropout": 0.1,
            "early_stopping_patience": epochs,
            "mixed_precision": "off",
        }
    )
    result = train_model(split_dir, Path(workdir) / "model", config, Path(workdir) / "ckpt")
    export_model_artifact(result.model_dir)
    return result.model_dir / SERVING_EXPORT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", default="", help="a serving SavedModel to score (default: train a small one)")
    add("--per-class", type=int, default=100, help="phantom training slices per class")
    add("--test-per-class", type=int, default=40, help="unseen phantom slices per class")
    add("--size", type=int, default=128, help="phantom slice side in pixels")
    add("--epochs", type=int, default=15, help="training epochs of the small model")


def run(args: argparse.Namespace) -> int:
    """`tumorflow bench explain`: print the pointing-game figure."""
    test = list(phantom_slices(args.test_per_class, args.size, seed=7))
    if args.model:
        result = play_pointing_game(Path(args.model), test)
    else:
        with tempfile.TemporaryDirectory() as workdir:
            export = train_phantom_classifier(Path(workdir), args.per_class, args.size, args.epochs)
            result = play_pointing_game(export, test)
    print(result.summary())
    return 0
