"""What a local run shows on the terminal, and the run log that keeps everything else.

The contract (what this module reads, and from whom):
- kfp.local's log records, on the root logger: `Executing task 'T'`, `Task 'T' finished with
  status S`, `Task 'T' cache hit`, and `Inner task failed: 'T'` in a failed run's error. They
  give one line per task with its wall time, `cached`, or `FAILED`.
- the tasks' streamed output (kfp.local prints it to `sys.stdout`): every line goes to the run
  log; a training epoch line (`components.progress.epoch_line`) is shown, rewritten in place on a
  TTY; the approval step's event line (`components.progress.approval_wait_line`, read with
  `waiting_for_approval`) becomes the prompt with this run's decision flags;
  the last exception line of a failed task's output becomes the cause in its one-line error.
With `verbose`, kfp.local's own output also reaches the terminal as before.
"""

from __future__ import annotations

import io
import logging
import re
import shutil
import threading
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import TextIO

from tumorflow.components.progress import progress_text, waiting_for_approval

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TASK_START = re.compile(r"Executing task '?([\w-]+)'?")
_TASK_END = re.compile(r"Task '?([\w-]+)'? finished with status (\w+)")
_TASK_CACHED = re.compile(r"Task '?([\w-]+)'? cache hit")
_INNER_FAILURE = re.compile(r"Inner task failed: '?([\w-]+)'?")
_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$")
_TASK_COLUMN = 22


class RunConsole(io.TextIOBase):
    """What a local run shows, and the run log that keeps everything else.

    Installed as a filter on the root logger (kfp.local logs there) and as `sys.stdout` (kfp.local
    prints its tasks' streamed output there). Everything goes to the run log; the terminal gets
    one line per task as it finishes, the training's epoch lines (`components.progress`) and the
    approval prompt. With `verbose`, kfp.local's own output also reaches the terminal as before.
    """

    def __init__(
        self, log_path: Path, terminal: TextIO, echo: TextIO, verbose: bool, decision_flags: str
    ) -> None:
        super().__init__()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = log_path.open("a", encoding="utf-8")
        self._terminal = terminal
        self._echo = echo
        self._verbose = verbose
        self._decision_flags = decision_flags
        self._lock = threading.Lock()
        self._local = threading.local()  # kfp.local runs independent tasks in threads
        self._tty = terminal.isatty()
        self._open_line = False
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float | str] = {}
        self._tails: dict[str, deque[str]] = {}

    # -- kfp.local's log records ------------------------------------------------------------
    def filter(self, record: logging.LogRecord) -> bool:
        message = _ANSI.sub("", str(record.getMessage()))
        if match := _TASK_START.search(message):
            self.started[match.group(1)] = record.created
            self._local.task = match.group(1)
        elif match := _TASK_END.search(message):
            task, status = match.groups()
            if task in self.started:
                self.seconds[task] = round(record.created - self.started[task], 1)
            if status == "SUCCESS" and task in self.seconds:
                self._show(f"{task:<{_TASK_COLUMN}}{self.seconds[task]:>7.1f} s")
        elif match := _TASK_CACHED.search(message):
            self.seconds[match.group(1)] = "cached"
            self._show(f"{match.group(1):<{_TASK_COLUMN}}{'cached':>9}")
        if self._verbose:
            return True
        stamp = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        self._write_log(f"{stamp} {record.levelname} {message}")
        return False

    def log_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        """`warnings.showwarning` during a quiet run: to the run log."""
        self._write_log(f"{category.__name__}: {message} ({filename}:{lineno})")

    # -- the tasks' streamed output (sys.stdout) ---------------------------------------------
    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        pending = getattr(self._local, "pending", "") + text
        *lines, self._local.pending = pending.split("\n")
        for line in lines:
            self._task_line(_ANSI.sub("", line).rstrip())
        if self._verbose:
            self._echo.write(text)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            self._log.flush()
        if self._verbose:
            self._echo.flush()

    def _task_line(self, line: str) -> None:
        self._write_log(line)
        task = getattr(self._local, "task", None) or ""
        if task and line.strip():
            self._tails.setdefault(task, deque(maxlen=50)).append(line.strip())
        if (run := waiting_for_approval(line)) is not None:
            flags = self._decision_flags
            self._show(
                f"{task:<{_TASK_COLUMN}}waiting for: tumorflow approve {run}{flags}   "
                f"(or: tumorflow reject {run}{flags} --reason ...)"
            )
        elif (text := progress_text(line)) is not None and not self._verbose:
            self._show(f"{task:<{_TASK_COLUMN}}{text}", transient=True)

    def _write_log(self, line: str) -> None:
        with self._lock:
            self._log.write(line + "\n")

    def _show(self, text: str, transient: bool = False) -> None:
        """A line on the terminal; on a TTY an epoch line is rewritten in place by the next."""
        with self._lock:
            if self._open_line:
                self._terminal.write("\r\x1b[K")
            if transient and self._tty:
                width = shutil.get_terminal_size().columns - 1
                self._terminal.write(text[:width])
                self._open_line = True
            else:
                self._terminal.write(text + "\n")
                self._open_line = False
            self._terminal.flush()

    # -- failure and end ---------------------------------------------------------------------
    def failure(self, error: RuntimeError, pipeline_root: Path) -> str:
        """One line: the failing task, the exception its output ended with, where the log is."""
        message = _ANSI.sub("", str(error))
        match = _INNER_FAILURE.search(message) or _TASK_END.search(message)
        unfinished = [task for task in self.started if task not in self.seconds]
        task = match.group(1) if match else (unfinished[-1] if unfinished else None)
        if task is None:
            return f"{message} (run log: {self.log_path})"
        self._show(f"{task:<{_TASK_COLUMN}}{'FAILED':>9}")
        cause = next(
            (
                f": {found.group(1)}: {found.group(2)}"
                for line in reversed(self._tails.get(task, ()))
                if (found := _EXCEPTION_LINE.match(line))
            ),
            "",
        )
        where = "its output is above" if self._verbose else f"its output is in {self.log_path}"
        return f"task {task} failed{cause} ({where}; outputs so far under {pipeline_root})"

    def close(self) -> None:
        if self._open_line:
            self._show("")
        super().close()  # flushes
        with self._lock:
            self._log.close()
