"""The MLflow record of a training run: its params, and a run resumed with its training."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tumorflow.components.training.tracking import TrainingRun, flatten_config, training_params
from tumorflow.core.config import TrainConfig

MANIFEST = {
    "classes": ["normal", "tumor"],
    "splits": {"train": {"count": 16}, "val": {"count": 4}},
}


def test_params_are_the_flattened_config_the_split_counts_and_what_was_resolved():
    config = TrainConfig.model_validate({"stage2": {"learning_rate": 1e-4}})
    flat = flatten_config(config)
    assert flat["stage2.learning_rate"] == 1e-4
    assert not any(isinstance(value, dict) for value in flat.values())
    params = training_params(config, MANIFEST, 224, "float32")
    assert params["data.train_count"] == 16 and params["data.val_count"] == 4
    assert params["data.classes"] == "normal,tumor"
    assert params["resolved.image_size"] == 224
    assert params["resolved.dtype_policy"] == "float32"
    assert params["backbone"] == config.backbone


@pytest.mark.e2e
def test_a_resumed_training_goes_on_in_its_run_and_a_lost_run_is_replaced(
    mlflow_server: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    import mlflow

    first = TrainingRun(mlflow_server, "test-tracking", None, {"tumorflow.pipeline_run": "r1"})
    first.log_params({"backbone": "custom_cnn"})
    first.log_epoch(1, {"stage": 1, "epoch": 1, "loss": 0.9, "val_loss": None}, 0)
    resumed = TrainingRun(mlflow_server, "test-tracking", first.run_id, {"attempt": 2})
    assert resumed.run_id == first.run_id
    resumed.log_params({"backbone": "changed", "extra": 1})
    resumed.log_epoch(1, {"stage": 1, "epoch": 2, "loss": 0.5}, 1)
    (tmp_path / "model.keras").write_bytes(b"model")
    resumed.finish([tmp_path / "model.keras"])

    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(first.run_id)
    assert run.data.params == {"backbone": "custom_cnn", "extra": "1"}
    assert run.data.tags["tumorflow.step"] == "train" and run.data.tags["attempt"] == "2"
    history = client.get_metric_history(first.run_id, "stage1_loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.9), (1, 0.5)]
    assert "stage1_val_loss" not in run.data.metrics
    assert run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(first.run_id, "model")] == ["model/model.keras"]

    lost = "0" * 32  # a checkpoint naming a run the tracking server no longer has
    with caplog.at_level(logging.WARNING):
        replaced = TrainingRun(mlflow_server, "test-tracking", lost)
    assert replaced.run_id not in (lost, first.run_id)
    assert "is gone: starting a new run" in caplog.text
