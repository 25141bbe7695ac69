"""`tumorflow bench train`: training images/s per replica count, with the scaling efficiency.

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
import subprocess
import sys
import textwrap

from tumorflow.core.errors import ConfigError

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


def run(args: argparse.Namespace) -> int:
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
    return 0
