"""The MLflow record of a training run: params, per-epoch metrics and the model folder.

One MLflow run per training, resumed with the training when a checkpoint names it. Params are the
flattened `TrainConfig` plus the split counts and what was resolved at run time; metrics are
`stage<S>_<loss|accuracy|val_loss|val_accuracy|learning_rate>` with a global epoch step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tumorflow.core.config import TrainConfig

log = logging.getLogger(__name__)

TRAIN_STEP_TAG = "tumorflow.step"
# MLflow takes at most this many params in one log_batch call.
_PARAMS_PER_BATCH = 100


def flatten_config(config: TrainConfig) -> dict[str, Any]:
    """`TrainConfig` as dotted keys (`stage1.epochs`, `augment.zoom`), for MLflow params."""

    def walk(prefix: str, value: Any) -> dict[str, Any]:
        if isinstance(value, dict):
            flat: dict[str, Any] = {}
            for key, item in value.items():
                flat.update(walk(f"{prefix}.{key}" if prefix else key, item))
            return flat
        return {prefix: value}

    return walk("", config.model_dump())


def training_params(
    config: TrainConfig, manifest: Mapping[str, Any], image_size: int, policy: str
) -> dict[str, Any]:
    """The params of a training run: the config, the split counts, the classes, and the image
    size and dtype policy the run resolved."""
    counts = {f"data.{s}_count": manifest["splits"][s]["count"] for s in manifest["splits"]}
    return {
        **flatten_config(config),
        **counts,
        "data.classes": ",".join(manifest["classes"]),
        "resolved.image_size": image_size,
        "resolved.dtype_policy": policy,
    }


class TrainingRun:
    """The MLflow run of one training: created, or resumed when `run_id` still exists."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_id: str | None,
        run_tags: Mapping[str, Any] | None = None,
    ) -> None:
        import mlflow

        tags = {TRAIN_STEP_TAG: "train", **{k: str(v) for k, v in (run_tags or {}).items()}}
        mlflow.set_tracking_uri(tracking_uri)
        experiment_id = mlflow.set_experiment(experiment).experiment_id
        self.client = mlflow.MlflowClient(tracking_uri)
        if run_id is not None:
            try:
                self.client.get_run(run_id)
            except mlflow.exceptions.MlflowException:
                log.warning("MLflow run %s of the checkpoint is gone: starting a new run", run_id)
                run_id = None
        if run_id is None:
            run_id = self.client.create_run(experiment_id, tags=tags).info.run_id
        else:
            for key, value in tags.items():
                self.client.set_tag(run_id, key, value)
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log the params the run does not hold yet (a resumed run keeps its first values)."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for start in range(0, len(fresh), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=fresh[start : start + _PARAMS_PER_BATCH])

    def log_epoch(self, stage: int, row: Mapping[str, Any], step: int) -> None:
        """One history row as `stage<S>_<metric>` at the global epoch `step`."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(f"stage{stage}_{key}", value, now, step)
            for key, value in row.items()
            if key not in ("stage", "epoch") and value is not None
        ]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, artifacts: Iterable[Path]) -> None:
        """Log the model folder's files under `model/` and end the run."""
        for path in artifacts:
            self.client.log_artifact(self.run_id, str(path), artifact_path="model")
        self.client.set_terminated(self.run_id)
