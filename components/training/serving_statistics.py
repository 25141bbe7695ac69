"""What the export folds into the SavedModel besides the weights, fitted after training: the
calibration temperature (calibration.py, on the validation split) and the OOD detector
(ood.py: statistics of the training split, threshold on the validation split).

The images are decoded exactly as the served model decodes them (export.decode_for_model) and
scored by the Keras model without augmentation. The result goes to `serving_statistics.npz` in
the model folder, which `export_serving_model` reads, and its summary into model_info.json.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tumorflow.components.training.calibration import (
    fit_temperature,
    log_probabilities,
    negative_log_likelihood,
)
from tumorflow.components.training.ood import (
    DEFAULT_FALSE_REJECTION_RATE,
    MahalanobisDetector,
    fit_mahalanobis,
    with_threshold,
)
from tumorflow.core.artifacts import MODEL_FILE, MODEL_INFO_FILE, SERVING_STATISTICS_FILE
from tumorflow.core.errors import ModelError

log = logging.getLogger(__name__)

_BATCH = 64


@dataclass(frozen=True)
class SplitOutputs:
    """The model's softmax probabilities [n, C], embeddings [n, D] and the labels [n] of a split."""

    probs: np.ndarray
    embeddings: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class ServingStatistics:
    """The temperature (1.0: uncalibrated) and the OOD detector (None: no OOD outputs)."""

    temperature: float = 1.0
    detector: MahalanobisDetector | None = None

    def write(self, path: Path) -> None:
        arrays: dict[str, Any] = {"temperature": np.float64(self.temperature)}
        if self.detector is not None:
            arrays |= {
                "class_means": self.detector.class_means,
                "precision": self.detector.precision,
                "threshold": np.float64(self.detector.threshold),
            }
        with Path(path).open("wb") as handle:
            np.savez(handle, **arrays)


def read_serving_statistics(model_dir: Path) -> ServingStatistics:
    """The statistics of a model folder; a folder without them (trained before they existed, or
    with both switched off) serves uncalibrated scores and no OOD outputs."""
    path = Path(model_dir) / SERVING_STATISTICS_FILE
    if not path.is_file():
        return ServingStatistics()
    with np.load(path) as arrays:
        detector = None
        if "class_means" in arrays:
            detector = MahalanobisDetector(
                arrays["class_means"], arrays["precision"], float(arrays["threshold"])
            )
        return ServingStatistics(float(arrays["temperature"]), detector)


def split_outputs(model: Any, split_dir: Path, split: str, grayscale: bool) -> SplitOutputs:
    """Run the Keras classifier on one split's images, decoded as serving decodes them."""
    import keras
    import tensorflow as tf

    from tumorflow.components.data.tfrecords import read_records
    from tumorflow.components.training.export import EMBEDDING_LAYER, decode_for_model

    dual = keras.Model(model.inputs, [model.outputs[0], model.get_layer(EMBEDDING_LAYER).output])
    image_size = int(model.inputs[0].shape[1])
    probs, embeddings, labels = [], [], []
    records = read_records(Path(split_dir), split)
    while batch := list(itertools.islice(records, _BATCH)):
        pixels = tf.stack([decode_for_model(r.encoded, image_size, grayscale) for r in batch])
        scores, features = dual(pixels, training=False)
        probs.append(np.asarray(scores, dtype=np.float64))
        embeddings.append(np.asarray(features, dtype=np.float64))
        labels.extend(r.label for r in batch)
    if not labels:
        raise ModelError(f"the {split} split of {split_dir} is empty")
    return SplitOutputs(np.concatenate(probs), np.concatenate(embeddings), np.array(labels))


def fit_serving_statistics(
    model_dir: Path,
    split_dir: Path,
    *,
    calibration: Literal["temperature", "none"] = "temperature",
    ood: Literal["mahalanobis", "none"] = "mahalanobis",
    ood_false_rejection_rate: float = DEFAULT_FALSE_REJECTION_RATE,
    model: Any = None,
) -> dict[str, Any]:
    """Fit the temperature and the OOD detector of a trained model folder on its split dataset;
    write serving_statistics.npz and add their summary (`calibration`, `ood`) to model_info.json.
    `model` is the folder's Keras model when already in memory. Returns the summary."""
    import keras

    model_dir = Path(model_dir)
    info_path = model_dir / MODEL_INFO_FILE
    info = json.loads(info_path.read_text())
    grayscale = bool(info.get("grayscale"))
    if model is None:
        model = keras.saving.load_model(model_dir / MODEL_FILE, compile=False)
    val = split_outputs(model, split_dir, "val", grayscale)
    summary: dict[str, Any] = {}
    statistics = ServingStatistics()
    if calibration == "temperature":
        logits = log_probabilities(val.probs)
        temperature = fit_temperature(logits, val.labels)
        summary["calibration"] = {
            "method": "temperature",
            "temperature": temperature,
            "val_nll_before": negative_log_likelihood(logits, val.labels, 1.0),
            "val_nll_after": negative_log_likelihood(logits, val.labels, temperature),
            "val_images": len(val.labels),
        }
        statistics = ServingStatistics(temperature=temperature)
        log.info(
            "temperature scaling: T=%.3f, validation NLL %.4f -> %.4f",
            temperature,
            summary["calibration"]["val_nll_before"],
            summary["calibration"]["val_nll_after"],
        )
    if ood == "mahalanobis":
        train = split_outputs(model, split_dir, "train", grayscale)
        detector = with_threshold(
            fit_mahalanobis(train.embeddings, train.labels),
            val.embeddings,
            ood_false_rejection_rate,
        )
        summary["ood"] = {
            "method": "mahalanobis",
            "threshold": detector.threshold,
            "false_rejection_rate": ood_false_rejection_rate,
            "val_rejected": float(np.mean(~detector.in_distribution(val.embeddings))),
            "train_images": len(train.labels),
        }
        statistics = ServingStatistics(statistics.temperature, detector)
        log.info(
            "OOD detector: Mahalanobis threshold %.2f rejects %.1f%% of the validation images",
            detector.threshold,
            100 * summary["ood"]["val_rejected"],
        )
    statistics.write(model_dir / SERVING_STATISTICS_FILE)
    info_path.write_text(json.dumps({**info, **summary}, indent=2))
    return summary
