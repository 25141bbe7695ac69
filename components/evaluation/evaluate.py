"""Evaluation of a trained model on a held-out split: metrics.json, predictions and plots.

Writes the "Evaluation" folder of docs/artifacts.md. The model is scored through the serving
SavedModel the train step exported (`<model>/saved_model/`, signature `serving_default` on the
split's encoded image bytes): the artifact evaluated is the one deploy publishes, and
`score_saved_model` is also how the gate re-scores the champion. The formulas live in
`components/evaluation/metrics.py`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from tumorflow.components.evaluation.metrics import (
    ECE_BINS,
    Predictions,
    calibration_bins,
    compute_metrics,
    expected_calibration_error,
    gate_metric_values,
    metrics_per_slice,
    read_predictions,
)
from tumorflow.core.artifacts import (
    EVALUATED_MODEL_FILE,
    EXTERNAL_DIR,
    METRICS_FILE,
    PLOTS,
    PREDICTIONS_FILE,
    REVIEW_HEATMAPS_FILE,
)
from tumorflow.core.errors import DatasetError, ModelError

log = logging.getLogger(__name__)

PREDICT_BATCH = 64
# Grad-CAM costs a forward and a backward pass per image: the review shows at most this many.
MAX_REVIEW_IMAGES = 24


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


def kfp_classification_payload(
    metrics: dict[str, Any], predictions: Path
) -> tuple[list[list[int]], dict[str, dict[str, list[float]]]]:
    """Arguments for KFP's ClassificationMetrics, from metrics.json and predictions.csv.

    Returns `(matrix, curves)`: call `log_confusion_matrix(metrics["classes"], matrix)`, and
    `log_roc_curve(c["fpr"], c["tpr"], c["threshold"])` for a curve `c` of `curves[<class>]`.
    """
    scored = read_predictions(predictions, list(metrics["classes"]))
    return metrics["confusion_matrix"], roc_points(scored.y_true, scored.probs, scored.classes)


def reported_class(classes: list[str], positive_class: str) -> str:
    """`positive_class` when it is one of `classes`, else the last class (with a warning)."""
    if positive_class in classes:
        return positive_class
    log.warning(
        "positive class %r is not one of %s: reporting %r instead",
        positive_class,
        classes,
        classes[-1],
    )
    return classes[-1]


def log_kfp_metrics(
    metrics: dict[str, Any],
    evaluation_dir: Path,
    scalar_metrics: Any,
    classification: Any,
    positive_class: str = "tumor",
) -> None:
    """Fill KFP `Metrics` and `ClassificationMetrics` output artifacts (passed in by the wrapper).

    KFP holds one ROC curve per artifact: that of `positive_class` (the last class when it is
    not one) when the split has both outcomes for it.
    """
    for name, value in gate_metric_values(metrics).items():
        scalar_metrics.log_metric(name, value)
    matrix, curves = kfp_classification_payload(metrics, Path(evaluation_dir) / PREDICTIONS_FILE)
    classification.log_confusion_matrix(metrics["classes"], matrix)
    chosen = reported_class(metrics["classes"], positive_class)
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


def plot_reliability(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    """Reliability diagram of one or more models (labels, scores) on the same images: accuracy
    against confidence per bin above, images per bin below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    width, share = 1 / ECE_BINS, 1 / ECE_BINS / len(curves)
    centers = (np.arange(ECE_BINS) + 0.5) * width
    for offset, (label, (y_true, probs)) in enumerate(curves.items()):
        bins = calibration_bins(y_true, probs)
        used = bins.counts > 0
        ece = expected_calibration_error(y_true, probs)
        top.plot(
            bins.confidence[used], bins.accuracy[used], marker="o", label=f"{label} (ECE {ece:.3f})"
        )
        bottom.bar(centers - width / 2 + share * (offset + 0.5), bins.counts, width=share)
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title="reliability (top label)")
    top.legend(loc="upper left")
    bottom.set(xlabel="confidence", ylabel="images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def score_saved_model(saved_model_dir: Path, split_dir: Path, split: str = "test") -> Predictions:
    """Scores of one split through a SavedModel's `serving_default` on the encoded image bytes.

    The class order is the model's own (its `classes` output). The one scoring path of the
    project: evaluate scores the challenger with it and the gate re-scores the champion.
    """
    import tensorflow as tf

    from tumorflow.components.data.tfrecords import read_records
    from tumorflow.components.training.export import INPUT, SIGNATURE, load_serving_model

    try:
        served = load_serving_model(saved_model_dir).signatures[SIGNATURE]
    except (OSError, KeyError, ValueError) as exc:
        raise ModelError(
            f"{saved_model_dir} is not a serving SavedModel with a {SIGNATURE!r} signature "
            f"({exc}); re-run the train step, which exports it"
        ) from None
    paths, labels, scores, classes = [], [], [], None
    records = read_records(Path(split_dir), split)
    while batch := list(itertools.islice(records, PREDICT_BATCH)):
        out = served(**{INPUT: tf.constant([r.encoded for r in batch])})
        scores.append(out["scores"].numpy().astype(np.float64))
        classes = [c.decode() for c in out["classes"].numpy()[0]]
        labels.extend(r.label for r in batch)
        paths.extend(r.path for r in batch)
    if classes is None:
        raise DatasetError(f"the {split} split of {split_dir} is empty: nothing to score")
    return Predictions(paths, np.array(labels, dtype=int), np.concatenate(scores), classes)


def confident_mistakes(scored: Predictions, limit: int = MAX_REVIEW_IMAGES) -> list[int]:
    """The indices of the images the model gets wrong, most confident first (ties in data
    order), `limit` at most: what the review shows when there is no champion to compare with."""
    guesses = scored.probs.argmax(axis=1)
    confidence = scored.probs.max(axis=1)
    wrong = [i for i in range(len(guesses)) if guesses[i] != scored.y_true[i]]
    return sorted(wrong, key=lambda i: -confidence[i])[:limit]


def explain_images(saved_model_dir: Path, images: list[bytes], batch: int = 16) -> list[Any]:
    """The Grad-CAM heat maps (0..1, input resolution) of the predicted class from the
    SavedModel's `explain` signature: the model that is gated and served explains itself."""
    import tensorflow as tf

    from tumorflow.components.training.export import (
        EXPLAIN_SIGNATURE,
        HEATMAP,
        INPUT,
        load_serving_model,
    )

    try:
        explain = load_serving_model(saved_model_dir).signatures[EXPLAIN_SIGNATURE]
    except (OSError, KeyError, ValueError) as exc:
        raise ModelError(
            f"{saved_model_dir} has no {EXPLAIN_SIGNATURE!r} signature ({exc}); re-run the train "
            "step, which exports it"
        ) from None
    heatmaps: list[Any] = []
    for start in range(0, len(images), batch):
        out = explain(**{INPUT: tf.constant(images[start : start + batch])})
        heatmaps.extend(out[HEATMAP].numpy())
    return heatmaps


def write_mistake_heatmaps(
    saved_model_dir: Path,
    split_dir: Path,
    scored: Predictions,
    output_dir: Path,
    split: str = "test",
    limit: int = MAX_REVIEW_IMAGES,
) -> None:
    """Explain the `limit` most confident mistakes of `scored` into `review_heatmaps.npz`
    (`paths`, `heatmaps` [n, h, w]) while the model is loaded here; the gate reads them instead
    of loading the model again."""
    from tumorflow.components.data.tfrecords import read_records

    wanted = [scored.paths[i] for i in confident_mistakes(scored, limit)]
    encoded = {r.path: r.encoded for r in read_records(Path(split_dir), split) if r.path in wanted}
    paths = [path for path in wanted if path in encoded]
    heatmaps = explain_images(saved_model_dir, [encoded[p] for p in paths]) if paths else []
    np.savez_compressed(
        Path(output_dir) / REVIEW_HEATMAPS_FILE,
        paths=np.array(paths, dtype=str),
        heatmaps=np.stack(heatmaps).astype(np.float32) if heatmaps else np.zeros((0, 0, 0)),
    )


def read_mistake_heatmaps(evaluation_dir: Path) -> dict[str, np.ndarray]:
    """The heat maps evaluate wrote, by image path; empty for an evaluation without them (one
    cached from before they were written)."""
    path = Path(evaluation_dir) / REVIEW_HEATMAPS_FILE
    if not path.exists():
        return {}
    with np.load(path) as stored:
        return dict(zip(stored["paths"].tolist(), stored["heatmaps"], strict=True))


def score_held_out_set(saved_model_dir: Path, split_dir: Path, classes: list[str]) -> Predictions:
    """The test split of a held-out set (an external site's) scored like the internal one, with
    labels and scores in `classes`' order (the evaluated model's): a set may lack a class."""
    from tumorflow.components.data.tfrecords import read_split_manifest

    labels_of = list(read_split_manifest(split_dir)["classes"])
    unknown = sorted(set(labels_of) - set(classes))
    if unknown:
        raise DatasetError(
            f"{split_dir} has classes {unknown} the model does not know ({classes}); map them "
            "with the external set's class_map"
        )
    scored = score_saved_model(saved_model_dir, split_dir)
    if sorted(scored.classes) != sorted(classes):
        raise ModelError(f"{saved_model_dir} outputs classes {scored.classes}, not {classes}")
    order = [scored.classes.index(c) for c in classes]
    y_true = np.array([classes.index(labels_of[i]) for i in scored.y_true], dtype=int)
    return Predictions(scored.paths, y_true, scored.probs[:, order], list(classes))


def evaluate_external_sets(
    saved_model_dir: Path, external_splits: dict[str, Path], classes: list[str], output_dir: Path
) -> dict[str, dict[str, Any]]:
    """Score every external set; write `<output_dir>/external/<name>/` metrics.json and
    predictions.csv; return the metrics per set."""
    results = {}
    for name, split_dir in external_splits.items():
        scored = score_held_out_set(saved_model_dir, split_dir, classes)
        metrics = compute_metrics(scored.y_true, scored.probs, scored.classes)
        folder = Path(output_dir) / EXTERNAL_DIR / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2, allow_nan=False))
        scored.write(folder / PREDICTIONS_FILE)
        log.info(
            "external set %s: n=%d accuracy %.4f macro F1 %.4f",
            name,
            metrics["n"],
            metrics["accuracy"],
            metrics["macro_f1"],
        )
        results[name] = metrics
    return results


def attach_slices(scored: Predictions, split_dir: Path) -> Predictions:
    """The predictions with the slice columns of the split's slices.csv (site, manufacturer,
    model, modality, source_folder, metadata-table columns: those with any known value);
    unchanged without one."""
    from tumorflow.components.data.dicom import GROUP_COLUMNS, read_slice_table

    table = read_slice_table(split_dir)
    if not table:
        return scored
    columns = sorted({c for row in table.values() for c in row} - set(GROUP_COLUMNS))
    slices = {
        column: [table.get(path, {}).get(column) or "" for path in scored.paths]
        for column in columns
    }
    return dataclasses.replace(
        scored, slices={column: values for column, values in slices.items() if any(values)}
    )


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


def uncalibrated_probabilities(probs: np.ndarray, temperature: float) -> np.ndarray:
    """The probabilities a temperature-scaled model gave before scaling: softmax(T * log p)
    undoes softmax(logits / T) exactly (the argmax is the same)."""
    from tumorflow.components.training.calibration import log_probabilities, tempered_softmax

    return tempered_softmax(log_probabilities(probs), 1.0 / temperature)


def calibration_figures(scored: Predictions, temperature: float) -> dict[str, float]:
    """metrics.json's `calibration`: the temperature the served model folds in and the ECE of
    the split before it (`ece_before`) and after (`ece`, the figure the gate reads)."""
    before = uncalibrated_probabilities(scored.probs, temperature)
    return {
        "temperature": float(temperature),
        "ece_before": expected_calibration_error(scored.y_true, before),
        "ece": expected_calibration_error(scored.y_true, scored.probs),
    }


def reliability_curves(
    scored: Predictions, metrics: dict[str, Any]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The reliability plot's curves: the served model, and before temperature scaling if any."""
    if "calibration" not in metrics:
        return {"model": (scored.y_true, scored.probs)}
    temperature = metrics["calibration"]["temperature"]
    before = uncalibrated_probabilities(scored.probs, temperature)
    return {
        "before temperature scaling": (scored.y_true, before),
        f"served (T = {temperature:.2f})": (scored.y_true, scored.probs),
    }


def evaluated_saved_model(evaluation_dir: Path) -> Path | None:
    """The SavedModel an evaluation scored, when its folder is still reachable from here."""
    record = Path(evaluation_dir) / EVALUATED_MODEL_FILE
    if not record.is_file():
        return None
    folder = Path(json.loads(record.read_text())["saved_model"])
    return folder if folder.is_dir() else None


def evaluate_model(
    model_dir: Path,
    split_dir: Path,
    output_dir: Path,
    split: str = "test",
    tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
    positive_class: str = "tumor",
    external_splits: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Score one split through the model's serving SavedModel; write metrics.json,
    predictions.csv, the plots and evaluated_model.json (where the SavedModel scored is).

    metrics.json also records `saved_model_sha256`, the digest of the SavedModel scored, and for
    a split with slices.csv (DICOM) `slices`: images and metrics per site, scanner, modality and
    source folder; predictions.csv then carries those columns for the gate.
    Metrics (as `test_accuracy`, `test_recall_tumor`, ...) and the files also go to the MLflow
    run `mlflow_run_id` when both it and `tracking_uri` are given. The log line reports the
    sensitivity and specificity of `positive_class`. `external_splits` (name -> split dataset)
    are scored too, into `external/<name>/` (`evaluate_external_sets`). Returns the metrics.
    """
    import matplotlib

    from tumorflow.components.data.tfrecords import read_split_manifest
    from tumorflow.components.training.export import (
        SERVING_EXPORT,
        read_model_info,
        saved_model_digest,
    )

    matplotlib.use("Agg")
    model_dir, split_dir, output_dir = Path(model_dir), Path(split_dir), Path(output_dir)
    info = read_model_info(model_dir)
    saved_model = model_dir / SERVING_EXPORT
    if not saved_model.is_dir():
        raise ModelError(
            f"{model_dir} holds no serving export ({SERVING_EXPORT}/); re-run the train step"
        )
    dataset_classes = read_split_manifest(split_dir)["classes"]
    if dataset_classes != list(info["classes"]):
        raise ModelError(
            f"the model was trained on classes {info['classes']} but {split_dir} has "
            f"{dataset_classes}; evaluate it on a split dataset made with the same classes"
        )
    scored = score_saved_model(saved_model, split_dir, split)
    if scored.classes != dataset_classes:
        raise ModelError(
            f"the serving export of {model_dir} outputs classes {scored.classes}, not "
            f"{dataset_classes}; re-run the train step"
        )
    scored = attach_slices(scored, split_dir)
    metrics = compute_metrics(scored.y_true, scored.probs, scored.classes)
    if info.get("calibration"):
        metrics["calibration"] = calibration_figures(scored, info["calibration"]["temperature"])
    if scored.slices:
        metrics["slices"] = metrics_per_slice(scored)
    metrics["saved_model_sha256"] = saved_model_digest(saved_model)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, allow_nan=False))
    (output_dir / EVALUATED_MODEL_FILE).write_text(
        json.dumps({"saved_model": str(saved_model.resolve())}, indent=2)
    )
    scored.write(output_dir / PREDICTIONS_FILE)
    _plot_confusion(metrics, output_dir / PLOTS[0])
    _plot_roc(
        roc_points(scored.y_true, scored.probs, scored.classes), metrics, output_dir / PLOTS[1]
    )
    plot_reliability(reliability_curves(scored, metrics), output_dir / PLOTS[2])
    write_mistake_heatmaps(saved_model, split_dir, scored, output_dir, split)
    if external_splits:
        evaluate_external_sets(saved_model, external_splits, scored.classes, output_dir)
    if tracking_uri and mlflow_run_id:
        _log_to_mlflow(tracking_uri, mlflow_run_id, split, metrics, output_dir)
    elif tracking_uri:
        log.info("no MLflow run id given: evaluation not logged to MLflow")
    positive = reported_class(scored.classes, positive_class)
    log.info(
        "%s split: n=%d accuracy %.4f macro F1 %.4f ECE %.4f; %s sensitivity %.4f specificity %.4f",
        split,
        metrics["n"],
        metrics["accuracy"],
        metrics["macro_f1"],
        metrics["ece"],
        positive,
        metrics["per_class"][positive]["sensitivity"],
        metrics["per_class"][positive]["specificity"],
    )
    return metrics
