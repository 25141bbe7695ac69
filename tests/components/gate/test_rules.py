"""The gate's rules, pure: thresholds, CI bounds, champion margins and gains, lower-is-better."""

from __future__ import annotations

import numpy as np
import pytest

from tumorflow.components.evaluation.metrics import Predictions, compute_metrics
from tumorflow.components.gate.rules import ChampionEvaluation, evaluate_gate
from tumorflow.core.config import ChampionRule, GateConfig, GateRule
from tumorflow.core.errors import GateError

CLASSES = ["normal", "tumor"]


def _predictions(n: int, accuracy: float, seed: int = 0) -> Predictions:
    """Binary predictions of which a share `accuracy` is right, with confident-ish scores."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    right = rng.random(n) < accuracy
    predicted = np.where(right, y, 1 - y)
    confidence = rng.uniform(0.6, 0.95, n)
    p_tumor = np.where(predicted == 1, confidence, 1 - confidence)
    probs = np.stack([1 - p_tumor, p_tumor], axis=1)
    return Predictions([f"img{i}.png" for i in range(n)], y, probs, CLASSES)


def _scored(predictions: Predictions) -> dict:
    return compute_metrics(predictions.y_true, predictions.probs, CLASSES)


def _metrics(**values: float) -> dict:
    """A metrics.json dict with the given global values and per-class stats (0.9 otherwise)."""
    metrics = {
        "classes": CLASSES,
        "accuracy": 0.9,
        "macro_f1": 0.9,
        "macro_roc_auc": 0.95,
        "ece": 0.05,
        "per_class": {
            c: {s: 0.9 for s in ("precision", "recall", "f1", "sensitivity", "specificity")}
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


def _champion(predictions: Predictions, metrics: dict | None = None) -> ChampionEvaluation:
    return ChampionEvaluation("3", "7", predictions, metrics or _scored(predictions))


@pytest.mark.parametrize(
    ("rule", "metrics", "passed"),
    [
        (GateRule(metric="accuracy", threshold=0.85), _metrics(accuracy=0.9), True),
        (GateRule(metric="accuracy", threshold=0.95), _metrics(accuracy=0.9), False),
        (GateRule(metric="accuracy", threshold=0.9), _metrics(accuracy=0.9), True),
        (GateRule(metric="ece", op="<=", threshold=0.1), _metrics(ece=0.05), True),
        (GateRule(metric="ece", op="<=", threshold=0.1), _metrics(ece=0.2), False),
        (GateRule(metric="recall:tumor", threshold=0.8), _metrics(**{"recall:tumor": 0.7}), False),
        (GateRule(metric="specificity:normal", threshold=0.8), _metrics(), True),
        (GateRule(metric="macro_roc_auc", threshold=0.5), _metrics(macro_roc_auc=None), False),
    ],
)
def test_absolute_rules(rule, metrics, passed):
    decision = evaluate_gate(metrics, _predictions(100, 0.9), _config([rule]), champion=None)
    assert decision.passed is passed
    assert decision.rules[0].passed is passed
    assert any("absolute rules only" in note for note in decision.notes)


def test_the_bootstrap_interval_contains_the_estimate_and_is_seeded():
    predictions = _predictions(400, 0.85)
    metrics = _scored(predictions)
    config = _config([GateRule(metric="accuracy", threshold=0.5)], resamples=300, seed=3)
    first = evaluate_gate(metrics, predictions, config, None)
    again = evaluate_gate(metrics, predictions, config, None)
    other = evaluate_gate(
        metrics,
        predictions,
        _config([GateRule(metric="accuracy", threshold=0.5)], resamples=300, seed=4),
        None,
    )
    low, high = first.bootstrap["intervals"]["accuracy"]
    assert low < metrics["accuracy"] < high
    assert first.bootstrap["intervals"] == again.bootstrap["intervals"]
    assert first.bootstrap["intervals"]["accuracy"] != other.bootstrap["intervals"]["accuracy"]
    assert "ece" in first.bootstrap["intervals"]  # calibration is always reported


def test_a_lower_bound_rule_fails_when_the_interval_is_wide():
    predictions = _predictions(20, 0.9, seed=1)
    metrics = _scored(predictions)
    point = evaluate_gate(
        metrics, predictions, _config([GateRule(metric="accuracy", threshold=0.8)]), None
    )
    lower = evaluate_gate(
        metrics,
        predictions,
        _config([GateRule(metric="accuracy", threshold=0.8, bound="lower")]),
        None,
    )
    assert point.passed and not lower.passed
    assert lower.rules[0].value < 0.8 <= metrics["accuracy"]


def test_an_upper_bound_rule_on_ece_judges_the_pessimistic_end():
    predictions = _predictions(30, 0.8, seed=2)
    metrics = _scored(predictions)
    rule = GateRule(metric="ece", op="<=", threshold=metrics["ece"] + 0.01, bound="upper")
    decision = evaluate_gate(metrics, predictions, _config([rule]), None)
    _, high = decision.bootstrap["intervals"]["ece"]
    assert decision.rules[0].value == high > metrics["ece"] + 0.01
    assert not decision.passed


def test_a_bound_rule_without_resamples_is_a_gate_error():
    rule = GateRule(metric="accuracy", threshold=0.5, bound="lower")
    with pytest.raises(GateError, match="bootstrap_resamples above 0"):
        evaluate_gate(_metrics(), _predictions(10, 0.9), _config([rule], resamples=0), None)


def test_unknown_metric_or_class_names_the_valid_ones():
    with pytest.raises(GateError, match="valid names: accuracy, macro_f1"):
        evaluate_gate(
            _metrics(),
            _predictions(10, 0.9),
            _config([GateRule(metric="auc", threshold=0.5)]),
            None,
        )
    champion_rule = ChampionRule(metric="recall:cancer")
    with pytest.raises(GateError, match="recall:tumor"):
        evaluate_gate(
            _metrics(), _predictions(10, 0.9), _config([], champion_rules=[champion_rule]), None
        )


def test_champion_margins_and_minimum_gains():
    challenger = _predictions(300, 0.85, seed=5)
    mine = _scored(challenger)
    champion = _champion(challenger, _metrics(macro_f1=mine["macro_f1"] + 0.015))
    rules = [
        ChampionRule(metric="macro_f1", margin=0.02),  # 0.015 worse: within the margin
        ChampionRule(metric="macro_f1", margin=0.01),  # outside a smaller one
        ChampionRule(metric="macro_f1", min_gain=0.0, margin=0.5),  # min_gain wins over margin
    ]
    decision = evaluate_gate(mine, challenger, _config([], champion_rules=rules), champion)
    assert [r.passed for r in decision.rules] == [True, False, False]
    assert decision.rules[0].threshold == pytest.approx(mine["macro_f1"] - 0.005)
    assert decision.rules[0].champion_value == pytest.approx(mine["macro_f1"] + 0.015)
    assert decision.champion_version == "3" and decision.champion_serving_version == "7"
    assert not decision.passed


def test_lower_is_better_metrics_turn_the_champion_comparison_around():
    challenger = _predictions(200, 0.85, seed=6)
    mine = _scored(challenger)
    worse_calibrated = _champion(challenger, _metrics(ece=mine["ece"] + 0.05))
    better_calibrated = _champion(challenger, _metrics(ece=mine["ece"] - 0.05))
    ece_rule = _config([], champion_rules=[ChampionRule(metric="ece", margin=0.01)])

    passed = evaluate_gate(mine, challenger, ece_rule, worse_calibrated)
    failed = evaluate_gate(mine, challenger, ece_rule, better_calibrated)

    assert passed.passed and not failed.passed
    assert passed.rules[0].op == "<="
    assert passed.rules[0].threshold == pytest.approx(mine["ece"] + 0.06)
    flipped = _config([], champion_rules=[ChampionRule(metric="accuracy", higher_is_better=False)])
    lower_accuracy = _champion(challenger, _metrics(accuracy=mine["accuracy"] + 0.1))
    assert evaluate_gate(mine, challenger, flipped, lower_accuracy).rules[0].op == "<="
    assert evaluate_gate(mine, challenger, flipped, lower_accuracy).passed


def test_the_paired_interval_of_identical_models_is_zero():
    challenger = _predictions(100, 0.8, seed=7)
    decision = evaluate_gate(
        _scored(challenger),
        challenger,
        _config([], champion_rules=[ChampionRule(metric="accuracy", margin=0.0)]),
        _champion(challenger),
    )
    assert decision.passed and decision.rules[0].ci == (0.0, 0.0)


def test_a_champion_scored_on_other_images_is_not_comparable():
    challenger = _predictions(50, 0.9)
    other_images = _predictions(50, 0.9, seed=3)
    other_images = Predictions(
        [f"other{i}.png" for i in range(50)], other_images.y_true, other_images.probs, CLASSES
    )
    decision = evaluate_gate(
        _scored(challenger),
        challenger,
        _config(
            [GateRule(metric="accuracy", threshold=0.0)],
            champion_rules=[ChampionRule(metric="accuracy")],
        ),
        _champion(other_images),
    )
    assert not decision.passed
    assert decision.rules[-1].name == "champion comparable"
    assert any("--override" in note for note in decision.notes)


def _two_sites(good: int, bad: int, bad_accuracy: float) -> Predictions:
    """Site A: `good` images scored well; site B: `bad` images scored at `bad_accuracy`."""
    a, b = _predictions(good, 0.97, seed=1), _predictions(bad, bad_accuracy, seed=2)
    return Predictions(
        a.paths + [f"b{p}" for p in b.paths],
        np.concatenate([a.y_true, b.y_true]),
        np.concatenate([a.probs, b.probs]),
        CLASSES,
        {"site": ["site-a"] * good + ["site-b"] * bad},
    )


def test_a_per_site_rule_binds_the_worst_site_with_enough_cases():
    rule = GateRule(metric="recall:tumor", threshold=0.85, per="site", min_cases=30)
    gate = GateConfig(rules=[rule], champion_rules=[], bootstrap_resamples=200)
    weak = _two_sites(200, 60, 0.5)
    decision = evaluate_gate(_scored(weak), weak, gate, None)
    assert not decision.passed
    assert decision.rules[0].kind == "slice"
    assert "site-b" in decision.rules[0].detail
    assert decision.rules[0].value < 0.85
    # the whole test set passes the same threshold: only the per-site view catches site B
    assert _scored(weak)["per_class"]["tumor"]["recall"] > 0.8
    # the same weak site under the case minimum is not bound
    few = _two_sites(200, 20, 0.5)
    assert evaluate_gate(_scored(few), few, gate, None).passed


def test_the_gate_reports_counts_and_intervals_per_slice():
    from tumorflow.components.gate.report import markdown_report

    predictions = _two_sites(100, 40, 0.6)
    gate = GateConfig(rules=[GateRule(metric="accuracy", threshold=0.5)], champion_rules=[])
    decision = evaluate_gate(_scored(predictions), predictions, gate, None)
    sites = decision.slices["site"]
    assert {value: entry["n"] for value, entry in sites.items()} == {"site-a": 100, "site-b": 40}
    low, high = sites["site-b"]["intervals"]["accuracy"]
    assert low <= sites["site-b"]["values"]["accuracy"] <= high
    assert sites["site-a"]["values"]["accuracy"] > sites["site-b"]["values"]["accuracy"]
    report = markdown_report(decision)
    assert "## Per site" in report
    assert "| site-b | 40 |" in report


def test_a_per_rule_on_a_missing_slice_column_names_the_ones_there():
    predictions = _two_sites(40, 40, 0.9)
    rule = GateRule(metric="accuracy", threshold=0.8, per="manufacturer")
    with pytest.raises(GateError, match=r"no slice column 'manufacturer'.*site"):
        evaluate_gate(
            _scored(predictions), predictions, GateConfig(rules=[rule], champion_rules=[]), None
        )
