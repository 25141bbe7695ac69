"""Two-stage fine-tuning with per-epoch checkpoints that a re-run resumes from.

Stage 1 trains the head on a frozen backbone; stage 2 unfreezes the backbone's top
`unfreeze_top_layers` layers (BatchNormalization stays frozen and in inference mode) and goes on
at the lower stage-2 rate with early stopping and learning-rate reduction on `val_loss`. The
from-scratch `custom_cnn` has nothing pretrained to protect: stage 1 trains all of it and stage 2
goes on at the lower rate, its BatchNormalization layers training normally.

After every epoch one pass over the validation split gives its loss, accuracy and macro-F1 (from
the same predictions). The model keeps the weights of the best epoch over both stages by
`TrainConfig.keep_weights` (validation loss or macro-F1; or the last epoch), a resumed run
included. `lr_schedule=warmup_cosine` replaces the constant rate of each stage with a
linear warm-up and a cosine decay (and stage 2's ReduceLROnPlateau with it). For custom_cnn,
`batchnorm_recalibration` (on by default) recomputes the BatchNormalization statistics over a
fixed sample of training batches before each validation: the moving averages made validation
swing from epoch to epoch (docs/training.md). `TrainResult.epoch_seconds` says what each of these
costs per epoch (`tumorflow bench train`).

Writes the "Model" folder of docs/artifacts.md: model.keras, model_info.json, history.csv,
training_curves.png (checkpoints live in `checkpoint_dir`).
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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
# The loss of every stage; the validation pass scores its predictions with the same.
LOSS = "sparse_categorical_crossentropy"
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
    # Per epoch trained in this call: seconds of the training steps and of each addition
    # (`EpochClock`); what `tumorflow bench train` compares with a plain `fit`.
    epoch_seconds: list[dict[str, Any]] = field(default_factory=list)

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


def class_weights(manifest: dict, classes: list[str]) -> dict[int, float]:
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


class EpochClock:
    """Where each epoch's time goes: the training steps, then each per-epoch addition of the
    recipe (`phase`), and the whole epoch. One row per epoch, in `TrainResult.epoch_seconds`."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._started = 0.0
        self._row: dict[str, Any] = {}

    def callback(self) -> Any:
        """The Keras callback that opens each epoch's row and closes its training steps: put it
        first, so that its `on_epoch_end` runs before every other callback's."""
        import keras

        clock = self

        class EpochStart(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
                clock._started = time.perf_counter()
                clock._row = {}

            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                clock._row["train"] = time.perf_counter() - clock._started

        return EpochStart()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time one addition of the epoch (validation, checkpoint, ...)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._row[name] = self._row.get(name, 0.0) + time.perf_counter() - started

    def finish(self, stage: int, epoch: int) -> dict[str, Any]:
        """Close the epoch's row (`epoch_total`: the whole epoch so far) and return it."""
        row = {"stage": stage, "epoch": epoch, **self._row}
        row["epoch_total"] = time.perf_counter() - self._started
        self.rows.append(row)
        return row


def _batchnorm_recalibration_class() -> type:
    import keras
    import tensorflow as tf

    class BatchNormRecalibration(keras.callbacks.Callback):
        """After each epoch, before the validation pass, sets every BatchNormalization layer's
        statistics to the plain mean of the batch statistics over `sample` (a fixed sample of
        un-augmented training batches) with the epoch's final weights ("precise BN"); `finish`
        does the same over `training_set` (more batches, None when `sample` is all of them) for
        the weights the model keeps.

        The moving averages follow the last few steps: with a from-scratch net whose weights move
        fast, and batches that differ a lot (per-patient intensities), they can leave inference
        far from what training saw, and validation swings. One compiled forward pass in training
        mode per batch, with momentum 0 so that each layer's moving statistics are the batch's,
        which the pass adds up."""

        def __init__(
            self,
            sample: Any,
            training_set: Any,
            layers: list[keras.layers.Layer],
            clock: EpochClock,
        ) -> None:
            super().__init__()
            self.sample = sample
            self.training_set = training_set
            self.layers = layers
            self.clock = clock
            self.batches_read = 0
            self._step: Any = None

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            with self.clock.phase("batchnorm_recalibration"):
                self._recalibrate(self.sample)

        def finish(self, model: keras.Model) -> None:
            """Recalibrate the weights `model` keeps over the whole bounded training set, when
            the per-epoch sample was only part of it."""
            if self.training_set is not None:
                self.set_model(model)
                self._recalibrate(self.training_set)

        def _batch_statistics(self, images: Any) -> list[Any]:
            self.model(images, training=True)
            return [v for layer in self.layers for v in (layer.moving_mean, layer.moving_variance)]

        def _recalibrate(self, dataset: Any) -> None:
            momenta = [layer.momentum for layer in self.layers]
            for layer in self.layers:
                layer.momentum = 0.0
            if self._step is None:
                self._step = tf.function(self._batch_statistics, reduce_retracing=True)
            sums, count = None, 0
            for images, _ in dataset:
                stats = self._step(images)
                sums = stats if sums is None else [a + b for a, b in zip(sums, stats, strict=True)]
                count += 1
            self.batches_read += count
            for layer, momentum in zip(self.layers, momenta, strict=True):
                layer.momentum = momentum
            for index, layer in enumerate(self.layers):
                layer.moving_mean.assign(sums[2 * index] / count)
                layer.moving_variance.assign(sums[2 * index + 1] / count)

    return BatchNormRecalibration


def _validation_pass_class() -> type:
    import keras
    import tensorflow as tf

    class ValidationPass(keras.callbacks.Callback):
        """After each epoch, one inference pass over the validation split; `val_loss`,
        `val_accuracy` and `val_macro_f1` all come from its predictions (the metric formulas'
        own, and the compiled loss) and go into the epoch's logs for the callbacks after it.

        It replaces Keras' own validation (`fit(validation_data=...)`), which would be a second
        pass for the macro-F1. The forward pass runs on this worker, outside the strategy: every
        worker scores the whole split with the same weights, so early stopping and the
        learning-rate reduction decide alike on each.
        """

        def __init__(self, dataset: Any, clock: EpochClock) -> None:
            super().__init__()
            self.dataset = dataset
            self.clock = clock
            self._forward: Any = None

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            with self.clock.phase("validation"):
                if self._forward is None:
                    self._forward = tf.function(
                        lambda images: self.model(images, training=False), reduce_retracing=True
                    )
                batches = [(self._forward(images), labels) for images, labels in self.dataset]
                probs = np.concatenate([np.asarray(p, dtype=np.float32) for p, _ in batches])
                labels = np.concatenate([np.asarray(y) for _, y in batches]).astype(int)
                if logs is not None:
                    logs.update(validation_metrics(labels, probs))

    return ValidationPass


def validation_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """`val_loss` (the compiled loss, averaged over the images, as Keras' validation gives it),
    `val_accuracy` and `val_macro_f1` of one set of predictions."""
    import keras

    loss = keras.losses.get(LOSS)(labels, probs)
    scores = batch_metrics(labels[None], probs[None], ["accuracy", "macro_f1"])
    return {
        "val_loss": float(np.mean(np.asarray(loss))),
        "val_accuracy": float(scores["accuracy"][0]),
        "val_macro_f1": float(scores["macro_f1"][0]),
    }


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
            previous_dir: Path | None = None,
            clock: EpochClock | None = None,
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
            self.clock = clock or EpochClock()
            # The newest checkpoint, of this stage or the one before: what it holds carries over.
            self.last_dir: Path | None = previous_dir

        def on_train_begin(self, logs: dict | None = None) -> None:
            if self.resume:
                restore_callback_state(self.resume, self.early, self.reduce_lr)

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            row: dict[str, Any] = {"stage": self.stage, "epoch": epoch + 1}
            for key in HISTORY_COLUMNS[2:]:
                row[key] = float(logs[key]) if key in logs else None
            row["learning_rate"] = float(np.asarray(self.model.optimizer.learning_rate))
            self.history.append(row)
            with self.clock.phase("best_epoch"):
                best_epoch_weights = self.best.offer(self.model, row, self.stage)
            if self.tracker is not None:
                with self.clock.phase("mlflow"):
                    self.tracker.log_epoch(self.stage, row, len(self.history) - 1)
            callbacks_state, best_weights = callback_state(self.early, self.reduce_lr, epoch)
            with self.clock.phase("checkpoint"):
                self.last_dir = self._save(
                    epoch, row, callbacks_state, best_weights, best_epoch_weights
                )
            seconds = self.clock.finish(self.stage, epoch + 1)
            log.info(
                "stage %d epoch %d: loss %.4f val_loss %s val_accuracy %s val_macro_f1 %s%s "
                "(checkpoint saved; %.2f s)",
                self.stage,
                epoch + 1,
                row["loss"] or float("nan"),
                row["val_loss"],
                row["val_accuracy"],
                row["val_macro_f1"],
                " (best so far)" if best_epoch_weights is not None else "",
                seconds["epoch_total"],
            )

        def _save(
            self,
            epoch: int,
            row: dict[str, Any],
            callbacks_state: dict[str, Any],
            best_weights: list[np.ndarray] | None,
            best_epoch_weights: list[np.ndarray] | None,
        ) -> Path:
            return self.store.save(
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
    config: TrainConfig,
    base: Any,
    split_dir: Path,
    image_size: int,
    batch_size: int,
    distribution: Any,
    clock: EpochClock,
) -> Any:
    """The callback that recomputes a from-scratch custom_cnn's BatchNorm statistics before each
    validation (`train.batchnorm_recalibration`); None when it does not apply.

    Each epoch reads a sample of at most `batchnorm_recalibration_epoch_batches` un-augmented
    training batches, drawn once in a seeded shuffle (the split's own order follows the classes) and kept
    decoded: the same batches every epoch. The weights the model keeps are recalibrated once
    more over `batchnorm_recalibration_batches` shuffled batches when that is more."""
    import keras

    if not (config.batchnorm_recalibration and config.backbone == CUSTOM_CNN):
        return None
    if distribution.strategy.num_replicas_in_sync > 1:
        log.warning("batchnorm_recalibration is skipped with more than one replica")
        return None

    def shuffled() -> Any:
        return make_dataset(
            split_dir, "train", image_size, batch_size, None, True, config.seed, config.grayscale
        )

    sample = shuffled()
    bound = min(config.batchnorm_recalibration_batches, int(sample.cardinality()))
    per_epoch = min(bound, config.batchnorm_recalibration_epoch_batches)
    return _batchnorm_recalibration_class()(
        sample.take(per_epoch).cache(),
        shuffled().take(bound) if bound > per_epoch else None,
        [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)],
        clock,
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
        loss=LOSS,
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
        # Not sharded: every worker scores the whole validation split (ValidationPass).
        val_ds = make_dataset(
            split_dir, "val", image_size, batch_size, None, False, 0, config.grayscale
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
        class_weight = class_weights(manifest, classes) if config.use_class_weights else None
        verbose = 1 if sys.stdout.isatty() else 2
        callback_class = _stage_callback_class()
        monitor = (
            None if config.keep_weights == "last" else config.keep_weights.removeprefix("best_")
        )
        best = BestEpoch(monitor)
        if resume:
            best.restore(resume)
        clock = EpochClock()
        recalibration = _batchnorm_recalibration(
            config, base, split_dir, image_size, batch_size, distribution, clock
        )
        validation = _validation_pass_class()(val_ds, clock)
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
            # The epoch's order: its steps, the BatchNorm statistics, the validation pass, then
            # the schedule, early stopping and the checkpoint that read its logs.
            first = [clock.callback(), *([] if recalibration is None else [recalibration])]
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
                last_dir,
                clock,
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
                epochs=stage_config.epochs,
                initial_epoch=initial_epoch,
                class_weight=class_weight,
                shuffle=False,
                callbacks=[
                    *first,
                    validation,
                    *callbacks,
                    checkpointer,
                    epoch_progress(f"stage {stage}"),
                ],
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
        if recalibration is not None:
            recalibration.finish(model)
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
            epoch_seconds=clock.rows,
        )
    finally:
        strategy_scope.__exit__(None, None, None)
        keras.mixed_precision.set_global_policy(previous_policy)
