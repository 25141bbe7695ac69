"""The metric formulas: known answers, scikit-learn where it has the same metric, the bootstrap."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from tumorflow.components.evaluation.metrics import (
    Predictions,
    bootstrap_indices,
    bootstrap_metrics,
    calibration_bins,
    compute_metrics,
    confidence_bins,
    expected_calibration_error,
    gate_metric_values,
    read_predictions,
)
from tumorflow.core.errors import ModelError

CLASSES = ["a", "b", "c"]


def _one_hot_probs(predicted: list[int], n_classes: int = 3, top: float = 0.8) -> np.ndarray:
    probs = np.full((len(predicted), n_classes), (1 - top) / (n_classes - 1))
    probs[np.arange(len(predicted)), predicted] = top
    return probs


def _random_scores(n: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes)) + 1.5 * (y[:, None] == np.arange(n_classes))
    # Rounded to 2 decimals: many tied scores, which AUC must count one half.
    probs = np.round(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True), 2)
    return y, probs


def test_metrics_of_a_known_three_class_confusion():
    y_true = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    y_pred = [0, 0, 0, 1, 1, 1, 2, 2, 2, 0]

    metrics = compute_metrics(y_true, _one_hot_probs(y_pred), CLASSES)

    assert metrics["confusion_matrix"] == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
    assert metrics["n"] == 10 and metrics["accuracy"] == pytest.approx(0.7)
    a, b = metrics["per_class"]["a"], metrics["per_class"]["b"]
    assert a["precision"] == pytest.approx(0.75) and a["recall"] == pytest.approx(0.75)
    # a: 5 true negatives (rows b, c outside column a), 1 false positive.
    assert a["specificity"] == pytest.approx(5 / 6) and a["support"] == 4
    assert b["f1"] == pytest.approx(2 / 3) and b["specificity"] == pytest.approx(6 / 7)
    assert b["sensitivity"] == b["recall"]
    assert metrics["macro_f1"] == pytest.approx((0.75 + 2 / 3 + 2 / 3) / 3)
    # Class a: 3 positives at 0.8 beat 5 negatives at 0.1 and tie one at 0.8; 1 positive at 0.1 ties 5.
    assert a["roc_auc"] == pytest.approx(19 / 24)


def test_precision_recall_f1_and_roc_auc_agree_with_scikit_learn():
    y, probs = _random_scores(200, 4, seed=5)
    metrics = compute_metrics(y, probs, ["w", "x", "y", "z"])
    pred = probs.argmax(axis=1)

    for index, name in enumerate(["w", "x", "y", "z"]):
        stats = metrics["per_class"][name]
        positives = y == index
        assert stats["roc_auc"] == pytest.approx(roc_auc_score(positives, probs[:, index]))
        assert stats["precision"] == pytest.approx(precision_score(positives, pred == index))
        assert stats["recall"] == pytest.approx(recall_score(positives, pred == index))
        assert stats["specificity"] == pytest.approx(recall_score(~positives, pred != index))
    assert metrics["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert metrics["macro_roc_auc"] == pytest.approx(
        np.mean([roc_auc_score(y == c, probs[:, c]) for c in range(4)])
    )


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
    assert "macro_roc_auc" not in gate_metric_values(alone)


def test_ece_of_a_hand_computed_example():
    # Bin i holds confidences in (i/15, (i+1)/15]: 0.95 -> 14, 0.9 -> 13, 0.58 and 0.55 -> 8,
    # 0.5 -> 7.
    probs = np.array([[0.95, 0.05], [0.1, 0.9], [0.58, 0.42], [0.45, 0.55], [0.5, 0.5]])
    y_true = np.array([0, 0, 0, 1, 1])  # right, wrong, right, right, wrong (the tie picks 0)

    assert confidence_bins(probs.max(axis=1)).tolist() == [14, 13, 8, 8, 7]
    # bin 14: |1 - 0.95|, bin 13: |0 - 0.9|, bin 8: |1 - 0.565| * 2, bin 7: |0 - 0.5|; each / 5
    expected = (0.05 + 0.9 + 2 * 0.435 + 0.5) / 5
    assert expected_calibration_error(y_true, probs) == pytest.approx(expected)
    assert compute_metrics(y_true, probs, ["x", "y"])["ece"] == pytest.approx(expected)
    bins = calibration_bins(y_true, probs)
    assert bins.counts[[7, 8, 13, 14]].tolist() == [1, 2, 1, 1] and bins.counts.sum() == 5
    assert bins.confidence[8] == pytest.approx(0.565) and bins.accuracy[8] == 1.0
    assert np.isnan(bins.accuracy[0])


def test_ece_is_zero_when_calibrated_and_large_when_over_confident():
    y_true = np.array([0] * 70 + [1] * 30)
    calibrated = _one_hot_probs([0] * 100, n_classes=2, top=0.7)
    over_confident = _one_hot_probs([0] * 100, n_classes=2, top=0.99)

    assert expected_calibration_error(y_true, calibrated) == pytest.approx(0.0, abs=1e-9)
    assert expected_calibration_error(y_true, over_confident) == pytest.approx(0.29)


def test_wrong_prediction_width_is_a_model_error():
    with pytest.raises(ModelError, match="do not match"):
        compute_metrics(np.array([0, 1]), np.ones((2, 2)) / 2, CLASSES)


def test_bootstrap_of_the_identity_resample_is_the_point_estimate():
    y, probs = _random_scores(150, 3, seed=1)
    metrics = compute_metrics(y, probs, CLASSES)
    names = ["accuracy", "macro_f1", "macro_roc_auc", "ece", "recall:b", "specificity:c"]

    values = bootstrap_metrics(y, probs, CLASSES, names, np.arange(150)[None])

    assert values["accuracy"][0] == pytest.approx(metrics["accuracy"])
    assert values["macro_f1"][0] == pytest.approx(metrics["macro_f1"])
    assert values["macro_roc_auc"][0] == pytest.approx(metrics["macro_roc_auc"])
    assert values["ece"][0] == pytest.approx(metrics["ece"])
    assert values["recall:b"][0] == pytest.approx(metrics["per_class"]["b"]["recall"])
    assert values["specificity:c"][0] == pytest.approx(metrics["per_class"]["c"]["specificity"])


def test_bootstrap_resamples_are_each_scored_like_a_split_of_their_own():
    y, probs = _random_scores(40, 3, seed=2)
    indices = bootstrap_indices(40, 25, seed=9)

    values = bootstrap_metrics(y, probs, CLASSES, ["macro_roc_auc", "ece"], indices)

    for row in (0, 13, 24):
        alone = compute_metrics(y[indices[row]], probs[indices[row]], CLASSES)
        assert values["ece"][row] == pytest.approx(alone["ece"])
        assert values["macro_roc_auc"][row] == pytest.approx(alone["macro_roc_auc"])
    assert np.array_equal(indices, bootstrap_indices(40, 25, seed=9))


def test_predictions_round_trip_and_reorder_by_class(tmp_path):
    written = Predictions(
        ["x.png", "y.png"], np.array([1, 0]), np.array([[0.2, 0.8], [0.9, 0.1]]), ["a", "b"]
    )
    written.write(tmp_path / "predictions.csv")

    back = read_predictions(tmp_path / "predictions.csv")
    swapped = read_predictions(tmp_path / "predictions.csv", ["b", "a"])

    assert back.paths == ["x.png", "y.png"] and back.classes == ["a", "b"]
    np.testing.assert_allclose(back.probs, written.probs)
    assert back.y_true.tolist() == [1, 0]
    np.testing.assert_allclose(swapped.probs, written.probs[:, ::-1])
    with pytest.raises(ModelError, match="p_c"):
        read_predictions(tmp_path / "predictions.csv", ["a", "c"])


def test_per_slice_metrics_count_images_and_leave_undefined_ones_out(tmp_path):
    from tumorflow.components.evaluation.metrics import (
        Predictions,
        metrics_per_slice,
        read_predictions,
    )

    y = np.array([0, 1, 1, 0, 0, 0])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7]])
    predictions = Predictions(
        [f"i{k}" for k in range(6)], y, probs, ["normal", "tumor"], {"site": ["a"] * 3 + ["b"] * 3}
    )
    report = metrics_per_slice(predictions)["site"]
    assert report["a"]["n"] == 3 and report["b"]["n"] == 3
    assert report["a"]["recall:tumor"] == 0.5
    assert report["b"]["accuracy"] == pytest.approx(2 / 3)
    # site b has no tumor images: its tumor recall is undefined, not 0
    assert "recall:tumor" not in report["b"]
    predictions.write(tmp_path / "p.csv")
    assert read_predictions(tmp_path / "p.csv").slices == predictions.slices
