"""Every metric formula of the project, once: the evaluation's point values and the gate's
bootstrap resamples are the same vectorised code, run on one row or on thousands.

Metrics are computed over a batch of resamples: labels `y` [R, n] and scores `probs` [R, n, C];
the point estimate is the batch of one (R = 1). `macro_roc_auc` is the mean one-vs-rest AUC
(Mann-Whitney, ties counted one half, as scikit-learn) over the classes that have both positives
and negatives; `ece` is the top-label expected calibration error over `ECE_BINS` equal-width
confidence bins, with the binning of `confidence_bins` used everywhere (point, bootstrap, plot).
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tumorflow.core.errors import DatasetError, GateError, ModelError

ECE_BINS = 15
GLOBAL_METRICS = ("accuracy", "macro_f1", "macro_roc_auc", "ece")
PER_CLASS_STATS = ("precision", "recall", "f1", "sensitivity", "specificity")
# Resample rows scored at once by `bootstrap_metrics` (memory: about rows * n * C * 8 bytes).
_BLOCK_CELLS = 4_000_000
SLICE_PREFIX = "slice:"


@dataclass(frozen=True)
class Predictions:
    """One model's scores of a split: image paths, labels [n], probabilities [n, C], class names,
    and the slice each image belongs to per slice column (`slices["site"][i]`, '' = unknown)."""

    paths: list[str]
    y_true: np.ndarray
    probs: np.ndarray
    classes: list[str]
    slices: dict[str, list[str]] = field(default_factory=dict)

    def write(self, path: Path) -> None:
        """predictions.csv: `path,label_index,p_<class>...,slice:<column>...` (docs/artifacts.md
        "Evaluation")."""
        columns = list(self.slices)
        with Path(path).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(
                [
                    "path",
                    "label_index",
                    *(f"p_{name}" for name in self.classes),
                    *(SLICE_PREFIX + column for column in columns),
                ]
            )
            for index, (name, label, row) in enumerate(
                zip(self.paths, self.y_true, self.probs, strict=True)
            ):
                writer.writerow(
                    [
                        name,
                        int(label),
                        *(f"{p:.6f}" for p in row),
                        *(self.slices[column][index] for column in columns),
                    ]
                )

    def subset(self, rows: np.ndarray) -> Predictions:
        """The predictions of the rows `rows` (indices)."""
        rows = np.asarray(rows, dtype=int)
        return Predictions(
            [self.paths[i] for i in rows],
            self.y_true[rows],
            self.probs[rows],
            self.classes,
            {column: [values[i] for i in rows] for column, values in self.slices.items()},
        )

    def slice_rows(self, column: str) -> dict[str, np.ndarray]:
        """Row indices of each known value of a slice column (unknown, '', left out)."""
        groups: dict[str, list[int]] = {}
        for index, value in enumerate(self.slices[column]):
            if value:
                groups.setdefault(value, []).append(index)
        return {value: np.array(rows) for value, rows in sorted(groups.items())}


def read_predictions(path: Path, classes: list[str] | None = None) -> Predictions:
    """predictions.csv back; with `classes`, the score columns in that order (all must exist)."""
    with Path(path).open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, [])
        rows = list(reader)
    columns = {name: index for index, name in enumerate(header)}
    written = [name.removeprefix("p_") for name in header if name.startswith("p_")]
    wanted = written if classes is None else list(classes)
    missing = [c for c in ("path", "label_index", *(f"p_{c}" for c in wanted)) if c not in columns]
    if missing:
        raise ModelError(f"{path} lacks the columns {missing}; re-run the evaluate step")
    score_columns = [columns[f"p_{c}"] for c in wanted]
    slice_columns = {
        name.removeprefix(SLICE_PREFIX): index
        for index, name in enumerate(header)
        if name.startswith(SLICE_PREFIX)
    }
    return Predictions(
        paths=[row[columns["path"]] for row in rows],
        y_true=np.array([int(row[columns["label_index"]]) for row in rows], dtype=int),
        probs=np.array(
            [[float(row[i]) for i in score_columns] for row in rows], dtype=np.float64
        ).reshape(len(rows), len(wanted)),
        classes=wanted,
        slices={column: [row[index] for row in rows] for column, index in slice_columns.items()},
    )


def metric_names(classes: list[str]) -> list[str]:
    """Every metric name a gate rule may use for these classes: globals, then `<stat>:<class>`."""
    return [*GLOBAL_METRICS, *(f"{stat}:{c}" for stat in PER_CLASS_STATS for c in classes)]


def check_metric(name: str, classes: list[str]) -> None:
    """Raise GateError naming the valid metrics when `name` is not one of them."""
    if name not in metric_names(classes):
        raise GateError(
            f"unknown gate metric {name!r}; valid names: {', '.join(metric_names(classes))}"
        )


def metric_value(metrics: dict[str, Any], name: str) -> float:
    """The value of a named metric in a metrics.json dict (NaN where it is null)."""
    check_metric(name, list(metrics["classes"]))
    if ":" in name:
        stat, label = name.split(":", 1)
        value = metrics["per_class"][label][stat]
    else:
        value = metrics[name]
    return float("nan") if value is None else float(value)


def gate_metric_values(metrics: dict[str, Any]) -> dict[str, float]:
    """Point values under the gate's names (null ones left out): accuracy, ..., `<stat>:<class>`."""
    names = metric_names(list(metrics["classes"]))
    values = {name: metric_value(metrics, name) for name in names}
    return {name: value for name, value in values.items() if np.isfinite(value)}


def confidence_bins(confidence: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """Bin index of each top-label confidence: bin i holds (i/bins, (i+1)/bins]; 0 goes to bin 0."""
    return np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)


@dataclass(frozen=True)
class CalibrationBins:
    """Per confidence bin: images, mean confidence and accuracy (NaN in empty bins)."""

    counts: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray


def calibration_bins(
    y_true: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS
) -> CalibrationBins:
    """The reliability diagram's data of one model's scores."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(float)
    index = confidence_bins(confidence, bins)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return CalibrationBins(
            counts=counts,
            confidence=np.bincount(index, confidence, bins) / counts,
            accuracy=np.bincount(index, correct, bins) / counts,
        )


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1e-300), 0.0)


def _roc_auc(probs: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """One-vs-rest AUC [R, C] by rank sums (average ranks for ties); NaN without both outcomes."""
    from scipy.stats import rankdata

    n = probs.shape[1]
    positives = truth.sum(axis=1).astype(float)
    ranks = rankdata(probs, axis=1)
    rank_sums = (ranks * truth).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sums - positives * (positives + 1) / 2) / (positives * (n - positives))
    return np.where((positives > 0) & (positives < n), auc, np.nan)


def batch_metrics(y: np.ndarray, probs: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Named metrics of each row of a batch: y [R, n], probs [R, n, C] -> {name: [R]}.

    Per-class names use the class index: `recall:3`. Every formula of the project is here.
    """
    rows, n, n_classes = probs.shape
    pred = probs.argmax(axis=2)
    truth = y[..., None] == np.arange(n_classes)
    guess = pred[..., None] == np.arange(n_classes)
    tp = (truth & guess).sum(axis=1).astype(float)
    fp = (~truth & guess).sum(axis=1)
    fn = (truth & ~guess).sum(axis=1)
    tn = n - tp - fp - fn
    stats = {
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "specificity": _ratio(tn, tn + fp),
    }
    stats["sensitivity"] = stats["recall"]
    values: dict[str, np.ndarray] = {}
    for name in names:
        if name == "accuracy":
            values[name] = (pred == y).mean(axis=1)
        elif name == "macro_f1":
            values[name] = stats["f1"].mean(axis=1)
        elif name == "macro_roc_auc":
            auc = _roc_auc(probs, truth)
            with warnings.catch_warnings():  # a resample where no class has both outcomes
                warnings.simplefilter("ignore", RuntimeWarning)
                values[name] = np.nanmean(auc, axis=1)
        elif name == "ece":
            confidence = probs.max(axis=2)
            correct = (pred == y).astype(float)
            offsets = confidence_bins(confidence) + ECE_BINS * np.arange(rows)[:, None]
            size = rows * ECE_BINS
            gap = np.bincount(offsets.ravel(), correct.ravel(), size) - np.bincount(
                offsets.ravel(), confidence.ravel(), size
            )
            values[name] = np.abs(gap.reshape(rows, ECE_BINS)).sum(axis=1) / n
        else:
            stat, label_index = name.split(":", 1)
            values[name] = stats[stat][:, int(label_index)]
    return values


def _indexed(names: list[str], classes: list[str]) -> list[str]:
    """Gate names (`recall:tumor`) as `batch_metrics` names (`recall:3`)."""
    for name in names:
        check_metric(name, classes)
    return [
        name if ":" not in name else f"{name.split(':')[0]}:{classes.index(name.split(':')[1])}"
        for name in names
    ]


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Top-label ECE: the count-weighted gap between confidence and accuracy per confidence bin."""
    y = np.asarray(y_true).astype(int)[None]
    return float(batch_metrics(y, np.asarray(probs, dtype=np.float64)[None], ["ece"])["ece"][0])


def _check_inputs(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> None:
    if len(y_true) == 0:
        raise DatasetError("cannot compute metrics of an empty split")
    if probs.ndim != 2 or probs.shape != (len(y_true), len(classes)):
        raise ModelError(
            f"predictions have shape {probs.shape}, expected ({len(y_true)}, {len(classes)}): "
            "the model's classes do not match the dataset's"
        )
    if y_true.min() < 0 or y_true.max() >= len(classes):
        raise DatasetError(f"labels must be class indices 0..{len(classes) - 1}")


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """The metrics.json dictionary of predictions `probs` [n, C] against labels `y_true` [n]."""
    y_true = np.asarray(y_true).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    _check_inputs(y_true, probs, classes)
    names = metric_names(classes)
    internal = _indexed(names, classes)
    batch = batch_metrics(y_true[None], probs[None], internal)
    point = {name: float(batch[key][0]) for name, key in zip(names, internal, strict=True)}
    aucs = _roc_auc(probs[None], (y_true[:, None] == np.arange(len(classes)))[None])[0]
    matrix = np.zeros((len(classes), len(classes)), dtype=int)
    np.add.at(matrix, (y_true, probs.argmax(axis=1)), 1)
    per_class = {
        name: {
            **{stat: point[f"{stat}:{name}"] for stat in PER_CLASS_STATS},
            "support": int(matrix[index].sum()),
            "roc_auc": None if np.isnan(aucs[index]) else float(aucs[index]),
        }
        for index, name in enumerate(classes)
    }
    macro_auc = point["macro_roc_auc"]
    return {
        "classes": list(classes),
        "accuracy": point["accuracy"],
        "macro_f1": point["macro_f1"],
        "macro_roc_auc": None if np.isnan(macro_auc) else macro_auc,
        "ece": point["ece"],
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "n": len(y_true),
    }


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """Row indices [resamples, n] of a seeded bootstrap."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    names: list[str],
    indices: np.ndarray,
) -> dict[str, np.ndarray]:
    """Each named metric over bootstrap resamples of the rows: {name: [resamples]}.

    `indices` come from `bootstrap_indices`; the same indices resample two models' scores of the
    same images identically (a paired bootstrap). Resamples are scored in blocks, vectorised.
    """
    internal = _indexed(names, classes)
    block = max(1, _BLOCK_CELLS // max(1, len(y_true) * probs.shape[1]))
    parts = [
        batch_metrics(
            y_true[indices[start : start + block]], probs[indices[start : start + block]], internal
        )
        for start in range(0, len(indices), block)
    ]
    return {
        name: np.concatenate([part[key] for part in parts])
        for name, key in zip(names, internal, strict=True)
    }


def confidence_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval of bootstrap samples (NaN resamples, e.g. a class absent, ignored)."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def defined_metric_values(
    y_true: np.ndarray, probs: np.ndarray, classes: list[str], names: list[str]
) -> dict[str, float]:
    """Point values of `names` on a (small) set of images, NaN where a metric is undefined there:
    recall/sensitivity/f1 of a class with no images of it, precision of a class never predicted,
    specificity without images of the other classes (`batch_metrics` counts those as 0)."""
    y_true = np.asarray(y_true).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    batch = batch_metrics(y_true[None], probs[None], _indexed(names, classes))
    values = {
        name: float(batch[key][0])
        for name, key in zip(names, _indexed(names, classes), strict=True)
    }
    predicted = probs.argmax(axis=1)
    for name in names:
        if ":" not in name:
            continue
        stat, label = name.split(":", 1)
        index = classes.index(label)
        count = {
            "recall": (y_true == index).sum(),
            "sensitivity": (y_true == index).sum(),
            "f1": (y_true == index).sum(),
            "precision": (predicted == index).sum(),
            "specificity": (y_true != index).sum(),
        }[stat]
        if count == 0:
            values[name] = float("nan")
    return values


def metrics_per_slice(predictions: Predictions) -> dict[str, dict[str, dict[str, Any]]]:
    """{column: {value: {"n": images, <metric>: point value...}}} for every slice column;
    metrics undefined on a slice (see `defined_metric_values`) are left out."""
    names = metric_names(predictions.classes)
    report: dict[str, dict[str, dict[str, Any]]] = {}
    for column in predictions.slices:
        report[column] = {}
        for value, rows in predictions.slice_rows(column).items():
            values = defined_metric_values(
                predictions.y_true[rows], predictions.probs[rows], predictions.classes, names
            )
            report[column][value] = {
                "n": len(rows),
                **{name: v for name, v in values.items() if np.isfinite(v)},
            }
    return report
