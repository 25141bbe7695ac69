"""The one reader of a local run's folder, with steps the kfp.local cache skipped."""

from __future__ import annotations

import json
from pathlib import Path

from tumorflow.core import artifacts
from tumorflow.pipelines.run_folder import (
    APPROVAL_RECORD,
    EVALUATION,
    GATE_DECISION,
    SOURCE,
    RunFolder,
    pipeline_root,
)


def _write(folder: Path, name: str, content: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(content))


def _parameters(run: Path, task: str, **values) -> None:
    _write(run / task, "executor_output.json", {"parameterValues": values})


def _two_runs(run_root: Path) -> tuple[Path, Path]:
    """A first run that did everything, and a second whose download and evaluate were cached."""
    root = pipeline_root(run_root)
    first, second = (
        root / "tumorflow-retrain-20261201120000",
        root / "tumorflow-retrain-20261202120000",
    )
    _parameters(first, "dataset-version", fingerprint="sha256:first")
    _write(first / "download" / "raw", artifacts.SOURCE_JSON, {"dataset_version": "sha256:first"})
    _write(first / "evaluate" / "evaluation", artifacts.METRICS_FILE, {"accuracy": 0.9})
    _write(first / "gate" / "decision", artifacts.DECISION_FILE, {"passed": False})
    _parameters(second, "dataset-version", fingerprint="sha256:first")
    _write(second / "gate" / "decision", artifacts.DECISION_FILE, {"passed": True})
    _write(second / "approval" / "record", artifacts.APPROVAL_FILE, {"status": "approved"})
    _parameters(second, "deploy", Output=3)
    return first, second


def test_a_cached_step_is_read_from_the_earlier_run_that_made_it(tmp_path):
    first, second = _two_runs(tmp_path)
    run = RunFolder.find(tmp_path, second.name)

    assert run.artifact(*SOURCE) == first / "download" / "raw"
    assert run.metrics() == {"accuracy": 0.9}
    assert run.dataset_version() == "sha256:first"


def test_a_step_that_ran_is_read_from_its_own_run(tmp_path):
    _, second = _two_runs(tmp_path)
    run = RunFolder.find(tmp_path, second.name)

    assert run.gate_decision() == {"passed": True}
    assert run.approval() == {"status": "approved"}
    assert run.deployed_version() == 3
    assert run.file(GATE_DECISION, artifacts.DECISION_FILE).is_relative_to(second)


def test_a_run_that_never_reached_the_retraining_dag_reads_nothing_of_earlier_runs(tmp_path):
    _two_runs(tmp_path)
    calm = pipeline_root(tmp_path) / "tumorflow-retrain-20261203120000"
    _write(calm / "drift-check" / "verdict", artifacts.VERDICT_FILE, {"drift_detected": False})
    run = RunFolder.find(tmp_path, calm.name)

    assert run.drift_check_verdict() == {"drift_detected": False}
    assert run.metrics() is None and run.gate_decision() is None and run.approval() is None
    assert run.dataset_version() is None


def test_a_never_cached_step_is_not_read_from_an_earlier_run(tmp_path):
    _, second = _two_runs(tmp_path)
    (second / "gate" / "decision" / artifacts.DECISION_FILE).unlink()

    assert RunFolder.find(tmp_path, second.name).gate_decision() is None


def test_a_later_run_is_never_read_for_an_earlier_one(tmp_path):
    first, _ = _two_runs(tmp_path)
    run = RunFolder.find(tmp_path, first.name)

    assert run.approval() is None
    assert run.deployed_version() is None
    assert run.file(EVALUATION, artifacts.PREDICTIONS_FILE) is None
    assert run.file(APPROVAL_RECORD, artifacts.APPROVAL_FILE) is None


def test_a_name_outside_the_pipeline_root_finds_no_run(tmp_path):
    _two_runs(tmp_path)

    assert RunFolder.find(tmp_path, "../pipeline_root") is None
    assert RunFolder.find(tmp_path, ".kfp_cache") is None
    assert RunFolder.find(tmp_path, "tumorflow-retrain-29990101000000") is None
