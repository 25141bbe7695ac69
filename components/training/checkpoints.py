"""Per-epoch training checkpoints: where they live, what they hold, and resuming from them.

A checkpoint folder holds the weights with optimizer state, the early-stopping best weights, the
weights of the best epoch so far over both stages (`BestEpoch`) and a `state.json` (stage,
epoch, history, callback counters, best epoch, MLflow run id); `latest.json` names the
newest complete one. `checkpoint_key` names the checkpoint folder of one dataset and config, so a
re-run of an interrupted pipeline finds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tumorflow.components.data.tfrecords import read_split_manifest
from tumorflow.core.config import TrainConfig

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

LATEST = "latest.json"
WEIGHTS_FILE = "model.weights.h5"
BEST_WEIGHTS_FILE = "best.npz"
BEST_EPOCH_FILE = "best_epoch.npz"
STATE_FILE = "state.json"


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


def model_fingerprint(config: TrainConfig, image_size: int, classes: list[str], policy: str) -> str:
    """What a checkpoint's weights fit: backbone, input, classes, head and dtype policy.

    Checkpoints with another fingerprint are not resumed from (their weights would not load).
    """
    return hashlib.sha256(
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
        state = json.loads((folder / STATE_FILE).read_text())
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
        best_epoch_weights: list[np.ndarray] | None = None,
    ) -> Path:
        """Write weights with optimizer state, the early-stopping and best-epoch weights (written
        when they change, else carried over from `best_weights_from` without a copy) and `state`,
        atomically."""
        name = f"ckpt-s{state['stage']}-e{state['epoch']:04d}"
        tmp = self.root / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_weights(tmp / WEIGHTS_FILE)
        for file_name, arrays in (
            (BEST_WEIGHTS_FILE, best_weights),
            (BEST_EPOCH_FILE, best_epoch_weights),
        ):
            if arrays is not None:
                np.savez(tmp / file_name, *arrays)
            elif best_weights_from is not None and (best_weights_from / file_name).exists():
                _carry_over(best_weights_from / file_name, tmp / file_name)
        (tmp / STATE_FILE).write_text(
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


def _carry_over(source: Path, target: Path) -> None:
    """A file of the previous checkpoint into the new one: a hard link where the filesystem has
    them (no copy; a checkpoint's files are never rewritten), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _load_arrays(path: Path) -> list[np.ndarray]:
    with np.load(path) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


def restore_checkpoint(model: keras.Model, folder: Path, learning_rate: float) -> None:
    """Load weights and optimizer state (both in the `.weights.h5` of a compiled model)."""
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(folder / WEIGHTS_FILE)
    model.optimizer.learning_rate = learning_rate


def callback_state(
    early: keras.callbacks.EarlyStopping | None,
    reduce_lr: keras.callbacks.ReduceLROnPlateau | None,
    epoch: int,
) -> tuple[dict[str, Any], list[np.ndarray] | None]:
    """The counters of EarlyStopping/ReduceLROnPlateau after `epoch` (0-based), for a checkpoint,
    and the early-stopping best weights when this epoch is the new best (else None)."""
    state: dict[str, Any] = {}
    best_weights = None
    if early is not None:
        state["early"] = {
            "wait": early.wait,
            "best": None if early.best is None else float(early.best),
            "best_epoch": early.best_epoch,
        }
        if early.best_epoch == epoch and early.best_weights is not None:
            best_weights = early.best_weights
    if reduce_lr is not None:
        state["reduce_lr"] = {
            "wait": reduce_lr.wait,
            "best": None if reduce_lr.best is None else float(reduce_lr.best),
            "cooldown_counter": reduce_lr.cooldown_counter,
        }
    return state, best_weights


def restore_callback_state(
    checkpoint: dict[str, Any],
    early: keras.callbacks.EarlyStopping | None,
    reduce_lr: keras.callbacks.ReduceLROnPlateau | None,
) -> None:
    """Put the counters (and best weights) saved in `checkpoint` back into the callbacks."""
    saved = checkpoint.get("callbacks", {})
    if early is not None and "early" in saved:
        early.wait = saved["early"]["wait"]
        early.best = saved["early"]["best"]
        early.best_epoch = saved["early"]["best_epoch"]
        best_file = checkpoint["dir"] / BEST_WEIGHTS_FILE
        if best_file.exists():
            early.best_weights = _load_arrays(best_file)
    if reduce_lr is not None and "reduce_lr" in saved:
        reduce_lr.wait = saved["reduce_lr"]["wait"]
        reduce_lr.best = saved["reduce_lr"]["best"]
        reduce_lr.cooldown_counter = saved["reduce_lr"]["cooldown_counter"]


class BestEpoch:
    """The best epoch so far over both stages by a validation metric, and its weights.

    `monitor` is `val_loss` (lower is better), `val_macro_f1` (higher is better) or None (keep the
    last epoch). A tie keeps the earlier epoch. Saved in each checkpoint, so a resumed run
    restores the same epoch an uninterrupted one would.
    """

    def __init__(self, monitor: str | None) -> None:
        self.monitor = monitor
        self.value: float | None = None
        self.stage = 0
        self.epoch = 0
        self.weights: list[np.ndarray] | None = None

    def offer(self, model: keras.Model, row: dict[str, Any], stage: int) -> list[np.ndarray] | None:
        """Take the epoch of history `row` if it beats the best; its weights when it does."""
        value = row.get(self.monitor) if self.monitor else None
        if value is None or not np.isfinite(value):
            return None
        if self.value is not None and (
            value >= self.value if self.monitor == "val_loss" else value <= self.value
        ):
            return None
        self.value, self.stage, self.epoch = float(value), stage, int(row["epoch"])
        self.weights = model.get_weights()
        return self.weights

    def state(self) -> dict[str, Any]:
        """What `state.json` and model_info.json record of it."""
        return {
            "monitor": self.monitor or "last",
            "value": self.value,
            "stage": self.stage,
            "epoch": self.epoch,
        }

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Take back the best epoch (and its weights) a checkpoint recorded."""
        saved = checkpoint.get("best_epoch") or {}
        best_file = checkpoint["dir"] / BEST_EPOCH_FILE
        if (
            saved.get("monitor") == self.monitor
            and saved.get("value") is not None
            and best_file.exists()
        ):
            self.value, self.stage, self.epoch = saved["value"], saved["stage"], saved["epoch"]
            self.weights = _load_arrays(best_file)

    def apply(self, model: keras.Model) -> bool:
        """Give `model` the best epoch's weights; False when there is none to restore."""
        if self.weights is None:
            return False
        model.set_weights(self.weights)
        return True
