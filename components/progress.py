"""The lines of a task's output the local runner shows: training progress as one compact line
per epoch, and the approval step's wait for a person.

The steps run in kfp.local subprocesses whose output goes to the run log; the local runner
(pipelines/run_console.py) picks the lines marked here (`[tumorflow-progress] ...`) out of that
stream and shows them, so a run shows an epoch counter without Keras' own progress output, and the
command that decides a waiting run. The writers and the reader share this module: no line is
recognised by its wording.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

PROGRESS_MARK = "[tumorflow-progress]"

_SHOWN_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
# The event the approval step prints when its run starts waiting for a person.
APPROVAL_WAIT_EVENT = "waiting-for-approval"


def epoch_line(
    label: str, epoch: int, epochs: int | None, logs: Mapping[str, Any], seconds: float
) -> str:
    """`[tumorflow-progress] stage 1  epoch 3/12  loss 0.4121  val_accuracy 0.8500  4.1 s`."""
    metrics = "  ".join(
        f"{name} {float(logs[name]):.4f}" for name in _SHOWN_METRICS if name in logs
    )
    counter = f"{epoch}/{epochs}" if epochs else str(epoch)
    return f"{PROGRESS_MARK} {label}  epoch {counter}  {metrics}  {seconds:.1f} s"


def progress_text(line: str) -> str | None:
    """The progress text of one line of task output; None for any other line."""
    _, mark, text = line.partition(PROGRESS_MARK)
    return text.strip() if mark else None


def approval_wait_line(pipeline_run: str) -> str:
    """`[tumorflow-progress] waiting-for-approval RUN`: what the approval step prints (flushed)
    when `pipeline_run` starts waiting for a person's signed decision."""
    return f"{PROGRESS_MARK} {APPROVAL_WAIT_EVENT} {pipeline_run}"


def waiting_for_approval(line: str) -> str | None:
    """The run an `approval_wait_line` names; None for any other line."""
    text = progress_text(line)
    if text is None:
        return None
    event, _, run = text.partition(" ")
    return run.strip() or None if event == APPROVAL_WAIT_EVENT else None


def epoch_progress(label: str) -> Any:
    """A Keras callback that prints `epoch_line` at the end of every epoch (flushed: the runner
    reads the task's output as it comes)."""
    import keras

    class EpochProgress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._started = time.monotonic()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            seconds = time.monotonic() - getattr(self, "_started", time.monotonic())
            epochs = self.params.get("epochs") if self.params else None
            print(epoch_line(label, epoch + 1, epochs, logs or {}, seconds), flush=True)

    return EpochProgress()
