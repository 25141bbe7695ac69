"""Monitoring: a drift check of the recent window that, past the configured threshold, starts the
retraining pipeline and records why in `trigger.json`."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tumorflow.components.drift import DriftVerdict
from tumorflow.components.monitor import TRIGGER_JSON, check_recent_drift, trigger_reason
from tumorflow.core.config import PipelineConfig

logger = logging.getLogger(__name__)

# Starts a retraining run of a config for a reason; returns what identifies the run.
Trigger = Callable[[PipelineConfig, str], Any]


@dataclass
class MonitorResult:
    """What one monitoring check found and whether it started a retraining run."""

    verdict: DriftVerdict
    window: tuple[datetime, datetime]
    triggered: bool
    reason: str | None = None
    trigger_path: Path | None = None
    run: Any = None


def local_trigger(config: PipelineConfig, reason: str) -> Any:
    """Retrain on this machine with kfp.local."""
    from tumorflow.pipelines.runner import run_local

    return run_local(config, trigger_reason=reason)


def cluster_trigger(host: str) -> Trigger:
    """Retrain by submitting the compiled pipeline to the Kubeflow Pipelines endpoint `host`."""

    def submit_run(config: PipelineConfig, reason: str) -> Any:
        from tumorflow.pipelines.runner import submit

        return submit(config, host, trigger_reason=reason)

    return submit_run


def check_and_trigger(
    config: PipelineConfig,
    current_source: str,
    reference_source: str,
    output_dir: Path,
    trigger: Trigger | None = None,
    *,
    model_dir: Path | None = None,
    now: datetime | None = None,
) -> MonitorResult:
    """Check the recent window for drift (`check_recent_drift`); on drift, call
    `trigger(config, reason)` (default: a local kfp.local run) after writing the reason to
    `output_dir/trigger.json`."""
    output_dir = Path(output_dir)
    verdict, window = check_recent_drift(
        current_source,
        reference_source,
        output_dir,
        drift_share=config.drift.drift_share,
        window_hours=config.drift.window_hours,
        model_name=config.deploy.model_name,
        model_dir=model_dir,
        now=now,
    )
    if not verdict.drift_detected:
        return MonitorResult(verdict=verdict, window=window, triggered=False)
    reason = trigger_reason(verdict)
    trigger_path = output_dir / TRIGGER_JSON
    record = {
        "reason": reason,
        "triggered_at": datetime.now(UTC).isoformat(),
        "window": [window[0].isoformat(), window[1].isoformat()],
        "current_source": str(current_source),
        "reference_source": str(reference_source),
        "share_of_drifted_columns": verdict.share_of_drifted_columns,
        "drift_share_threshold": verdict.drift_share_threshold,
        "drifted_columns": verdict.drifted_columns,
        "current_rows": verdict.current_rows,
        "report_html": verdict.html_path,
        "report_json": verdict.json_path,
        "verdict": verdict.verdict_path,
    }
    trigger_path.write_text(json.dumps(record, indent=2))
    logger.warning("%s: starting a retraining run", reason)
    run = (trigger or local_trigger)(config, reason)
    record["run"] = run if isinstance(run, str | int | float | dict | list) else str(run)
    trigger_path.write_text(json.dumps(record, indent=2, default=str))
    return MonitorResult(
        verdict=verdict,
        window=window,
        triggered=True,
        reason=reason,
        trigger_path=trigger_path,
        run=run,
    )
