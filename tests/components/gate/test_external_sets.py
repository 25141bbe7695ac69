"""External-site sets in the gate, pure: floors and non-inferiority per set, the figures beside the
internal test split, and the warning when a set is much worse than the internal split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tumorflow.components.evaluation.metrics import Predictions, compute_metrics
from tumorflow.components.gate.report import markdown_report
from tumorflow.components.gate.rules import ChampionEvaluation, ExternalScores, evaluate_gate
from tumorflow.core.config import ChampionRule, ExternalSetConfig, GateConfig, GateRule
from tumorflow.core.errors import GateError

CLASSES = ["normal", "tumor"]


def _predictions(n: int, accuracy: float, seed: int = 0) -> Predictions:
    """Binary predictions of which a share `accuracy` is right."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    right = rng.random(n) < accuracy
    predicted = np.where(right, y, 1 - y)
    confidence = rng.uniform(0.6, 0.95, n)
    p_tumor = np.where(predicted == 1, confidence, 1 - confidence)
    return Predictions(
        [f"img{i}.png" for i in range(n)], y, np.stack([1 - p_tumor, p_tumor], axis=1), CLASSES
    )


def _scores(predictions: Predictions) -> ExternalScores:
    return ExternalScores(
        compute_metrics(predictions.y_true, predictions.probs, CLASSES), predictions
    )


def _gate(*sets: ExternalSetConfig, max_drop: float = 0.1) -> GateConfig:
    return GateConfig(
        rules=[GateRule(metric="accuracy", threshold=0.5)],
        champion_rules=[],
        bootstrap_resamples=200,
        external_sets=list(sets),
        external_max_drop=max_drop,
    )


INTERNAL = _predictions(200, 0.95, seed=1)


def _decide(gate: GateConfig, external: dict, champion: ChampionEvaluation | None = None):
    internal = _scores(INTERNAL)
    return evaluate_gate(internal.metrics, INTERNAL, gate, champion, external=external)


def test_each_external_set_is_reported_beside_the_internal_split() -> None:
    site = ExternalSetConfig(name="site-b", source="phantom")
    decision = _decide(_gate(site), {"site-b": _scores(_predictions(120, 0.9, seed=2))})

    entry = decision.external_sets["site-b"]
    assert entry["n"] == 120
    assert entry["values"]["macro_f1"] < entry["internal"]["macro_f1"]
    assert entry["drop"] == pytest.approx(
        entry["internal"]["macro_f1"] - entry["values"]["macro_f1"]
    )
    low, high = entry["intervals"]["macro_f1"]
    assert low < entry["values"]["macro_f1"] < high
    assert decision.passed and not decision.warnings, "a few points lower is no warning"
    assert "| site-b | 120 | macro_f1 |" in markdown_report(decision)


def test_a_floor_on_an_external_set_can_fail_the_gate() -> None:
    site = ExternalSetConfig(
        name="site-b",
        source="phantom",
        rules=[GateRule(metric="macro_f1", threshold=0.8, bound="lower")],
    )
    decision = _decide(_gate(site), {"site-b": _scores(_predictions(120, 0.7, seed=2))})

    failed = [r for r in decision.rules if not r.passed]
    assert not decision.passed
    assert [r.name for r in failed] == ["external site-b: macro_f1 >= 0.8 (lower)"]
    assert failed[0].kind == "external"


def test_the_drop_warning_appears_when_an_external_set_is_much_worse() -> None:
    site = ExternalSetConfig(name="site-c", source="phantom")
    decision = _decide(
        _gate(site, max_drop=0.1), {"site-c": _scores(_predictions(120, 0.6, seed=3))}
    )

    assert decision.passed, "a warning fails no rule"
    [warning] = decision.warnings
    assert warning.startswith("external set site-c: macro_f1 ")
    assert "worse than the internal test split's" in warning
    assert f"**Warning:** {warning}" in markdown_report(decision)


def _wrong_on(y: np.ndarray, wrong: list[int]) -> Predictions:
    """Confident predictions of labels `y`, wrong on the images `wrong`."""
    predicted = y.copy()
    predicted[wrong] = 1 - predicted[wrong]
    p_tumor = np.where(predicted == 1, 0.9, 0.1)
    probs = np.stack([1 - p_tumor, p_tumor], axis=1)
    return Predictions([f"img{i}.png" for i in range(len(y))], y, probs, CLASSES)


def _with_champion_on(name: str, theirs: Predictions) -> ChampionEvaluation:
    scored = ChampionEvaluation("3", "7", theirs, _scores(theirs).metrics)
    return ChampionEvaluation("3", "7", INTERNAL, _scores(INTERNAL).metrics, {name: scored})


@pytest.mark.parametrize(("bound", "passed"), [("point", True), ("lower", False)])
def test_non_inferiority_on_an_external_set_can_bind_the_ci(bound: str, passed: bool) -> None:
    # 16 images: champion and challenger each wrong on 3, different ones. The point values are
    # equal; the paired CI of the difference on so few images reaches far below the margin.
    y = np.array([0, 1] * 8)
    champion = _with_champion_on("site-b", _wrong_on(y, [0, 1, 2]))
    challenger = _wrong_on(y, [3, 4, 5])
    rule = ChampionRule(metric="accuracy", margin=0.05, bound=bound)
    site = ExternalSetConfig(name="site-b", source="phantom", champion_rules=[rule])

    decision = _decide(_gate(site), {"site-b": _scores(challenger)}, champion)

    [ruled] = [r for r in decision.rules if r.kind == "external"]
    assert ruled.champion_value == decision.external_sets["site-b"]["values"]["accuracy"]
    assert ruled.ci[0] < -0.05
    assert ruled.passed is passed and decision.passed is passed


def test_an_external_set_that_was_not_scored_is_an_error() -> None:
    site = ExternalSetConfig(name="site-b", source="phantom")
    with pytest.raises(GateError, match="external set 'site-b' was not scored"):
        _decide(_gate(site), {})


def test_external_set_names_are_unique_and_safe() -> None:
    with pytest.raises(ValueError, match="unique"):
        _gate(
            ExternalSetConfig(name="a", source="phantom"),
            ExternalSetConfig(name="a", source="phantom"),
        )
    with pytest.raises(ValueError):
        ExternalSetConfig(name="../a", source="phantom")


def _site(root: Path, offset: float, per_class: int = 4) -> Path:
    """A site's class folders: the classes' grey levels of the brightness model, shifted."""
    from helpers import image_bytes

    for index, name in enumerate(MODEL_CLASSES):
        (root / name).mkdir(parents=True)
        for number in range(per_class):
            level = min(250.0, MODEL_LEVELS[index] + offset)
            data = image_bytes(100 * index + number, 32, level=level, spread=4.0)
            (root / name / f"{number}.png").write_bytes(data)
    return root


MODEL_CLASSES = ["cyst", "normal", "stone", "tumor"]
MODEL_LEVELS = [40.0, 100.0, 160.0, 220.0]


def test_external_sets_go_through_evaluate_and_the_gate(make_model_dir, split_dir, tmp_path):
    """The brightness model of tests/components/conftest.py: right on a site that looks like the
    training data, mostly wrong on one whose scanner is 50 grey levels brighter."""
    from tumorflow.components.data.external_sets import (
        external_splits,
        prepare_external_sets,
        resolve_external_versions,
    )
    from tumorflow.components.evaluation.evaluate import evaluate_model
    from tumorflow.components.gate.champion import evaluate_champion
    from tumorflow.components.gate.decision import run_gate
    from tumorflow.core.config import DatasetConfig, SplitConfig

    model = make_model_dir("model", exported=True)
    sets = [
        ExternalSetConfig(name="alike", source=str(_site(tmp_path / "alike", 5.0))),
        ExternalSetConfig(
            name="bright",
            source=str(_site(tmp_path / "bright", 50.0)),
            rules=[GateRule(metric="macro_f1", threshold=0.6)],
        ),
    ]
    dataset = DatasetConfig(classes=MODEL_CLASSES)
    prepared = tmp_path / "external"
    versions = resolve_external_versions(sets, dataset)
    prepare_external_sets(sets, dataset, SplitConfig(), versions, prepared)
    splits = external_splits(prepared)
    evaluate_model(model, split_dir, tmp_path / "evaluation", external_splits=splits)
    config = GateConfig(
        rules=[GateRule(metric="accuracy", threshold=0.9)],
        champion_rules=[],
        bootstrap_resamples=50,
        external_sets=sets,
        external_max_drop=0.2,
    )

    result = run_gate(
        tmp_path / "evaluation",
        split_dir,
        config,
        tracking_uri=None,
        model_name="kidney",
        output_dir=tmp_path / "decision",
        model_base_path=str(tmp_path / "nothing-served"),
        external_dir=prepared,
    )

    data = json.loads(result.decision_path.read_text())
    alike, bright = data["external_sets"]["alike"], data["external_sets"]["bright"]
    assert alike["n"] == bright["n"] == 16
    assert alike["values"]["accuracy"] == pytest.approx(1.0)
    assert bright["values"]["macro_f1"] < 0.6 and bright["internal"]["macro_f1"] == 1.0
    assert not data["passed"]
    assert [r["name"] for r in data["rules"] if not r["passed"]] == [
        "external bright: macro_f1 >= 0.6 (point)"
    ]
    [warning] = data["warnings"]
    assert warning.startswith("external set bright: macro_f1 ")
    assert "| bright | 16 | macro_f1 | 1.0000 |" in result.markdown
    # the champion is re-scored on the same external images through its served signature
    champion = evaluate_champion(model / "saved_model", split_dir, external_splits=splits)
    assert champion.external["bright"].metrics["macro_f1"] == pytest.approx(
        bright["values"]["macro_f1"]
    )
