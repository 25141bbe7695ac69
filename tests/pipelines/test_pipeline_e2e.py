"""The whole DAG under kfp.local on a tiny phantom dataset, tracked by a real MLflow server."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tumorflow.pipelines.config import load_config
from tumorflow.pipelines.runner import run_local

pytestmark = pytest.mark.slow


def _tiny_config(run_root: Path, tracking_uri: str, *overrides: str):
    return load_config(
        preset="phantom",
        overrides=[
            f"run_root={run_root}",
            f"tracking.tracking_uri={tracking_uri}",
            "dataset.phantom.per_class=16",
            "dataset.phantom.size=48",
            "dataset.phantom.corrupt=3",
            "train.image_size=48",
            "train.batch_size=16",
            "train.stage1.epochs=2",
            "train.stage2.epochs=1",
            "gate.bootstrap_resamples=50",
            "split.min_test_per_class=1",
            *overrides,
        ],
    )


def _png(size: int = 60) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def passing_run(tmp_path_factory, mlflow_server):
    run_root = tmp_path_factory.mktemp("e2e")
    config = _tiny_config(
        run_root,
        mlflow_server,
        "gate.rules=[{metric: accuracy, threshold: 0.0}]",
        "deploy.model_name=e2e-model",
    )
    return config, run_local(config)


def test_corrupt_files_are_quarantined_and_the_run_completes(passing_run):
    _, summary = passing_run
    split_dirs = list(summary.run_dir.glob("validate-and-split*/split"))
    assert split_dirs, "no split artifact"
    quarantine = (split_dirs[0] / "quarantine.csv").read_text().splitlines()
    assert len(quarantine) - 1 == 3
    assert summary.gate["passed"] is True


def test_a_passing_run_deploys_a_servable_version(passing_run):
    import tensorflow as tf

    config, summary = passing_run
    assert summary.deployed_version == 1
    version_dir = Path(summary.model_base_path) / "e2e-model" / "1"
    assert (version_dir / "saved_model.pb").exists()
    serving = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    outputs = serving(image_bytes=tf.constant([_png(), _png(80)]))
    scores = outputs["scores"].numpy()
    assert scores.shape == (2, 4)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-4)
    assert set(outputs["predicted_class"].numpy().astype(str)) <= set(config.dataset.classes)


def test_the_run_is_tracked_in_mlflow(passing_run, mlflow_server):
    import mlflow

    _, summary = passing_run
    client = mlflow.MlflowClient(mlflow_server)
    runs = client.search_runs(
        [client.get_experiment_by_name("tumorflow").experiment_id],
        filter_string=f"tags.`tumorflow.pipeline_run` = '{summary.run_name}'",
    )
    assert runs, "no MLflow run tagged with the pipeline run"
    metrics = runs[0].data.metrics
    assert "accuracy" in metrics or "test_accuracy" in metrics
    history = client.get_metric_history(runs[0].info.run_id, "stage1_loss")
    assert len(history) == 2
    versions = client.search_model_versions("name = 'e2e-model'")
    assert [v.version for v in versions] == ["1"]
    assert client.get_model_version_by_alias("e2e-model", "champion").version == "1"


def test_a_failing_gate_deploys_nothing(passing_run, mlflow_server):
    config, first = passing_run
    strict = config.model_copy(deep=True)
    strict.gate.rules[0].threshold = 1.01
    summary = run_local(strict)
    assert summary.gate["passed"] is False
    assert summary.deployed_version is None
    versions = sorted(p.name for p in (Path(first.model_base_path) / "e2e-model").iterdir())
    assert versions == ["1"]
    assert "train" not in summary.task_seconds or summary.task_seconds["train"] < 30
    assert json.loads(json.dumps(summary.to_dict()))["deployed_version"] is None


def test_the_review_notebook_runs_on_the_run(passing_run, tmp_path):
    import subprocess
    import sys

    config, _ = passing_run
    (tmp_path / "runs").symlink_to(Path(config.run_root).resolve())
    notebook = Path(__file__).resolve().parents[2] / "notebooks" / "review_run.py"
    result = subprocess.run(
        [sys.executable, str(notebook)], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "3 quarantined files" in result.stdout
    assert "gate passed:" in result.stdout
