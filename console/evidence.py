"""What the console shows about runs: the registry's candidates and the files a run left.

A pipeline run's files live under `<run_root>/pipeline_root/<pipeline run>/` (kfp.local's layout:
one folder per task output); the gate's `decision.json` and `review_images.json` (with their
Grad-CAM overlays), evaluate's `metrics.json` and `predictions.csv`, the plots and the drift
report are found there by name.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tumorflow.components.gate.review import CHANGED, REVIEW_FILE
from tumorflow.components.release import registry

WAITING = "waiting"
DEPLOYED = "deployed"
_STATES = {"pending": WAITING}


@dataclass
class RunSummary:
    """One line of the Runs page."""

    pipeline_run: str
    model_name: str
    model_version: str
    created: int
    state: str
    gate_passed: bool | None
    dataset_version: str = ""
    approval: dict[str, str] = field(default_factory=dict)


def run_folder(run_root: Path, pipeline_run: str) -> Path | None:
    """The run's folder under the kfp.local pipeline root, if it is on this machine."""
    if "/" in pipeline_run or pipeline_run.startswith("."):
        return None
    folder = Path(run_root) / "pipeline_root" / pipeline_run
    return folder if folder.is_dir() else None


def find_file(folder: Path | None, name: str) -> Path | None:
    """The newest file called `name` under `folder`."""
    if folder is None:
        return None
    found = sorted(folder.rglob(name), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _json(path: Path | None) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path else None


def _dataset_version(folder: Path | None) -> str:
    source = _json(find_file(folder, "source.json")) or {}
    return str(source.get("dataset_version", ""))


def list_runs(tracking_uri: str, model_names: list[str], run_root: Path) -> list[RunSummary]:
    """Every registered candidate of `model_names`, runs waiting for a person first, then newest."""
    client = registry.connect(tracking_uri)
    runs = []
    for model_name in model_names:
        for mv in registry.list_versions(client, model_name):
            pipeline_run = mv.tags.get(registry.TAG_PIPELINE_RUN, "")
            status = mv.tags.get("approval.status", "pending")
            state = _STATES.get(status, status)
            if mv.tags.get(registry.TAG_SERVING_VERSION):
                state = DEPLOYED
            gate = mv.tags.get(registry.TAG_GATE_PASSED)
            runs.append(
                RunSummary(
                    pipeline_run=pipeline_run,
                    model_name=model_name,
                    model_version=mv.version,
                    created=mv.creation_timestamp,
                    state=state,
                    gate_passed=None if gate is None else gate == "true",
                    dataset_version=_dataset_version(run_folder(run_root, pipeline_run)),
                    approval={
                        k.split(".", 1)[1]: v
                        for k, v in mv.tags.items()
                        if k.startswith("approval.")
                    },
                )
            )
    return sorted(runs, key=lambda r: (r.state != WAITING, -r.created))


@dataclass
class RunEvidence:
    """Everything the review page shows for one run."""

    decision: dict[str, Any] | None
    metrics: dict[str, Any] | None
    wrong_predictions: list[dict[str, Any]]
    plots: dict[str, str]
    drift_report: str | None
    # test images whose prediction changed between champion and challenger (gate's review file)
    changed_predictions: list[dict[str, Any]] = field(default_factory=list)


def _review_images(folder: Path | None) -> list[dict[str, Any]]:
    """The gate's review images, each `overlay` as a path relative to the run folder."""
    review = find_file(folder, REVIEW_FILE)
    if review is None or folder is None:
        return []
    entries = json.loads(review.read_text())
    for entry in entries:
        if "overlay" in entry:
            entry["overlay"] = (review.parent / entry["overlay"]).relative_to(folder).as_posix()
    return entries


def run_evidence(run_root: Path, pipeline_run: str) -> RunEvidence:
    """The gate decision, the evaluation, the plots (paths relative to the run folder), the test
    images the challenger gets wrong and those whose prediction changed, with their overlays."""
    folder = run_folder(run_root, pipeline_run)
    decision = _json(find_file(folder, "decision.json"))
    metrics = _json(find_file(folder, "metrics.json"))
    plots = {}
    for name in ("confusion_matrix.png", "roc.png", "reliability.png"):
        path = find_file(folder, name)
        if path is not None and folder is not None:
            plots[name.removesuffix(".png")] = path.relative_to(folder).as_posix()
    drift = find_file(folder, "*.html")
    reviewed = _review_images(folder)
    overlays = {e["path"]: e["overlay"] for e in reviewed if "overlay" in e}
    wrong = []
    predictions = find_file(folder, "predictions.csv")
    if predictions is not None and metrics is not None:
        classes = metrics.get("classes", [])
        with predictions.open() as handle:
            for row in csv.DictReader(handle):
                scores = [float(row.get(f"p_{c}", 0.0)) for c in classes]
                guess = max(range(len(scores)), key=scores.__getitem__) if scores else -1
                label = int(row["label_index"])
                if guess != label:
                    wrong.append(
                        {
                            "path": row["path"],
                            "label": classes[label],
                            "predicted": classes[guess],
                            "confidence": scores[guess],
                            "overlay": overlays.get(row["path"]),
                        }
                    )
    return RunEvidence(
        decision=decision,
        metrics=metrics,
        wrong_predictions=wrong,
        plots=plots,
        drift_report=drift.relative_to(folder).as_posix() if drift and folder else None,
        changed_predictions=[e for e in reviewed if CHANGED in e["reasons"]],
    )
