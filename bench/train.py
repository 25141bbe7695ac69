"""`tumorflow bench train`: what each per-epoch addition of our training recipe costs against a
plain `model.fit`, and training images/s per replica count, with the scaling efficiency.

The recipe's epoch: the demo's data and model (the phantom preset: custom_cnn, 64 px, grey) trained
by `train_model` with every default on (BatchNorm recalibration, the validation pass with
macro-F1, best-epoch tracking, a checkpoint per epoch, MLflow logging to a SQLite store as the
demo's), for `--epochs` epochs of stage 1. The baseline: the same model, compiled the same way,
`fit` on the same `tf.data` input with Keras' own validation and nothing else. Both run in this
process, in turns, `--repeats` times; each figure is the median over the epochs after the first
(which decodes into the caches and traces). Each addition is timed where it runs
(`TrainResult.epoch_seconds`) and given as seconds per epoch and as a share of the plain epoch.

Each replica count runs in its own process (logical CPU devices must be configured before
TensorFlow starts): the GPUs where there are several, else that many logical CPU devices of the
one CPU. Each process builds the classifier under `MirroredStrategy` (the default strategy for
one replica), feeds it synthetic in-memory batches of `batch-size × replicas` images (the scaling
rule of components/training/strategy.py), warms up, then times `steps` training steps. Scaling
efficiency = (images/s with N replicas) / (N × images/s with one replica).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from tumorflow.core.errors import ConfigError

# The recipe's epoch may cost at most this many plain `fit` epochs (issue 21).
TARGET_RATIO = 1.25
# The recipe's per-epoch additions, as `TrainResult.epoch_seconds` names them, and as printed.
ADDITIONS = (
    ("batchnorm_recalibration", "BatchNorm recalibration"),
    ("validation", "validation pass (loss, accuracy, macro-F1), beyond Keras' own"),
    ("best_epoch", "best-epoch tracking"),
    ("checkpoint", "checkpoint"),
    ("mlflow", "MLflow logging"),
)

_CHILD = """
import json, sys, time
import numpy as np
import tensorflow as tf
replicas, backbone, size, batch, steps = (
    int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
)
gpus = tf.config.list_physical_devices("GPU")
if not gpus and replicas > 1:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * replicas
    )
import keras
from tumorflow.components.training.backbones import build_classifier
kind = "GPU" if gpus else "CPU"
devices = [d.name for d in tf.config.list_logical_devices(kind)][:replicas]
strategy = tf.distribute.MirroredStrategy(devices) if replicas > 1 else tf.distribute.get_strategy()
global_batch = batch * replicas
rng = np.random.default_rng(0)
images = rng.uniform(0, 255, (global_batch, size, size, 3)).astype("float32")
labels = rng.integers(0, 4, global_batch).astype("int32")
data = tf.data.Dataset.from_tensors((images, labels)).repeat()
with strategy.scope():
    model, _ = build_classifier(backbone, 4, size, "none", 0.0)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
model.fit(data, steps_per_epoch=3, epochs=1, verbose=0)
start = time.perf_counter()
model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
seconds = time.perf_counter() - start
print("BENCH " + json.dumps({"replicas": strategy.num_replicas_in_sync, "device": kind,
    "images_per_s": steps * global_batch / seconds}), flush=True)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--measure",
        default="recipe,scaling",
        help="what to measure: recipe (per-epoch costs), scaling (replicas), or both (default)",
    )
    parser.add_argument("--epochs", type=int, default=6, help="recipe: epochs per run (6)")
    parser.add_argument("--repeats", type=int, default=2, help="recipe: runs of each (2)")
    parser.add_argument(
        "--workdir", default=None, help="recipe: where the demo split is made and kept (temp)"
    )
    parser.add_argument(
        "--recalibration-batches",
        type=int,
        default=None,
        help="recipe: train.batchnorm_recalibration_batches (default: the preset's)",
    )
    parser.add_argument("--replicas", default="1,2", help="replica counts to measure (default 1,2)")
    parser.add_argument("--backbone", default="custom_cnn", help="model (default custom_cnn)")
    parser.add_argument("--size", type=int, default=96, help="input side (default 96)")
    parser.add_argument("--batch-size", type=int, default=16, help="per-replica batch (16)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")


def measure(replicas: int, backbone: str, size: int, batch_size: int, steps: int) -> dict:
    """Images/s of `steps` training steps on `replicas` replicas, in a fresh process."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    env.pop("TF_CONFIG", None)
    args = [str(value) for value in (replicas, backbone, size, batch_size, steps)]
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CHILD), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        raise ConfigError(f"training on {replicas} replica(s) failed: {' '.join(tail)}")
    return json.loads(lines[-1].removeprefix("BENCH "))


def scaling_table(results: list[dict]) -> list[dict]:
    """Each result with its speed-up and scaling efficiency against the one-replica result."""
    base = next((r for r in results if r["replicas"] == 1), results[0])
    per_replica = base["images_per_s"] / base["replicas"]
    return [
        {
            **r,
            "speedup": r["images_per_s"] / base["images_per_s"],
            "efficiency": r["images_per_s"] / (r["replicas"] * per_replica),
        }
        for r in results
    ]


def demo_split(workdir: Path) -> tuple[Path, Any]:
    """The phantom preset's split dataset, made as the pipeline makes it (kept in `workdir`),
    and the preset's training section."""
    from tumorflow.components.data.download import download_dataset
    from tumorflow.components.data.validate import validate_and_split
    from tumorflow.core.artifacts import SPLIT_MANIFEST_JSON
    from tumorflow.core.config import load_config

    config = load_config(preset="phantom")
    split_dir = workdir / "phantom-split"
    if not (split_dir / SPLIT_MANIFEST_JSON).exists():
        download_dataset(config.dataset.source, workdir / "phantom-raw", config.dataset)
        validate_and_split(
            workdir / "phantom-raw", split_dir, config.split, config.dataset.classes or None
        )
    return split_dir, config.train


def plain_fit_epochs(split_dir: Path, config: Any, epochs: int) -> list[dict[str, float]]:
    """Seconds of each epoch of a plain `fit`: the recipe's model, compile, input and class
    weights, Keras' own validation, no callbacks. Rows: `epoch_total` and `validation`."""
    import keras

    from tumorflow.components.data.tfrecords import read_split_manifest
    from tumorflow.components.training.backbones import build_classifier
    from tumorflow.components.training.input_pipeline import make_dataset
    from tumorflow.components.training.train import LOSS, class_weights

    manifest = read_split_manifest(split_dir)
    classes = list(manifest["classes"])
    size, batch = config.image_size, config.batch_size
    keras.utils.set_random_seed(config.seed)
    train_ds = make_dataset(
        split_dir, "train", size, batch, config.augment, True, config.seed, config.grayscale
    )
    val_ds = make_dataset(split_dir, "val", size, batch, None, False, 0, config.grayscale)
    model, _ = build_classifier(
        config.backbone,
        len(classes),
        size,
        config.weights,
        config.dropout,
        config.batchnorm_momentum,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(config.stage1.learning_rate),
        loss=LOSS,
        metrics=["accuracy"],
    )
    rows: list[dict[str, float]] = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.started = time.perf_counter()

        def on_test_begin(self, logs: dict | None = None) -> None:
            self.validating = time.perf_counter()

        def on_test_end(self, logs: dict | None = None) -> None:
            self.validation = time.perf_counter() - self.validating

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            total = time.perf_counter() - self.started
            rows.append({"epoch_total": total, "validation": self.validation})

    model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=epochs,
        class_weight=class_weights(manifest, classes) if config.use_class_weights else None,
        callbacks=[Clock()],
        verbose=0,
    )
    return rows


def recipe_epochs(split_dir: Path, config: Any, epochs: int, run_dir: Path) -> list[dict]:
    """`TrainResult.epoch_seconds` of `train_model` with `config` for `epochs` epochs of stage
    1, logging to MLflow in a SQLite store as the demo does."""
    from tumorflow.components.training.train import train_model

    config = config.model_copy(
        update={
            "stage1": config.stage1.model_copy(update={"epochs": epochs}),
            "stage2": config.stage2.model_copy(update={"epochs": 0}),
        }
    )
    result = train_model(
        split_dir,
        run_dir / "model",
        config,
        run_dir / "checkpoints",
        tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}",
        experiment="bench-train",
    )
    return result.epoch_seconds


def _steady(rows: list[dict], key: str) -> float:
    """The median of `key` over the epochs after the first of each run (absent: 0)."""
    return statistics.median(row.get(key, 0.0) for run in rows for row in run[1:])


def epoch_costs(plain: list[list[dict]], recipe: list[list[dict]]) -> list[dict[str, Any]]:
    """Rows of the per-epoch cost table: the plain epoch, each addition (seconds per epoch and
    as a share of the plain epoch), the recipe's epoch and its ratio to the plain one."""
    plain_epoch = _steady(plain, "epoch_total")
    rows = [
        {"name": "plain fit epoch (training steps + Keras' validation)", "seconds": plain_epoch},
        {"name": "our training steps", "seconds": _steady(recipe, "train")},
    ]
    for key, name in ADDITIONS:
        seconds = _steady(recipe, key)
        if key == "validation":
            seconds -= _steady(plain, "validation")
        rows.append({"name": name, "seconds": seconds})
    rows.append({"name": "our epoch, every default on", "seconds": _steady(recipe, "epoch_total")})
    for row in rows:
        row["ratio"] = row["seconds"] / plain_epoch
    return rows


def run_recipe(args: argparse.Namespace) -> None:
    """Print the per-epoch cost table of the recipe against a plain fit (module docstring)."""
    if args.epochs < 2 or args.repeats < 1:
        raise ConfigError("--epochs must be 2 or more (the first is not counted), --repeats 1+")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        workdir = Path(args.workdir) if args.workdir else Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        split_dir, config = demo_split(workdir)
        if args.recalibration_batches is not None:
            config = config.model_copy(
                update={"batchnorm_recalibration_batches": args.recalibration_batches}
            )
        plain: list[list[dict]] = []
        recipe: list[list[dict]] = []
        for repeat in range(args.repeats):
            # In turns, each first every other time: a machine that slows down burdens neither.
            order = ("plain", "recipe") if repeat % 2 == 0 else ("recipe", "plain")
            for kind in order:
                if kind == "plain":
                    plain.append(plain_fit_epochs(split_dir, config, args.epochs))
                else:
                    run_dir = Path(scratch) / f"run{repeat}"
                    recipe.append(recipe_epochs(split_dir, config, args.epochs, run_dir))
    for repeat, (ours, theirs) in enumerate(zip(recipe, plain, strict=True), 1):
        plain_epoch, our_epoch = _steady([theirs], "epoch_total"), _steady([ours], "epoch_total")
        print(
            f"run {repeat}: plain epoch {plain_epoch:.3f} s, ours {our_epoch:.3f} s "
            f"({our_epoch / plain_epoch:.2f}x)"
        )
    rows = epoch_costs(plain, recipe)
    print(
        f"per-epoch cost: phantom preset ({config.backbone}, {config.image_size} px, batch "
        f"{config.batch_size}, BatchNorm recalibration over "
        f"{config.batchnorm_recalibration_epoch_batches} batches each epoch and "
        f"{config.batchnorm_recalibration_batches} at the end, at most), median of epochs "
        f"2-{args.epochs} of {args.repeats} run(s) each"
    )
    print(f"{'':<64}{'s/epoch':>9}  {'x plain':>8}")
    for row in rows:
        print(f"{row['name']:<64}{row['seconds']:>9.3f}  {row['ratio']:>7.2f}x")
    added = sum(row["ratio"] for row in rows[2:-1])
    print(f"the additions alone: +{added:.2f}x (the training steps of both runs taken as equal)")
    total = rows[-1]["ratio"]
    verdict = "PASS" if total <= TARGET_RATIO else "MISS"
    print(f"total: {total:.2f}x the plain fit epoch (target <= {TARGET_RATIO:.2f}x): {verdict}")


def run(args: argparse.Namespace) -> int:
    parts = {part.strip() for part in args.measure.split(",") if part.strip()}
    if not parts or parts - {"recipe", "scaling"}:
        raise ConfigError(f"--measure takes recipe, scaling or both, not {args.measure!r}")
    if "recipe" in parts:
        run_recipe(args)
    if "scaling" in parts:
        run_scaling(args)
    return 0


def run_scaling(args: argparse.Namespace) -> None:
    """Print images/s per replica count and the scaling efficiency."""
    try:
        counts = sorted({int(value) for value in args.replicas.split(",")})
    except ValueError:
        raise ConfigError(f"--replicas takes counts like 1,2,4, not {args.replicas!r}") from None
    if not counts or counts[0] < 1:
        raise ConfigError("--replicas counts must be 1 or more")
    results = [measure(n, args.backbone, args.size, args.batch_size, args.steps) for n in counts]
    print(
        f"{args.backbone} {args.size}px, batch {args.batch_size} per replica, "
        f"{args.steps} steps, {results[0]['device']} devices"
    )
    print(f"{'replicas':>8}  {'images/s':>10}  {'speed-up':>8}  {'efficiency':>10}")
    for row in scaling_table(results):
        print(
            f"{row['replicas']:>8}  {row['images_per_s']:>10.1f}  {row['speedup']:>7.2f}x"
            f"  {row['efficiency']:>9.0%}"
        )
