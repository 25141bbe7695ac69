"""Evaluation of a trained model on a held-out split: metrics.json, predictions and plots.

Writes the "Evaluation" folder of docs/artifacts.md. `macro_roc_auc` is the mean one-vs-rest AUC
over the classes that have both positives and negatives in `y_true`; a class absent from (or alone
in) `y_true` has `roc_auc: null` and is left out of the mean, and when no class qualifies
`macro_roc_auc` is `null`. `ece` is the top-label expected calibration error over 15 equal-width
confidence bins.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from tumorflow.core.errors import DatasetError, ModelError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
PLOTS = ("confusion_matrix.png", "roc.png", "reliability.png")
ECE_BINS = 15
PER_CLASS_STATS = ("precision", "recall", "f1", "sensitivity", "specificity")


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0


def expected_calibration_error(
    y_true: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS
) -> float:
    """Top-label ECE: the count-weighted gap between confidence and accuracy per confidence bin."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    # Bin i holds confidences in (i/bins, (i+1)/bins]; a confidence of exactly 0 goes to bin 0.
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


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
    from sklearn.metrics import confusion_matrix, roc_auc_score

    y_true = np.asarray(y_true).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    _check_inputs(y_true, probs, classes)
    y_pred = probs.argmax(axis=1)
    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(classes))))
    n = int(matrix.sum())
    per_class: dict[str, dict[str, Any]] = {}
    aucs = []
    for index, name in enumerate(classes):
        tp = matrix[index, index]
        fn = matrix[index].sum() - tp
        fp = matrix[:, index].sum() - tp
        tn = n - tp - fn - fp
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        positives = y_true == index
        auc = None
        if 0 < positives.sum() < n:
            auc = float(roc_auc_score(positives, probs[:, index]))
            aucs.append(auc)
        per_class[name] = {
            "precision": precision,
            "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall),
            "sensitivity": recall,
            "specificity": _ratio(tn, tn + fp),
            "support": int(tp + fn),
            "roc_auc": auc,
        }
    return {
        "classes": list(classes),
        "accuracy": _ratio(np.trace(matrix), n),
        "macro_f1": float(np.mean([stats["f1"] for stats in per_class.values()])),
        "macro_roc_auc": float(np.mean(aucs)) if aucs else None,
        "ece": expected_calibration_error(y_true, probs),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "n": n,
    }


def roc_points(
    y_true: np.ndarray, probs: np.ndarray, classes: list[str]
) -> dict[str, dict[str, list[float]]]:
    """One-vs-rest ROC curve per class (`fpr`, `tpr`, `threshold`), for classes with both outcomes.

    The first threshold, which scikit-learn sets to infinity, is written as 1.0 so it is JSON.
    """
    from sklearn.metrics import roc_curve

    curves = {}
    for index, name in enumerate(classes):
        positives = np.asarray(y_true) == index
        if 0 < positives.sum() < len(positives):
            fpr, tpr, threshold = roc_curve(positives, probs[:, index])
            curves[name] = {
                "fpr": fpr.tolist(),
                "tpr": tpr.tolist(),
                "threshold": np.minimum(threshold, 1.0).tolist(),
            }
    return curves


def read_predictions(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """predictions.csv back as (paths, labels [n], probs [n, C], classes)."""
    with Path(path).open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        rows = list(reader)
    classes = [column.removeprefix("p_") for column in header[2:]]
    paths = [row[0] for row in rows]
    labels = np.array([int(row[1]) for row in rows], dtype=int)
    probs = np.array([[float(v) for v in row[2:]] for row in rows], dtype=np.float64)
    return paths, labels, probs.reshape(len(rows), len(classes)), classes


def kfp_classification_payload(
    metrics: dict[str, Any], predictions: Path
) -> tuple[list[list[int]], dict[str, dict[str, list[float]]]]:
    """Arguments for KFP's ClassificationMetrics, from metrics.json and predictions.csv.

    Returns `(matrix, curves)`: call `log_confusion_matrix(metrics["classes"], matrix)`, and
    `log_roc_curve(c["fpr"], c["tpr"], c["threshold"])` for a curve `c` of `curves[<class>]`.
    """
    _, labels, probs, _ = read_predictions(predictions)
    return metrics["confusion_matrix"], roc_points(labels, probs, metrics["classes"])


def gate_metric_values(metrics: dict[str, Any]) -> dict[str, float]:
    """Point values under the gate's names: accuracy, macro_f1, ..., `<stat>:<class>`."""
    values = {
        key: float(metrics[key])
        for key in ("accuracy", "macro_f1", "macro_roc_auc", "ece")
        if metrics.get(key) is not None
    }
    for name, stats in metrics["per_class"].items():
        for stat in PER_CLASS_STATS:
            values[f"{stat}:{name}"] = float(stats[stat])
    return values


def log_kfp_metrics(
    metrics: dict[str, Any],
    evaluation_dir: Path,
    scalar_metrics: Any,
    classification: Any,
    roc_class: str | None = None,
) -> None:
    """Fill KFP `Metrics` and `ClassificationMetrics` output artifacts (passed in by the wrapper).

    KFP holds one ROC curve per artifact: that of `roc_class` (default: `tumor` if it is a class,
    else the last class) when the split has both outcomes for it.
    """
    for name, value in gate_metric_values(metrics).items():
        scalar_metrics.log_metric(name, value)
    matrix, curves = kfp_classification_payload(metrics, Path(evaluation_dir) / PREDICTIONS_FILE)
    classification.log_confusion_matrix(metrics["classes"], matrix)
    chosen = roc_class or ("tumor" if "tumor" in metrics["classes"] else metrics["classes"][-1])
    if chosen in curves:
        curve = curves[chosen]
        classification.log_roc_curve(curve["fpr"], curve["tpr"], curve["threshold"])


def _plot_confusion(metrics: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    matrix = np.array(metrics["confusion_matrix"])
    classes = metrics["classes"]
    fig, axis = plt.subplots(figsize=(1.2 * len(classes) + 3, 1.2 * len(classes) + 2))
    axis.imshow(matrix, cmap="Blues")
    for (row, col), value in np.ndenumerate(matrix):
        color = "white" if value > matrix.max() / 2 else "black"
        axis.text(col, row, str(value), ha="center", va="center", color=color)
    axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axis.set_yticks(range(len(classes)), classes)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(f"confusion matrix (n={metrics['n']}, accuracy {metrics['accuracy']:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_roc(
    curves: dict[str, dict[str, list[float]]], metrics: dict[str, Any], path: Path
) -> None:
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(5.5, 5))
    for name, curve in curves.items():
        auc = metrics["per_class"][name]["roc_auc"]
        axis.plot(curve["fpr"], curve["tpr"], label=f"{name} (AUC {auc:.3f})")
    axis.plot([0, 1], [0, 1], ":", color="grey")
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    axis.set_title("ROC, one vs rest")
    axis.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_reliability(y_true: np.ndarray, probs: np.ndarray, ece: float, path: Path) -> None:
    import matplotlib.pyplot as plt

    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    index = np.clip(np.ceil(confidence * ECE_BINS).astype(int) - 1, 0, ECE_BINS - 1)
    centers = (np.arange(ECE_BINS) + 0.5) / ECE_BINS
    accuracy = [correct[index == b].mean() if (index == b).any() else 0.0 for b in range(ECE_BINS)]
    counts = np.bincount(index, minlength=ECE_BINS)
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.bar(centers, accuracy, width=1 / ECE_BINS, edgecolor="black", label="accuracy")
    top.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_title(f"reliability (top label), ECE {ece:.3f}")
    top.legend(loc="upper left")
    bottom.bar(centers, counts, width=1 / ECE_BINS, color="grey")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _predict_split(
    model: Any, split_dir: Path, split: str, image_size: int, grayscale: bool
) -> tuple[list[str], np.ndarray, np.ndarray]:
    import tensorflow as tf

    from tumorflow.components.input_pipeline import decoded_examples

    paths, labels, probs = [], [], []
    examples = decoded_examples(split_dir, split, image_size, ordered=True, grayscale=grayscale)
    for batch in examples.batch(64):
        probs.append(np.asarray(model(tf.cast(batch["image"], tf.float32), training=False)))
        labels.append(batch["label"].numpy())
        paths.extend(p.decode() for p in batch["path"].numpy())
    return paths, np.concatenate(labels), np.concatenate(probs).astype(np.float64)


def _load_model(model_dir: Path) -> tuple[Any, dict[str, Any]]:
    import keras

    info_path, model_path = model_dir / "model_info.json", model_dir / "model.keras"
    if not info_path.exists() or not model_path.exists():
        raise ModelError(
            f"{model_dir} is not a model folder: model.keras or model_info.json missing"
        )
    try:
        return keras.models.load_model(model_path), json.loads(info_path.read_text())
    except Exception as exc:
        raise ModelError(f"cannot load {model_path}: {exc}. Re-run the train step.") from exc


def _log_to_mlflow(
    tracking_uri: str, run_id: str, split: str, metrics: dict[str, Any], output_dir: Path
) -> None:
    import time

    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    values = gate_metric_values(metrics)
    entries = [
        Metric(f"{split}_{name.replace(':', '_')}", value, now, 0) for name, value in values.items()
    ]
    client.log_batch(run_id, metrics=entries)
    for name in (METRICS_FILE, PREDICTIONS_FILE, *PLOTS):
        client.log_artifact(run_id, str(output_dir / name), artifact_path="evaluation")


def evaluate_model(
    model_dir: Path,
    split_dir: Path,
    output_dir: Path,
    split: str = "test",
    tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
) -> dict[str, Any]:
    """Predict one split with model.keras; write metrics.json, predictions.csv and the plots.

    Metrics (as `test_accuracy`, `test_recall_tumor`, ...) and the files also go to the MLflow
    run `mlflow_run_id` when both it and `tracking_uri` are given. Returns the metrics.
    """
    import matplotlib

    from tumorflow.components.tfrecords import read_split_manifest

    matplotlib.use("Agg")
    model_dir, split_dir, output_dir = Path(model_dir), Path(split_dir), Path(output_dir)
    model, info = _load_model(model_dir)
    classes = list(info["classes"])
    dataset_classes = read_split_manifest(split_dir)["classes"]
    if dataset_classes != classes:
        raise ModelError(
            f"the model was trained on classes {classes} but {split_dir} has {dataset_classes}; "
            "evaluate it on a split dataset made with the same classes"
        )
    paths, labels, probs = _predict_split(
        model, split_dir, split, int(info["image_size"][0]), bool(info.get("grayscale"))
    )
    metrics = compute_metrics(labels, probs, classes)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, allow_nan=False))
    with (output_dir / PREDICTIONS_FILE).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label_index", *(f"p_{name}" for name in classes)])
        for path, label, row in zip(paths, labels, probs, strict=True):
            writer.writerow([path, int(label), *(f"{p:.6f}" for p in row)])
    _plot_confusion(metrics, output_dir / PLOTS[0])
    _plot_roc(roc_points(labels, probs, classes), metrics, output_dir / PLOTS[1])
    _plot_reliability(labels, probs, metrics["ece"], output_dir / PLOTS[2])
    if tracking_uri and mlflow_run_id:
        _log_to_mlflow(tracking_uri, mlflow_run_id, split, metrics, output_dir)
    elif tracking_uri:
        log.info("no MLflow run id given: evaluation not logged to MLflow")
    log.info(
        "%s split: n=%d accuracy %.4f macro F1 %.4f ECE %.4f",
        split,
        metrics["n"],
        metrics["accuracy"],
        metrics["macro_f1"],
        metrics["ece"],
    )
    return metrics
