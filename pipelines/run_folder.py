"""The one reader of a local run's folder: what a finished kfp.local run left, step by step.

kfp.local writes each task's outputs to `<run_root>/pipeline_root/<pipeline run>/<task>/<output>`
and its output parameters to `<task>/executor_output.json`. A task the cache skipped writes
nothing in this run: its outputs are those of an earlier run of the same pipeline root, found here
as the newest earlier run that has them. The runner's summary, `tumorflow monitor` and the
console read runs through this module only; the file names come from `core/artifacts.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tumorflow.core import artifacts

PIPELINE_ROOT = "pipeline_root"
EXECUTOR_OUTPUT = "executor_output.json"

# (task, output) of the files a run's readers look at: kfp.local names a task after its
# component function (underscores as dashes) and an output after the function's parameter.
DATASET_VERSION_TASK = "dataset-version"
SOURCE = ("download", "raw")
SPLIT = ("validate-and-split", "split")
MODEL = ("train", "model")
EVALUATION = ("evaluate", "evaluation")
GATE_DECISION = ("gate", "decision")
APPROVAL_RECORD = ("approval", "record")
DRIFT_REPORT_VERDICT = ("drift-report", "verdict")
DRIFT_CHECK_VERDICT = ("drift-check", "verdict")
DEPLOY_TASK = "deploy"
# The tasks the cache may skip (docs/caching.md); the others run in every run that reaches them.
CACHED_TASKS = frozenset({"download", "validate-and-split", "train", "evaluate"})


def pipeline_root(run_root: Path | str) -> Path:
    """Where kfp.local writes the runs of a run root."""
    return Path(run_root) / PIPELINE_ROOT


@dataclass(frozen=True)
class RunFolder:
    """One pipeline run's folder, read with the cache in mind."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def find(cls, run_root: Path | str, pipeline_run: str) -> RunFolder | None:
        """The folder of `pipeline_run` under `run_root`, if it is on this machine (a name with a
        path separator or a leading dot names none)."""
        if not pipeline_run or "/" in pipeline_run or pipeline_run.startswith("."):
            return None
        folder = pipeline_root(run_root) / pipeline_run
        return cls(folder) if folder.is_dir() else None

    def _earlier_runs(self) -> list[Path]:
        return sorted(
            (p for p in self.path.parent.iterdir() if p.is_dir() and p.name < self.name),
            reverse=True,
        )

    def artifact(self, task: str, output: str) -> Path | None:
        """Where the run's `task` wrote `output`; for a cacheable task the cache skipped in a run
        that went through the retraining DAG, the newest earlier run's. A step that is never
        cached, or one a run never reached (a monitoring run without drift), has none."""
        own = self.path / task / output
        if own.exists():
            return own
        if task not in CACHED_TASKS or self.parameter(DATASET_VERSION_TASK, "fingerprint") is None:
            return None
        return next(
            (p / task / output for p in self._earlier_runs() if (p / task / output).exists()),
            None,
        )

    def file(self, step: tuple[str, str], name: str) -> Path | None:
        """The file `name` in the output `step` = (task, output), cache-aware."""
        folder = self.artifact(*step)
        path = folder / name if folder is not None else None
        return path if path is not None and path.exists() else None

    def json(self, step: tuple[str, str], name: str) -> dict[str, Any] | None:
        path = self.file(step, name)
        return json.loads(path.read_text()) if path is not None else None

    def parameter(self, task: str, name: str) -> Any:
        """An output parameter of a finished task (kfp.local's executor_output.json); None when
        the task did not run in this run."""
        for output in sorted(self.path.glob(f"{task}*/{EXECUTOR_OUTPUT}")):
            values = json.loads(output.read_text()).get("parameterValues", {})
            if name in values:
                return values[name]
        return None

    # -- what the readers ask for ----------------------------------------------------------
    def dataset_version(self) -> str | None:
        """The fingerprint of the data the run trained on: the (never cached) dataset-version
        step's output, else the download's source.json (cached or not)."""
        fingerprint = self.parameter(DATASET_VERSION_TASK, "fingerprint")
        if fingerprint:
            return str(fingerprint)
        source = self.json(SOURCE, artifacts.SOURCE_JSON) or {}
        return source.get("dataset_version") or None

    def gate_decision(self) -> dict[str, Any] | None:
        return self.json(GATE_DECISION, artifacts.DECISION_FILE)

    def approval(self) -> dict[str, Any] | None:
        return self.json(APPROVAL_RECORD, artifacts.APPROVAL_FILE)

    def metrics(self) -> dict[str, Any] | None:
        return self.json(EVALUATION, artifacts.METRICS_FILE)

    def trigger(self) -> dict[str, Any] | None:
        """The monitoring run's trigger record (why it retrained), if its drift check wrote one."""
        return self.json(DRIFT_CHECK_VERDICT, artifacts.TRIGGER_FILE)

    def drift_check_verdict(self) -> dict[str, Any] | None:
        return self.json(DRIFT_CHECK_VERDICT, artifacts.VERDICT_FILE)

    def deployed_version(self) -> int | None:
        """The version deploy published (0: the model equals the served one); None when deploy
        did not run."""
        version = self.parameter(DEPLOY_TASK, "Output")
        return int(version) if version is not None else None

    def drift_report_html(self) -> Path | None:
        """The Evidently drift report page: the drift-report step's, else the drift check's."""
        for step in (DRIFT_REPORT_VERDICT, DRIFT_CHECK_VERDICT):
            if (found := self.file(step, artifacts.DRIFT_REPORT_HTML)) is not None:
                return found
        return None
