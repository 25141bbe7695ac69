"""The lines of a task's output the local runner shows: training progress as one compact line
per epoch, and the approval step's wait for a person.

The steps run in kfp.local subprocesses whose output goes to the run log; the local runner
(pipelines/run_console.py) picks the lines recognised here out of that stream and shows them, so
a run shows an epoch counter without Keras' own progress output, and the command that decides it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

PROGRESS_MARK = "[tumorflow-progress]"

_SHOWN_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
# The approval step logs the command that decides a waiting run (components/release/approval.py).
_APPROVAL_WAIT = re.compile(r"`tumorflow approve (\S+)`")


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


def waiting_for_approval(line: str) -> str | None:
    """The run a line of the approval step's output says is waiting for a person (it names
    `tumorflow approve RUN`); None for any other line."""
    match = _APPROVAL_WAIT.search(line)
    return match.group(1) if match else None


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
