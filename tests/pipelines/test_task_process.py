"""How a task's process ends: the heap frozen at exit, every atexit handler still run."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def test_the_heap_is_frozen_at_exit_and_every_exit_handler_still_runs(tmp_path: Path) -> None:
    program = textwrap.dedent(
        f"""
        import atexit, gc
        from pathlib import Path

        out = Path({str(tmp_path)!r})
        # registered before: runs after the freeze (atexit runs handlers last in, first out)
        atexit.register(lambda: (out / "frozen").write_text(str(gc.get_freeze_count())))
        from tumorflow.pipelines.task_process import end_without_final_collection

        end_without_final_collection()
        # registered after, as MLflow's and a temporary folder's handlers are: runs first
        atexit.register(lambda: (out / "later").write_text(str(gc.get_freeze_count())))
        junk = [[index] for index in range(100_000)]
        """
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "later").read_text() == "0"  # ran before the freeze
    assert int((tmp_path / "frozen").read_text()) > 100_000  # the task's objects were frozen
