"""Evaluation through the serving export: the evaluation folder, KFP and MLflow (the formulas
are tested in test_metrics.py)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from helpers import write_synthetic_split

from tumorflow.components.evaluation.evaluate import (
    PLOTS,
    evaluate_model,
    evaluated_saved_model,
    log_kfp_metrics,
)
from tumorflow.components.training.backbones import build_classifier
from tumorflow.components.training.export import export_model_artifact
from tumorflow.core.errors import ModelError


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
    export_model_artifact(model_dir)
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
    info = json.loads((model_dir / "model_info.json").read_text())
    assert metrics["saved_model_sha256"] == info["saved_model_sha256"]
    # the gate finds the SavedModel that was scored through the evaluation
    assert evaluated_saved_model(tmp_path) == (model_dir / "saved_model").resolve()
    # and the Grad-CAM heat maps of the most confident mistakes (the untrained model makes some),
    # from the SavedModel's own explain signature
    from tumorflow.components.data.tfrecords import read_records
    from tumorflow.components.evaluation.evaluate import (
        confident_mistakes,
        explain_images,
        read_mistake_heatmaps,
    )
    from tumorflow.components.evaluation.metrics import read_predictions

    scored = read_predictions(tmp_path / "predictions.csv")
    mistakes = [scored.paths[i] for i in confident_mistakes(scored)]
    heatmaps = read_mistake_heatmaps(tmp_path)
    assert mistakes and list(heatmaps) == mistakes
    encoded = {r.path: r.encoded for r in read_records(split_dir, "test")}
    first = explain_images(model_dir / "saved_model", [encoded[mistakes[0]]])[0]
    np.testing.assert_allclose(heatmaps[mistakes[0]], first, atol=1e-6)
    assert all(h.shape == (32, 32) and 0 <= h.min() <= h.max() <= 1 for h in heatmaps.values())


def test_the_scores_are_those_of_the_serving_signature(model_and_split, tmp_path):
    import tensorflow as tf

    from tumorflow.components.data.tfrecords import read_records

    model_dir, split_dir = model_and_split
    evaluate_model(model_dir, split_dir, tmp_path)
    records = list(read_records(split_dir, "test"))
    served = tf.saved_model.load(str(model_dir / "saved_model")).signatures["serving_default"]
    scores = served(image_bytes=tf.constant([r.encoded for r in records]))["scores"].numpy()
    with (tmp_path / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    written = np.array(
        [[float(row[f"p_{c}"]) for c in ("cyst", "normal", "stone", "tumor")] for row in rows]
    )
    np.testing.assert_allclose(written, scores, atol=1e-6)
    assert [row["path"] for row in rows] == [r.path for r in records]


def test_the_test_split_and_the_external_sets_are_scored_with_one_load(
    model_and_split, tmp_path, monkeypatch
):
    import os

    import tensorflow as tf

    from tumorflow.components.monitoring.features import build_reference
    from tumorflow.components.training import export

    model_dir, split_dir = model_and_split
    loads = []
    load = tf.saved_model.load
    monkeypatch.setattr(
        tf.saved_model, "load", lambda path, *a, **k: loads.append(path) or load(path, *a, **k)
    )
    export._load_saved_model.cache_clear()
    sets = {"site-b": split_dir, "site-c": split_dir}
    metrics = evaluate_model(model_dir, split_dir, tmp_path / "one", external_splits=sets)
    # and the evaluate step's drift reference, through the same SavedModel
    build_reference(split_dir, model_dir / "saved_model", tmp_path / "one" / "reference")
    assert len(loads) == 1
    for name in sets:
        external = json.loads((tmp_path / "one" / "external" / name / "metrics.json").read_text())
        assert external["accuracy"] == metrics["accuracy"]
    # a SavedModel written again at the same place is loaded again
    pb = model_dir / "saved_model" / "saved_model.pb"
    os.utime(pb, ns=(pb.stat().st_atime_ns, pb.stat().st_mtime_ns + 1_000_000))
    evaluate_model(model_dir, split_dir, tmp_path / "two")
    assert len(loads) == 2


def test_a_model_without_its_serving_export_is_refused(model_and_split, tmp_path):
    import shutil

    model_dir, split_dir = model_and_split
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare, ignore=shutil.ignore_patterns("saved_model"))
    with pytest.raises(ModelError, match="re-run the train step"):
        evaluate_model(bare, split_dir, tmp_path / "out")


def test_kfp_classification_metrics_are_filled(model_and_split, tmp_path):
    from kfp.dsl import ClassificationMetrics, Metrics

    model_dir, split_dir = model_and_split
    metrics = evaluate_model(model_dir, split_dir, tmp_path)
    scalars, classification = Metrics(), ClassificationMetrics()

    log_kfp_metrics(metrics, tmp_path, scalars, classification, positive_class="stone")

    assert scalars.metadata["accuracy"] == pytest.approx(metrics["accuracy"])
    assert "recall:tumor" in scalars.metadata
    matrix = classification.metadata["confusionMatrix"]
    assert [row["row"] for row in matrix["rows"]] == metrics["confusion_matrix"]
    curve = classification.metadata["confidenceMetrics"]
    assert len(curve) >= 2
    stone = roc_points_of(tmp_path, "stone")
    assert [point["falsePositiveRate"] for point in curve] == stone["fpr"]


def roc_points_of(evaluation_dir, name):
    from tumorflow.components.evaluation.evaluate import roc_points
    from tumorflow.components.evaluation.metrics import read_predictions

    scored = read_predictions(evaluation_dir / "predictions.csv")
    return roc_points(scored.y_true, scored.probs, scored.classes)[name]


def test_classes_that_differ_from_the_split_are_refused(model_and_split, tmp_path):
    model_dir, _ = model_and_split
    other = write_synthetic_split(tmp_path / "other", {"test": 1}, size=40, classes=["x", "y"])
    with pytest.raises(ModelError, match="same classes"):
        evaluate_model(model_dir, other, tmp_path / "out")


@pytest.mark.service
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


def test_a_split_with_slices_csv_is_evaluated_per_site_and_scanner(model_and_split, tmp_path):
    import shutil

    from tumorflow.components.data.dicom import SLICES_CSV, write_slice_table
    from tumorflow.components.data.tfrecords import read_records

    model_dir, split_dir = model_and_split
    sliced = tmp_path / "split"
    shutil.copytree(split_dir, sliced)
    paths = [record.path for record in read_records(sliced, "test")]
    write_slice_table(
        [
            {"path": p, "patient": f"patient-{i}", "site": f"site-{i % 2}", "manufacturer": "ACME"}
            for i, p in enumerate(paths)
        ],
        sliced / SLICES_CSV,
    )
    metrics = evaluate_model(model_dir, sliced, tmp_path / "eval")
    assert set(metrics["slices"]) == {"site", "manufacturer"}
    assert {v: e["n"] for v, e in metrics["slices"]["site"].items()} == {"site-0": 6, "site-1": 6}
    assert metrics["slices"]["manufacturer"]["ACME"]["accuracy"] == metrics["accuracy"]
    with (tmp_path / "eval" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {row["slice:site"] for row in rows} == {"site-0", "site-1"}


def test_a_dataset_made_only_of_hostile_names_is_validated_split_and_evaluated(tmp_path):
    """Every name of the hostile-name corpus (undecodable bytes, newlines, leading dashes, a
    255-byte name, names differing only in case) goes through validate -> split -> evaluate; the
    predictions and metrics name the safe copies, and each maps back to its original name."""
    from helpers import HOSTILE_NAMES, write_hostile_name_corpus

    from tumorflow.components.data.download import download_dataset
    from tumorflow.components.data.manifest import read_manifest
    from tumorflow.components.data.safe_names import original_name
    from tumorflow.components.data.validate import validate_and_split
    from tumorflow.components.evaluation.metrics import read_predictions
    from tumorflow.core.config import DatasetConfig, SplitConfig

    corpus = write_hostile_name_corpus(tmp_path / "corpus", per_class=0, size=40)
    download_dataset(str(tmp_path / "corpus"), tmp_path / "raw", DatasetConfig())
    rows = read_manifest(tmp_path / "raw")
    assert len(rows) == 2 * len(HOSTILE_NAMES)
    split = validate_and_split(
        tmp_path / "raw",
        tmp_path / "split",
        SplitConfig(min_test_per_class=1, test_fraction=0.3, val_fraction=0.2, seed=1),
    )
    assert split.quarantined == [] and split.classes == ["normal", "tumor"]
    model, _ = build_classifier("custom_cnn", 2, 32, "none", 0.0)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    model.save(model_dir / "model.keras")
    info = {"backbone": "custom_cnn", "image_size": [32, 32], "classes": split.classes}
    (model_dir / "model_info.json").write_text(json.dumps({**info, "mlflow_run_id": None}))
    export_model_artifact(model_dir)
    scored = {}
    for name, count in split.counts.items():
        if not sum(count.values()):
            continue
        out = tmp_path / f"eval-{name}"
        metrics = evaluate_model(model_dir, tmp_path / "split", out, split=name)
        assert metrics["n"] == sum(count.values())
        assert json.loads((out / "metrics.json").read_text())["n"] == metrics["n"]
        predictions = read_predictions(out / "predictions.csv", split.classes)
        assert np.isfinite(predictions.probs).all()
        scored.update(zip(predictions.paths, predictions.y_true, strict=True))
    original_of = {
        row.path: original_name(row.original_path) if row.original_path else row.path
        for row in rows
    }
    assert set(scored) == set(original_of)  # every image scored once, under its safe name
    for path, label in scored.items():
        path.encode("utf-8")
        assert path.isprintable() and "\n" not in path
        assert not any(part.startswith("-") or len(part.encode()) > 200 for part in path.split("/"))
        assert split.classes[label] == path.split("/")[0]
    originals = {original_of[path].encode("utf-8", "surrogateescape") for path in scored}
    assert originals == {
        label.encode() + b"/" + name for label, names in corpus.items() for name in names
    }
