"""Monitoring: check the recent window of served requests for drift and, past the configured
threshold, start the retraining pipeline, recording why in `trigger.json`."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tumorflow.components import storage
from tumorflow.components.drift import (
    DriftVerdict,
    drift_report,
    load_table,
    nothing_to_compare,
    served_reference,
)
from tumorflow.components.errors import ConfigError
from tumorflow.pipelines.config import PipelineConfig

logger = logging.getLogger(__name__)

TRIGGER_JSON = "trigger.json"
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


def _reason(verdict: DriftVerdict) -> str:
    return (
        f"drift detected: {len(verdict.drifted_columns)} of {len(verdict.columns)} feature columns "
        f"drifted (share {verdict.share_of_drifted_columns:.2f} >= "
        f"{verdict.drift_share_threshold:.2f}): {', '.join(verdict.drifted_columns)}; "
        f"report {verdict.html_path}"
    )


def resolve_served_reference(model_base_path: str, model_name: str) -> tuple[str, Path | None]:
    """The drift reference of the served (`stable`, else newest) version, and its local folder.

    The folder (None for a remote base path) lets the check add the model's embedding features.
    """
    served = served_reference(model_base_path, model_name)
    if served is None:
        raise ConfigError(
            f"no served version of {model_name!r} under {model_base_path}: "
            "pass --reference or deploy a model first"
        )
    if not storage.exists(served.reference_uri):
        raise ConfigError(
            f"served version {served.version} has no drift reference ({served.reference_uri}): "
            "pass --reference"
        )
    model_dir = None if storage.is_remote(served.version_uri) else Path(served.version_uri)
    return served.reference_uri, model_dir


def check_recent_drift(
    current_source: str,
    reference_source: str,
    output_dir: Path,
    *,
    drift_share: float,
    window_hours: float,
    model_name: str,
    model_dir: Path | None = None,
    now: datetime | None = None,
) -> tuple[DriftVerdict, tuple[datetime, datetime]]:
    """Compare the last `window_hours` of `current_source` (a request log, a table or a folder of
    recent images) with `reference_source`; the report and verdict go to `output_dir`."""
    end = now or datetime.now(UTC)
    window = (end - timedelta(hours=window_hours), end)
    output_dir = Path(output_dir)
    reference = load_table(reference_source, model_dir=model_dir)
    current = load_table(
        current_source,
        window,
        model_dir=model_dir,
        projection=reference.attrs.get("projection"),
        model_name=model_name,
    )
    if len(current) < 2:
        verdict = nothing_to_compare(
            output_dir,
            drift_share,
            f"{len(current)} current rows between {window[0].isoformat()} and "
            f"{window[1].isoformat()}: nothing to compare",
            current_rows=len(current),
        )
        logger.info(verdict.message)
        return verdict, window
    return drift_report(reference, current, output_dir, drift_share), window


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
    reason = _reason(verdict)
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
