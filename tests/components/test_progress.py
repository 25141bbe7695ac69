"""The epoch-progress callback: one compact, marked line per epoch that the local runner shows."""

from __future__ import annotations

import numpy as np
import pytest

from tumorflow.components.progress import epoch_line, epoch_progress, progress_text


def test_one_marked_line_per_epoch_with_counter_and_metrics(
    capsys: pytest.CaptureFixture,
) -> None:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    features = np.random.default_rng(0).normal(size=(16, 3)).astype("float32")
    labels = (features[:, 0] > 0).astype("int32")
    model.fit(
        features,
        labels,
        validation_data=(features, labels),
        epochs=3,
        verbose=0,
        callbacks=[epoch_progress("stage 2")],
    )
    lines = capsys.readouterr().out.splitlines()
    shown = [progress_text(line) for line in lines]
    assert len(lines) == 3 and None not in shown
    for epoch, text in enumerate(shown, start=1):
        assert text.startswith(f"stage 2  epoch {epoch}/3  loss ")
        assert "val_accuracy" in text and text.endswith(" s")


def test_other_task_output_is_not_progress() -> None:
    assert progress_text("Epoch 1/12") is None
    assert progress_text("    [KFP Executor 11:18:47 INFO]: built classifier") is None
    indented = "    " + epoch_line("stage 1", 4, 12, {"loss": 0.5}, 2.04)
    assert progress_text(indented) == "stage 1  epoch 4/12  loss 0.5000  2.0 s"


def test_the_approval_event_names_its_run_and_nothing_else_does():
    from tumorflow.components.progress import (
        approval_wait_line,
        epoch_line,
        waiting_for_approval,
    )

    assert waiting_for_approval(approval_wait_line("run-42")) == "run-42"
    assert waiting_for_approval("  " + approval_wait_line("r") + "\n") == "r"
    assert waiting_for_approval("waiting up to 9s for `tumorflow approve run-42`") is None
    assert waiting_for_approval(epoch_line("stage 1", 1, 2, {}, 1.0)) is None
