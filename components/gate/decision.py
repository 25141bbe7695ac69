"""The evaluation gate step: absolute rules, champion/challenger on the same test images, CIs.

The decision is data (decision.json, the "blessing" that deploy consumes) plus a Markdown report
for the pipeline UI. This module orchestrates: the champion is found and re-scored by
`champion.py`, the rules are applied by `gate_rules.py` (pure), the report is `gate_report.py`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tumorflow.components.gate.report import markdown_report
from tumorflow.components.gate.rules import GateDecision, evaluate_gate
from tumorflow.core.artifacts import DECISION_FILE, GATE_REPORT_FILE
from tumorflow.core.config import GateConfig
from tumorflow.core.errors import GateError

log = logging.getLogger(__name__)

RELIABILITY_PLOT = "reliability.png"


def write_decision(decision: GateDecision, out_dir: Path) -> Path:
    """Write decision.json and report.md into `out_dir`; return the decision.json path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / DECISION_FILE
    path.write_text(json.dumps(decision.to_dict(), indent=2, default=_json_default))
    (out_dir / GATE_REPORT_FILE).write_text(markdown_report(decision))
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to decision.json")


@dataclass
class GateRunResult:
    """What the gate step produced: the decision, its report, and where they were written."""

    decision: GateDecision
    markdown: str
    decision_path: Path

    @property
    def passed(self) -> bool:
        return self.decision.passed

    def log_champion_classification(self, artifact: Any) -> None:
        """Log the champion's confusion matrix to a KFP ClassificationMetrics artifact."""
        matrix = self.decision.confusion_matrices.get("champion")
        if matrix:
            artifact.log_confusion_matrix(self.decision.classes, matrix)


def run_gate(
    evaluation_dir: Path,
    split_dir: Path,
    gate: GateConfig,
    *,
    tracking_uri: str | None,
    model_name: str,
    output_dir: Path,
    model_base_path: str | None = None,
    external_dir: Path | None = None,
) -> GateRunResult:
    """The gate step: find and re-score the champion, apply the rules, write the decision and
    the review images (changed between champion and challenger, or wrong; Grad-CAM overlays).

    With `model_base_path`, a version served there makes an unreadable registry (no tracking
    URI, or unreachable) a GateError instead of a gate with absolute rules only.
    `external_dir` holds the prepared external sets (components/data/external_sets.py) that
    `gate.external_sets` names: the champion is re-scored on them, evaluate scored the challenger.
    """
    from tumorflow.components.data.external_sets import external_splits
    from tumorflow.components.evaluation.evaluate import (
        METRICS_FILE,
        PREDICTIONS_FILE,
        evaluated_saved_model,
        plot_reliability,
        read_mistake_heatmaps,
    )
    from tumorflow.components.evaluation.metrics import read_predictions
    from tumorflow.components.gate.champion import score_champion
    from tumorflow.components.gate.review import write_review_images
    from tumorflow.components.gate.rules import ExternalScores
    from tumorflow.core.artifacts import EXTERNAL_DIR

    evaluation_dir = Path(evaluation_dir)
    metrics_path = evaluation_dir / METRICS_FILE
    if not metrics_path.exists():
        raise GateError(f"{evaluation_dir} has no {METRICS_FILE}; run the evaluate step first")
    metrics = json.loads(metrics_path.read_text())
    predictions = read_predictions(evaluation_dir / PREDICTIONS_FILE, list(metrics["classes"]))
    prepared = external_splits(external_dir)
    missing = [s.name for s in gate.external_sets if s.name not in prepared]
    if missing:
        raise GateError(
            f"gate.external_sets {missing} were not prepared (found: {sorted(prepared) or 'none'}); "
            "re-run the pipeline, whose external-sets step downloads and validates them"
        )
    prepared = {s.name: prepared[s.name] for s in gate.external_sets}
    external = {}
    for name in prepared:
        folder = evaluation_dir / EXTERNAL_DIR / name
        if not (folder / METRICS_FILE).exists():
            raise GateError(f"evaluate did not score external set {name!r}; re-run evaluate")
        external[name] = ExternalScores(
            json.loads((folder / METRICS_FILE).read_text()),
            read_predictions(folder / PREDICTIONS_FILE, list(metrics["classes"])),
        )
    found = score_champion(tracking_uri, model_name, model_base_path, split_dir, prepared)
    champion = found.evaluation
    decision = evaluate_gate(
        metrics, predictions, gate, champion, notes=found.notes, external=external
    )
    decision_path = write_decision(decision, output_dir)
    curves = {"challenger": (predictions.y_true, predictions.probs)}
    if champion is not None and champion.metrics:
        label = f"v{champion.version}" if champion.version else f"served {champion.serving_version}"
        curves[f"champion ({label})"] = (champion.predictions.y_true, champion.predictions.probs)
    plot_reliability(curves, Path(output_dir) / RELIABILITY_PLOT)
    write_review_images(
        evaluated_saved_model(evaluation_dir),
        split_dir,
        predictions,
        champion.predictions if champion is not None else None,
        output_dir,
        heatmaps=read_mistake_heatmaps(evaluation_dir),
    )
    for warning in decision.warnings:
        log.warning("%s", warning)
    log.info("gate %s (%d rules)", "passed" if decision.passed else "failed", len(decision.rules))
    return GateRunResult(decision, markdown_report(decision), decision_path)
