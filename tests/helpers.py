"""What the test modules share: a free port, waiting on an event instead of sleeping, and tiny
images and split datasets. Importable as `helpers` (pytest's `pythonpath`), where conftest is
not under `--import-mode=importlib`."""

from __future__ import annotations

import io
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from tumorflow.components.data.synthetic import SYNTHETIC_CLASSES, draw_synthetic_scan

# write_split: a split dataset written by the project's own writer (so a test split is the real
# format); tests import it from here.
from tumorflow.components.data.tfrecords import Record, write_split

T = TypeVar("T")

# The settings of the tiny run (phantom preset): load_config(TINY_CONFIG, preset="phantom", ...)
TINY_CONFIG = Path(__file__).with_name("tiny.yaml")


def free_port() -> int:
    """A loopback TCP port nothing listens on at the moment of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Call `predicate` until it returns something truthy and return that; fail the test saying
    `what` did not happen once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(interval)


def encode(image: np.ndarray | Image.Image, fmt: str = "PNG", quality: int = 95) -> bytes:
    """The file bytes (PNG, JPEG, ...) of an image or of uint8/uint16 pixels (grey or RGB)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=quality)
    return buffer.getvalue()


def noise_image(
    seed: int,
    size: int | tuple[int, int] = 32,
    mode: str = "RGB",
    level: float | None = None,
    spread: float = 8.0,
) -> Image.Image:
    """A seeded random image of `size` (side, or height and width) in colour `mode`: uniform
    noise, or with `level` a flat grey of that mean with Gaussian noise of `spread`."""
    height, width = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    if level is None:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    else:
        pixels = np.clip(level + rng.normal(0, spread, (height, width, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8)).convert(mode)


def image_bytes(
    seed: int = 0,
    size: int | tuple[int, int] = 24,
    mode: str = "RGB",
    fmt: str = "PNG",
    level: float | None = None,
    spread: float = 8.0,
) -> bytes:
    """`noise_image(...)` encoded as `fmt`: what a client sends or a dataset folder holds."""
    return encode(noise_image(seed, size, mode, level, spread), fmt)


def write_synthetic_split(
    folder: Path,
    counts: Mapping[str, int],
    size: int,
    seed: int = 0,
    classes: Iterable[str] = SYNTHETIC_CLASSES,
    shard_size: int = 1024,
) -> Path:
    """A split dataset of synthetic CT-like scans (PNG), `counts[split]` images per class, whose
    lesion's place and size tell the class: something a tiny model can learn."""
    classes = list(classes)
    rng = np.random.default_rng(seed)
    records = {}
    for split, per_class in counts.items():
        records[split] = [
            Record(
                encode(draw_synthetic_scan(rng, index % len(classes), len(classes), size)),
                index % len(classes),
                f"{classes[index % len(classes)]}/{split}-{index:05d}.png",
                f"g-{split}-{index}",
            )
            for index in range(per_class * len(classes))
        ]
    return write_split(
        folder,
        classes,
        records,
        shard_size,
        class_weights=dict.fromkeys(classes, 1.0),
        seed=seed,
        grouping={"groups": sum(len(rows) for rows in records.values())},
        strategy="synthetic",
        quarantined=0,
        source={"source": "synthetic"},
    )


# File names old PACS exports and Windows shares produce, as raw bytes: undecodable bytes,
# control characters, leading dashes, a 255-byte name, names differing only in case, and a
# folder whose name is not UTF-8 either.
HOSTILE_NAMES = (
    b"bad_\xff_name.png",
    b"latin1_\xe9t\xe9.png",
    b"line\nbreak.png",
    b"carriage\rreturn\ttab.png",
    b"-rf.png",
    b"--help.png",
    b"a" * 251 + b".png",
    b"Case.png",
    b"case.png",
    b"CASE.PNG",
    b"ok_\xc3\xa9_utf8 with spaces.png",
    b"sub_\xfe_folder/inside.png",
)


def write_hostile_name_corpus(
    folder: Path, classes: Sequence[str] = ("normal", "tumor"), per_class: int = 12, size: int = 48
) -> dict[str, list[bytes]]:
    """A class-folder dataset under `folder`: `per_class` ordinary synthetic scans per class plus
    every name of `HOSTILE_NAMES` in each class, all distinct images. Returns the hostile
    relative paths written per class, as bytes."""
    rng = np.random.default_rng(7)
    root = bytes(Path(folder))
    written: dict[str, list[bytes]] = {}
    for index, name in enumerate(classes):
        names = [f"scan-{k:03d}.png".encode() for k in range(per_class)] + list(HOSTILE_NAMES)
        for relative in names:
            path = os.path.join(root, name.encode(), relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as handle:
                handle.write(encode(draw_synthetic_scan(rng, index, len(classes), size)))
        written[name] = list(HOSTILE_NAMES)
    return written


# A training run in a child process whose epochs end slowly, so a test can kill it after its
# first checkpoint: argv = split dir, work dir, TrainConfig JSON, seconds per epoch end.
SLOW_TRAINING_CHILD = """
from pathlib import Path
from tumorflow.components.training import train
from tumorflow.core.config import TrainConfig

original = train._stage_callback_class
def slow_callback_class():
    base = original()
    class Slow(base):
        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)
            time.sleep(float(sys.argv[4]))
    return Slow
train._stage_callback_class = slow_callback_class
config = TrainConfig.model_validate_json(sys.argv[3])
work = Path(sys.argv[2])
result = train.train_model(Path(sys.argv[1]), work / "model", config, work / "ckpt")
"""


def write_release_run(
    run_root: Path, pipeline_run: str, *, seed: int, dataset_version: str, epochs: int = 2
) -> dict[str, str]:
    """A finished run's folders as the pipeline lays them out (split manifest, model info,
    evaluation, the gate's decision made by the real gate) for release records; returns the
    model's `saved_model_sha256` and the decision's digest."""
    import hashlib

    from tumorflow.components.evaluation.metrics import Predictions, compute_metrics
    from tumorflow.components.gate.decision import run_gate
    from tumorflow.core.config import GateConfig, GateRule

    classes = ["normal", "tumor"]
    root = Path(run_root) / "pipeline_root" / pipeline_run
    split = root / "validate-and-split" / "split"
    split.mkdir(parents=True)
    manifest = {
        "classes": classes,
        "splits": {"train": {"count": 40 + seed}, "val": {"count": 10}, "test": {"count": 50}},
        "strategy": "grouped-stratified",
        "seed": 42,
        "source": {"dataset_version": dataset_version},
    }
    (split / "split_manifest.json").write_text(json.dumps(manifest))
    digest = hashlib.sha256(f"saved model of {pipeline_run}".encode()).hexdigest()
    model = root / "train" / "model"
    model.mkdir(parents=True)
    info = {
        "backbone": "custom_cnn",
        "weights": None,
        "image_size": [32, 32],
        "stage1": {"epochs": epochs},
        "epochs_run": {"stage1": epochs},
        "saved_model_sha256": digest,
    }
    (model / "model_info.json").write_text(json.dumps(info))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 50)
    predicted = np.where(rng.random(50) < 0.8 + 0.05 * seed, y, 1 - y)
    p_tumor = np.where(predicted == 1, 0.8, 0.2)
    evaluation = root / "evaluate" / "evaluation"
    evaluation.mkdir(parents=True)
    predictions = Predictions(
        [f"{i}.png" for i in range(50)], y, np.stack([1 - p_tumor, p_tumor], 1), classes
    )
    predictions.write(evaluation / "predictions.csv")
    metrics = compute_metrics(predictions.y_true, predictions.probs, classes)
    (evaluation / "metrics.json").write_text(json.dumps(metrics))
    gate = GateConfig(
        rules=[GateRule(metric="accuracy", threshold=0.7)],
        champion_rules=[],
        bootstrap_resamples=50,
    )
    run_gate(
        evaluation,
        split,
        gate,
        tracking_uri=None,
        model_name="kidney-ct",
        output_dir=root / "gate" / "decision",
    )
    decision = (root / "gate" / "decision" / "decision.json").read_bytes()
    return {"serving_digest": digest, "decision_digest": hashlib.sha256(decision).hexdigest()}


def isolated_keras_cache(monkeypatch, folder: Path) -> Path:
    """Point Keras' cache at `folder` (as `KERAS_HOME=folder` would when Keras is imported) and
    make any download attempt fail the test; returns the folder Keras loads weights files from."""
    import keras.src.backend.config as keras_config
    import keras.src.utils.file_utils as keras_files

    def no_download(origin, *args, **kwargs):
        raise AssertionError(f"Keras tried to download {origin}")

    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(folder))
    monkeypatch.setattr(keras_files, "urlretrieve", no_download)
    return folder / "models"


def write_notop_weights(backbone: str, image_size: int, path: Path) -> list[np.ndarray]:
    """A randomly initialised backbone's weights at `path` (an .h5 name), in the legacy HDF5
    layout of Keras' published notop files; returns the weights written."""
    from tumorflow.components.training.backbones import build_backbone

    model = build_backbone(backbone, image_size, "none")
    model.save(path)
    return model.get_weights()
