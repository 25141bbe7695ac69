"""What the console shows about runs: the registry's candidates and the files a run left.

A pipeline run's files are read through `pipelines.run_folder` (kfp.local's layout, cached steps
included): the gate's decision and review images (with their Grad-CAM overlays), evaluate's
metrics and predictions, the plots and the drift report. The console links only files inside the
run's own folder: a plot of a cached evaluate step stays in the earlier run's folder.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tumorflow.components.gate.review import CHANGED
from tumorflow.components.release import registry
from tumorflow.core import artifacts
from tumorflow.pipelines.run_folder import EVALUATION, GATE_DECISION, SPLIT, RunFolder

WAITING = "waiting"
DEPLOYED = "deployed"
_STATES = {"pending": WAITING}


@dataclass
class CandidateRow:
    """One line of the Runs page: a registered candidate and the run that made it."""

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
    found = RunFolder.find(run_root, pipeline_run)
    return found.path if found else None


def _dataset_version(run_root: Path, pipeline_run: str) -> str:
    found = RunFolder.find(run_root, pipeline_run)
    return (found.dataset_version() or "") if found else ""


# The signed decisions (registry tag `decision.<seq>.<action>`) behind each shown status; the
# approval step verifies them against the trust root before the run goes on.
_SIGNED_ACTIONS = {"approved": {"approve", "override", "auto_approve"}, "rejected": {"reject"}}


def list_runs(tracking_uri: str, model_names: list[str], run_root: Path) -> list[CandidateRow]:
    """Every registered candidate of `model_names`, runs waiting for a person first, then newest."""
    client = registry.connect(tracking_uri)
    runs = []
    for model_name in model_names:
        for mv in registry.list_versions(client, model_name):
            pipeline_run = mv.tags.get(registry.TAG_PIPELINE_RUN, "")
            status = mv.tags.get("approval.status", "pending")
            signed = {tag.rsplit(".", 1)[1] for tag, _ in registry.decision_tags(mv.tags)}
            if status in ("approved", "rejected") and not signed & _SIGNED_ACTIONS[status]:
                # a plain tag with no signed record behind it decides nothing: still waiting
                status = "pending"
            state = _STATES.get(status, status)
            if mv.tags.get(registry.TAG_SERVING_VERSION):
                state = DEPLOYED
            gate = mv.tags.get(registry.TAG_GATE_PASSED)
            runs.append(
                CandidateRow(
                    pipeline_run=pipeline_run,
                    model_name=model_name,
                    model_version=mv.version,
                    created=mv.creation_timestamp,
                    state=state,
                    gate_passed=None if gate is None else gate == "true",
                    dataset_version=_dataset_version(run_root, pipeline_run),
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
    # validate's leak report (split_manifest.json `leak_report`): what a random split would leak
    leak_report: dict[str, Any] | None = None


def _own_file(run: RunFolder | None, step: tuple[str, str], name: str) -> Path | None:
    """A file of `step` the console can link: one inside the run's own folder."""
    path = run.file(step, name) if run else None
    return path if path is not None and path.is_relative_to(run.path) else None


def _review_images(run: RunFolder | None) -> list[dict[str, Any]]:
    """The gate's review images, each `overlay` as a path relative to the run folder."""
    review = _own_file(run, GATE_DECISION, artifacts.REVIEW_FILE)
    if review is None:
        return []
    entries = json.loads(review.read_text())
    for entry in entries:
        if "overlay" in entry:
            entry["overlay"] = (review.parent / entry["overlay"]).relative_to(run.path).as_posix()
    return entries


def run_evidence(run_root: Path, pipeline_run: str) -> RunEvidence:
    """The gate decision, the evaluation, the plots (paths relative to the run folder), the test
    images the challenger gets wrong and those whose prediction changed, with their overlays."""
    run = RunFolder.find(run_root, pipeline_run)
    decision = run.gate_decision() if run else None
    metrics = run.metrics() if run else None
    plots = {}
    for name in artifacts.PLOTS:
        path = _own_file(run, EVALUATION, name)
        if path is not None:
            plots[name.removesuffix(".png")] = path.relative_to(run.path).as_posix()
    drift = run.drift_report_html() if run else None
    split_manifest = (run.json(SPLIT, artifacts.SPLIT_MANIFEST_JSON) if run else None) or {}
    reviewed = _review_images(run)
    overlays = {e["path"]: e["overlay"] for e in reviewed if "overlay" in e}
    wrong = []
    predictions = run.file(EVALUATION, artifacts.PREDICTIONS_FILE) if run else None
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
        drift_report=drift.relative_to(run.path).as_posix() if drift else None,
        changed_predictions=[e for e in reviewed if CHANGED in e["reasons"]],
        leak_report=split_manifest.get("leak_report"),
    )
