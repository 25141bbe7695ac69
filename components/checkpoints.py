"""Per-epoch training checkpoints: where they live, what they hold, and resuming from them.

A checkpoint folder holds the weights with optimizer state, the early-stopping best weights and
a `state.json` (stage, epoch, history, callback counters, MLflow run id); `latest.json` names the
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

from tumorflow.components.tfrecords import read_split_manifest
from tumorflow.core.config import TrainConfig

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

LATEST = "latest.json"
WEIGHTS_FILE = "model.weights.h5"
BEST_WEIGHTS_FILE = "best.npz"
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
    ) -> Path:
        """Write weights with optimizer state, early-stopping best weights and `state` atomically."""
        name = f"ckpt-s{state['stage']}-e{state['epoch']:04d}"
        tmp = self.root / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_weights(tmp / WEIGHTS_FILE)
        if best_weights is not None:
            np.savez(tmp / BEST_WEIGHTS_FILE, *best_weights)
        elif best_weights_from is not None and (best_weights_from / BEST_WEIGHTS_FILE).exists():
            shutil.copyfile(best_weights_from / BEST_WEIGHTS_FILE, tmp / BEST_WEIGHTS_FILE)
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
