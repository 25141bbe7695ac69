from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path

import pytest

from tumorflow.components.release.registry import (
    RegistryError,
    code_version,
    connect,
    download_model_folder,
    find_champion,
    move_champion,
    register_candidate,
)

pytestmark = pytest.mark.service


def _model_folder(tmp_path: Path, run_id: str | None = None) -> Path:
    folder = tmp_path / f"model-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    (folder / "model.keras").write_bytes(b"weights")
    (folder / "model_info.json").write_text(
        json.dumps({"classes": ["a", "b"], "mlflow_run_id": run_id})
    )
    return folder


def test_candidates_are_registered_once_per_run(tmp_path, mlflow_server):
    name = f"m-{uuid.uuid4().hex[:6]}"
    assert find_champion(mlflow_server, name) is None
    first = register_candidate(
        mlflow_server, name, _model_folder(tmp_path), {"passed": False}, "run-a"
    )
    again = register_candidate(
        mlflow_server, name, _model_folder(tmp_path), {"passed": True}, "run-a"
    )
    other = register_candidate(
        mlflow_server, name, _model_folder(tmp_path), {"passed": True}, "run-b"
    )
    assert first.version == again.version != other.version
    assert first.tags == {
        "tumorflow.pipeline_run": "run-a",
        "gate.passed": "false",
        "approval.status": "pending",
        "tumorflow.code_version": code_version(),
    }
    client = connect(mlflow_server)
    assert move_champion(client, name, first.version) is None
    assert move_champion(client, name, other.version) == first.version
    assert find_champion(mlflow_server, name).version == other.version
    assert client.get_registered_model(name).aliases == {
        "champion": other.version,
        "previous": first.version,
    }
    downloaded = download_model_folder(client, first)
    assert (downloaded / "model.keras").read_bytes() == b"weights"


def test_the_training_runs_logged_model_folder_is_reused(tmp_path, mlflow_server):
    client = connect(mlflow_server)
    experiment = client.get_experiment_by_name("tumorflow") or client.get_experiment(
        client.create_experiment("tumorflow")
    )
    run_id = client.create_run(experiment.experiment_id).info.run_id
    folder = _model_folder(tmp_path, run_id)
    client.log_artifacts(run_id, str(folder), "model")
    version = register_candidate(
        mlflow_server, f"m-{uuid.uuid4().hex[:6]}", folder, {"passed": True}, "run-t"
    )
    assert version.source == f"runs:/{run_id}/model" and version.run_id == run_id
    assert [a.path for a in client.list_artifacts(run_id)] == ["model"]


def test_a_server_that_is_down_is_reported_at_once():
    with pytest.raises(RegistryError, match="not reachable"):
        connect("http://127.0.0.1:9")


def test_the_code_version_names_the_package_and_changes_with_its_source(tmp_path, monkeypatch):
    import tumorflow

    before = code_version()
    assert re.fullmatch(r"tumorflow \S+ sha256:[0-9a-f]{64}", before)
    # the same digest over a copy of the sources, and another one once a source file changes
    copy = tmp_path / "tumorflow"
    shutil.copytree(
        Path(tumorflow.__file__).parent,
        copy,
        ignore=shutil.ignore_patterns(".venv*", ".git", "tests", "runs", "__pycache__", "*.pyc"),
    )
    monkeypatch.setattr(tumorflow, "__file__", str(copy / "__init__.py"))
    code_version.cache_clear()
    assert code_version() == before
    (copy / "core" / "errors.py").write_text((copy / "core" / "errors.py").read_text() + "\n# x\n")
    code_version.cache_clear()
    assert code_version() != before
    code_version.cache_clear()
