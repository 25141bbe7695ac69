"""The local run's console: one line per task, epoch lines, the approval prompt, and a failing
task as one line with its cause; everything in the run log."""

from __future__ import annotations

import io
import logging

from tumorflow.components.progress import approval_wait_line, epoch_line
from tumorflow.pipelines.run_console import RunConsole


def _record(message: str, created: float) -> logging.LogRecord:
    record = logging.LogRecord("kfp.local", logging.INFO, __file__, 0, message, None, None)
    record.created = created
    return record


def _console(tmp_path):
    terminal = io.StringIO()
    console = RunConsole(
        tmp_path / "logs" / "run.log",
        terminal=terminal,
        echo=io.StringIO(),
        verbose=False,
        decision_flags=" --run-root runs",
    )
    return console, terminal


def test_a_run_shows_each_task_once_with_its_time_and_keeps_the_rest_in_its_log(tmp_path):
    console, terminal = _console(tmp_path)

    assert console.filter(_record("Executing task 'train'", 100.0)) is False
    console.write(epoch_line("stage 1", 1, 2, {"loss": 0.5}, 1.0) + "\n")
    console.write("Keras chatter\n")
    # a person's words name the command too, but only the approval step's event is the prompt
    console.write("INFO waiting up to 900s for `tumorflow approve run-6` or `tumorflow reject`\n")
    console.write(approval_wait_line("run-7") + "\n")
    console.filter(_record("Task 'train' finished with status SUCCESS", 112.5))
    console.filter(_record("Task 'download' cache hit", 113.0))
    console.close()

    shown = terminal.getvalue()
    assert "stage 1  epoch 1/2  loss 0.5000" in shown
    assert "waiting for: tumorflow approve run-7 --run-root runs" in shown
    assert "(or: tumorflow reject run-7 --run-root runs --reason ...)" in shown
    assert "run-6" not in shown and "waiting-for-approval" not in shown
    assert "train                    12.5 s" in shown
    assert "cached" in shown and "Keras chatter" not in shown
    assert console.seconds == {"train": 12.5, "download": "cached"}
    assert "Keras chatter" in console.log_path.read_text()


def test_a_failing_task_is_one_line_naming_it_and_the_exception_its_output_ended_with(tmp_path):
    console, _ = _console(tmp_path)
    console.filter(_record("Executing task 'gate'", 1.0))
    console.write("Traceback (most recent call last):\n")
    console.write("tumorflow.core.errors.GateError: no metrics.json; run evaluate first\n")

    message = console.failure(RuntimeError("Inner task failed: 'gate'"), tmp_path / "pipeline_root")
    console.close()

    assert message.startswith("task gate failed: GateError: no metrics.json; run evaluate first")
    assert str(console.log_path) in message
