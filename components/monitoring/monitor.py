"""Monitoring checks: the recent window of served requests (or images) against the served
model's drift reference, and the reason a drift gives for retraining."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tumorflow.components.monitoring.drift_report import (
    DriftVerdict,
    drift_report,
    load_table,
    nothing_to_compare,
)
from tumorflow.core.artifacts import TRIGGER_FILE
from tumorflow.core.config import DicomConfig

logger = logging.getLogger(__name__)


def trigger_reason(verdict: DriftVerdict) -> str:
    return (
        f"drift detected: {len(verdict.drifted_columns)} of {len(verdict.columns)} feature columns "
        f"drifted (share {verdict.share_of_drifted_columns:.2f} >= "
        f"{verdict.drift_share_threshold:.2f}): {', '.join(verdict.drifted_columns)}; "
        f"report {verdict.html_path}"
    )


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
    dicom_config: DicomConfig | None = None,
) -> tuple[DriftVerdict, tuple[datetime, datetime]]:
    """Compare the last `window_hours` of `current_source` (a request log, a table or a folder of
    recent images, DICOM decoded with `dicom_config`) with `reference_source`; the report and
    verdict go to `output_dir`."""
    end = now or datetime.now(UTC)
    window = (end - timedelta(hours=window_hours), end)
    output_dir = Path(output_dir)
    reference = load_table(reference_source, model_dir=model_dir, dicom_config=dicom_config)
    current = load_table(
        current_source,
        window,
        model_dir=model_dir,
        projection=reference.attrs.get("projection"),
        model_name=model_name,
        dicom_config=dicom_config,
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


def write_trigger_record(
    verdict: DriftVerdict,
    window: tuple[datetime, datetime],
    current_source: str,
    reference_source: str,
    output_dir: Path,
) -> dict:
    """Write `trigger.json`, the one record of why a retraining was started (docs/artifacts.md
    "Trigger record"); return it."""
    record = {
        "reason": trigger_reason(verdict),
        "triggered_at": datetime.now(UTC).isoformat(timespec="seconds"),
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
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / TRIGGER_FILE).write_text(json.dumps(record, indent=2))
    return record
