"""Where a version's release record comes from: the registry's tags, the run folder that made it,
the served version folder and the audit log. `tumorflow release` and the console call this."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tumorflow.components.release import audit_log, release_record
from tumorflow.core import artifacts, storage
from tumorflow.core.errors import ConfigError, TumorflowError
from tumorflow.pipelines import run_folder


def run_files(run_root: str | Path, pipeline_run: str | None) -> release_record.RunFiles:
    """The files of a run under `run_root` a release record reads (none when it is elsewhere)."""
    run = run_folder.RunFolder.find(run_root, pipeline_run or "")
    if run is None:
        return release_record.RunFiles()
    return release_record.RunFiles(
        dataset_version=run.dataset_version(),
        split_manifest=run.file(run_folder.SPLIT, artifacts.SPLIT_MANIFEST_JSON),
        model_info=run.file(run_folder.MODEL, artifacts.MODEL_INFO_FILE),
        metrics=run.file(run_folder.EVALUATION, artifacts.METRICS_FILE),
        decision=run.file(run_folder.GATE_DECISION, artifacts.DECISION_FILE),
        trigger=run.file(run_folder.DRIFT_CHECK_VERDICT, artifacts.TRIGGER_FILE),
        drift_verdict=run.file(run_folder.DRIFT_CHECK_VERDICT, artifacts.VERDICT_FILE),
    )


def load_trust(trust_uri: str) -> Any:
    """The trust root, or None when there is none (decisions are then checked by signature only)."""
    from tumorflow.components.release.trust_root import TrustRoot

    try:
        return TrustRoot.load(trust_uri)
    except ConfigError:
        return None


def release_record_of(
    tracking_uri: str,
    run_root: str | Path,
    model_name: str,
    version: str,
    *,
    audit_log_uri: str,
    trust: Any = None,
) -> dict[str, Any]:
    """The release record of one registered version, from everything this machine can read."""
    from tumorflow.components.release import registry

    client = registry.connect(tracking_uri)
    try:
        model_version = client.get_model_version(model_name, str(version))
    except Exception as exc:  # MLflow raises its own RestException / MlflowException
        raise TumorflowError(
            f"{model_name} has no version {version} in {tracking_uri}: {str(exc)[:200]}"
        ) from None
    tags = dict(model_version.tags)
    served = tags.get(registry.TAG_SERVING_PATH)
    served_folder = served if served and not storage.is_remote(served) else None
    return release_record.build(
        model_name,
        str(version),
        tags=tags,
        files=run_files(run_root, tags.get(registry.TAG_PIPELINE_RUN)),
        served_folder=served_folder if served_folder and Path(served_folder).is_dir() else None,
        audit_entries=audit_log.read(audit_log_uri) if storage.exists(audit_log_uri) else [],
        trust=trust,
    )
