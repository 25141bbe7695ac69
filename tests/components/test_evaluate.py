"""Evaluation: metrics with known answers, calibration, the evaluation folder, KFP and MLflow."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from helpers import write_synthetic_split

from tumorflow.components.backbones import build_classifier
from tumorflow.components.evaluate import (
    PLOTS,
    compute_metrics,
    evaluate_model,
    expected_calibration_error,
    log_kfp_metrics,
)
from tumorflow.core.errors import ModelError

CLASSES = ["a", "b", "c"]


def _one_hot_probs(predicted: list[int], n_classes: int = 3, top: float = 0.8) -> np.ndarray:
    probs = np.full((len(predicted), n_classes), (1 - top) / (n_classes - 1))
    probs[np.arange(len(predicted)), predicted] = top
    return probs


def test_metrics_of_a_known_three_class_confusion():
    y_true = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    y_pred = [0, 0, 0, 1, 1, 1, 2, 2, 2, 0]

    metrics = compute_metrics(y_true, _one_hot_probs(y_pred), CLASSES)

    assert metrics["confusion_matrix"] == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
    assert metrics["n"] == 10 and metrics["accuracy"] == pytest.approx(0.7)
    a, b = metrics["per_class"]["a"], metrics["per_class"]["b"]
    assert a["precision"] == pytest.approx(0.75) and a["recall"] == pytest.approx(0.75)
    assert a["specificity"] == pytest.approx(5 / 6) and a["support"] == 4
    assert b["f1"] == pytest.approx(2 / 3) and b["specificity"] == pytest.approx(6 / 7)
    assert b["sensitivity"] == b["recall"]
    assert metrics["macro_f1"] == pytest.approx((0.75 + 2 / 3 + 2 / 3) / 3)
    # Class a: 3 positives at 0.8 beat 5 negatives at 0.1 and tie one at 0.8; 1 positive at 0.1 ties 5.
    assert a["roc_auc"] == pytest.approx(19 / 24)


def test_a_class_missing_from_the_labels_gives_null_auc_and_valid_json():
    y_true = np.array([0, 0, 1, 1])
    metrics = compute_metrics(y_true, _one_hot_probs([0, 1, 1, 2]), CLASSES)

    assert metrics["per_class"]["c"]["roc_auc"] is None
    assert metrics["per_class"]["c"]["support"] == 0
    assert metrics["macro_roc_auc"] == pytest.approx(
        np.mean([metrics["per_class"][k]["roc_auc"] for k in ("a", "b")])
    )
    json.dumps(metrics, allow_nan=False)
    alone = compute_metrics(np.array([1, 1]), _one_hot_probs([1, 0]), CLASSES)
    assert alone["macro_roc_auc"] is None


def test_ece_is_zero_when_calibrated_and_large_when_over_confident():
    y_true = np.array([0] * 70 + [1] * 30)
    calibrated = _one_hot_probs([0] * 100, n_classes=2, top=0.7)
    over_confident = _one_hot_probs([0] * 100, n_classes=2, top=0.99)

    assert expected_calibration_error(y_true, calibrated) == pytest.approx(0.0, abs=1e-9)
    assert expected_calibration_error(y_true, over_confident) == pytest.approx(0.29)
    assert compute_metrics(y_true, over_confident, ["x", "y"])["ece"] == pytest.approx(0.29)


def test_wrong_prediction_width_is_a_model_error():
    with pytest.raises(ModelError, match="do not match"):
        compute_metrics(np.array([0, 1]), np.ones((2, 2)) / 2, CLASSES)


@pytest.fixture(scope="module")
def model_and_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    split_dir = write_synthetic_split(root / "split", {"train": 1, "test": 3}, size=40, seed=2)
    model, _ = build_classifier("custom_cnn", 4, 32, "none", 0.0)
    model_dir = root / "model"
    model_dir.mkdir()
    model.save(model_dir / "model.keras")
    info = {
        "backbone": "custom_cnn",
        "image_size": [32, 32],
        "classes": ["cyst", "normal", "stone", "tumor"],
        "mlflow_run_id": None,
    }
    (model_dir / "model_info.json").write_text(json.dumps(info))
    return model_dir, split_dir


def test_evaluate_model_writes_every_file(model_and_split, tmp_path):
    model_dir, split_dir = model_and_split
    metrics = evaluate_model(model_dir, split_dir, tmp_path)

    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert metrics["n"] == 12 and sum(map(sum, metrics["confusion_matrix"])) == 12
    with (tmp_path / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "label_index", "p_cyst", "p_normal", "p_stone", "p_tumor"]
    assert len(rows) == 12 and rows[0]["path"] == "cyst/test-00000.png"
    assert sum(
        float(rows[0][f"p_{c}"]) for c in ("cyst", "normal", "stone", "tumor")
    ) == pytest.approx(1.0, abs=1e-4)
    for name in PLOTS:
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_kfp_classification_metrics_are_filled(model_and_split, tmp_path):
    from kfp.dsl import ClassificationMetrics, Metrics

    model_dir, split_dir = model_and_split
    metrics = evaluate_model(model_dir, split_dir, tmp_path)
    scalars, classification = Metrics(), ClassificationMetrics()

    log_kfp_metrics(metrics, tmp_path, scalars, classification)

    assert scalars.metadata["accuracy"] == pytest.approx(metrics["accuracy"])
    assert "recall:tumor" in scalars.metadata
    matrix = classification.metadata["confusionMatrix"]
    assert [row["row"] for row in matrix["rows"]] == metrics["confusion_matrix"]
    assert len(classification.metadata["confidenceMetrics"]) >= 2


def test_classes_that_differ_from_the_split_are_refused(model_and_split, tmp_path):
    model_dir, _ = model_and_split
    other = write_synthetic_split(tmp_path / "other", {"test": 1}, size=40, classes=["x", "y"])
    with pytest.raises(ModelError, match="same classes"):
        evaluate_model(model_dir, other, tmp_path / "out")


@pytest.mark.slow
def test_metrics_and_plots_go_to_the_mlflow_run(model_and_split, tmp_path, mlflow_server):
    import mlflow

    model_dir, split_dir = model_and_split
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.create_experiment(f"eval-{tmp_path.name}")
    run_id = client.create_run(experiment).info.run_id

    metrics = evaluate_model(
        model_dir, split_dir, tmp_path, tracking_uri=mlflow_server, mlflow_run_id=run_id
    )

    logged = client.get_run(run_id).data.metrics
    assert logged["test_accuracy"] == pytest.approx(metrics["accuracy"])
    assert "test_recall_tumor" in logged
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/reliability.png"} <= artifacts
