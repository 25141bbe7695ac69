"""Two-stage fine-tuning with per-epoch checkpoints that a re-run resumes from.

Stage 1 trains the head on a frozen backbone; stage 2 unfreezes the backbone's top
`unfreeze_top_layers` layers (BatchNormalization stays frozen and in inference mode) and goes on
at the lower stage-2 rate with early stopping and learning-rate reduction on `val_loss`. The
from-scratch `custom_cnn` has nothing pretrained to protect: stage 1 trains all of it and stage 2
goes on at the lower rate, its BatchNormalization layers training normally.

Every epoch also scores validation macro-F1. The model keeps the weights of the best epoch over
both stages by `TrainConfig.keep_weights` (validation loss or macro-F1; or the last epoch), a
resumed run included. `lr_schedule=warmup_cosine` replaces the constant rate of each stage with a
linear warm-up and a cosine decay (and stage 2's ReduceLROnPlateau with it). For custom_cnn,
`batchnorm_recalibration` (on by default) recomputes the BatchNormalization statistics over
training batches before each validation: the moving averages made validation swing from epoch to
epoch (docs/training.md).

Writes the "Model" folder of docs/artifacts.md: model.keras, model_info.json, history.csv,
training_curves.png (checkpoints live in `checkpoint_dir`).
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tumorflow.components.data.split import balanced_class_weights
from tumorflow.components.data.tfrecords import read_split_manifest
from tumorflow.components.evaluation.metrics import batch_metrics
from tumorflow.components.progress import epoch_progress
from tumorflow.components.training.backbones import CUSTOM_CNN, build_classifier, default_image_size
from tumorflow.components.training.checkpoints import (
    BestEpoch,
    CheckpointStore,
    callback_state,
    checkpoint_key,
    model_fingerprint,
    restore_callback_state,
    restore_checkpoint,
)
from tumorflow.components.training.input_pipeline import make_dataset
from tumorflow.components.training.serving_statistics import fit_serving_statistics
from tumorflow.components.training.strategy import training_distribution
from tumorflow.components.training.tracking import TrainingRun, training_params
from tumorflow.components.training.weights import starting_weights
from tumorflow.core.artifacts import (
    CURVES_FILE,
    HISTORY_FILE,
    MODEL_FILE,
    MODEL_INFO_FILE,
    SERVING_STATISTICS_FILE,
)
from tumorflow.core.config import TrainConfig
from tumorflow.core.errors import DatasetError

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

# The pipeline's train step names its checkpoint folder with `checkpoint_key` from here.
__all__ = ["TrainResult", "checkpoint_key", "plot_training_curves", "train_model"]

HISTORY_COLUMNS = (
    "stage",
    "epoch",
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "learning_rate",
    "val_macro_f1",
)
# The floor of the cosine decay, as a fraction of the stage's learning rate.
_COSINE_FLOOR = 0.05


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
        kept = self.info.get("kept_epoch", {})
        return {
            "backbone": self.info["backbone"],
            "image_size": self.info["image_size"][0],
            "epochs_stage1": self.info["epochs_run"]["stage1"],
            "epochs_stage2": self.info["epochs_run"]["stage2"],
            "best_val_accuracy": max(val_accuracy) if val_accuracy else None,
            "kept_epoch": f"stage {kept['stage']} epoch {kept['epoch']}"
            if kept.get("epoch")
            else "last",
            "mlflow_run_id": self.mlflow_run_id or "",
        }


def _resolve_mixed_precision(setting: str) -> str:
    import tensorflow as tf

    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    if setting == "on" and not has_gpu:
        log.warning("mixed precision requested but no GPU is visible: training in float32")
    return "mixed_float16" if setting != "off" and has_gpu else "float32"


def _class_weights(manifest: dict, classes: list[str]) -> dict[int, float]:
    """Keras' `class_weight`: the split manifest's weights, else the same formula on its counts."""
    weights = manifest.get("class_weights") or {}
    counts = manifest["splits"]["train"].get("class_counts", {})
    balanced = balanced_class_weights([counts.get(name, 0) for name in classes])
    return {index: float(weights.get(name, balanced[index])) for index, name in enumerate(classes)}


def warmup_cosine_rate(base: float, epoch: int, epochs: int, warmup: int) -> float:
    """The learning rate of `epoch` (0-based) of a stage of `epochs`: linear warm-up to `base`
    over `warmup` epochs, then a cosine decay to `_COSINE_FLOOR * base` at the last epoch."""
    if epoch < warmup:
        return base * (epoch + 1) / (warmup + 1)
    decay_epochs = epochs - warmup - 1
    progress = (epoch - warmup) / decay_epochs if decay_epochs > 0 else 0.0
    floor = _COSINE_FLOOR * base
    return float(floor + 0.5 * (base - floor) * (1 + np.cos(np.pi * min(progress, 1.0))))


def _macro_f1_scorer(val_ds: Any) -> Any:
    """A function of the model giving its validation macro-F1 (the metric formulas' own)."""
    labels = np.concatenate([np.asarray(y) for _, y in val_ds]).astype(int)

    def score(model: keras.Model) -> float:
        probs = model.predict(val_ds, verbose=0)
        return float(batch_metrics(labels[None], probs[None], ["macro_f1"])["macro_f1"][0])

    return score


def _batchnorm_recalibration_class() -> type:
    import keras

    class BatchNormRecalibration(keras.callbacks.Callback):
        """Before each validation, sets every BatchNormalization layer's statistics to the plain
        mean over `dataset` (un-augmented training batches) with the epoch's final weights.

        The moving averages follow the last few steps: with a from-scratch net whose weights move
        fast, and batches that differ a lot (per-patient intensities), they can leave inference
        far from what training saw, and validation swings."""

        def __init__(self, dataset: Any, layers: list[keras.layers.Layer]) -> None:
            super().__init__()
            self.dataset = dataset
            self.layers = layers

        def on_test_begin(self, logs: dict | None = None) -> None:
            momenta = [layer.momentum for layer in self.layers]
            for step, (images, _) in enumerate(self.dataset):
                for layer in self.layers:
                    layer.momentum = step / (step + 1)
                self.model(images, training=True)
            for layer, momentum in zip(self.layers, momenta, strict=True):
                layer.momentum = momentum

    return BatchNormRecalibration


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
            tracker: TrainingRun | None = None,
            best: BestEpoch | None = None,
            val_macro_f1: Any = None,
            previous_dir: Path | None = None,
        ) -> None:
            super().__init__()
            self.store = store
            self.stage = stage
            self.history = history
            self.run_state = run_state
            self.early = early
            self.reduce_lr = reduce_lr
            self.resume = resume
            self.tracker = tracker
            self.best = best or BestEpoch(None)
            self.val_macro_f1 = val_macro_f1
            # The newest checkpoint, of this stage or the one before: what it holds carries over.
            self.last_dir: Path | None = previous_dir

        def on_train_begin(self, logs: dict | None = None) -> None:
            if self.resume:
                restore_callback_state(self.resume, self.early, self.reduce_lr)

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            row: dict[str, Any] = {"stage": self.stage, "epoch": epoch + 1}
            for key in HISTORY_COLUMNS[2:6]:
                row[key] = float(logs[key]) if key in logs else None
            row["learning_rate"] = float(np.asarray(self.model.optimizer.learning_rate))
            row["val_macro_f1"] = self.val_macro_f1(self.model) if self.val_macro_f1 else None
            self.history.append(row)
            best_epoch_weights = self.best.offer(self.model, row, self.stage)
            step = len(self.history) - 1
            if self.tracker is not None:
                self.tracker.log_epoch(self.stage, row, step)
            callbacks_state, best_weights = callback_state(self.early, self.reduce_lr, epoch)
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
                    "best_epoch": self.best.state(),
                },
                best_weights,
                self.last_dir,
                best_epoch_weights,
            )
            log.info(
                "stage %d epoch %d: loss %.4f val_loss %s val_accuracy %s val_macro_f1 %s%s "
                "(checkpoint saved)",
                self.stage,
                epoch + 1,
                row["loss"] or float("nan"),
                row["val_loss"],
                row["val_accuracy"],
                row["val_macro_f1"],
                " (best so far)" if best_epoch_weights is not None else "",
            )

    return StageCheckpoint


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
                {key: ("" if row.get(key) is None else row[key]) for key in HISTORY_COLUMNS}
            )


def plot_training_curves(
    history: list[dict[str, Any]], path: Path, kept: dict[str, Any] | None = None
) -> None:
    """Loss and accuracy (train and val, and val macro-F1) over all epochs, the stage boundary
    and the kept epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(range(1, len(history) + 1))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    kept_step = next(
        (
            step
            for step, row in zip(steps, history, strict=True)
            if kept and (row["stage"], row["epoch"]) == (kept.get("stage"), kept.get("epoch"))
        ),
        None,
    )
    for axis, metric in zip(axes, ("loss", "accuracy"), strict=True):
        keys = [(metric, "-"), (f"val_{metric}", "--")]
        if metric == "accuracy":
            keys.append(("val_macro_f1", ":"))
        for key, style in keys:
            values = [np.nan if row.get(key) is None else row[key] for row in history]
            axis.plot(steps, values, style, marker="o", label=key)
        if kept_step is not None:
            axis.axvline(kept_step, color="green", alpha=0.4, label="kept epoch")
        stage1 = sum(1 for row in history if row["stage"] == 1)
        if 0 < stage1 < len(history):
            axis.axvline(stage1 + 0.5, color="grey", linestyle=":", label="stage 2 starts")
        axis.set_xlabel("epoch (both stages)")
        axis.set_title(metric)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _trainable_split(split_dir: Path) -> tuple[dict, list[str]]:
    """The split manifest and its classes; a split without train or val images is refused."""
    manifest = read_split_manifest(split_dir)
    for split in ("train", "val"):
        if manifest["splits"].get(split, {}).get("count", 0) == 0:
            raise DatasetError(f"the {split} split of {split_dir} is empty; cannot train")
    return manifest, list(manifest["classes"])


def _batchnorm_recalibration(
    config: TrainConfig, base: Any, split_dir: Path, image_size: int, batch_size: int, distribution
) -> Any:
    """The callback that recomputes a from-scratch custom_cnn's BatchNorm statistics before each
    validation (`train.batchnorm_recalibration`); None when it does not apply."""
    import keras

    if not (config.batchnorm_recalibration and config.backbone == CUSTOM_CNN):
        return None
    if distribution.strategy.num_replicas_in_sync > 1:
        log.warning("batchnorm_recalibration is skipped with more than one replica")
        return None
    return _batchnorm_recalibration_class()(
        make_dataset(
            split_dir, "train", image_size, batch_size, None, False, 0, config.grayscale
        ).take(config.batchnorm_recalibration_batches),
        [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)],
    )


def _compile_for_stage(
    model: Any, base: Any, config: TrainConfig, stage: int, stage_config: Any, distribution
) -> None:
    """Set which layers a stage trains (stage 1 the head, stage 2 the top of the backbone too)
    and compile with the stage's learning rate, scaled for the replicas."""
    import keras

    _set_stage_trainable(model, base, config.backbone, stage, config.unfreeze_top_layers)
    model.compile(
        optimizer=keras.optimizers.Adam(distribution.learning_rate(stage_config.learning_rate)),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def _stage_callbacks(config: TrainConfig, stage: int, stage_config: Any) -> tuple[list, Any, Any]:
    """A stage's Keras callbacks: the warm-up cosine schedule when configured; in stage 2 early
    stopping and, with a constant schedule, learning-rate reduction on plateau. Returns the
    list, the early stopping and the reduction (None where absent; checkpoints record them)."""
    import keras

    early = reduce_lr = None
    callbacks: list = []
    if config.lr_schedule == "warmup_cosine":
        callbacks.append(
            keras.callbacks.LearningRateScheduler(
                lambda epoch, _, base=stage_config.learning_rate, epochs=stage_config.epochs: (
                    warmup_cosine_rate(base, epoch, epochs, config.warmup_epochs)
                )
            )
        )
    if stage == 2:
        early = keras.callbacks.EarlyStopping(
            monitor="val_loss",
            patience=config.early_stopping_patience,
            restore_best_weights=True,
            verbose=1,
        )
        callbacks.append(early)
        if config.lr_schedule == "constant":
            reduce_lr = keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss",
                factor=config.reduce_lr_factor,
                patience=config.reduce_lr_patience,
                verbose=1,
            )
            callbacks.append(reduce_lr)
    return callbacks, early, reduce_lr


def _write_model_folder(
    model: Any,
    output_dir: Path,
    config: TrainConfig,
    *,
    image_size: int,
    classes: list[str],
    epochs_run: dict[str, int],
    kept_epoch: dict[str, Any],
    policy: str,
    history: list[dict[str, Any]],
    tracker: TrainingRun | None,
    split_dir: Path,
    starting: dict[str, str],
) -> dict[str, Any]:
    """The model folder (docs/artifacts.md "Model"): the Keras model, its info, the history, the
    curves and the serving statistics (calibration temperature, OOD detector) fitted on
    `split_dir`; logged to MLflow with `tracker`. Returns the info."""
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save(output_dir / MODEL_FILE)
    _write_history(output_dir / HISTORY_FILE, history)
    plot_training_curves(history, output_dir / CURVES_FILE, kept_epoch)
    info = {
        "backbone": config.backbone,
        "weights": config.weights,
        **starting,
        "image_size": [image_size, image_size],
        "grayscale": config.grayscale,
        "classes": classes,
        "stage1": config.stage1.model_dump(),
        "stage2": config.stage2.model_dump(),
        "epochs_run": epochs_run,
        "kept_epoch": kept_epoch,
        "lr_schedule": config.lr_schedule,
        "dtype_policy": policy,
        "mlflow_run_id": tracker.run_id if tracker else None,
    }
    (output_dir / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2))
    info |= fit_serving_statistics(
        output_dir,
        split_dir,
        calibration=config.calibration,
        ood=config.ood,
        ood_false_rejection_rate=config.ood_false_rejection_rate,
        model=model,
    )
    if tracker is not None:
        files = (MODEL_FILE, MODEL_INFO_FILE, HISTORY_FILE, CURVES_FILE, SERVING_STATISTICS_FILE)
        tracker.finish(output_dir / name for name in files)
    return info


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
    manifest, classes = _trainable_split(split_dir)
    image_size = config.image_size or default_image_size(config.backbone)
    policy = _resolve_mixed_precision(config.mixed_precision)
    distribution = training_distribution()
    store = distribution.checkpoint_store(
        CheckpointStore(checkpoint_dir, model_fingerprint(config, image_size, classes, policy))
    )
    output_dir = distribution.output_dir(output_dir)
    tracking_uri = tracking_uri if distribution.is_chief else None
    batch_size = distribution.global_batch(config.batch_size)
    resume = store.latest()
    history: list[dict[str, Any]] = list(resume["history"]) if resume else []
    resumed_from = (resume["stage"], resume["epoch"]) if resume else None
    if resume:
        log.info("resuming from stage %d epoch %d", resume["stage"], resume["epoch"])

    previous_policy = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(policy)
    # Model, optimizer and datasets are built in the strategy's scope (components/training/strategy.py).
    strategy_scope = distribution.strategy.scope()
    strategy_scope.__enter__()
    try:
        keras.utils.set_random_seed(config.seed)
        train_ds = distribution.shard(
            make_dataset(
                split_dir,
                "train",
                image_size,
                batch_size,
                config.augment,
                True,
                config.seed,
                config.grayscale,
            )
        )
        val_ds = distribution.shard(
            make_dataset(split_dir, "val", image_size, batch_size, None, False, 0, config.grayscale)
        )
        model, base = build_classifier(
            config.backbone,
            len(classes),
            image_size,
            "none" if resume else config.weights,
            config.dropout,
            config.batchnorm_momentum,
        )
        starting = starting_weights(config.backbone, image_size, config.weights)
        tracker = None
        if tracking_uri:
            resumed_run = resume.get("mlflow_run_id") if resume else None
            tracker = TrainingRun(tracking_uri, experiment, resumed_run, run_tags)
            tracker.log_params(
                {**training_params(config, manifest, image_size, policy), **starting}
            )
        run_state = {"mlflow_run_id": tracker.run_id if tracker else None}
        class_weight = _class_weights(manifest, classes) if config.use_class_weights else None
        verbose = 1 if sys.stdout.isatty() else 2
        callback_class = _stage_callback_class()
        monitor = (
            None if config.keep_weights == "last" else config.keep_weights.removeprefix("best_")
        )
        best = BestEpoch(monitor)
        if resume:
            best.restore(resume)
        val_macro_f1 = _macro_f1_scorer(val_ds)
        recalibration = _batchnorm_recalibration(
            config, base, split_dir, image_size, batch_size, distribution
        )
        last_dir = resume["dir"] if resume else None
        epochs_run = {"stage1": 0, "stage2": 0}

        for stage, stage_config in ((1, config.stage1), (2, config.stage2)):
            key = f"stage{stage}"
            done_before = resume is not None and (
                resume["stage"] > stage or (resume["stage"] == stage and resume["stage_done"])
            )
            _compile_for_stage(model, base, config, stage, stage_config, distribution)
            stage_resume = resume if resume is not None and resume["stage"] == stage else None
            if stage_resume is not None:
                restore_checkpoint(model, stage_resume["dir"], stage_resume["learning_rate"])
            epochs_run[key] = sum(1 for row in history if row["stage"] == stage)
            if done_before or stage_config.epochs == 0:
                continue
            initial_epoch = stage_resume["epoch"] if stage_resume else 0
            if initial_epoch >= stage_config.epochs:
                continue
            callbacks, early, reduce_lr = _stage_callbacks(config, stage, stage_config)
            if recalibration is not None:
                callbacks.insert(0, recalibration)
            checkpointer = callback_class(
                store,
                stage,
                history,
                run_state,
                early,
                reduce_lr,
                stage_resume,
                tracker,
                best,
                val_macro_f1,
                last_dir,
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
                callbacks=[*callbacks, checkpointer, epoch_progress(f"stage {stage}")],
                verbose=verbose,
            )
            epochs_run[key] = sum(1 for row in history if row["stage"] == stage)
            last_dir = store.save(
                model,
                {
                    **run_state,
                    "stage": stage,
                    "epoch": history[-1]["epoch"],
                    "stage_done": True,
                    "history": history,
                    "learning_rate": float(np.asarray(model.optimizer.learning_rate)),
                    "callbacks": {},
                    "best_epoch": best.state(),
                },
                None,
                checkpointer.last_dir,
            )
            resume = None

        if best.apply(model):
            log.info(
                "keeping the weights of stage %d epoch %d (best %s %.4f)",
                best.stage,
                best.epoch,
                best.monitor,
                best.value,
            )
        info = _write_model_folder(
            model,
            output_dir,
            config,
            image_size=image_size,
            classes=classes,
            epochs_run=epochs_run,
            kept_epoch=best.state(),
            policy=policy,
            history=history,
            tracker=tracker,
            split_dir=split_dir,
            starting=starting,
        )
        log.info("model written to %s (%s epochs)", output_dir, epochs_run)
        return TrainResult(
            model_dir=output_dir,
            info=info,
            history=history,
            mlflow_run_id=tracker.run_id if tracker else None,
            resumed_from=resumed_from,
        )
    finally:
        strategy_scope.__exit__(None, None, None)
        keras.mixed_precision.set_global_policy(previous_policy)
