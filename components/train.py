"""Two-stage fine-tuning with per-epoch checkpoints that a re-run resumes from.

Stage 1 trains the head on a frozen backbone; stage 2 unfreezes the backbone's top
`unfreeze_top_layers` layers (BatchNormalization stays frozen and in inference mode) and goes on
at the lower stage-2 rate with early stopping and learning-rate reduction on `val_loss`. The
from-scratch `custom_cnn` has nothing pretrained to protect: stage 1 trains all of it and stage 2
goes on at the lower rate, its BatchNormalization layers training normally.

Writes the "Model" folder of docs/artifacts.md: model.keras, model_info.json, history.csv,
training_curves.png (checkpoints live in `checkpoint_dir`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tumorflow.components.backbones import CUSTOM_CNN, build_classifier, default_image_size
from tumorflow.components.input_pipeline import make_dataset
from tumorflow.components.tfrecords import read_split_manifest
from tumorflow.core.config import TrainConfig
from tumorflow.core.errors import DatasetError

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
INFO_FILE = "model_info.json"
HISTORY_FILE = "history.csv"
CURVES_FILE = "training_curves.png"
HISTORY_COLUMNS = (
    "stage",
    "epoch",
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "learning_rate",
)
LATEST = "latest.json"


@dataclass
class TrainResult:
    """What a training run produced: the model folder, its history and the MLflow run."""

    model_dir: Path
    info: dict[str, Any]
    history: list[dict[str, Any]]
    mlflow_run_id: str | None
    resumed_from: tuple[int, int] | None = None

    @property
    def model_path(self) -> Path:
        return self.model_dir / MODEL_FILE

    def summary(self) -> dict[str, Any]:
        """Flat key/values for pipeline artifact metadata."""
        val_accuracy = [row["val_accuracy"] for row in self.history if row.get("val_accuracy")]
        return {
            "backbone": self.info["backbone"],
            "image_size": self.info["image_size"][0],
            "epochs_stage1": self.info["epochs_run"]["stage1"],
            "epochs_stage2": self.info["epochs_run"]["stage2"],
            "best_val_accuracy": max(val_accuracy) if val_accuracy else None,
            "mlflow_run_id": self.mlflow_run_id or "",
        }


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


def checkpoint_key(split_dir: Path, config: TrainConfig) -> str:
    """A stable folder name for the checkpoints of training `config` on this split dataset.

    The same split manifest and config give the same key, so a re-run of a pipeline finds the
    checkpoints of the run that was interrupted.
    """
    manifest = read_split_manifest(split_dir)
    digest = hashlib.sha256(
        json.dumps(
            {"manifest": manifest, "config": config.model_dump()}, sort_keys=True, default=str
        ).encode()
    ).hexdigest()
    return f"train-{digest[:16]}"


def _resolve_mixed_precision(setting: str) -> str:
    import tensorflow as tf

    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    if setting == "on" and not has_gpu:
        log.warning("mixed precision requested but no GPU is visible: training in float32")
    return "mixed_float16" if setting != "off" and has_gpu else "float32"


def _class_weights(manifest: dict, classes: list[str]) -> dict[int, float]:
    weights = manifest.get("class_weights") or {}
    counts = manifest["splits"]["train"].get("class_counts", {})
    n_train = sum(counts.values())
    result = {}
    for index, name in enumerate(classes):
        if name in weights:
            result[index] = float(weights[name])
        elif counts.get(name):
            result[index] = n_train / (len(classes) * counts[name])
        else:
            result[index] = 1.0
    return result


class CheckpointStore:
    """Per-epoch checkpoints in a folder: each a complete sub-folder renamed into place.

    `latest.json` (replaced atomically) names the newest complete checkpoint, so a kill at any
    moment leaves either the previous or the new checkpoint readable, never half of one.
    """

    def __init__(self, root: Path, fingerprint: str) -> None:
        self.root = Path(root)
        self.fingerprint = fingerprint

    def latest(self) -> dict[str, Any] | None:
        """The newest checkpoint's state (with its folder as `dir`), or None to start over."""
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        folder = self.root / json.loads(pointer.read_text())["dir"]
        state = json.loads((folder / "state.json").read_text())
        if state.get("fingerprint") != self.fingerprint:
            log.warning(
                "checkpoints in %s belong to another model or dataset; starting over", self.root
            )
            return None
        state["dir"] = folder
        return state

    def save(
        self,
        model: keras.Model,
        state: dict[str, Any],
        best_weights: list[np.ndarray] | None,
        best_weights_from: Path | None,
    ) -> Path:
        """Write weights with optimizer state, early-stopping best weights and `state` atomically."""
        name = f"ckpt-s{state['stage']}-e{state['epoch']:04d}"
        tmp = self.root / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_weights(tmp / "model.weights.h5")
        if best_weights is not None:
            np.savez(tmp / "best.npz", *best_weights)
        elif best_weights_from is not None and (best_weights_from / "best.npz").exists():
            shutil.copyfile(best_weights_from / "best.npz", tmp / "best.npz")
        (tmp / "state.json").write_text(
            json.dumps({**state, "fingerprint": self.fingerprint}, indent=2)
        )
        final = self.root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer_tmp = self.root / f".{LATEST}.tmp"
        pointer_tmp.write_text(json.dumps({"dir": name}))
        os.replace(pointer_tmp, self.root / LATEST)
        for old in self.root.glob("ckpt-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        return final


def _load_arrays(path: Path) -> list[np.ndarray]:
    with np.load(path) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


def _restore_checkpoint(model: keras.Model, folder: Path, learning_rate: float) -> None:
    """Load weights and optimizer state (both in the `.weights.h5` of a compiled model)."""
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(folder / "model.weights.h5")
    model.optimizer.learning_rate = learning_rate


def _stage_callback_class() -> type:
    import keras

    class StageCheckpoint(keras.callbacks.Callback):
        """Records history, logs to MLflow and checkpoints after every epoch of one stage.

        Placed after EarlyStopping/ReduceLROnPlateau, it restores their counters on resume
        (their `on_train_begin` resets them first) and saves them with each checkpoint.
        """

        def __init__(
            self,
            store: CheckpointStore,
            stage: int,
            history: list[dict[str, Any]],
            run_state: dict[str, Any],
            early: keras.callbacks.EarlyStopping | None = None,
            reduce_lr: keras.callbacks.ReduceLROnPlateau | None = None,
            resume: dict[str, Any] | None = None,
            mlflow_client: Any = None,
        ) -> None:
            super().__init__()
            self.store = store
            self.stage = stage
            self.history = history
            self.run_state = run_state
            self.early = early
            self.reduce_lr = reduce_lr
            self.resume = resume
            self.mlflow_client = mlflow_client
            self.last_dir: Path | None = resume["dir"] if resume else None

        def on_train_begin(self, logs: dict | None = None) -> None:
            if not self.resume:
                return
            saved = self.resume.get("callbacks", {})
            if self.early is not None and "early" in saved:
                self.early.wait = saved["early"]["wait"]
                self.early.best = saved["early"]["best"]
                self.early.best_epoch = saved["early"]["best_epoch"]
                best_file = self.resume["dir"] / "best.npz"
                if best_file.exists():
                    self.early.best_weights = _load_arrays(best_file)
            if self.reduce_lr is not None and "reduce_lr" in saved:
                self.reduce_lr.wait = saved["reduce_lr"]["wait"]
                self.reduce_lr.best = saved["reduce_lr"]["best"]
                self.reduce_lr.cooldown_counter = saved["reduce_lr"]["cooldown_counter"]

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            row: dict[str, Any] = {"stage": self.stage, "epoch": epoch + 1}
            for key in HISTORY_COLUMNS[2:6]:
                row[key] = float(logs[key]) if key in logs else None
            row["learning_rate"] = float(np.asarray(self.model.optimizer.learning_rate))
            self.history.append(row)
            step = len(self.history) - 1
            if self.mlflow_client is not None:
                self.mlflow_client.log_epoch(self.stage, row, step)
            callbacks_state: dict[str, Any] = {}
            best_weights = None
            if self.early is not None:
                callbacks_state["early"] = {
                    "wait": self.early.wait,
                    "best": None if self.early.best is None else float(self.early.best),
                    "best_epoch": self.early.best_epoch,
                }
                if self.early.best_epoch == epoch and self.early.best_weights is not None:
                    best_weights = self.early.best_weights
            if self.reduce_lr is not None:
                callbacks_state["reduce_lr"] = {
                    "wait": self.reduce_lr.wait,
                    "best": None if self.reduce_lr.best is None else float(self.reduce_lr.best),
                    "cooldown_counter": self.reduce_lr.cooldown_counter,
                }
            self.last_dir = self.store.save(
                self.model,
                {
                    **self.run_state,
                    "stage": self.stage,
                    "epoch": epoch + 1,
                    "stage_done": False,
                    "history": self.history,
                    "learning_rate": row["learning_rate"],
                    "callbacks": callbacks_state,
                },
                best_weights,
                self.last_dir,
            )
            log.info(
                "stage %d epoch %d: loss %.4f val_loss %s val_accuracy %s (checkpoint saved)",
                self.stage,
                epoch + 1,
                row["loss"] or float("nan"),
                row["val_loss"],
                row["val_accuracy"],
            )

    return StageCheckpoint


class _MlflowLogger:
    """The MLflow side of a training run: one run, resumed with the training when possible."""

    def __init__(
        self, tracking_uri: str, experiment: str, run_id: str | None, tags: dict[str, str]
    ) -> None:
        import mlflow

        self.mlflow = mlflow
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

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for start in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[start : start + 100])

    def log_epoch(self, stage: int, row: dict[str, Any], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(f"stage{stage}_{key}", value, now, step)
            for key, value in row.items()
            if key not in ("stage", "epoch") and value is not None
        ]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, model_dir: Path) -> None:
        for name in (MODEL_FILE, INFO_FILE, HISTORY_FILE, CURVES_FILE):
            self.client.log_artifact(self.run_id, str(model_dir / name), artifact_path="model")
        self.client.set_terminated(self.run_id)


def _set_stage_trainable(
    model: keras.Model, base: keras.Model, backbone: str, stage: int, unfreeze_top_layers: int
) -> None:
    """Stage 1: backbone frozen (all of it trainable for custom_cnn). Stage 2: top layers open."""
    import keras

    if backbone == CUSTOM_CNN:
        base.trainable = True
        return
    if stage == 1:
        base.trainable = False
        return
    base.trainable = True
    cutoff = max(len(base.layers) - unfreeze_top_layers, 0)
    for index, layer in enumerate(base.layers):
        layer.trainable = index >= cutoff and not isinstance(layer, keras.layers.BatchNormalization)


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        for row in history:
            writer.writerow(
                {key: ("" if row[key] is None else row[key]) for key in HISTORY_COLUMNS}
            )


def plot_training_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy (train and val) over all epochs, the stage boundary marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(range(1, len(history) + 1))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            values = [np.nan if row[key] is None else row[key] for row in history]
            axis.plot(steps, values, style, marker="o", label=key)
        stage1 = sum(1 for row in history if row["stage"] == 1)
        if 0 < stage1 < len(history):
            axis.axvline(stage1 + 0.5, color="grey", linestyle=":", label="stage 2 starts")
        axis.set_xlabel("epoch (both stages)")
        axis.set_title(metric)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_model(
    split_dir: Path,
    output_dir: Path,
    config: TrainConfig,
    checkpoint_dir: Path,
    tracking_uri: str | None = None,
    experiment: str = "tumorflow",
    run_tags: dict | None = None,
) -> TrainResult:
    """Fine-tune a classifier on a split dataset in two stages; write the model folder.

    A re-run with the same `checkpoint_dir` resumes from its last completed epoch. With a
    `tracking_uri`, params, per-epoch metrics (`stage1_loss`, `stage2_val_accuracy`, ... with a
    global epoch step), the curves and the model go to one MLflow run.
    """
    import keras

    split_dir, output_dir, checkpoint_dir = Path(split_dir), Path(output_dir), Path(checkpoint_dir)
    manifest = read_split_manifest(split_dir)
    classes = list(manifest["classes"])
    for split in ("train", "val"):
        if manifest["splits"].get(split, {}).get("count", 0) == 0:
            raise DatasetError(f"the {split} split of {split_dir} is empty; cannot train")
    image_size = config.image_size or default_image_size(config.backbone)
    policy = _resolve_mixed_precision(config.mixed_precision)
    fingerprint = hashlib.sha256(
        json.dumps(
            [
                config.backbone,
                image_size,
                config.grayscale,
                classes,
                config.dropout,
                config.unfreeze_top_layers,
                policy,
            ]
        ).encode()
    ).hexdigest()
    store = CheckpointStore(checkpoint_dir, fingerprint)
    resume = store.latest()
    history: list[dict[str, Any]] = list(resume["history"]) if resume else []
    resumed_from = (resume["stage"], resume["epoch"]) if resume else None
    if resume:
        log.info("resuming from stage %d epoch %d", resume["stage"], resume["epoch"])

    previous_policy = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(config.seed)
        train_ds = make_dataset(
            split_dir,
            "train",
            image_size,
            config.batch_size,
            config.augment,
            True,
            config.seed,
            config.grayscale,
        )
        val_ds = make_dataset(
            split_dir, "val", image_size, config.batch_size, None, False, 0, config.grayscale
        )
        model, base = build_classifier(
            config.backbone,
            len(classes),
            image_size,
            "none" if resume else config.weights,
            config.dropout,
        )
        tracker = None
        if tracking_uri:
            tags = {"tumorflow.step": "train", **{k: str(v) for k, v in (run_tags or {}).items()}}
            tracker = _MlflowLogger(
                tracking_uri, experiment, resume.get("mlflow_run_id") if resume else None, tags
            )
            counts = {f"data.{s}_count": manifest["splits"][s]["count"] for s in manifest["splits"]}
            tracker.log_params(
                {
                    **flatten_config(config),
                    **counts,
                    "data.classes": ",".join(classes),
                    "resolved.image_size": image_size,
                    "resolved.dtype_policy": policy,
                }
            )
        run_state = {"mlflow_run_id": tracker.run_id if tracker else None}
        class_weight = _class_weights(manifest, classes) if config.use_class_weights else None
        verbose = 1 if sys.stdout.isatty() else 2
        callback_class = _stage_callback_class()
        epochs_run = {"stage1": 0, "stage2": 0}

        for stage, stage_config in ((1, config.stage1), (2, config.stage2)):
            key = f"stage{stage}"
            done_before = resume is not None and (
                resume["stage"] > stage or (resume["stage"] == stage and resume["stage_done"])
            )
            _set_stage_trainable(model, base, config.backbone, stage, config.unfreeze_top_layers)
            model.compile(
                optimizer=keras.optimizers.Adam(stage_config.learning_rate),
                loss="sparse_categorical_crossentropy",
                metrics=["accuracy"],
            )
            stage_resume = resume if resume is not None and resume["stage"] == stage else None
            if stage_resume is not None:
                _restore_checkpoint(model, stage_resume["dir"], stage_resume["learning_rate"])
            epochs_run[key] = sum(1 for row in history if row["stage"] == stage)
            if done_before or stage_config.epochs == 0:
                continue
            initial_epoch = stage_resume["epoch"] if stage_resume else 0
            if initial_epoch >= stage_config.epochs:
                continue
            early = reduce_lr = None
            callbacks: list[keras.callbacks.Callback] = []
            if stage == 2:
                early = keras.callbacks.EarlyStopping(
                    monitor="val_loss",
                    patience=config.early_stopping_patience,
                    restore_best_weights=True,
                    verbose=1,
                )
                reduce_lr = keras.callbacks.ReduceLROnPlateau(
                    monitor="val_loss",
                    factor=config.reduce_lr_factor,
                    patience=config.reduce_lr_patience,
                    verbose=1,
                )
                callbacks = [early, reduce_lr]
            checkpointer = callback_class(
                store, stage, history, run_state, early, reduce_lr, stage_resume, tracker
            )
            log.info(
                "stage %d: %d trainable weights of %d, learning rate %g, epochs %d..%d",
                stage,
                len(model.trainable_weights),
                len(model.weights),
                stage_config.learning_rate,
                initial_epoch + 1,
                stage_config.epochs,
            )
            model.fit(
                train_ds,
                validation_data=val_ds,
                epochs=stage_config.epochs,
                initial_epoch=initial_epoch,
                class_weight=class_weight,
                shuffle=False,
                callbacks=[*callbacks, checkpointer],
                verbose=verbose,
            )
            epochs_run[key] = sum(1 for row in history if row["stage"] == stage)
            store.save(
                model,
                {
                    **run_state,
                    "stage": stage,
                    "epoch": history[-1]["epoch"],
                    "stage_done": True,
                    "history": history,
                    "learning_rate": float(np.asarray(model.optimizer.learning_rate)),
                    "callbacks": {},
                },
                None,
                checkpointer.last_dir,
            )
            resume = None

        output_dir.mkdir(parents=True, exist_ok=True)
        model.save(output_dir / MODEL_FILE)
        _write_history(output_dir / HISTORY_FILE, history)
        plot_training_curves(history, output_dir / CURVES_FILE)
        info = {
            "backbone": config.backbone,
            "weights": config.weights,
            "image_size": [image_size, image_size],
            "grayscale": config.grayscale,
            "classes": classes,
            "stage1": config.stage1.model_dump(),
            "stage2": config.stage2.model_dump(),
            "epochs_run": epochs_run,
            "dtype_policy": policy,
            "mlflow_run_id": tracker.run_id if tracker else None,
        }
        (output_dir / INFO_FILE).write_text(json.dumps(info, indent=2))
        if tracker is not None:
            tracker.finish(output_dir)
        log.info("model written to %s (%s epochs)", output_dir, epochs_run)
        return TrainResult(
            model_dir=output_dir,
            info=info,
            history=history,
            mlflow_run_id=tracker.run_id if tracker else None,
            resumed_from=resumed_from,
        )
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
