"""The whole DAG under kfp.local on a tiny phantom dataset, as a user starts it: `tumorflow run`
(in-process) with the default tracking, MLflow on SQLite under the run root. Two runs: the
first trains, deploys and prints; the second, with a gate no model passes and an external site,
reuses the first's training and deploys nothing.

The other scenarios run end to end once elsewhere: drift starting a retraining that waits for a
person (tests/pipelines/test_production_loop.py, day 4), a calm monitoring run
(tests/components/monitoring/test_monitor.py), a reviewer approving in a browser
(tests/console/test_review_e2e.py), a PACS source (tests/pipelines/test_pacs_pipeline.py)."""

import contextlib
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_CONFIG, image_bytes

from tumorflow.core.config import PipelineConfig, load_config
from tumorflow.pipelines.runner import RunSummary, run_local

pytestmark = pytest.mark.e2e

MODEL = "e2e-model"
SETTINGS = ("dataset.phantom.corrupt=3", f"deploy.model_name={MODEL}")
# the tasks `tumorflow run` prints a line for, once each
TASKS = (
    "dataset-version",
    "download",
    "validate-and-split",
    "train",
    "evaluate",
    "gate",
    "approval",
    "deploy",
)


@dataclass
class FirstRun:
    config: PipelineConfig
    summary: RunSummary
    home: Path  # the working directory `tumorflow run` ran in
    out: str
    err: str


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> FirstRun:
    """`tumorflow run --preset phantom --config tests/tiny.yaml` with 3 corrupt files, run from
    an empty working directory; what it printed is kept."""
    from tumorflow.cli.main import main

    home = tmp_path_factory.mktemp("e2e")
    root = home / "runs"
    argv = ["run", "--run-root", str(root), "--preset", "phantom", "--config", str(TINY_CONFIG)]
    for setting in SETTINGS:
        argv += ["--set", setting]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(home), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*argv, "--summary-json", str(home / "summary.json")])
    assert code == 0, err.getvalue()[-3000:]
    data = json.loads((home / "summary.json").read_text())
    data["run_dir"] = Path(data["run_dir"])
    data["log_path"] = Path(data["log_path"]) if data["log_path"] else None
    config = load_config(TINY_CONFIG, preset="phantom", overrides=[f"run_root={root}", *SETTINGS])
    return FirstRun(config, RunSummary(**data), home, out.getvalue(), err.getvalue())


def test_the_run_printed_one_line_per_task_and_kept_the_rest_in_its_log(first_run, capsys):
    from tumorflow.cli.main import main

    progress = first_run.err.splitlines()
    finished = [line for line in progress if " epoch " not in line]
    for task in TASKS:
        assert sum(line.split()[0] == task for line in finished if line.strip()) == 1, task
    assert re.search(r"^train\s+\d+\.\d s$", first_run.err, re.MULTILINE)
    # and the two drift tasks and the two external-set tasks (which finish at once without sets)
    assert len(finished) <= len(TASKS) + 4
    assert len(progress) - len(finished) <= 3  # at most a line per epoch: tiny.yaml trains 2 + 1
    assert "executor_input" not in first_run.out + first_run.err
    assert "have no effect" not in first_run.err
    log_path = Path(re.search(r"^log\s+(\S+)", first_run.out, re.MULTILINE).group(1))
    log = log_path.read_text()
    assert "executor_input" in log
    # with no champion the gate loads no model: evaluate explained the mistakes it shows
    review = next(first_run.summary.run_dir.glob("gate*/decision/review_images.json"))
    shown = json.loads(review.read_text())
    assert shown and all(entry["reasons"] == ["wrong"] for entry in shown)
    assert f"review overlays: {len(shown)} explained by evaluate, 0 here" in log
    assert "deployed       version 1" in first_run.out
    # MLflow's files stay under the run root, not in the working directory
    root = Path(first_run.config.run_root)
    assert not (first_run.home / "mlruns").exists()
    assert any((root / "mlartifacts").rglob("model_info.json"))

    assert main(["status", "--run-root", str(root), "--model-name", MODEL]) == 0
    assert "aliases: champion=1" in capsys.readouterr().out


def test_corrupt_files_are_quarantined_and_the_run_completes(first_run):
    summary = first_run.summary
    split_dirs = list(summary.run_dir.glob("validate-and-split*/split"))
    assert split_dirs, "no split artifact"
    quarantine = (split_dirs[0] / "quarantine.csv").read_text().splitlines()
    assert len(quarantine) - 1 == 3
    assert summary.gate["passed"] is True


def test_a_passing_run_deploys_a_servable_version(first_run):
    import tensorflow as tf

    config, summary = first_run.config, first_run.summary
    assert summary.deployed_version == 1
    version_dir = Path(summary.model_base_path) / MODEL / "1"
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


def test_the_run_is_tracked_in_mlflow(first_run):
    import mlflow

    summary = first_run.summary
    assert summary.tracking_uri.startswith("sqlite:///")
    client = mlflow.MlflowClient(summary.tracking_uri)
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert versions[0].tags["tumorflow.pipeline_run"] == summary.run_name
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    # the training run (cached steps carry no run name) is the version's source run, tagged
    # with the dataset version it trained on
    run = client.get_run(versions[0].run_id)
    assert run.data.tags["tumorflow.dataset_version"] == summary.dataset_version
    metrics = run.data.metrics
    assert "accuracy" in metrics or "test_accuracy" in metrics
    history = client.get_metric_history(run.info.run_id, "stage1_loss")
    assert len(history) == 2


def test_the_review_notebook_runs_on_the_run(first_run, tmp_path):
    import subprocess
    import sys

    config = first_run.config
    (tmp_path / "runs").symlink_to(Path(config.run_root).resolve())
    notebook = Path(__file__).resolve().parents[2] / "notebooks" / "review_run.py"
    result = subprocess.run(
        [sys.executable, str(notebook)], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "3 quarantined files" in result.stdout
    assert "gate passed:" in result.stdout


def test_a_failing_gate_with_an_external_site_deploys_nothing_and_reuses_the_training(
    first_run, caplog
):
    """The second run: a floor no model reaches, and a second "site" (the phantom with another
    seed and twice the noise) prepared and scored by challenger and champion, its own floor
    failing too. Only the gate's settings changed: the steps before it come from the cache, the
    gate judges the same figures, nothing is deployed."""
    from jinja2 import Environment, FileSystemLoader

    from tumorflow.console.app import TEMPLATES
    from tumorflow.console.evidence import CandidateRow, run_evidence
    from tumorflow.core.config import ExternalSetConfig

    config, first = first_run.config, first_run.summary
    strict = config.model_copy(deep=True)
    strict.gate.rules[0].threshold = 1.01
    strict.gate.external_max_drop = 0.0
    strict.gate.external_sets = [
        ExternalSetConfig(
            name="site-b",
            source="phantom",
            phantom={"per_class": 6, "size": 48, "seed": 7, "noise_scale": 2.0},
            rules=[{"metric": "macro_f1", "threshold": 1.01}],
            champion_rules=[{"metric": "macro_f1", "margin": 0.05, "bound": "lower"}],
        )
    ]
    caplog.set_level(logging.INFO)  # as the CLI logs: the runner reads kfp.local's cache hits
    summary = run_local(strict)

    assert summary.gate["passed"] is False
    assert summary.deployed_version is None
    versions = sorted(p.name for p in (Path(first.model_base_path) / MODEL).iterdir())
    assert versions == ["1"]
    assert json.loads(json.dumps(summary.to_dict()))["deployed_version"] is None
    # The steps before the gate came from the cache (and left nothing in this run's folder): an
    # external set is never trained on. (evaluate is not among them: kfp.local takes an output
    # artifact without a file as a cache miss, and its Metrics and ClassificationMetrics outputs
    # have none, so it scores the cached model again, on the site too.)
    ran = {path.name for path in summary.run_dir.iterdir() if path.is_dir()}
    for task in ("download", "validate-and-split", "train"):
        assert summary.task_seconds.get(task) == "cached", task
        assert task not in ran, task
    assert isinstance(summary.task_seconds.get("gate"), float) and "gate" in ran
    assert isinstance(summary.task_seconds.get("external-sets"), float)
    assert "deploy" not in summary.task_seconds and "deploy" not in ran

    decision = summary.gate
    assert decision["challenger"] == pytest.approx(first.gate["challenger"], rel=1e-6, nan_ok=True)
    site = decision["external_sets"]["site-b"]
    assert site["n"] == 24
    assert set(site["values"]) >= {"accuracy", "macro_f1"}
    assert site["internal"]["macro_f1"] == pytest.approx(decision["challenger"]["macro_f1"])
    assert site["champion"] is not None, "the served champion is re-scored on the site too"
    failed = [r["name"] for r in decision["rules"] if not r["passed"]]
    assert "external site-b: macro_f1 >= 1.01 (point)" in failed
    assert "accuracy >= 1.01 (point)" in failed
    # the warning is the measured drop against the configured one (0 here)
    assert bool(decision["warnings"]) == (site["drop"] > 0)

    # the review page shows the site and the leak report
    run = CandidateRow(summary.run_name, MODEL, "2", 0, "waiting", False)
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
