"""The whole DAG under kfp.local on a tiny phantom dataset, tracked by a real MLflow server."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_CONFIG, image_bytes, noise_image
from PIL import ImageFilter

from tumorflow.core.config import load_config
from tumorflow.pipelines.runner import run_local

pytestmark = pytest.mark.e2e


def _tiny_config(run_root: Path, tracking_uri: str, *overrides: str):
    return load_config(
        TINY_CONFIG,
        preset="phantom",
        overrides=[
            f"run_root={run_root}",
            f"tracking.tracking_uri={tracking_uri}",
            "dataset.phantom.corrupt=3",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def passing_run(tmp_path_factory, mlflow_server):
    run_root = tmp_path_factory.mktemp("e2e")
    config = _tiny_config(run_root, mlflow_server, "deploy.model_name=e2e-model")
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
    outputs = serving(image_bytes=tf.constant([image_bytes(0, 60, "L"), image_bytes(1, 80, "L")]))
    scores = outputs["scores"].numpy()
    assert scores.shape == (2, 4)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-4)
    assert set(outputs["predicted_class"].numpy().astype(str)) <= set(config.dataset.classes)
    # The phantom preset trains on one grey channel; the served version decodes the same way.
    meta = json.loads((version_dir / "assets.extra" / "tumorflow.json").read_text())
    assert meta["grayscale"] is True


def test_the_run_is_tracked_in_mlflow(passing_run, mlflow_server):
    import mlflow

    _, summary = passing_run
    client = mlflow.MlflowClient(mlflow_server)
    versions = client.search_model_versions("name = 'e2e-model'")
    assert [v.version for v in versions] == ["1"]
    assert versions[0].tags["tumorflow.pipeline_run"] == summary.run_name
    assert client.get_model_version_by_alias("e2e-model", "champion").version == "1"
    # the training run (cached steps carry no run name) is the version's source run, tagged
    # with the dataset version it trained on
    run = client.get_run(versions[0].run_id)
    assert run.data.tags["tumorflow.dataset_version"] == summary.dataset_version
    metrics = run.data.metrics
    assert "accuracy" in metrics or "test_accuracy" in metrics
    history = client.get_metric_history(run.info.run_id, "stage1_loss")
    assert len(history) == 2


def test_a_failing_gate_deploys_nothing_and_reuses_the_first_runs_training(
    passing_run, mlflow_server, caplog
):
    config, first = passing_run
    strict = config.model_copy(deep=True)
    strict.gate.rules[0].threshold = 1.01
    caplog.set_level(logging.INFO)  # as the CLI logs: the runner reads kfp.local's cache hits
    summary = run_local(strict)
    assert summary.gate["passed"] is False
    assert summary.deployed_version is None
    versions = sorted(p.name for p in (Path(first.model_base_path) / "e2e-model").iterdir())
    assert versions == ["1"]
    assert json.loads(json.dumps(summary.to_dict()))["deployed_version"] is None

    # Only the gate's rules changed: the steps before it came from the cache (and left nothing
    # in this run's folder), the gate ran again and judged the same figures. (evaluate is not
    # among them: kfp.local takes an output artifact without a file as a cache miss, and its
    # Metrics and ClassificationMetrics outputs have none, so it scores the cached model again.)
    ran = {path.name for path in summary.run_dir.iterdir() if path.is_dir()}
    for task in ("download", "validate-and-split", "train", "drift-reference"):
        assert summary.task_seconds.get(task) == "cached", task
        assert task not in ran, task
    assert isinstance(summary.task_seconds.get("gate"), float) and "gate" in ran
    assert "deploy" not in summary.task_seconds and "deploy" not in ran
    challenger = pytest.approx(first.gate["challenger"], rel=1e-6, nan_ok=True)
    assert summary.gate["challenger"] == challenger


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


def _manual(config, timeout_s: float):
    """The same run with manual approval: the steps up to the gate come from the cache."""
    manual = config.model_copy(deep=True)
    manual.gate.approval = "manual"
    manual.gate.approval_timeout_s = timeout_s
    manual.gate.approval_poll_s = 0.5
    manual.gate.champion_rules = []
    return manual


def test_an_unanswered_approval_times_out_and_deploys_nothing(passing_run, mlflow_server):
    config, first = passing_run
    before = sorted(p.name for p in (Path(first.model_base_path) / "e2e-model").iterdir())
    summary = run_local(_manual(config, timeout_s=3))
    assert summary.approval["status"] == "timed_out"
    assert summary.deployed_version is None
    assert sorted(p.name for p in (Path(first.model_base_path) / "e2e-model").iterdir()) == before


def _blurred_dark_scans(folder: Path, count: int = 40) -> Path:
    """Blurred, darker scans from a "new scanner"."""
    folder.mkdir()
    for index in range(count):
        image = noise_image(index, 64, "L", level=60, spread=10)
        image.filter(ImageFilter.GaussianBlur(3)).save(folder / f"{index}.png")
    return folder


def test_the_monitoring_pipeline_retrains_only_when_requests_drift(passing_run, tmp_path):
    from tumorflow.pipelines.run_folder import SOURCE, RunFolder

    config, first = passing_run
    drifted = run_local(config, monitor_source=str(_blurred_dark_scans(tmp_path / "new-scanner")))
    assert drifted.run_name.startswith("tumorflow-monitor-")
    assert drifted.trigger_reason.startswith("drift detected")
    trigger = json.loads((drifted.run_dir / "drift-check" / "verdict" / "trigger.json").read_text())
    assert trigger["reason"] == drifted.trigger_reason
    assert trigger["current_rows"] == 40
    assert drifted.gate is not None, "the retraining DAG did not run"

    same = RunFolder(first.run_dir).artifact(*SOURCE) / "files"
    calm = run_local(config, monitor_source=str(same))
    verdict = json.loads((calm.run_dir / "drift-check" / "verdict" / "verdict.json").read_text())
    assert verdict["drift_detected"] is False
    assert calm.trigger_reason is None and calm.gate is None and calm.deployed_version is None


def test_an_external_set_is_scored_and_gated_but_never_trained_on(passing_run, caplog):
    """A second "site": the phantom with another seed and twice the noise, prepared and scored
    by challenger and champion; its floor fails the gate; training comes from the cache."""
    from jinja2 import Environment, FileSystemLoader

    from tumorflow.console.app import TEMPLATES
    from tumorflow.console.evidence import CandidateRow, run_evidence
    from tumorflow.core.config import ExternalSetConfig

    config, _ = passing_run
    with_site = config.model_copy(deep=True)
    with_site.gate.external_max_drop = 0.0
    with_site.gate.external_sets = [
        ExternalSetConfig(
            name="site-b",
            source="phantom",
            phantom={"per_class": 6, "size": 48, "seed": 7, "noise_scale": 2.0},
            rules=[{"metric": "macro_f1", "threshold": 1.01}],
            champion_rules=[{"metric": "macro_f1", "margin": 0.05, "bound": "lower"}],
        )
    ]
    caplog.set_level(logging.INFO)  # as the CLI logs: the runner reads kfp.local's cache hits
    summary = run_local(with_site)

    assert summary.task_seconds.get("train") == "cached", "an external set is never trained on"
    assert isinstance(summary.task_seconds.get("external-sets"), float)
    decision = summary.gate
    site = decision["external_sets"]["site-b"]
    assert site["n"] == 24
    assert set(site["values"]) >= {"accuracy", "macro_f1"}
    assert site["internal"]["macro_f1"] == pytest.approx(decision["challenger"]["macro_f1"])
    assert site["champion"] is not None, "the served champion is re-scored on the site too"
    failed = [r["name"] for r in decision["rules"] if not r["passed"]]
    assert "external site-b: macro_f1 >= 1.01 (point)" in failed
    assert decision["passed"] is False and summary.deployed_version is None
    # the warning is the measured drop against the configured one (0 here)
    assert bool(decision["warnings"]) == (site["drop"] > 0)

    run = CandidateRow(summary.run_name, "e2e-model", "2", 0, "waiting", False)
    page = (
        Environment(loader=FileSystemLoader(TEMPLATES))
        .get_template("review.html")
        .render(
            run=run,
            evidence=run_evidence(Path(config.run_root), summary.run_name),
            may_decide=False,
        )
    )
    assert 'id="external-sets"' in page and "<td>site-b</td><td>24</td>" in page
    assert 'id="leak-report"' in page
