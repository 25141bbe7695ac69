from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, recall_score, roc_auc_score

from tumorflow.components.gate import (
    bootstrap_metrics,
    evaluate_gate,
    markdown_report,
    write_decision,
)
from tumorflow.core.config import ChampionRule, GateConfig, GateRule
from tumorflow.core.errors import GateError

CLASSES = ["normal", "tumor"]


def _predictions(n: int, accuracy: float, seed: int = 0) -> pd.DataFrame:
    """Binary predictions of which a share `accuracy` is right, with confident-ish scores."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    right = rng.random(n) < accuracy
    predicted = np.where(right, y, 1 - y)
    confidence = rng.uniform(0.6, 0.95, n)
    p_tumor = np.where(predicted == 1, confidence, 1 - confidence)
    return pd.DataFrame(
        {
            "path": [f"img{i}.png" for i in range(n)],
            "label_index": y,
            "p_normal": 1 - p_tumor,
            "p_tumor": p_tumor,
        }
    )


def _metrics(**values: float) -> dict:
    """A metrics.json dict with the given global values and recall/precision per class."""
    metrics = {
        "classes": CLASSES,
        "accuracy": 0.9,
        "macro_f1": 0.9,
        "macro_roc_auc": 0.95,
        "ece": 0.05,
        "per_class": {
            c: {
                "precision": 0.9,
                "recall": 0.9,
                "f1": 0.9,
                "sensitivity": 0.9,
                "specificity": 0.9,
                "support": 10,
            }
            for c in CLASSES
        },
        "confusion_matrix": [[9, 1], [1, 9]],
        "n": 20,
    }
    for key, value in values.items():
        if ":" in key:
            stat, label = key.split(":")
            metrics["per_class"][label][stat] = value
        else:
            metrics[key] = value
    return metrics


def _config(rules: list[GateRule], **kwargs) -> GateConfig:
    return GateConfig(
        rules=rules,
        champion_rules=kwargs.pop("champion_rules", []),
        bootstrap_resamples=kwargs.pop("resamples", 200),
        **kwargs,
    )


@pytest.mark.parametrize(
    ("rule", "metrics", "passed"),
    [
        (GateRule(metric="accuracy", threshold=0.85), _metrics(accuracy=0.9), True),
        (GateRule(metric="accuracy", threshold=0.95), _metrics(accuracy=0.9), False),
        (GateRule(metric="ece", op="<=", threshold=0.1), _metrics(ece=0.05), True),
        (GateRule(metric="ece", op="<=", threshold=0.1), _metrics(ece=0.2), False),
        (GateRule(metric="recall:tumor", threshold=0.8), _metrics(**{"recall:tumor": 0.7}), False),
        (GateRule(metric="specificity:normal", threshold=0.8), _metrics(), True),
    ],
)
def test_absolute_rules(rule, metrics, passed):
    decision = evaluate_gate(metrics, _predictions(100, 0.9), _config([rule]), champion=None)
    assert decision.passed is passed
    assert decision.rules[0].passed is passed
    assert any("absolute rules only" in note for note in decision.notes)


def test_bootstrap_matches_sklearn_on_the_identity_resample():
    frame = _predictions(300, 0.8)
    y = frame["label_index"].to_numpy()
    probs = frame[["p_normal", "p_tumor"]].to_numpy()
    names = ["accuracy", "macro_f1", "macro_roc_auc", "recall:tumor", "ece"]
    values = bootstrap_metrics(y, probs, CLASSES, names, np.arange(300)[None])
    assert values["accuracy"][0] == pytest.approx((probs.argmax(1) == y).mean())
    assert values["macro_f1"][0] == pytest.approx(f1_score(y, probs.argmax(1), average="macro"))
    assert values["macro_roc_auc"][0] == pytest.approx(roc_auc_score(y, probs[:, 1]))
    assert values["recall:tumor"][0] == pytest.approx(recall_score(y, probs.argmax(1)))
    assert 0 <= values["ece"][0] <= 1


def test_bootstrap_interval_contains_the_estimate_and_is_seeded():
    frame = _predictions(400, 0.85)
    metrics = _metrics(
        accuracy=float(
            (frame[["p_normal", "p_tumor"]].to_numpy().argmax(1) == frame["label_index"]).mean()
        )
    )
    config = _config([GateRule(metric="accuracy", threshold=0.5)], resamples=300, seed=3)
    first = evaluate_gate(metrics, frame, config, None)
    again = evaluate_gate(metrics, frame, config, None)
    other = evaluate_gate(
        metrics,
        frame,
        _config([GateRule(metric="accuracy", threshold=0.5)], resamples=300, seed=4),
        None,
    )
    low, high = first.bootstrap["intervals"]["accuracy"]
    assert low < metrics["accuracy"] < high
    assert first.bootstrap["intervals"] == again.bootstrap["intervals"]
    assert first.bootstrap["intervals"]["accuracy"] != other.bootstrap["intervals"]["accuracy"]


def test_a_lower_bound_rule_fails_when_the_interval_is_wide():
    frame = _predictions(20, 0.9, seed=1)
    accuracy = float(
        (frame[["p_normal", "p_tumor"]].to_numpy().argmax(1) == frame["label_index"]).mean()
    )
    metrics = _metrics(accuracy=accuracy)
    point = evaluate_gate(
        metrics, frame, _config([GateRule(metric="accuracy", threshold=0.8)]), None
    )
    lower = evaluate_gate(
        metrics, frame, _config([GateRule(metric="accuracy", threshold=0.8, bound="lower")]), None
    )
    assert point.passed and not lower.passed
    assert lower.rules[0].value < 0.8 <= accuracy


def test_unknown_metric_or_class_names_the_valid_ones():
    with pytest.raises(GateError, match="valid names: accuracy, macro_f1"):
        evaluate_gate(
            _metrics(),
            _predictions(10, 0.9),
            _config([GateRule(metric="auc", threshold=0.5)]),
            None,
        )
    with pytest.raises(GateError, match="recall:tumor"):
        evaluate_gate(
            _metrics(),
            _predictions(10, 0.9),
            _config([GateRule(metric="recall:cancer", threshold=0.5)]),
            None,
        )


def test_decision_files_follow_the_contract(tmp_path):
    config = _config([GateRule(metric="accuracy", threshold=0.95)])
    decision = evaluate_gate(_metrics(), _predictions(50, 0.9), config, None)
    path = write_decision(decision, tmp_path)
    data = json.loads(path.read_text())
    assert data["passed"] is False and data["champion_version"] is None
    assert {
        "name",
        "metric",
        "op",
        "threshold",
        "bound",
        "value",
        "champion_value",
        "passed",
        "detail",
    } <= set(data["rules"][0])
    assert data["confusion_matrices"]["challenger"] == [[9, 1], [1, 9]]
    report = (tmp_path / "report.md").read_text()
    assert "FAILED" in report and "**FAIL**" in report and "absolute rules only" in report


@pytest.mark.slow
def test_champion_re_evaluated_on_the_same_images(make_model_dir, split_dir, tmp_path):
    from tumorflow.components.export import export_serving_model
    from tumorflow.components.gate import evaluate_champion

    evaluations = {}
    for name, confusion in (("good", 0), ("worse", 1)):
        export_serving_model(make_model_dir(name, confusion=confusion), tmp_path / f"{name}-export")
        evaluations[name] = evaluate_champion(tmp_path / f"{name}-export", split_dir, version=name)
    assert evaluations["good"].metrics["accuracy"] == pytest.approx(1.0)
    assert evaluations["worse"].metrics["accuracy"] < 0.8
    config = GateConfig(
        rules=[GateRule(metric="accuracy", threshold=0.3)],
        champion_rules=[
            ChampionRule(metric="macro_f1", margin=0.02),
            ChampionRule(metric="accuracy", min_gain=0.1),
        ],
        bootstrap_resamples=100,
    )

    def as_challenger(evaluation):
        frame = pd.DataFrame(evaluation.probs, columns=[f"p_{c}" for c in evaluation.classes])
        frame.insert(0, "label_index", evaluation.y_true)
        frame.insert(0, "path", evaluation.paths)
        return evaluation.metrics, frame

    worse_vs_good = evaluate_gate(*as_challenger(evaluations["worse"]), config, evaluations["good"])
    good_vs_worse = evaluate_gate(*as_challenger(evaluations["good"]), config, evaluations["worse"])
    assert not worse_vs_good.passed
    assert [r.passed for r in worse_vs_good.rules] == [True, False, False]
    assert good_vs_worse.passed
    assert good_vs_worse.champion_version == "worse"
    assert good_vs_worse.rules[1].champion_value == pytest.approx(
        evaluations["worse"].metrics["macro_f1"]
    )
    low, high = good_vs_worse.rules[1].ci
    assert 0 < low <= high
    report = markdown_report(worse_vs_good)
    assert "re-evaluated on the challenger's test images" in report
    assert "Confusion matrix: champion" in report
