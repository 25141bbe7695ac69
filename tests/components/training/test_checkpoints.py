"""Training checkpoints: the folder key, atomic saves, refusing foreign checkpoints, and the
early-stopping / learning-rate counters a resumed stage goes on with."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from tumorflow.components.data.tfrecords import MANIFEST_JSON
from tumorflow.components.training.checkpoints import (
    BEST_EPOCH_FILE,
    LATEST,
    BestEpoch,
    CheckpointStore,
    callback_state,
    checkpoint_key,
    restore_callback_state,
    restore_checkpoint,
)
from tumorflow.core.config import TrainConfig


def _config(**overrides) -> TrainConfig:
    return TrainConfig.model_validate({"backbone": "custom_cnn", "image_size": 32, **overrides})


def _model(seed: int = 0):
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    return model


def _state(stage: int, epoch: int, **extra) -> dict:
    return {"stage": stage, "epoch": epoch, "stage_done": False, "history": [], **extra}


def test_checkpoint_key_follows_data_and_config(split_dir: Path):
    key = checkpoint_key(split_dir, _config())
    assert key == checkpoint_key(split_dir, _config())
    assert key.startswith("train-")
    assert key != checkpoint_key(split_dir, _config(seed=9))
    manifest = json.loads((split_dir / MANIFEST_JSON).read_text())
    manifest["classes"] = [*manifest["classes"], "other"]
    (split_dir / MANIFEST_JSON).write_text(json.dumps(manifest))
    assert checkpoint_key(split_dir, _config()) != key


def test_the_newest_complete_checkpoint_is_resumed_and_older_ones_removed(tmp_path: Path):
    store = CheckpointStore(tmp_path, "fp-1")
    assert store.latest() is None
    model = _model()
    model.fit(np.ones((4, 3)), np.zeros((4, 2)), epochs=2, verbose=0)
    first = store.save(model, _state(1, 1, learning_rate=1e-3), None, None)
    second = store.save(model, _state(1, 2, learning_rate=5e-4), None, first)
    # a save killed half-way leaves a hidden temporary folder that nothing reads
    (tmp_path / ".tmp-ckpt-s1-e0003").mkdir()
    latest = store.latest()
    assert latest["dir"] == second and (latest["stage"], latest["epoch"]) == (1, 2)
    assert not first.exists()
    assert json.loads((tmp_path / LATEST).read_text()) == {"dir": second.name}

    other = _model(seed=1)
    restore_checkpoint(other, latest["dir"], latest["learning_rate"])
    for mine, theirs in zip(model.get_weights(), other.get_weights(), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    assert int(other.optimizer.iterations) == 2  # the optimizer state came back too
    assert float(np.asarray(other.optimizer.learning_rate)) == pytest.approx(5e-4)


def test_checkpoints_of_another_model_are_not_resumed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    CheckpointStore(tmp_path, "fp-1").save(_model(), _state(2, 1), None, None)
    with caplog.at_level(logging.WARNING):
        assert CheckpointStore(tmp_path, "fp-2").latest() is None
    assert "belong to another model or dataset; starting over" in caplog.text


def test_early_stopping_and_lr_counters_survive_a_resume(tmp_path: Path):
    import keras

    early = keras.callbacks.EarlyStopping(monitor="val_loss", restore_best_weights=True)
    reduce_lr = keras.callbacks.ReduceLROnPlateau(monitor="val_loss")
    early.wait, early.best, early.best_epoch = 0, 0.25, 3
    early.best_weights = [np.full((3, 2), 7.0, dtype=np.float32), np.ones(2, dtype=np.float32)]
    reduce_lr.wait, reduce_lr.best, reduce_lr.cooldown_counter = 1, 0.25, 2
    counters, best = callback_state(early, reduce_lr, epoch=3)
    assert best is early.best_weights
    store = CheckpointStore(tmp_path, "fp")
    folder = store.save(_model(), _state(2, 4, callbacks=counters), best, None)
    # a later epoch that is not the best keeps the best weights of the earlier one
    early.wait = 1
    later_counters, later_best = callback_state(early, reduce_lr, epoch=4)
    assert later_best is None
    store.save(_model(), _state(2, 5, callbacks=later_counters), later_best, folder)

    fresh_early = keras.callbacks.EarlyStopping(monitor="val_loss", restore_best_weights=True)
    fresh_reduce = keras.callbacks.ReduceLROnPlateau(monitor="val_loss")
    restore_callback_state(store.latest(), fresh_early, fresh_reduce)
    assert (fresh_early.wait, fresh_early.best, fresh_early.best_epoch) == (1, 0.25, 3)
    assert (fresh_reduce.wait, fresh_reduce.best, fresh_reduce.cooldown_counter) == (1, 0.25, 2)
    np.testing.assert_array_equal(fresh_early.best_weights[0], early.best_weights[0])


def test_the_best_epoch_is_kept_written_once_and_restored_after_a_resume(tmp_path: Path):
    model = _model()
    store = CheckpointStore(tmp_path, "fp")
    best = BestEpoch("val_loss")
    rows = [
        {"epoch": 1, "val_loss": 0.9},
        {"epoch": 2, "val_loss": 0.4},
        {"epoch": 3, "val_loss": 0.4},
    ]
    folder, kept, best_file = None, None, None
    for row in rows:
        model.fit(np.ones((4, 3)), np.zeros((4, 2)), epochs=1, verbose=0)
        weights = best.offer(model, row, 1)
        if weights is not None:
            kept = [w.copy() for w in model.get_weights()]
        folder = store.save(
            model, _state(1, row["epoch"], best_epoch=best.state()), None, folder, weights
        )
        if row["epoch"] == 2:
            best_file = (folder / BEST_EPOCH_FILE).stat()
    # a tie keeps the earlier epoch; its weights file is carried over, not written again
    assert best.state() == {"monitor": "val_loss", "value": 0.4, "stage": 1, "epoch": 2}
    assert (folder / BEST_EPOCH_FILE).stat().st_mtime_ns == best_file.st_mtime_ns

    resumed = BestEpoch("val_loss")
    resumed.restore(store.latest())
    other = _model(seed=3)
    assert resumed.apply(other) and (resumed.stage, resumed.epoch) == (1, 2)
    for mine, theirs in zip(kept, other.get_weights(), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    assert not BestEpoch(None).apply(other)
