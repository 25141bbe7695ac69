"""The gate step: decision files, the champion re-scored through its served signature, and a loud
failure when a version is served but the registry cannot be read."""

from __future__ import annotations

import io
import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest

from tumorflow.components.data.tfrecords import read_records
from tumorflow.components.evaluation.metrics import Predictions, compute_metrics
from tumorflow.components.gate.decision import run_gate
from tumorflow.components.gate.report import markdown_report
from tumorflow.core.config import ChampionRule, GateConfig, GateRule
from tumorflow.core.errors import GateError

CLASSES = ["normal", "tumor"]


def _evaluation(folder: Path, n: int = 50, seed: int = 0) -> Path:
    """An evaluation folder (metrics.json + predictions.csv) of a binary model, 90% right."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    predicted = np.where(rng.random(n) < 0.9, y, 1 - y)
    p_tumor = np.where(predicted == 1, 0.8, 0.2)
    predictions = Predictions(
        [f"{i}.png" for i in range(n)], y, np.stack([1 - p_tumor, p_tumor], 1), CLASSES
    )
    folder.mkdir(parents=True)
    predictions.write(folder / "predictions.csv")
    metrics = compute_metrics(predictions.y_true, predictions.probs, CLASSES)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def _serve_a_version(base: Path, name: str) -> None:
    """What `served_version` sees of a deployed version: `<base>/<name>/1/saved_model.pb`."""
    (base / name / "1").mkdir(parents=True)
    (base / name / "1" / "saved_model.pb").write_bytes(b"")


def _gate(tmp_path: Path, **kwargs):
    config = GateConfig(
        rules=[GateRule(metric="accuracy", threshold=0.95)],
        champion_rules=[],
        bootstrap_resamples=100,
    )
    return run_gate(
        _evaluation(tmp_path / "evaluation"),
        tmp_path / "split",
        config,
        model_name="kidney",
        output_dir=tmp_path / "decision",
        **kwargs,
    )


def test_decision_files_follow_the_contract(tmp_path):
    result = _gate(tmp_path, tracking_uri=None, model_base_path=str(tmp_path / "nothing-served"))

    data = json.loads(result.decision_path.read_text())
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
    assert data["classes"] == CLASSES and data["champion"] is None
    assert sum(map(sum, data["confusion_matrices"]["challenger"])) == 50
    assert set(data["bootstrap"]["intervals"]) == {"accuracy", "ece"}
    report = (tmp_path / "decision" / "report.md").read_text()
    assert report == result.markdown
    assert "FAILED" in report and "**FAIL**" in report and "absolute rules only" in report
    assert (tmp_path / "decision" / "reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_a_served_version_without_a_tracking_uri_fails_loudly(tmp_path):
    _serve_a_version(tmp_path / "models", "kidney")
    with pytest.raises(GateError, match=r"version 1 is served .* set tracking_uri"):
        _gate(tmp_path, tracking_uri=None, model_base_path=str(tmp_path / "models"))
    assert not (tmp_path / "decision").exists()


def test_a_served_version_with_an_unreachable_registry_fails_loudly(tmp_path):
    _serve_a_version(tmp_path / "models", "kidney")
    down = "http://127.0.0.1:9"  # the discard port: nothing answers HTTP there
    with pytest.raises(GateError, match=r"registry .* cannot be read.*start the MLflow server"):
        _gate(tmp_path, tracking_uri=down, model_base_path=str(tmp_path / "models"))
    assert not (tmp_path / "decision").exists()


@pytest.mark.e2e
def test_champion_re_evaluated_on_the_same_images(make_model_dir, split_dir, tmp_path):
    from tumorflow.components.gate.champion import evaluate_champion
    from tumorflow.components.gate.rules import evaluate_gate

    evaluations = {}
    for name, confusion in (("good", 0), ("worse", 1)):
        model_dir = make_model_dir(name, confusion=confusion, exported=True)
        evaluations[name] = evaluate_champion(model_dir / "saved_model", split_dir, version=name)
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

    def gate(challenger, champion):
        return evaluate_gate(challenger.metrics, challenger.predictions, config, champion)

    worse_vs_good = gate(evaluations["worse"], evaluations["good"])
    good_vs_worse = gate(evaluations["good"], evaluations["worse"])
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


@pytest.mark.e2e
def test_a_served_version_the_registry_does_not_know_is_the_champion(
    make_model_dir, split_dir, tmp_path, mlflow_server
):
    """Deployed without tracking, then gated with it: the served version is still compared."""
    from tumorflow.components.evaluation.evaluate import evaluate_model

    served = make_model_dir("served", confusion=0, exported=True)
    name = f"kidney-{uuid.uuid4().hex[:6]}"
    shutil.copytree(served / "saved_model", tmp_path / "models" / name / "1")
    challenger = make_model_dir("challenger", confusion=1, exported=True)
    evaluate_model(challenger, split_dir, tmp_path / "evaluation")
    config = GateConfig(
        rules=[GateRule(metric="accuracy", threshold=0.3)],
        champion_rules=[ChampionRule(metric="macro_f1", margin=0.02)],
        bootstrap_resamples=50,
    )

    result = run_gate(
        tmp_path / "evaluation",
        split_dir,
        config,
        tracking_uri=mlflow_server,
        model_name=name,
        output_dir=tmp_path / "decision",
        model_base_path=str(tmp_path / "models"),
    )

    decision = result.decision
    assert decision.champion_version is None and decision.champion_serving_version == "1"
    assert any("served version 1 was re-scored" in note for note in decision.notes)
    assert decision.champion["accuracy"] == pytest.approx(1.0)
    assert not decision.passed and not decision.rules[1].passed
    # the review images: what changed between the two and what the challenger gets wrong, each
    # with the challenger's own Grad-CAM overlay at the scan's size
    from PIL import Image

    from tumorflow.components.evaluation.metrics import read_predictions

    folder = tmp_path / "decision"
    shown = json.loads((folder / "review_images.json").read_text())
    challenger_scores = read_predictions(tmp_path / "evaluation" / "predictions.csv")
    wrong = {
        path
        for path, label, probs in zip(
            challenger_scores.paths, challenger_scores.y_true, challenger_scores.probs, strict=True
        )
        if probs.argmax() != label
    }
    assert wrong and {e["path"] for e in shown} == wrong
    assert all(e["reasons"] == ["changed", "wrong"] for e in shown)
    assert all(e["champion"] == e["label"] != e["challenger"] for e in shown)
    sizes = {
        r.path: Image.open(io.BytesIO(r.encoded)).size for r in read_records(split_dir, "test")
    }
    for entry in shown:
        overlay = Image.open(folder / entry["overlay"])
        assert overlay.size == sizes[entry["path"]] and overlay.mode == "RGB"
    champion_scores = read_predictions(folder / "champion_predictions.csv", CLASSES)
    assert champion_scores.paths == challenger_scores.paths


def test_review_images_put_changed_predictions_first_and_are_capped():
    from tumorflow.components.gate.review import select_review_images

    paths = [f"{i}.png" for i in range(6)]
    labels = np.array([0, 0, 1, 1, 0, 1])
    challenger = Predictions(
        paths,
        labels,
        np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8], [0.4, 0.6], [0.1, 0.9]]),
        CLASSES,
    )
    champion = Predictions(
        paths,
        labels,
        np.array([[0.8, 0.2], [0.9, 0.1], [0.7, 0.3], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]]),
        CLASSES,
    )
    shown = select_review_images(challenger, champion, limit=10)
    assert [(e["path"], e["reasons"]) for e in shown] == [
        ("1.png", ["changed", "wrong"]),
        ("3.png", ["changed"]),
        ("2.png", ["wrong"]),
        ("4.png", ["wrong"]),
    ]
    assert shown[1]["champion"] == "normal" and shown[1]["challenger"] == "tumor"
    assert [e["path"] for e in select_review_images(challenger, champion, limit=2)] == [
        "1.png",
        "3.png",
    ]
    assert [e["path"] for e in select_review_images(challenger, None)] == [
        "1.png",
        "2.png",
        "4.png",
    ]
    # with no champion, the review shows the mistakes evaluate has explained already
    from tumorflow.components.evaluation.evaluate import confident_mistakes

    assert confident_mistakes(challenger) == [1, 2, 4]
    assert confident_mistakes(challenger, limit=2) == [1, 2]


def test_the_gate_explains_only_what_evaluate_did_not(split_dir, tmp_path, monkeypatch):
    """Evaluate's heat maps are used as they are; the SavedModel explains only the rest, and with
    all of them at hand it is not loaded at all (a first run's gate needs no TensorFlow)."""
    from PIL import Image

    from tumorflow.components.evaluation import evaluate
    from tumorflow.components.gate.review import write_review_images

    records = list(read_records(split_dir, "test"))
    labels = np.array([r.label for r in records])
    probs = np.full((len(records), 4), 0.1)
    probs[np.arange(len(records)), (labels + 1) % 4] = 0.7  # every answer wrong
    challenger = Predictions([r.path for r in records], labels, probs, ["a", "b", "c", "d"])
    asked: list[int] = []

    def explain(saved_model_dir, images, batch=16):
        asked.append(len(images))
        return [np.ones((8, 8)) for _ in images]

    monkeypatch.setattr(evaluate, "explain_images", explain)
    given = {r.path: np.zeros((8, 8)) for r in records}
    shown = write_review_images(
        tmp_path / "saved_model", split_dir, challenger, None, tmp_path / "all", heatmaps=given
    )
    assert len(shown) == 24 and asked == []
    assert all((tmp_path / "all" / e["overlay"]).exists() for e in shown)

    some = dict(list(given.items())[:10])
    shown = write_review_images(
        tmp_path / "saved_model", split_dir, challenger, None, tmp_path / "some", heatmaps=some
    )
    assert asked == [14]
    # an explained image is overlaid with its own heat map: a hot one is redder than a cold one
    red = {
        e["path"]: np.asarray(Image.open(tmp_path / "some" / e["overlay"]))[..., 0].mean()
        for e in shown
    }
    cold = [red[p] for p in red if p in some]
    hot = [red[p] for p in red if p not in some]
    assert min(hot) > max(cold)
