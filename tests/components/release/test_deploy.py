from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import pandas as pd
import pytest

from tumorflow.components.release.deploy import (
    DeployRefused,
    check_deployable,
    deploy_model,
    model_status,
    rollback,
)
from tumorflow.core.serving_layout import serving_labels


def _decision(tmp_path: Path, passed: bool) -> Path:
    path = tmp_path / f"decision-{passed}.json"
    rule = {"name": "accuracy >= 0.8 (point)", "passed": passed}
    path.write_text(json.dumps({"passed": passed, "rules": [rule]}))
    return path


def _files(folder: Path) -> dict[str, bytes]:
    """Every file of a SavedModel outside assets.extra/, by relative path."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).parts[0] != "assets.extra"
    }


def _approval(tmp_path: Path, **record) -> Path:
    folder = tmp_path / f"approval-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    (folder / "approval.json").write_text(json.dumps(record))
    return folder


@pytest.mark.parametrize(
    ("decision", "approval", "refusal"),
    [
        ({"passed": True}, None, None),
        ({"passed": True}, {"status": "approved"}, None),
        (
            {"passed": False, "rules": [{"name": "accuracy >= 0.8", "passed": False}]},
            None,
            "accuracy >= 0.8",
        ),
        ({"passed": False}, {"status": "approved"}, "--override"),
        ({"passed": False}, {"status": "approved", "override": True}, None),
        ({"passed": True}, {"status": "rejected", "reason": "blurry scans"}, "blurry scans"),
        ({"passed": True}, {"status": "timed_out"}, "'timed_out'"),
        ({}, None, "no passing decision"),
    ],
)
def test_what_may_be_deployed(decision, approval, refusal):
    if refusal is None:
        check_deployable(decision, approval)
    else:
        with pytest.raises(DeployRefused, match=refusal):
            check_deployable(decision, approval)


def test_the_served_version_is_byte_for_byte_what_evaluate_scored(
    make_model_dir, split_dir, tmp_path
):
    from tumorflow.components.evaluation.evaluate import evaluate_model

    model_dir = make_model_dir(exported=True)
    metrics = evaluate_model(model_dir, split_dir, tmp_path / "evaluation")
    result = deploy_model(
        model_dir,
        _decision(tmp_path, passed=True),
        str(tmp_path / "models"),
        "kidney",
        keep_versions=2,
        tracking_uri=None,
        pipeline_run="run-1",
    )

    served = tmp_path / "models" / "kidney" / "1"
    assert result.deployed and result.version == 1
    assert _files(served) == _files(model_dir / "saved_model")
    meta = json.loads((served / "assets.extra" / "tumorflow.json").read_text())
    assert meta["serving_digest"] == result.serving_digest == metrics["saved_model_sha256"]
    assert meta["model_name"] == "kidney" and meta["pipeline_run"] == "run-1"


def test_a_model_changed_after_evaluation_is_refused(make_model_dir, tmp_path):
    model_dir = make_model_dir(exported=True)
    decision = tmp_path / "decision.json"
    decision.write_text(json.dumps({"passed": True, "challenger_saved_model_sha256": "0" * 64}))
    with pytest.raises(DeployRefused, match="deploy the model that was gated"):
        deploy_model(
            model_dir,
            decision,
            str(tmp_path / "models"),
            "kidney",
            keep_versions=2,
            tracking_uri=None,
            pipeline_run="run-1",
        )
    next(model_dir.glob("saved_model/variables/*.data-*")).write_bytes(b"tampered")
    with pytest.raises(DeployRefused, match="changed after it was evaluated"):
        deploy_model(
            model_dir,
            _decision(tmp_path, passed=True),
            str(tmp_path / "models"),
            "kidney",
            keep_versions=2,
            tracking_uri=None,
            pipeline_run="run-1",
        )
    assert list((tmp_path / "models" / "kidney").iterdir()) == []
    with pytest.raises(DeployRefused, match="re-run the train step"):
        deploy_model(
            make_model_dir("not-exported"),
            _decision(tmp_path, passed=True),
            str(tmp_path / "models"),
            "kidney",
            keep_versions=2,
            tracking_uri=None,
            pipeline_run="run-2",
        )


def test_the_same_weights_again_publish_nothing(make_model_dir, tmp_path, caplog):
    base = tmp_path / "models"
    first_model, same_weights = (
        make_model_dir("first", exported=True),
        make_model_dir("again", exported=True, fresh=True),  # saved and exported again
    )
    different = make_model_dir("different", confusion=1, exported=True)

    def deploy(model_dir: Path, run: str):
        return deploy_model(
            model_dir,
            _decision(tmp_path, passed=True),
            str(base),
            "kidney",
            keep_versions=2,
            tracking_uri=None,
            pipeline_run=run,
        )

    first = deploy(first_model, "run-1")
    config = (base / "models.config").read_bytes()
    with caplog.at_level("INFO", logger="tumorflow.components.release.deploy"):
        repeated = deploy(same_weights, "run-2")

    assert first.deployed and not repeated.deployed
    assert repeated.version == 1 and repeated.reason == "identical to served version 1"
    assert "identical to served version 1" in caplog.text and "nothing deployed" in caplog.text
    assert (base / "models.config").read_bytes() == config
    assert sorted(p.name for p in (base / "kidney").iterdir()) == ["1"]
    assert deploy(different, "run-3").version == 2


def _registry(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _parse_config(base: Path):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    return text_format.Parse(
        (base / "models.config").read_text(), model_server_config_pb2.ModelServerConfig()
    )


@pytest.mark.service
def test_a_failed_gate_deploys_nothing(make_model_dir, tmp_path, mlflow_server):
    name = f"m-{uuid.uuid4().hex[:6]}"
    base = tmp_path / "models"
    base.mkdir()
    with pytest.raises(DeployRefused, match="--override"):
        deploy_model(
            make_model_dir(),
            _decision(tmp_path, passed=False),
            str(base),
            name,
            keep_versions=2,
            tracking_uri=mlflow_server,
            pipeline_run="run-failed",
        )
    assert list(base.iterdir()) == []
    assert _registry(mlflow_server).search_model_versions(f"name = '{name}'") == []


@pytest.mark.service
def test_versions_increase_and_aliases_and_labels_follow(make_model_dir, tmp_path, mlflow_server):
    name = f"m-{uuid.uuid4().hex[:6]}"
    base = tmp_path / "models"
    reference = tmp_path / "reference" / "drift_reference.parquet"
    reference.parent.mkdir()
    pd.DataFrame({"mean_intensity": [1.0, 2.0]}).to_parquet(reference)
    results = [
        deploy_model(
            make_model_dir(f"model{i}", confusion=i, exported=True),
            _decision(tmp_path, passed=True),
            str(base),
            name,
            keep_versions=2,
            tracking_uri=mlflow_server,
            pipeline_run=f"run-{i}",
            drift_reference=reference,
        )
        for i in range(3)
    ]
    assert [r.version for r in results] == [1, 2, 3]
    assert sorted(p.name for p in (base / name).iterdir()) == ["1", "2", "3"]
    assets = base / name / "3" / "assets.extra"
    meta = json.loads((assets / "tumorflow.json").read_text())
    assert meta["registered_version"] == results[2].registered_version
    assert (assets / "drift_reference.parquet").exists()

    (entry,) = _parse_config(base).model_config_list.config
    assert entry.name == name and entry.base_path == str((base / name).resolve())
    assert dict(entry.version_labels) == {"stable": 3, "previous": 2}
    assert list(entry.model_version_policy.specific.versions) == [2, 3]

    aliases = _registry(mlflow_server).get_registered_model(name).aliases
    assert aliases == {
        "champion": results[2].registered_version,
        "previous": results[1].registered_version,
    }
    version = _registry(mlflow_server).get_model_version(name, results[2].registered_version)
    assert (
        version.tags["serving_version"] == "3" and version.tags["tumorflow.pipeline_run"] == "run-2"
    )
    assert version.tags["serving_digest"] == results[2].serving_digest == meta["serving_digest"]

    back = rollback(mlflow_server, name, str(base))
    assert (back.stable, back.replaced) == (2, 3)
    # the version rolled back from stops being loaded: unlabelled requests move to 2 as well
    assert serving_labels(str(base), name) == ({"stable": 2, "previous": 1}, [1, 2])
    aliases = _registry(mlflow_server).get_registered_model(name).aliases
    assert aliases["champion"] == results[1].registered_version
    assert aliases["previous"] == results[2].registered_version

    to_first = rollback(mlflow_server, name, str(base), to_version=1)
    assert serving_labels(str(base), name) == ({"stable": 1}, [1])
    with pytest.raises(DeployRefused, match="not on disk"):
        rollback(mlflow_server, name, str(base), to_version=9)

    status = model_status(mlflow_server, name, str(base))
    assert status["serving"] == {
        "on_disk": [1, 2, 3],
        "loaded": [1],
        "labels": {"stable": 1},
    }
    assert status["aliases"]["champion"] == to_first.champion_version
    assert [v["pipeline_run"] for v in status["versions"]] == ["run-2", "run-1", "run-0"]
    assert status["versions"][2]["rollback"]["from_serving_version"] == "2"


@pytest.mark.e2e
def test_concurrent_deploys_get_distinct_versions(make_model_dir, tmp_path):
    base = tmp_path / "models"
    decision = _decision(tmp_path, passed=True)
    models = [make_model_dir(f"model{i}", confusion=i, exported=True) for i in range(3)]
    versions, errors = [], []

    def deploy(model_dir: Path, run: str) -> None:
        try:
            result = deploy_model(
                model_dir,
                decision,
                str(base),
                "kidney",
                keep_versions=5,
                tracking_uri=None,
                pipeline_run=run,
            )
            versions.append(result.version)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=deploy, args=(m, f"r{i}")) for i, m in enumerate(models)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(versions) == [1, 2, 3]
    assert sorted(p.name for p in (base / "kidney").iterdir()) == ["1", "2", "3"]
    labels, loaded = serving_labels(str(base), "kidney")
    assert loaded == [1, 2, 3] and labels["stable"] == 3


@pytest.mark.service
def test_gate_against_the_registry_champion(make_model_dir, split_dir, tmp_path, mlflow_server):
    """A worse challenger is rejected and nothing changes; a better one is deployed."""
    from tumorflow.components.evaluation.evaluate import evaluate_model
    from tumorflow.components.gate.decision import run_gate
    from tumorflow.core.config import ChampionRule, GateConfig, GateRule

    name = f"m-{uuid.uuid4().hex[:6]}"
    base = tmp_path / "models"
    config = GateConfig(
        rules=[GateRule(metric="accuracy", threshold=0.3)],
        champion_rules=[ChampionRule(metric="macro_f1", margin=0.02)],
        bootstrap_resamples=50,
    )

    def evaluation_of(model_dir: Path) -> Path:
        folder = tmp_path / f"{model_dir.name}-evaluation"
        evaluate_model(model_dir, split_dir, folder)
        return folder

    def gate_and_deploy(model_dir: Path, run: str):
        result = run_gate(
            evaluation_of(model_dir),
            split_dir,
            config,
            tracking_uri=mlflow_server,
            model_name=name,
            output_dir=tmp_path / f"{run}-decision",
            model_base_path=str(base),
        )
        try:
            deployed = deploy_model(
                model_dir,
                result.decision_path,
                str(base),
                name,
                keep_versions=2,
                tracking_uri=mlflow_server,
                pipeline_run=run,
            )
        except DeployRefused:
            deployed = None
        return result, deployed

    medium = make_model_dir("medium", confusion=1, exported=True)
    first, deployed = gate_and_deploy(medium, "run-medium")
    assert first.passed and first.decision.champion_version is None and deployed.version == 1

    worse = make_model_dir("worse", confusion=2, exported=True)
    second, deployed = gate_and_deploy(worse, "run-worse")
    assert not second.passed and deployed is None
    assert second.decision.champion_version == "1"
    assert sorted(p.name for p in (base / name).iterdir()) == ["1"]
    assert (tmp_path / "run-worse-decision" / "reliability.png").exists()

    better = make_model_dir("better", confusion=0, exported=True)
    third, deployed = gate_and_deploy(better, "run-better")
    assert third.passed and deployed.version == 2
    assert third.decision.rules[1].champion_value < third.decision.rules[1].value
    aliases = _registry(mlflow_server).get_registered_model(name).aliases
    assert aliases == {"champion": deployed.registered_version, "previous": "1"}

    # The same weights trained again: the gate passes (equal to the champion), nothing is new.
    again = make_model_dir("better-again", confusion=0, exported=True, fresh=True)
    fourth, repeated = gate_and_deploy(again, "run-again")
    assert fourth.passed and fourth.decision.champion_serving_version == "2"
    assert not repeated.deployed and repeated.reason == "identical to served version 2"
    assert sorted(p.name for p in (base / name).iterdir()) == ["1", "2"]
    assert _registry(mlflow_server).get_registered_model(name).aliases == aliases


@pytest.mark.service
def test_a_canary_serves_beside_stable_until_promoted(make_model_dir, tmp_path, mlflow_server):
    from tumorflow.components.release.deploy import promote_canary

    name = f"m-{uuid.uuid4().hex[:6]}"
    base = tmp_path / "models"

    def deploy(index: int, rollout: str):
        return deploy_model(
            make_model_dir(f"canary{index}", confusion=index, exported=True),
            _decision(tmp_path, passed=True),
            str(base),
            name,
            keep_versions=2,
            tracking_uri=mlflow_server,
            pipeline_run=f"canary-run-{index}",
            rollout=rollout,
        )

    first = deploy(0, "canary")  # nothing stable yet: the first version becomes stable
    second = deploy(1, "canary")
    registry = _registry(mlflow_server)
    labels, loaded = serving_labels(str(base), name)
    assert labels == {"stable": first.version, "canary": second.version}
    assert loaded == [first.version, second.version]
    assert registry.get_model_version_by_alias(name, "champion").version == first.registered_version
    assert registry.get_model_version_by_alias(name, "canary").version == second.registered_version

    promoted = promote_canary(mlflow_server, name, str(base))
    labels, _ = serving_labels(str(base), name)
    assert labels == {"stable": second.version, "previous": first.version}
    assert promoted.champion_version == second.registered_version
    assert (
        registry.get_model_version_by_alias(name, "champion").version == second.registered_version
    )
    assert "canary" not in registry.get_registered_model(name).aliases
    with pytest.raises(DeployRefused, match="no canary"):
        promote_canary(mlflow_server, name, str(base))
